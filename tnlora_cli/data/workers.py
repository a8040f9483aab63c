"""How many processes tokenize a file: `data.num_proc` as given; by default the calling process
alone. Worker processes are forked from a process that already runs threads (pyarrow's jemalloc
background thread, torch's pools), and a forked child can then wait forever on a lock that a
thread held at the fork: seen in the test suite, so more processes are the user's choice, never
the default (and on 2 shared cores they measured no faster: docs/benchmarks.md)."""

from __future__ import annotations


def worker_count(num_proc: int | None, rows: int) -> int | None:
    """Processes for `rows` rows: the recipe's `data.num_proc` (at most one per row); None
    means the calling process itself (the default)."""
    if num_proc is None or num_proc <= 1 or rows < 2:
        return None
    return min(num_proc, rows)
