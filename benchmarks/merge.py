"""Streaming merge on a synthetic sharded checkpoint of >= 2 GB.

    python benchmarks/merge.py [--workdir /tmp/tnlora-merge-bench] [--layers 10] [--shard 500MB]

Builds a random Llama-shaped model (hidden 2048, SmolLM2's tokenizer) saved in shards,
a TRAC adapter on q_proj/v_proj with random (non-zero) cores as a run directory, then runs
`tnlora merge --no-verify` in a child process and prints:
- peak RSS of the merge divided by the largest input shard;
- merge time divided by the time to copy the same checkpoint files.
Verification (which loads the adapter model and the merged model one after the other) is
timed separately with `--verify`.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch
import yaml


def build(workdir: Path, layers: int, shard: str) -> tuple[Path, Path]:
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from tnlora_cli.model.build import adapter_metadata, prepare
    from tnlora_cli.model.embedded import smollm2_path
    from tnlora_cli.model.state import adapter_state_dict
    from tnlora_cli.recipe.load import validate_recipe
    from tnlora_cli.run.checkpoint import save_adapter

    base = workdir / "base"
    if not (base / "model.safetensors.index.json").is_file():
        tokenizer = AutoTokenizer.from_pretrained(smollm2_path())
        config = LlamaConfig(
            vocab_size=len(tokenizer), hidden_size=2048, intermediate_size=5504, num_hidden_layers=layers,
            num_attention_heads=16, num_key_value_heads=16, tie_word_embeddings=False, dtype="float32",
        )
        torch.manual_seed(0)
        model = LlamaForCausalLM(config)
        model.save_pretrained(base, max_shard_size=shard)
        tokenizer.save_pretrained(base)
        del model
    data = workdir / "data.jsonl"
    data.write_text("".join(json.dumps({"text": f"sample {i} " * 20}) + "\n" for i in range(40)))
    run = workdir / "run"
    if not (run / "adapter").is_dir():
        raw = {
            "model": str(base), "task": "causal-lm", "output_dir": str(run),
            "adapter": {"type": "trac", "target_modules": ["q_proj", "v_proj"], "r": 16},
            "data": {"train": str(data), "max_length": 32},
        }
        prepared = prepare(validate_recipe(raw))
        with torch.no_grad():
            for p in prepared.model.parameters():
                if p.requires_grad:
                    p.normal_(std=0.05)
        (run / "adapter").mkdir(parents=True)
        (run / "recipe.yaml").write_text(yaml.safe_dump(raw))
        save_adapter(run / "adapter", adapter_state_dict(prepared.model, []), adapter_metadata(prepared))
    return base, run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default="/tmp/tnlora-merge-bench")
    parser.add_argument("--layers", type=int, default=10)
    parser.add_argument("--shard", default="500MB")
    parser.add_argument("--verify", action="store_true", help="also time a verified merge")
    args = parser.parse_args()
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    base, run = build(workdir, args.layers, args.shard)
    shards = sorted(base.glob("model-*.safetensors"))
    total = sum(p.stat().st_size for p in shards)
    largest = max(p.stat().st_size for p in shards)
    print(f"checkpoint: {len(shards)} shards, {total / 2**30:.2f} GiB, largest shard {largest / 2**20:.0f} MiB")

    copy_dir = workdir / "copy"
    shutil.rmtree(copy_dir, ignore_errors=True)
    start = time.perf_counter()
    shutil.copytree(base, copy_dir)
    os.sync()
    copy_s = time.perf_counter() - start
    shutil.rmtree(copy_dir)

    def merge(extra: list[str]) -> tuple[float, int]:
        """Wall time and peak RSS of a `tnlora merge` child, sampled every 10 ms (the
        child's ru_maxrss would include this process's RSS at fork)."""
        import psutil

        out = workdir / "merged"
        shutil.rmtree(out, ignore_errors=True)
        start = time.perf_counter()
        proc = subprocess.Popen([sys.executable, "-m", "tnlora_cli", "merge", str(run), "--out", str(out), "--max-shard-size", args.shard, *extra])
        child, peak = psutil.Process(proc.pid), 0
        while proc.poll() is None:
            try:
                peak = max(peak, child.memory_info().rss)
            except psutil.NoSuchProcess:
                break
            time.sleep(0.01)
        if proc.returncode:
            sys.exit(f"merge failed ({proc.returncode})")
        os.sync()
        return time.perf_counter() - start, peak

    merge_s, peak = merge(["--no-verify"])
    print(f"merge (streaming, --no-verify): {merge_s:.1f} s; copying the same files: {copy_s:.1f} s; ratio {merge_s / copy_s:.2f}")
    print(f"peak RSS of the merge: {peak / 2**20:.0f} MiB = {peak / largest:.2f} x the largest shard ({peak / total:.2f} x the checkpoint)")
    if args.verify:
        verified_s, verified_peak = merge(["--force"])
        print(f"merge with verification: {verified_s:.1f} s, peak RSS {verified_peak / 2**20:.0f} MiB (loads the adapter model, then the merged model)")


if __name__ == "__main__":
    main()
