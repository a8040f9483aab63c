"""Method comparison: every adapter at two budgets, learning-rate sweeps, seeds, one JSON per cell.

    python benchmarks/quality.py list                       # tasks, experiments, counts, done/total
    python benchmarks/quality.py run [--task T] [--only GLOB] [--stage sweep|seeds|all]
                                     [--jobs 2] [--threads 1] [--budget MINUTES]
    python benchmarks/quality.py rerun TASK EXPERIMENT LR SEED [--rtol 1e-4]   # same numbers on the same machine?
    python benchmarks/quality.py ranks                      # inspect-rank PNG of each best cell
    python benchmarks/quality.py report                     # docs/results.md and its plots

A task is a recipe (`benchmarks/quality/tasks/TASK.yaml`) with its target modules; an
experiment (`benchmarks/quality/experiments/TASK/NAME.yaml`) adds adapter settings, the
learning rates to sweep and optional training overrides. A cell is (task, experiment,
learning rate, seed); its result is `benchmarks/quality/results/TASK/NAME/lr=LR,seed=S.json`.

Protocol: the `sweep` stage runs every learning rate at seed 0, and one more rate beyond the
end of the grid when the best one sits at an end (at most twice); a task with `refine` then adds
the geometric midpoints between the best rate and its neighbours. The `seeds` stage runs seeds
1 and 2 at each experiment's best rate (task metric, then held-out loss). Finished cells are skipped, so an
interrupted run continues where it stopped. Each cell is its own process with a fixed thread
count, so its peak memory is its own and its numbers repeat on the same machine. Do not edit
tnlora_cli/ while a run is going: a cell imports some modules only when it reaches them, and a
cell that mixes two versions fails (its result is not written; the next run repeats it).
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import math
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
HERE = ROOT / "benchmarks" / "quality"
RESULTS = HERE / "results"
RUNS = ROOT / "runs" / "quality"
FIGURES = ROOT / "docs" / "results"
SEEDS = (0, 1, 2)


@dataclass(frozen=True)
class Task:
    name: str
    metric: str  # the task metric the sweep maximises
    metrics: tuple[str, ...]  # everything reported
    generate: bool = False  # scored through `tnlora eval --generate`
    forgetting: bool = False  # held-out Shakespeare loss, tuned minus base
    stopped: str = ""  # why the task was not run to the end (said in the report)
    refine: bool = False  # the sweep adds the midpoints beside its best rate (a finer grid where it matters)
    jobs: int = 2  # cells that ran at a time when the results were made (said in the report)


TASKS = {
    # refine: the 3x grid left LoRA's optimum between two points (see minilm_recipes), so this task
    # also runs the midpoints beside every experiment's best rate.
    "minilm_topics": Task("minilm_topics", "accuracy", ("accuracy", "macro_f1", "loss"), refine=True),
    # The quickstart's own regime (200 steps): the learning rate recipes/quickstart.yaml ships.
    "minilm_recipes": Task("minilm_recipes", "accuracy", ("accuracy", "macro_f1", "loss")),
    "smollm2_arithmetic": Task("smollm2_arithmetic", "exact_match", ("exact_match", "answer_accuracy", "loss"), generate=True, forgetting=True,
                               stopped="Stopped after the LoRA sweep: 1-4% exact match at every rate (the tuned model mostly answers "
                               "\"10\"), too hard at 60 steps on CPU to separate adapters. Kept as a negative result; "
                               "`smollm2_topics` is the generation task."),
    "smollm2_topics": Task("smollm2_topics", "exact_match", ("exact_match", "chrf", "loss"), generate=True, forgetting=True),
    # TensorGuide's image setup (Table 1): random ResNet-18, trained 1-channel stem, adapters on the classifier.
    "mnist_resnet18": Task("mnist_resnet18", "accuracy", ("accuracy", "macro_f1", "loss"), jobs=1),
}


@dataclass(frozen=True)
class Cell:
    task: str
    experiment: str
    lr: float
    seed: int

    @property
    def result_path(self) -> Path:
        return RESULTS / self.task / self.experiment / f"lr={self.lr:g},seed={self.seed}.json"

    @property
    def run_dir(self) -> Path:
        return RUNS / self.task / self.experiment / f"lr={self.lr:g},seed={self.seed}"

    def __str__(self) -> str:
        return f"{self.task}/{self.experiment} lr={self.lr:g} seed={self.seed}"


def experiments(task: str) -> dict[str, dict[str, Any]]:
    folder = HERE / "experiments" / task
    return {p.stem: yaml.safe_load(p.read_text()) for p in sorted(folder.glob("*.yaml"))}


def cell_recipe(cell: Cell, run_dir: Path | None = None) -> dict[str, Any]:
    """The task recipe with the experiment's adapter settings, overrides, rate and seed."""
    raw = yaml.safe_load((HERE / "tasks" / f"{cell.task}.yaml").read_text())
    exp = experiments(cell.task)[cell.experiment]
    kept = {k: raw["adapter"][k] for k in ("target_modules", "modules_to_save") if k in raw["adapter"]}  # the task's, for every experiment
    raw["adapter"] = {**kept, **exp["adapter"]}
    raw["training"] = {**raw["training"], **exp.get("training", {}), "learning_rate": cell.lr, "seed": cell.seed}
    raw["output_dir"] = str(run_dir or cell.run_dir)
    return raw


