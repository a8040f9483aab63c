"""What the divergence guard costs per optimizer step: tnlora's real training step with the
guard on and off, interleaved, with gradient clipping off and on.

    python benchmarks/guard_overhead.py                      # quickstart recipe (MiniLM), CPU
    python benchmarks/guard_overhead.py --steps 20 --rounds 6 --set training.batch_size=32

The guard's gradient check reads the total gradient norm the engine computes once per step
(`Engine.gradient_norm`, which clipping uses too) and synchronises with the host once per
step. "on" is the step as `tnlora train` runs it. "off" skips the guard's loss bookkeeping and
check, and, with clipping off, the gradient norm itself (nothing else needs it then). "walk"
is the check tnlora made before: every trainable gradient tested for finiteness in turn, with
its own host synchronisation. Blocks of `--steps` steps alternate between the modes (in a
rotating order) for `--rounds` rounds, so load on a shared machine affects every mode alike;
the table gives the median step time per mode and each mode's difference from "off". On a
loaded machine those differences are mostly noise, so the guard's own work in the "on" steps
(its loss bookkeeping, the gradient norm when only the guard needs it, and the check with its
host synchronisation) is also timed directly and given as a share of the median step.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parents[1]


class _NoGuard:
    """The guard's place in the loop, doing nothing but the optimizer step."""

    def add(self, loss, labels=None) -> None:
        pass

    def check(self, step, grad_norm, requests=()):
        return tuple(False for _ in requests)

    def optimizer_step(self, optimizer, step) -> None:
        optimizer.step()


class _WalkingGuard(_NoGuard):
    """The former check: each trainable gradient tested in turn, then one host sync."""

    def __init__(self, guard, model) -> None:
        self.guard, self.params = guard, [p for p in model.parameters() if p.requires_grad]

    def add(self, loss, labels=None) -> None:
        self.guard.add(loss, labels)

    def check(self, step, grad_norm, requests=()):
        import torch

        bad = torch.zeros((), dtype=torch.bool)
        for p in self.params:
            if p.grad is not None:
                bad |= ~torch.isfinite(p.grad).all()
        assert not bool(bad)
        return self.guard.check(step, None, requests)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default=str(ROOT / "recipes/quickstart.yaml"))
    parser.add_argument("--set", action="append", default=[], help="recipe override, as tnlora's --set")
    parser.add_argument("--steps", type=int, default=10, help="steps per block")
    parser.add_argument("--rounds", type=int, default=4, help="blocks per mode")
    parser.add_argument("--warmup", type=int, default=3)
    args = parser.parse_args()

    import torch

    from tnlora_cli.model.build import resolve_checked
    from tnlora_cli.recipe.load import load_recipe
    from tnlora_cli.report.reporter import Reporter
    from tnlora_cli.training.loop import _TrainingRun

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {'cuda' if torch.cuda.is_available() else 'cpu'}")
    rows = []
    for clip in (None, 1.0):
        with tempfile.TemporaryDirectory() as out:
            recipe = load_recipe(args.recipe, [*args.set, f"output_dir={out}", "training.max_steps=1000000", f"training.max_grad_norm={'null' if clip is None else clip}"])
            run = _TrainingRun.set_up(recipe, resolve_checked(recipe), None, False, Reporter())
            run.start()
            guard, gradient_norm = run.guard, run.engine.gradient_norm
            modes = {
                "on": (guard, gradient_norm),
                "off": (_NoGuard(), gradient_norm if clip is not None else (lambda: None)),
                "walk": (_WalkingGuard(guard, run.model), gradient_norm if clip is not None else (lambda: None)),
            }
            times: dict[str, list[float]] = {m: [] for m in modes}
            for _ in range(args.warmup):
                run.optimizer_step()
            order = list(modes)
            for r in range(args.rounds):
                for mode in order[r % len(order):] + order[: r % len(order)]:
                    run.guard, run.engine.gradient_norm = modes[mode]
                    for _ in range(args.steps):
                        if torch.cuda.is_available():
                            torch.cuda.synchronize()
                        start = time.perf_counter()
                        run.optimizer_step()
                        if torch.cuda.is_available():
                            torch.cuda.synchronize()
                        times[mode].append(time.perf_counter() - start)
            run.engine.gradient_norm = gradient_norm
            off = statistics.median(times["off"])
            own = _guard_work(run, guard, gradient_norm if clip is None else None, args.steps * args.rounds)
            for mode, values in times.items():
                median = statistics.median(values)
                share = f"{1000 * own:.3f} ms = {100 * own / statistics.median(times['on']):.3f}%" if mode == "on" else ""
                rows.append((f"{'off' if clip is None else 'on'}", mode, len(values), 1000 * median, 100 * (median - off) / off, share))
    print(f"recipe {args.recipe} {' '.join(args.set)}: {args.rounds} rounds x {args.steps} steps per mode, interleaved")
    print("| clipping | guard | steps | median step (ms) | vs guard off | guard's own work per step (median) |")
    print("| --- | --- | ---: | ---: | ---: | ---: |")
    for clip, mode, n, median, delta, share in rows:
        print(f"| {clip} | {mode} | {n} | {median:.1f} | {delta:+.2f}% | {share} |")


def _guard_work(run, guard, norm_for_guard_only, steps: int) -> float:
    """Median seconds per step of the guard's own calls, timed around each call in real
    steps: `add` per micro-batch, the gradient norm when only the guard needs it, `check`."""
    import torch

    spent = [0.0]

    def timed(fn):
        def wrapper(*a, **k):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            start = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                if torch.cuda.is_available():
                    torch.cuda.synchronize()
                spent[0] += time.perf_counter() - start

        return wrapper

    run.guard = SimpleNamespace(add=timed(guard.add), check=timed(guard.check), optimizer_step=guard.optimizer_step)
    if norm_for_guard_only is not None:
        run.engine.gradient_norm = timed(norm_for_guard_only)
    per_step = []
    for _ in range(steps):
        spent[0] = 0.0
        run.optimizer_step()
        per_step.append(spent[0])
    run.guard = guard
    if norm_for_guard_only is not None:
        run.engine.gradient_norm = norm_for_guard_only
    return statistics.median(per_step)


if __name__ == "__main__":
    main()
