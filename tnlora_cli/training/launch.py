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

    Freeing the last reference to a gloo process group deadlocked a rank now and then: its
    destructor joins the group's worker threads while holding the GIL, and a worker still
    dropping a finished collective's tensors waits for the GIL. Training keeps those objects
    alive (`loop.FINISHED_RUNS`) and the CLI leaves through here, so
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