def load_results(task: str | None = None) -> list[dict[str, Any]]:
    paths = sorted(RESULTS.glob(f"{task or '*'}/*/*.json"))
    return [json.loads(p.read_text()) for p in paths]


# --------------------------------------------------------------------------- one cell


def run_cell(cell: Cell, threads: int, run_dir: Path | None = None) -> dict[str, Any]:
    """Train, score and measure one cell in this process (its run written to `run_dir`,
    default the cell's own); returns its result record."""
    import torch

    torch.set_num_threads(threads)
    os.environ.setdefault("TNLORA_PROGRESS", "plain")
    from tnlora_cli.recipe.load import validate_recipe
    from tnlora_cli.train import train

    task = TASKS[cell.task]
    run_dir = run_dir or cell.run_dir
    recipe = validate_recipe(cell_recipe(cell, run_dir), source=str(cell))
    start = time.perf_counter()
    result = train(recipe, overwrite=True, check_memory=False)
    wall = time.perf_counter() - start
    peak_rss_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # before scoring loads a second copy
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "seconds_per_step" in r]
    train_seconds = sum(r["seconds_per_step"] * (r["step"] - p["step"]) for p, r in zip([{"step": 0}] + steps, steps))
    metrics = dict(result.evaluation["tuned"])
    base = dict(result.evaluation["base"])
    if task.generate:
        from tnlora_cli.evaluate import evaluate_generation

        generated = evaluate_generation(run_dir)["metrics"]
        metrics.update({k: v for k, v in generated["tuned"].items() if k not in metrics})
        base.update({k: v for k, v in generated["base"].items() if k not in base})
    if task.forgetting:
        metrics["forgetting"], base["shakespeare_loss"] = _forgetting(run_dir)
    adapter_dir = run_dir / "adapter"
    record = {
        "task": cell.task,
        "experiment": cell.experiment,
        "learning_rate": cell.lr,
        "seed": cell.seed,
        "adapter": recipe.adapter.model_dump(mode="json"),
        "training": recipe.training.model_dump(mode="json", include={"max_steps", "batch_size", "gradient_accumulation_steps", "lr_scheduler", "warmup_steps"}),
        "metrics": metrics,
        "base_metrics": base,
        "n_eval": json.loads((run_dir / "eval.json").read_text())["n_examples"],
        "final_train_loss": result.final_loss,
        "parameters": _adapter_counts(run_dir),
        "adapter_file_bytes": sum(p.stat().st_size for p in adapter_dir.glob("*.safetensors")),
        "peak_rss_mib": round(peak_rss_mib, 1),
        "train_seconds": round(train_seconds, 2),
        "seconds_per_step": round(train_seconds / result.steps, 4),
        "cell_wall_seconds": round(wall, 1),
        "threads": threads,
        "environment": _environment(),
    }
    return record


def _adapter_counts(run_dir: Path) -> dict[str, int]:
    """Trainable and stored adapter parameters, and the modules trained in full (the task head,
    or the task's modules_to_save) apart: the adapter's counts do not include them."""
    from tnlora_cli.count import count_params
    from tnlora_cli.recipe.load import load_recipe

    counts = count_params(load_recipe(run_dir / "recipe.yaml")).to_json()
    total = counts["adapter_total"]
    return {"trainable": total["trainable"], "stored": total["stored"], "trained_in_full": counts.get("head", {}).get("trainable", 0)}


