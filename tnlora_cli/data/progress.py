"""Progress of data preparation's long phases (reading, tokenizing, writing) through a `Reporter`.

The phases run inside `datasets` (its JSON/CSV builder, `Dataset.map` with its worker processes,
`save_to_disk`), which count rows on a progress bar of their own in the parent process. While a
phase runs, that bar is replaced by one that forwards its counts, with the rate in rows/s, to the
reporter: one home for the bars of every phase, worker processes included, and no pass over the
rows of our own. With a `datasets` that has no such bar the phases run without progress.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from typing import Any, Self

from ..report.reporter import Reporter

#: The `datasets` modules whose progress bars are forwarded (reading; map and saving).
_MODULES = ("datasets.builder", "datasets.arrow_dataset")
#: At most this many updates per second reach the reporter.
_UPDATES_PER_SECOND = 4
#: The rate is reported at least this often (seconds), besides every tenth of the rows.
RATE_EVERY_S = 30.0


class _ForwardingBar:
    """Stands in for `datasets`' tqdm bar: counts rows and tells the reporter."""

    def __init__(self, reporter: Reporter, description: str, on_update: Callable[[], Any] | None, iterable: Any = None,
                 total: int | None = None, initial: int = 0, **_: Any) -> None:
        self.reporter, self.description, self.iterable, self.on_update = reporter, description, iterable, on_update
        self.n, self.total = initial or 0, total if total is not None else (len(iterable) if hasattr(iterable, "__len__") else 0)
        self.first = self.rate_at = self.n
        self.t0 = self.last = self.last_rate = time.perf_counter()
        self.next_rate = self._tenth_after(self.n)
        reporter.start(int(self.total or 0), description, completed=self.n)

    def __iter__(self) -> Iterator[Any]:
        for item in self.iterable:
            yield item
            self.update(1)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def update(self, n: float = 1) -> None:
        if self.reporter is None:
            return
        self.n += int(n or 0)
        if self.on_update is not None:
            self.on_update()
        now = time.perf_counter()
        if now - self.last < 1 / _UPDATES_PER_SECOND:
            return
        self.last = now
        # The rate goes with every tenth of the rows (and every RATE_EVERY_S seconds): a log
        # file gets a line for each, a terminal's bar moves in between.
        if self.n >= self.next_rate or now - self.last_rate >= RATE_EVERY_S:
            self.last_rate, self.next_rate, self.rate_at = now, self._tenth_after(self.n), self.n
            self.reporter.advance(self.n, self._rate(now))
        else:
            self.reporter.advance(self.n)

    def _tenth_after(self, n: int) -> float:
        return (n * 10 // self.total + 1) * self.total / 10 if self.total else float("inf")

    def _rate(self, now: float) -> dict[str, int]:
        return {"rows/s": round((self.n - self.first) / max(now - self.t0, 1e-9))}

    def set_description(self, *_: Any, **__: Any) -> None:
        """`datasets` names shards here; the phase keeps its own name."""

    def close(self) -> None:
        if self.reporter is not None:
            if self.rate_at != self.n:
                self.reporter.advance(self.n, self._rate(time.perf_counter()))
            self.reporter.finish()
            self.reporter = None  # closed once, however often `datasets` closes it


@contextlib.contextmanager
def phase(reporter: Reporter | None, description: str, on_update: Callable[[], Any] | None = None) -> Iterator[None]:
    """Within this block, `datasets`' row counts show as the reporter's task `description`;
    `on_update` is called with each of its updates and at the end."""
    reporter = reporter or Reporter()
    if type(reporter) is Reporter and on_update is None:  # nobody listens: leave `datasets` as it is
        yield
        return
    import importlib

    modules = [importlib.import_module(name) for name in _MODULES]
    saved = [(m, m.hf_tqdm) for m in modules if hasattr(m, "hf_tqdm")]

    def bar(*args: Any, **kwargs: Any) -> _ForwardingBar:
        return _ForwardingBar(reporter, description, on_update, *args, **kwargs)

    for module, _ in saved:
        module.hf_tqdm = bar
    try:
        yield
    finally:
        for module, original in saved:
            module.hf_tqdm = original
        if on_update is not None:  # what was done since the last update
            on_update()
