"""The launch a process belongs to (rank, world size), read from the launcher's environment
before accelerate starts: what must be decided before an engine exists."""

from __future__ import annotations

import os


def is_main_launch_process() -> bool:
    """Rank 0 of a launch (or a plain single process), known before accelerate starts."""
    return int(os.environ.get("RANK", "0")) == 0


def launch_world_size() -> int:
    """Processes of the launch (1 for a plain process), known before accelerate starts."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def leave_launched_process() -> None:
    """End a rank of a multi-process launch now that its work is written: flush and exit
    without running any destructor.

    A rank whose peers had exited sometimes waited forever while the collective backend's
    objects were freed (first at interpreter exit, then, with the process group destroyed
    at the end of training, when the training run's objects went out of scope). Training
    keeps those objects alive (`loop.FINISHED_RUNS`) and the CLI leaves through here, so
    nothing is freed: the outputs are already written atomically and the launcher gets exit 0."""
    if launch_world_size() <= 1:
        return
    import sys

    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(0)
