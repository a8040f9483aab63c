"""How long-running library functions tell the outside world what they are doing.

The library never prints: it calls a `Reporter`. The default one is silent; the CLI passes
one that draws rich progress bars and tables.
"""

from __future__ import annotations

from typing import Any


class Reporter:
    """No-op base: override what you want to show."""

    def status(self, message: str) -> None:
        """A one-line note on what is happening now."""

    def start(self, total: int, description: str, completed: int = 0) -> None:
        """A task of `total` steps begins (possibly resumed at `completed`)."""

    def advance(self, completed: int, fields: dict[str, Any] | None = None) -> None:
        """Progress to `completed` steps, with live fields (loss, lr, tokens/s)."""

    def finish(self) -> None:
        """The task started by `start` is over."""

    def metrics(self, step: int, values: dict[str, float]) -> None:
        """Evaluation results at `step`."""
