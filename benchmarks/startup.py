"""Start-up time of the `tnlora` command: how long until help is shown or a bad recipe refused.

    python benchmarks/startup.py [--repeat 5]

Each case is a fresh process (`python -m tnlora_cli ...`); the median of `--repeat` runs is
printed beside the interpreter alone and `import torch`, the floor and the cost the checks avoid.
Target: a recipe error in under 2 s on an idle machine (recipes are checked before torch loads).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _time(argv: list[str], repeat: int, env: dict[str, str]) -> tuple[float, int]:
    """Median wall seconds of `argv` over `repeat` fresh processes, and its exit code."""
    times, code = [], 0
    for _ in range(repeat):
        start = time.perf_counter()
        code = subprocess.run(argv, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).returncode
        times.append(time.perf_counter() - start)
    return statistics.median(times), code


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5, help="fresh processes per case (median shown)")
    args = parser.parse_args()
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    with tempfile.TemporaryDirectory() as tmp:
        bad = Path(tmp) / "bad.yaml"
        bad.write_text((ROOT / "recipes" / "quickstart.yaml").read_text() + "\nepochz: 3\n")
        cli = [sys.executable, "-m", "tnlora_cli"]
        cases = [
            ("python -c pass (floor)", [sys.executable, "-c", "pass"]),
            ("import torch (avoided)", [sys.executable, "-c", "import torch"]),
            ("tnlora --help", cli + ["--help"]),
            ("tnlora train --help", cli + ["train", "--help"]),
            ("recipe error (unknown key)", cli + ["train", str(bad)]),
            ("adapter switched by --set", cli + ["train", "recipes/quickstart.yaml", "--set", "adapter.type=tera"]),
            ("option error (eval --batch-size 0)", cli + ["eval", "runs/none", "--batch-size", "0"]),
        ]
        load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
        print(f"start-up, median of {args.repeat} fresh processes (load average {load:.2f}, {os.cpu_count()} CPUs)")
        print(f"{'case':38s} {'seconds':>8s}  exit")
        for name, argv in cases:
            seconds, code = _time(argv, args.repeat, env)
            print(f"{name:38s} {seconds:8.2f}  {code}")


if __name__ == "__main__":
    main()
