#!/usr/bin/env bash
# Set up (scripts/setup.sh) and fine-tune MiniLM on chatterbot topics with LoRA.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec .venv/bin/tnlora train recipes/quickstart.yaml --overwrite "$@"
