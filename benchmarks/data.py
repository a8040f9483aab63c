"""Data preparation at scale: `tnlora prepare` against a plain batched `datasets.map`.

    python benchmarks/data.py [--rows 100000] [--rss-rows 1000000] [--workdir /tmp/tnlora-data-bench]

On a synthetic instruction file (benchmarks/make_instruction_data.py) and SmolLM2's chat
template, each measurement in its own child process with empty caches (HF datasets cache and
tnlora's data cache), printing the wall time of the work (after imports and loading the
tokenizer, which both do alike) and the child's peak RSS. At `--rows` rows, interleaved:
- baseline: load the JSON lines and one batched `map` that chat-templates every row and
  tokenizes the batch (no mask, no checks, no split, no cache);
- prepare (first): `prepare_data` of a recipe on the same file (load, check every row, mask
  the prompt from the rendered text, split, write the cache), `data.num_proc` left to its
  default (the available cores); target <= 1.2 x baseline;
- prepare (cached): the same again; target <= 3% of the first;
- prepare (first, num_proc 1): the speed-up of the default number of processes;
- at `--rss-rows` rows (0: skipped) the first prepare again: peak RSS flat (within 10%) from
  `--rows` to `--rss-rows` rows.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

BASELINE = """
ds = datasets.load_dataset("json", data_files=DATA, split="train")
def fn(batch):
    texts = [tok.apply_chat_template([{"role": "user", "content": p}, {"role": "assistant", "content": r}], tokenize=False)
             for p, r in zip(batch["prompt"], batch["response"])]
    return tok(texts, add_special_tokens=False)
out = ds.map(fn, batched=True, remove_columns=ds.column_names)
RESULT["examples"] = out.num_rows
"""

PREPARE = """
data = prepare_data(DataConfig(train=DATA, max_length=512, num_proc=NUM_PROC), "instruction", tok)
RESULT.update(examples=len(data.train) + len(data.eval), hit=data.report["cache"]["hit"], tokens=data.report["train_tokens"],
              truncated=data.report["truncated"])
"""

CHILD = """
import json, resource, sys, time
import datasets
from tnlora_cli.data.prepare import prepare_data
from tnlora_cli.model.embedded import smollm2_path
from tnlora_cli.model.loading import load_tokenizer
from tnlora_cli.recipe.sections import DataConfig
datasets.disable_progress_bars()
tok = load_tokenizer(str(smollm2_path()))
RESULT = {{}}
DATA = {data!r}
NUM_PROC = {num_proc!r}
t0 = time.perf_counter()  # imports and the tokenizer are loaded the same way in both: not timed
{body}
RESULT["seconds"] = time.perf_counter() - t0
RESULT["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
# What the resident set holds at the end: anonymous memory, and file pages (memory-mapped
# Arrow files, which the kernel can drop and re-read at will).
status = dict(line.split(":", 1) for line in open("/proc/self/status"))
RESULT["rss_anon_mib_end"] = int(status["RssAnon"].split()[0]) / 1024
RESULT["rss_file_mib_end"] = int(status["RssFile"].split()[0]) / 1024
print("RESULT " + json.dumps(RESULT))
"""


def run(body: str, data: Path, env: dict, num_proc: int | None = None) -> dict:
    code = CHILD.format(data=str(data), body=body, num_proc=num_proc)
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, cwd=ROOT)
    if proc.returncode != 0:
        raise SystemExit(proc.stderr[-3000:])
    line = next(line for line in proc.stdout.splitlines() if line.startswith("RESULT "))
    result = json.loads(line[len("RESULT "):])
    result["process_seconds"] = time.perf_counter() - t0
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--rss-rows", type=int, default=1_000_000, help="rows of the peak-RSS comparison (0: skip it)")
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "tnlora-data-bench")
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    files = {}
    for n in (args.rows, args.rss_rows):
        path = args.workdir / f"instructions-{n}.jsonl"
        if n and not path.is_file():
            subprocess.run([sys.executable, str(ROOT / "benchmarks/make_instruction_data.py"), str(path), "--rows", str(n)], check=True)
        files[n] = path

    def fresh_env(tag: str) -> dict:
        caches = args.workdir / f"cache-{tag}"
        shutil.rmtree(caches, ignore_errors=True)
        return {**os.environ, "PYTHONPATH": str(ROOT), "HF_DATASETS_CACHE": str(caches / "hf"), "TNLORA_DATA_CACHE": str(caches / "tnlora"),
                "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}

    data = files[args.rows]
    results = {}
    env = fresh_env("prepare")
    results["prepare (first)"] = run(PREPARE, data, env)
    results["baseline"] = run(BASELINE, data, fresh_env("baseline"))
    results["prepare (cached)"] = run(PREPARE, data, env)
    results["prepare (first, num_proc 1)"] = run(PREPARE, data, fresh_env("one"), num_proc=1)
    if args.rss_rows:
        results[f"prepare (first, {args.rss_rows:,} rows)"] = run(PREPARE, files[args.rss_rows], fresh_env("large"))
    for name, r in results.items():
        print(f"{name:32s} {r['seconds']:8.2f} s in-process  {r['process_seconds']:8.2f} s with start-up  peak RSS {r['peak_rss_mib']:7.0f} MiB  {r}")
    first, base, cached, one = (results[k] for k in list(results)[:4])
    print(f"first prepare / baseline map:      {first['seconds'] / base['seconds']:.2f}x   (target <= 1.2)")
    print(f"cached prepare / first prepare:    {cached['seconds'] / first['seconds']:.1%}   (target <= 3%)")
    print(f"num_proc 1 / default num_proc:     {one['seconds'] / first['seconds']:.2f}x   (speed-up of {os.cpu_count()} cores)")
    if args.rss_rows:
        large = results[f"prepare (first, {args.rss_rows:,} rows)"]
        print(f"peak RSS {args.rss_rows:,} / {args.rows:,} rows:  {large['peak_rss_mib'] / first['peak_rss_mib']:.2f}x  (target within 10%)")


if __name__ == "__main__":
    main()
