"""Data preparation at scale: `tnlora prepare` against a plain batched `datasets.map`.

    python benchmarks/data.py [--rows 100000] [--workdir /tmp/tnlora-data-bench]

On a synthetic instruction file (benchmarks/make_instruction_data.py) and SmolLM2's chat
template, each measurement in its own child process with empty caches (HF datasets cache and
tnlora's data cache), printing the wall time of the work (after imports and loading the
tokenizer, which both do alike) and the child's peak RSS:
- baseline: load the JSON lines and one batched `map` that chat-templates every row and
  tokenizes the batch (no mask, no checks, no split, no cache);
- prepare (first): `prepare_data` of a recipe on the same file (load, check every row, mask
  the prompt from the rendered text, split, write the cache); target <= 1.3 x baseline;
- prepare (cached): the same again; target <= 3% of the first;
- the first prepare on a quarter of the rows: peak RSS flat (within 10%) and <= 1 GiB.
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
data = prepare_data(DataConfig(train=DATA, max_length=512), "instruction", tok)
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


def run(body: str, data: Path, env: dict) -> dict:
    code = CHILD.format(data=str(data), body=body)
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
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "tnlora-data-bench")
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    files = {}
    for n in (args.rows // 4, args.rows):
        path = args.workdir / f"instructions-{n}.jsonl"
        if not path.is_file():
            subprocess.run([sys.executable, str(ROOT / "benchmarks/make_instruction_data.py"), str(path), "--rows", str(n)], check=True)
        files[n] = path

    def fresh_env(tag: str) -> dict:
        caches = args.workdir / f"cache-{tag}"
        shutil.rmtree(caches, ignore_errors=True)
        return {**os.environ, "PYTHONPATH": str(ROOT), "HF_DATASETS_CACHE": str(caches / "hf"), "TNLORA_DATA_CACHE": str(caches / "tnlora"),
                "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}

    big, small = files[args.rows], files[args.rows // 4]
    results = {"baseline": run(BASELINE, big, fresh_env("baseline"))}
    env = fresh_env("prepare")
    results["prepare (first)"] = run(PREPARE, big, env)
    results["prepare (cached)"] = run(PREPARE, big, env)
    results[f"prepare (first, {args.rows // 4:,} rows)"] = run(PREPARE, small, fresh_env("small"))
    for name, r in results.items():
        print(f"{name:32s} {r['seconds']:8.2f} s in-process  {r['process_seconds']:8.2f} s with start-up  peak RSS {r['peak_rss_mib']:7.0f} MiB  {r}")
    base, first, cached, quarter = (results[k] for k in results)
    print(f"first prepare / baseline map:      {first['seconds'] / base['seconds']:.2f}x   (target <= 1.3)")
    print(f"cached prepare / first prepare:    {cached['seconds'] / first['seconds']:.1%}   (target <= 3%)")
    print(f"peak RSS 100% / 25% rows:          {first['peak_rss_mib'] / quarter['peak_rss_mib']:.2f}x  (target within 10%)")
    print(f"peak RSS first prepare:            {first['peak_rss_mib'] / 1024:.2f} GiB (target <= 1 GiB)")


if __name__ == "__main__":
    main()