def _forgetting(run_dir: Path, chunks: int = 16, length: int = 128) -> tuple[float, float]:
    """Held-out loss on Shakespeare (the first `chunks` x `length` tokens of Hamlet): tuned
    minus base, and the base loss. A general-text loss the task never trained on."""
    from tnlora_cli.data.embedded import shakespeare_rows
    from tnlora_cli.evaluation.metrics import evaluate_examples
    from tnlora_cli.generation.generator import load_generator
    from tnlora_cli.model.inject import adapters_disabled

    gen = load_generator(run_dir, merge=False)
    text = next(r["text"] for r in shakespeare_rows() if r["title"] == "hamlet")
    ids = gen.tokenizer(text[20_000:200_000], add_special_tokens=False)["input_ids"][: chunks * length]
    examples = [{"input_ids": ids[i : i + length], "labels": ids[i : i + length]} for i in range(0, len(ids), length)]
    pad = gen.tokenizer.pad_token_id if gen.tokenizer.pad_token_id is not None else 0  # no padding: equal lengths
    tuned = evaluate_examples(gen.model, examples, "causal-lm", pad, chunks)["loss"]
    with adapters_disabled(gen.model):
        base = evaluate_examples(gen.model, examples, "causal-lm", pad, chunks)["loss"]
    return tuned - base, base


def _environment() -> dict[str, Any]:
    import torch
    import transformers

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("model name")), platform.processor())
    return {"tnlora_commit": commit, "torch": torch.__version__, "transformers": transformers.__version__, "python": platform.python_version(),
            "cpu": cpu, "cores": os.cpu_count(), "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None}


# --------------------------------------------------------------------------- protocol


def best_lr(results: list[dict[str, Any]], metric: str) -> float | None:
    """The seed-0 learning rate with the best task metric (then the lower held-out loss)."""
    sweep = [r for r in results if r["seed"] == 0]
    if not sweep:
        return None
    return max(sweep, key=lambda r: (r["metrics"][metric], -r["metrics"]["loss"]))["learning_rate"]


def _rate(lr: float) -> float:
    return float(f"{lr:.3g}")


def sweep_rates(task: str, name: str, exp: dict[str, Any]) -> tuple[list[float], list[float], bool]:
    """The sweep's seed-0 rates known so far: the grid, then one grid step beyond whichever end
    wins (at most twice); for a task with `refine`, the geometric midpoints between the best of
    those and its neighbours; and whether all of them are done."""
    grid = sorted(float(x) for x in exp["learning_rates"])
    factor = grid[1] / grid[0]
    seed0 = {r["learning_rate"]: r for r in load_results(task) if r["experiment"] == name and r["seed"] == 0}
    metric = TASKS[task].metric
    rates = list(grid)
    for extensions in range(3):
        if not all(lr in seed0 for lr in rates):
            return rates, [], False
        best = best_lr([seed0[lr] for lr in rates], metric)
        low, high = min(rates), max(rates)
        if extensions == 2 or best not in (low, high):
            break
        rates.append(_rate(low / factor) if best == low else _rate(high * factor))
    midpoints = []
    if TASKS[task].refine:
        ordered = sorted(rates)
        i = ordered.index(best)
        midpoints = [_rate(math.sqrt(best * ordered[j])) for j in (i - 1, i + 1) if 0 <= j < len(ordered)]
    return sorted(rates), midpoints, all(lr in seed0 for lr in midpoints)


def sweep_cells(task: str, name: str, exp: dict[str, Any]) -> list[Cell]:
    rates, midpoints, _ = sweep_rates(task, name, exp)
    return [Cell(task, name, lr, 0) for lr in rates + midpoints]


def seed_cells(task: str, name: str, exp: dict[str, Any]) -> list[Cell]:
    """Seeds 0-2 at the best rate of the sweep, once the sweep is complete."""
    rates, midpoints, complete = sweep_rates(task, name, exp)
    if not complete:
        return []
    sweep = [r for r in load_results(task) if r["experiment"] == name and r["seed"] == 0 and r["learning_rate"] in rates + midpoints]
    return [Cell(task, name, best_lr(sweep, TASKS[task].metric), s) for s in SEEDS]


def pending(args: argparse.Namespace) -> list[Cell]:
    cells: list[Cell] = []
    for task in [t for t in TASKS if not TASKS[t].stopped] if args.task is None else [args.task]:
        for name, exp in experiments(task).items():
            if args.only and not fnmatch.fnmatch(name, args.only):
                continue
            if args.stage in ("sweep", "all"):
                cells += sweep_cells(task, name, exp)
            if args.stage in ("seeds", "all"):
                cells += seed_cells(task, name, exp)
    unique = list(dict.fromkeys(cells))
    return [c for c in unique if not c.result_path.exists()]


def run(args: argparse.Namespace) -> None:
    """Run pending cells, `--jobs` at a time, each in its own process; repeat until the
    sweep extensions and seed cells they unlock are done too (or the budget is spent)."""
    deadline = time.monotonic() + args.budget * 60 if args.budget else math.inf
    running: dict[Cell, tuple[subprocess.Popen, Any]] = {}
    failed: set[Cell] = set()
    todo = pending(args)
    while True:
        finished = False
        for cell, (proc, log) in list(running.items()):
            if proc.poll() is not None:
                del running[cell]
                log.close()
                finished = True
                if proc.returncode != 0:
                    failed.add(cell)
                    print(f"FAILED {cell} (exit {proc.returncode}); log: {cell.run_dir}.log", flush=True)
                else:
                    r = json.loads(cell.result_path.read_text())
                    m = TASKS[cell.task].metric
                    print(f"done   {cell}: {m} {r['metrics'][m]:.4f}, loss {r['metrics']['loss']:.4f}, "
                          f"{r['seconds_per_step']:.2f} s/step, {r['cell_wall_seconds']:.0f} s", flush=True)
        if finished:  # a finished cell may unlock a sweep extension or the seeds
            todo = [c for c in pending(args) if c not in running and c not in failed]
        if not todo and not running:
            break
        while todo and len(running) < args.jobs and time.monotonic() < deadline:
            cell = todo.pop(0)
            cell.run_dir.parent.mkdir(parents=True, exist_ok=True)
            log = open(f"{cell.run_dir}.log", "w")
            cmd = [sys.executable, __file__, "cell", cell.task, cell.experiment, repr(cell.lr), str(cell.seed), "--threads", str(args.threads)]
            env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "TNLORA_PROGRESS": "plain"}
            running[cell] = (subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, env=env), log)
            print(f"start  {cell}", flush=True)
        if not running:
            break
        time.sleep(2)
    left = pending(args)
    print(f"{len(left)} cells pending" + (f", {len(failed)} failed" if failed else ""))


