"""One training process per run directory, and no leftovers of a dead one.

The lock is an `flock` on `output_dir/.tnlora.lock`: the kernel releases it when the process
ends, however it ends, so a killed run never blocks the next and a live one is never
joined by a second. While holding it, whatever a dead process left (temporary directories
of an unfinished publish, a half-pruned checkpoint, an unfinished `--overwrite`) can be
cleaned up safely: nobody else is writing there.

`--overwrite` moves the previous run aside into `.previous-run/` and restores it if the new
run fails; it is deleted only once the new run has published its adapter.
"""

from __future__ import annotations

import fcntl
import os
import shutil
from collections.abc import Callable
from pathlib import Path

from ..errors import RunInUseError
from .atomic import remove_path, write_text

LOCK_NAME = ".tnlora.lock"
PREVIOUS = ".previous-run"
#: Everything a training run writes at the top of its output_dir.
RUN_FILES = ("adapter", "checkpoints", "metrics.jsonl", "loss.png", "eval.json", "recipe.yaml", "tensorboard", "trackers.json", "generations.jsonl")


class RunLock:
    """Exclusive, non-blocking lock on a run directory (released by the OS on death)."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = Path(run_dir)
        self._fd: int | None = None
        self._created = False

    def acquire(self) -> RunLock:
        self._created = not self.run_dir.exists()
        self.run_dir.mkdir(parents=True, exist_ok=True)
        path = self.run_dir / LOCK_NAME
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise RunInUseError(
                f"output_dir: {self.run_dir} is in use by another tnlora process (pid {holder})",
                hint="wait for that run to finish, or choose another output_dir (--set output_dir=...)",
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            if self._created and [p.name for p in self.run_dir.iterdir()] == [LOCK_NAME]:
                # A run refused before writing anything leaves no directory behind.
                (self.run_dir / LOCK_NAME).unlink()
                self.run_dir.rmdir()
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def clean_dead_leftovers(run_dir: Path) -> list[str]:
    """Remove what an interrupted process left in a run directory we hold the lock of:
    hidden temporary directories and files (`.adapter.tmp-*`, `.step-*.tmp`, `.*.old-*`,
    `.*.tmp`) and checkpoints being pruned. Returns what was removed, for a warning."""
    removed = []
    for folder in (run_dir, run_dir / "checkpoints"):
        if not folder.is_dir():
            continue
        for item in folder.iterdir():
            name = item.name
            if name.startswith(".") and (".tmp" in name or ".old-" in name or name.endswith(".deleting")):
                remove_path(item)
                removed.append(str(item.relative_to(run_dir)))
    return removed


def stage_previous_run(run_dir: Path) -> bool:
    """`--overwrite`: move the previous run's files into `.previous-run/` (kept until the
    new run succeeds). Returns whether there was anything to move."""
    present = [name for name in RUN_FILES if (run_dir / name).exists()]
    if not present:
        return False
    aside = run_dir / PREVIOUS
    if aside.exists():  # an older unfinished overwrite: its files are the ones to keep
        for name in present:
            remove_path(run_dir / name)
        return True
    aside.mkdir()
    for name in present:
        os.replace(run_dir / name, aside / name)
    return True


def restore_previous_run(run_dir: Path) -> bool:
    """Put the previous run back after a failed (or killed) `--overwrite` run."""
    aside = run_dir / PREVIOUS
    if not aside.is_dir():
        return False
    for name in RUN_FILES:
        if (aside / name).exists() or (run_dir / name).exists():
            remove_path(run_dir / name)
        if (aside / name).exists():
            os.replace(aside / name, run_dir / name)
    shutil.rmtree(aside, ignore_errors=True)
    return True


def drop_previous_run(run_dir: Path) -> None:
    """The new run succeeded: the previous one may go."""
    shutil.rmtree(run_dir / PREVIOUS, ignore_errors=True)


def trim_metrics(metrics_file: Path, last_step: int) -> int:
    """Keep only records up to `last_step` (those after the checkpoint are recomputed by the
    resumed run, so each step is recorded once). Returns how many records were dropped."""
    if not metrics_file.is_file():
        return 0
    kept, dropped = [], 0
    import json

    for line in metrics_file.read_text().splitlines():
        try:
            step = json.loads(line).get("step", 0)
        except (ValueError, AttributeError):
            dropped += 1
            continue
        if isinstance(step, int) and step <= last_step:
            kept.append(line)
        else:
            dropped += 1
    if dropped:
        write_text(metrics_file, "".join(line + "\n" for line in kept))
    return dropped


def remove_stale_outputs(run_dir: Path, warn: Callable[[str], None]) -> None:
    """A fresh run in a directory holding no adapter and no checkpoint: files of a run that
    died before its first checkpoint (metrics, plot) would mix into the new run's."""
    stale = [name for name in ("metrics.jsonl", "loss.png", "eval.json", "tensorboard", "trackers.json") if (run_dir / name).exists()]
    if stale:
        for name in stale:
            remove_path(run_dir / name)
        warn(f"removed {', '.join(stale)} of an earlier run in {run_dir} that ended before its first checkpoint")
