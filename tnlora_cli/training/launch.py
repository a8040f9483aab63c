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
