"""How many processes tokenize a file: `data.num_proc`, or by default the cores this process
may run on, fewer for small files (starting a worker and sending it the tokenizer costs about
as much as tokenizing a few thousand rows)."""

from __future__ import annotations

import os

#: A worker is started for at most every this many rows.
ROWS_PER_WORKER = 10_000


def available_cores() -> int:
    """The CPUs this process may run on (its affinity mask where the system has one)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def worker_count(num_proc: int | None, rows: int) -> int | None:
    """Processes for `rows` rows: the recipe's `data.num_proc` as given, else the available
    cores, at most one per ROWS_PER_WORKER rows. None means the calling process itself."""
    if num_proc is not None:
        return num_proc if num_proc > 1 else None
    n = min(available_cores(), rows // ROWS_PER_WORKER)
    return n if n > 1 else None
