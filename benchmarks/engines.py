"""Per-process memory and throughput of the training engines, in the same run.

    python benchmarks/engines.py [--model smollm2-135m] [--processes 2] [--steps 10] [--adapter trac]
                                 [--workdir /tmp/tnlora-engines]

Trains a causal LM (default SmolLM2-135M, embedded; any local Llama-style directory) on Shakespeare with the chosen adapter under DDP, FSDP2,
DeepSpeed ZeRO-2 and ZeRO-3 (`accelerate launch`, one process per GPU, or gloo processes on
CPU) and prints, per engine, each rank's peak memory (GPU: max allocated; CPU: peak RSS) and
tokens/s, as ratios to DDP. Also checks that every engine ends with the same adapter as DDP.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
ENGINES = {
    "ddp": ["--multi_gpu"],
    "fsdp": ["--multi_gpu"],
    "deepspeed-zero2": ["--multi_gpu"],
    "deepspeed-zero3": ["--use_deepspeed", "--deepspeed_config_file", "{zero3}", "--zero3_init_flag", "true"],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m", help="embedded alias or a local model directory (q_proj/v_proj layers)")
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--adapter", default="trac")
    parser.add_argument("--workdir", default="/tmp/tnlora-engines")
    args = parser.parse_args()
    work = Path(args.workdir)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    zero3 = work / "zero3.json"
    zero3.write_text(json.dumps({"zero_optimization": {"stage": 3}, "train_micro_batch_size_per_gpu": "auto",
                                 "gradient_accumulation_steps": "auto", "gradient_clipping": "auto"}))
    accelerate = shutil.which("accelerate", path=os.path.dirname(sys.executable)) or "accelerate"
    results = {}
    for engine, flags in ENGINES.items():
        raw = {
            "model": args.model, "task": "causal-lm",
            "adapter": {"type": args.adapter, "target_modules": ["q_proj", "v_proj"]},
            "data": {"train": "shakespeare", "max_length": 128, "max_eval_samples": 16},
            "training": {"max_steps": args.steps, "batch_size": 4, "learning_rate": 1e-3, "log_every": args.steps,
                         "distributed": "auto" if engine == "deepspeed-zero3" else engine},
            "output_dir": str(work / engine),
        }
        recipe = work / f"{engine}.yaml"
        recipe.write_text(yaml.safe_dump(raw))
        cmd = [accelerate, "launch", *[f.format(zero3=zero3) for f in flags], "--num_processes", str(args.processes),
               "--num_machines", "1", "--dynamo_backend", "no", "--main_process_port", "29581",
               "-m", "tnlora_cli", "train", str(recipe)]
        env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), "HF_HUB_OFFLINE": "1"}
        result = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if result.returncode != 0:
            print(f"{engine}: failed\n{result.stderr[-2000:]}")
            continue
        records = [json.loads(line) for line in (work / engine / "metrics.jsonl").read_text().splitlines()]
        results[engine] = {
            "tokens_per_s": [r for r in records if "tokens_per_s" in r][-1]["tokens_per_s"],
            "peak_mib": records[-1]["peak_memory_mib_per_rank"],
            "checksum": records[-1]["adapter_checksum_per_rank"][0],
        }
    base = results.get("ddp")
    print(f"{args.adapter} on {args.model}, {args.processes} processes, {args.steps} steps of 4 x 128 tokens per process")
    print(f"{'engine':<18}{'tok/s':>9}{'x ddp':>7}  {'peak MiB per rank':<26}{'x ddp (max)':>12}  same adapter as ddp")
    for engine, r in results.items():
        peaks = r["peak_mib"]
        speed = r["tokens_per_s"] / base["tokens_per_s"] if base else float("nan")
        memory = max(peaks) / max(base["peak_mib"]) if base else float("nan")
        same = abs(r["checksum"] - base["checksum"]) <= 1e-6 * abs(base["checksum"]) if base else None
        print(f"{engine:<18}{r['tokens_per_s']:>9.0f}{speed:>7.2f}  {', '.join(f'{p:.0f}' for p in peaks):<26}{memory:>12.2f}  {same}")


if __name__ == "__main__":
    main()
