"""`tnlora train`: lock the run directory, check the memory estimate, train, and keep or
restore what was there before (`--overwrite`, interruptions, crashes).

The loop itself is `training.loop.run_training`.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import DivergenceError, InterruptedRun
from .report.reporter import Reporter
from .run.layout import checkpoint_dirs
from .run.lock import (
    RunLock,
    clean_dead_leftovers,
    drop_previous_run,
    remove_stale_outputs,
    restore_previous_run,
    stage_previous_run,
)
from .training.interrupt import StoppedBySignal
from .training.launch import is_main_launch_process

if TYPE_CHECKING:
    from .recipe.sections import Recipe
    from .training.loop import TrainResult


def train(
    recipe: Recipe,
    *,
    resume: str | None = None,
    overwrite: bool = False,
    reporter: Reporter | None = None,
    stop_after: int | None = None,
    check_memory: bool = True,
) -> TrainResult:
    """Train the recipe's adapter; returns where it went and the final held-out metrics.

    The output_dir is locked for the whole run (see `run.lock`); `--overwrite` keeps the
    previous run until this one has published its adapter; `check_memory` compares the
    dry-run memory estimate (from the prepared data's lengths) with what the machine has
    before any weight is loaded.
    `stop_after` ends the run after that step as an interruption would.
    """
    # Imported here: `tnlora_cli/__init__` binds `train` to this function at import time (the
    # module shares its name), and `import tnlora_cli` must not import torch.
    from .model.build import resolve_checked
    from .training.loop import run_training

    reporter = reporter or Reporter()
    model_path = resolve_checked(recipe)  # resolved once; a certain error is said before an estimate
    run = functools.partial(run_training, recipe, model_path, resume=resume, overwrite=overwrite, reporter=reporter, stop_after=stop_after,
                            check_memory=check_memory)
    if not is_main_launch_process():  # the main process holds the lock and tidies up
        return run()
    out = Path(recipe.output_dir)
    with RunLock(out):
        for item in clean_dead_leftovers(out):
            reporter.status(f"removed {out / item}, left by an interrupted process")
        if resume is None and restore_previous_run(out):
            reporter.status(f"an --overwrite run in {out} ended before finishing: the previous run was put back")
        staged = overwrite and resume is None and stage_previous_run(out)
        if resume is None and not (out / "adapter").exists() and not checkpoint_dirs(out):
            remove_stale_outputs(out, reporter.status)
        try:
            result = run()
        except StoppedBySignal as stop:
            reporter.finish()
            raise InterruptedRun(
                f"training interrupted by {stop.signal_name} at step {stop.step}/{stop.max_steps}: saved checkpoint {stop.checkpoint} "
                "(adapter, optimizer, scheduler and random-number state); no final adapter was written",
                hint="run the same command with --resume auto to continue from that step",
            ) from None
        except KeyboardInterrupt:  # a second signal, or one before training steps began
            reporter.finish()
            clean_dead_leftovers(out)
            found = checkpoint_dirs(out)
            saved = f"the newest checkpoint is {found[-1]}" if found else "no checkpoint had been saved"
            raise InterruptedRun(
                f"training interrupted: {saved}; no final adapter was written",
                hint="run the same command with --resume auto to continue" if found else "run the same command again (with --overwrite) to start over",
            ) from None
        except DivergenceError as exc:
            clean_dead_leftovers(out)
            if not staged or not restore_previous_run(out):
                raise
            # This run's checkpoints went with it: name what is there now, the previous run.
            raise DivergenceError(
                f"{exc.summary}; no adapter was published, and the previous run in {out} was put back as it was",
                hint="lower training.learning_rate (or set training.max_grad_norm), then start again with --overwrite",
            ) from None
        except BaseException:
            clean_dead_leftovers(out)  # a half-written checkpoint of this run (disk full, crash)
            if staged:
                restore_previous_run(out)
            raise
        if result.completed and (out / "adapter").exists():
            drop_previous_run(out)
        return result