def _write_json(path: Path, data: dict[str, Any]) -> None:
    from tnlora_cli.run.atomic import write_json

    path.parent.mkdir(parents=True, exist_ok=True)
    write_json(path, data)


def cell_main(args: argparse.Namespace) -> None:
    cell = Cell(args.task, args.experiment, float(args.lr), int(args.seed))
    _write_json(cell.result_path, run_cell(cell, args.threads))


def rerun(args: argparse.Namespace) -> None:
    """Run a finished cell again (into a scratch run directory) and compare its numbers."""
    cell = Cell(args.task, args.experiment, float(args.lr), int(args.seed))
    stored = json.loads(cell.result_path.read_text())
    scratch = RUNS / "rerun"
    os.environ["OMP_NUM_THREADS"] = str(stored["threads"])  # as the cell ran (torch is not imported yet)
    os.environ.setdefault("TNLORA_PROGRESS", "plain")
    try:
        again = run_cell(cell, stored["threads"], scratch)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    rows = [(k, stored["metrics"][k], again["metrics"][k]) for k in stored["metrics"]]
    rows.append(("final_train_loss", stored["final_train_loss"], again["final_train_loss"]))
    lines, same = compare_rerun(rows, args.rtol)
    print("\n".join(lines))
    sys.exit(0 if same else 1)


#: Metrics that count examples (each prediction either changed or did not): compared exactly.
COUNTED = frozenset({"accuracy", "macro_f1", "exact_match", "answer_accuracy"})
#: Relative tolerance of every other number (losses, chrF, forgetting) in `rerun`: float32 sums
#: taken in another order (threads, BLAS path) move a loss's last digits without changing what
#: the model predicts; 1e-4 is far below any difference the report draws a conclusion from.
RERUN_RTOL = 1e-4


