#!/usr/bin/env bash
# Set up (scripts/setup.sh) and run the whole test suite offline.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
# One pytest worker per core, one torch thread per worker: the suite is many small models and
# launcher start-ups, which overlap better than they thread. TNLORA_TEST_WORKERS=0 runs serially.
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
exec .venv/bin/python -m pytest -q -p no:cacheprovider -n "${TNLORA_TEST_WORKERS:-auto}" "$@"
