#!/usr/bin/env bash
# Every GPU measurement tnlora needs, in one command, within about 8 minutes on one GPU:
#
#   bash benchmarks/gpu.sh [OUTPUT.md]        # default: gpu-results.md in the current directory
#
# 1. train_speed.py at Llama-2-7B layer shapes (2 random layers, bf16, batch 4 x 512):
#    tnlora train (lora, trac, tera) against HF Trainer + peft LoRA and a bare loop;
#    then tnlora's lora with and without training.compile at the same shapes;
# 2. step_time.py for every adapter at the same shapes against peft's LoRA;
# 3. generate.py (decoding speed against plain transformers) when the embedded SmolLM2 is installed;
# 4. the GPU-marked tests (when pytest is installed);
# 5. engines.py (DDP, FSDP2, ZeRO-2/3) when there are at least two GPUs (one GPU cannot hold
#    two NCCL ranks, and one process is what train_speed already measures).
# Installs nothing. Each part has its own time limit; a part that fails or runs out of time is
# reported in the output and the others still run. Without a GPU it says so and exits 0.
set -u
cd "$(dirname "$0")/.."
OUT="${1:-gpu-results.md}"
PY="${PYTHON:-python3}"

if ! "$PY" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
    echo "benchmarks/gpu.sh: no CUDA GPU visible to PyTorch ($PY); nothing to measure. Run it on a GPU machine."
    exit 0
fi

export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
GPUS=$("$PY" -c 'import torch; print(torch.cuda.device_count())')
TMP=$(mktemp -d /tmp/tnlora-gpu-XXXXXX)
trap 'rm -rf "$TMP"' EXIT
START=$(date +%s)

# part NAME SECONDS COMMAND...: run with a time limit, keep its stdout as the section body
part() {
    local name=$1 limit=$2
    shift 2
    echo "== $name (limit ${limit}s)" >&2
    local t0=$(date +%s)
    timeout --signal=INT --kill-after=20 "$limit" "$@" >"$TMP/$name.out" 2>"$TMP/$name.err"
    local rc=$?
    {
        echo "## $name"
        echo
        echo "\`$*\` (exit $rc, $(( $(date +%s) - t0 )) s)"
        echo
        if [ $rc -eq 0 ]; then cat "$TMP/$name.out"; else echo '```'; tail -n 15 "$TMP/$name.err"; echo '```'; fi
        echo
    } >>"$TMP/report.md"
    tail -n 3 "$TMP/$name.err" >&2
}

{
    echo "# tnlora GPU benchmarks"
    echo
    echo "$(date -u '+%Y-%m-%d %H:%M UTC'), $GPUS x $(nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null | head -n1),"
    echo "$("$PY" -c 'import torch, transformers; print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, transformers {transformers.__version__}")'),"
    echo "peft $("$PY" -c 'import peft; print(peft.__version__)' 2>/dev/null || echo 'not installed')"
    echo
} >"$TMP/report.md"

part train_speed 200 "$PY" benchmarks/train_speed.py --tasks llama-2-7b --layers 2 --batch 4 --seq 512 \
    --steps 10 --warmup 5 --adapters lora,trac,tera --markdown "$TMP/train_speed.md"
[ -s "$TMP/train_speed.md" ] && cp "$TMP/train_speed.md" "$TMP/train_speed.out"

part compile 100 "$PY" benchmarks/train_speed.py --tasks llama-2-7b --layers 2 --batch 4 --seq 512 \
    --steps 10 --warmup 5 --cases tnlora:lora,tnlora:lora+compile --markdown "$TMP/compile.md"
[ -s "$TMP/compile.md" ] && cp "$TMP/compile.md" "$TMP/compile.out"

part step_time 120 "$PY" benchmarks/step_time.py --model llama-2-7b --layers 2 --batch 4 --seq 512 --steps 5 --warmup 2

if "$PY" -c 'from tnlora_cli.model.embedded import smollm2_path; smollm2_path()' 2>/dev/null; then
    part generate 70 "$PY" benchmarks/generate.py --adapters lora,tensorguide-tanh,tera --prompts 8 --max-new-tokens 32 --batch-size 8
else
    echo "## generate" >>"$TMP/report.md"; echo >>"$TMP/report.md"
    echo "not run: the embedded SmolLM2-135M is not installed on this machine" >>"$TMP/report.md"; echo >>"$TMP/report.md"
fi

if "$PY" -c 'import pytest' 2>/dev/null; then
    part tests 60 "$PY" -m pytest -q -p no:cacheprovider tests -m gpu
else
    { echo "## tests"; echo; echo "not run: pytest is not installed"; echo; } >>"$TMP/report.md"
fi

if [ "$GPUS" -ge 2 ] && command -v accelerate >/dev/null; then
    part engines 120 "$PY" benchmarks/engines.py --processes "$GPUS" --steps 10
else
    { echo "## engines"; echo; echo "not run: $GPUS GPU(s); DDP/FSDP2/ZeRO need two processes, each on its own GPU"; echo; } >>"$TMP/report.md"
fi

echo "total: $(( $(date +%s) - START )) s" >>"$TMP/report.md"
cp "$TMP/report.md" "$OUT"
echo "benchmarks/gpu.sh: wrote $OUT ($(( $(date +%s) - START )) s)"
exit 0