def compare_rerun(rows: list[tuple[str, float, float]], rtol: float = RERUN_RTOL) -> tuple[list[str], bool]:
    """One line per (name, stored, rerun) and whether the rerun repeats the cell: counted metrics
    equal, the rest within `rtol` relative to max(1, |value|)."""
    lines, same = [], True
    for name, a, b in rows:
        if a == b:
            verdict = "same"
        elif name not in COUNTED and abs(b - a) <= rtol * max(1.0, abs(a), abs(b)):
            verdict = f"within tolerance ({b - a:+.2e}, rtol {rtol:g})"
        else:
            verdict = f"differs by {b - a:+.2e}" + (" (counted: must be equal)" if name in COUNTED else f" (beyond rtol {rtol:g})")
            same = False
        lines.append(f"{name:18s} stored {a:.6f}  rerun {b:.6f}  {verdict}")
    return lines, same


def list_(args: argparse.Namespace) -> None:
    from tnlora_cli.count import count_params
    from tnlora_cli.recipe.load import validate_recipe

    for task in TASKS:
        for name, exp in experiments(task).items():
            cell = Cell(task, name, float(exp["learning_rates"][0]), 0)
            total = count_params(validate_recipe(cell_recipe(cell), source=name)).to_json()["adapter_total"]
            n = len(list((RESULTS / task / name).glob("*.json")))
            print(f"{task:20s} {name:18s} trainable {total['trainable']:>9,}  stored {total['stored']:>9,}  cells done {n}")


def ranks(args: argparse.Namespace) -> None:
    """`tnlora inspect-rank` of each experiment's best seed-0 run, one PNG per task."""
    from tnlora_cli.ranks import inspect_run
    from tnlora_cli.report.plots import plot_ranks

    for task in [t for t in TASKS if not TASKS[t].stopped and len(experiments(t)) > 1]:  # the report shows ranks beside a comparison
        reports, summary = [], {}
        for name in experiments(task):
            best = best_lr([r for r in load_results(task) if r["experiment"] == name], TASKS[task].metric)
            run_dir = Cell(task, name, best, 0).run_dir if best is not None else None
            if run_dir is not None and (run_dir / "adapter").exists():
                report = inspect_run(run_dir)
                report["label"] = f"{name} ({report['trainable_parameters']:,})"
                reports.append(report)
                linear = [layer for layer in report["layers"] if layer["rank"] is not None]
                summary[name] = {"mean_rank": statistics.fmean(x["rank"] for x in linear) if linear else None,
                                 "mean_effective_rank": statistics.fmean(x["effective_rank"] for x in linear) if linear else None,
                                 "mean_max_rank": statistics.fmean(x["max_rank"] for x in linear) if linear else None,
                                 "mean_rank_fraction": statistics.fmean(x["rank"] / x["max_rank"] for x in linear) if linear else None,
                                 "learning_rate": best}
        if reports:
            _write_json(RESULTS / task / "ranks.json", summary)
            plot_ranks(reports, FIGURES / f"ranks_{task}.png")
            print(f"wrote docs/results/ranks_{task}.png ({len(reports)} runs)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("run")
    p.add_argument("--task", choices=list(TASKS))
    p.add_argument("--only", help="experiment name glob, e.g. 'lora_*'")
    p.add_argument("--stage", choices=["sweep", "seeds", "all"], default="all")
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--budget", type=float, help="minutes after which no new cell starts")
    p.set_defaults(fn=run)
    for name, fn in (("cell", cell_main), ("rerun", rerun)):
        p = sub.add_parser(name)
        p.add_argument("task", choices=list(TASKS))
        p.add_argument("experiment")
        p.add_argument("lr")
        p.add_argument("seed")
        p.add_argument("--threads", type=int, default=1)
        if name == "rerun":
            p.add_argument("--rtol", type=float, default=RERUN_RTOL, help="relative tolerance of losses and other uncounted metrics")
        p.set_defaults(fn=fn)
    sub.add_parser("list").set_defaults(fn=list_)
    sub.add_parser("ranks").set_defaults(fn=ranks)
    p = sub.add_parser("report")
    p.set_defaults(fn=lambda a: __import__("quality_report").write_report())
    args = parser.parse_args()
    args.fn(args)


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).parent))
    main()
