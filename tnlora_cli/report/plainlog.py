"""Progress as plain lines, for output that is not a terminal (a cluster job's log file, CI).

A rich progress bar redraws one line in place: written to a file it shows nothing useful
until the end. Where the bar's stream is not a terminal, each step that carries values
(training's `log_every` steps) becomes one line instead:

    training step 20/200  loss 1.234  lr 0.001  tok/s 5321  elapsed 0:00:12  remaining 0:01:48

Steps without values (merging layers, factorising updates, training between log steps)
print a line at a tenth of the total only when no line came for `QUIET_S` seconds, so slow
work still shows it is alive and fast work does not flood the log. `TNLORA_PROGRESS=plain` or `=bar` overrides the choice.

Tables and messages are not cut to 80 columns either (`fit_console`): a log keeps every
module name and option whole, and trained tokens are marked with brackets, not colour alone.
"""

from __future__ import annotations

import datetime
import os
import time
from collections.abc import Callable
from typing import Any

QUIET_S = 30.0
#: Width a console renders at when it writes to a file or pipe: wide enough that no table is
#: cut or squeezed (rich sizes tables to their content; this is only the ceiling).
LOG_WIDTH = 10_000
#: Width of `--help` written to a file or pipe: help panels fill their width, so a ceiling as
#: above would pad every line; at this width the longest option name and its type fit.
HELP_LOG_WIDTH = 120
#: Around the trained tokens of a sample when colour is off.
TRAINED_OPEN, TRAINED_CLOSE = "[[", "]]"


def use_plain_lines(is_terminal: bool) -> bool:
    """Plain lines unless the output is a terminal; TNLORA_PROGRESS=plain|bar decides instead."""
    choice = os.environ.get("TNLORA_PROGRESS", "").lower()
    if choice in ("plain", "bar"):
        return choice == "plain"
    return not is_terminal


def fit_console(console: Any) -> None:
    """A rich console writing to a file or pipe renders at full width without wrapping (a
    terminal keeps its own width); called before each command, so a console follows its stream."""
    logged = not console.is_terminal
    console.width = LOG_WIDTH if logged else None  # None: ask the terminal
    console.soft_wrap = logged


def _clock(seconds: float) -> str:
    return str(datetime.timedelta(seconds=int(max(0.0, seconds))))


def _value(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


class PlainProgress:
    """One task's progress, written as whole lines through `write`."""

    def __init__(
        self, write: Callable[[str], None], total: int, description: str, completed: int = 0, clock: Callable[[], float] = time.perf_counter
    ) -> None:
        self.clock = clock
        self.write = write
        self.total = total
        self.description = description
        self.first = completed
        self.completed = completed
        self.started = self.last_line = clock()
        self.next_tenth = self._tenth_after(completed)

    def _tenth_after(self, completed: int) -> int:
        return (completed * 10 // max(1, self.total) + 1) * max(1, self.total) // 10

    def line(self, completed: int, fields: dict[str, Any] | None = None) -> str:
        elapsed = self.clock() - self.started
        done = completed - self.first
        remaining = elapsed / done * (self.total - completed) if done > 0 else None
        parts = [f"{self.description} step {completed}/{self.total}" if self.total > 0 else f"{self.description}: {completed} done"]
        parts += [f"{k} {_value(v)}" for k, v in (fields or {}).items()]
        parts.append(f"elapsed {_clock(elapsed)}")
        if self.total > 0:  # a total of 0: not known beforehand (rows of a file being read)
            parts.append(f"remaining {_clock(remaining) if remaining is not None else '?'}")
        return "  ".join(parts)

    def advance(self, completed: int, fields: dict[str, Any] | None = None) -> None:
        self.completed = completed
        if fields:
            self._emit(self.line(completed, fields))
        elif completed >= self.next_tenth and self.clock() - self.last_line >= QUIET_S:
            self._emit(self.line(completed))
        if completed >= self.next_tenth:
            self.next_tenth = self._tenth_after(completed)

    def _emit(self, line: str) -> None:
        self.write(line)
        self.last_line = self.clock()

    def finish(self) -> None:
        # An error or an interruption also ends the task: it did not finish, it stopped.
        verb = "finished" if self.completed >= self.total else "stopped"
        where = f"at step {self.completed}/{self.total}" if self.total > 0 else f"after {self.completed}"
        self.write(f"{self.description} {verb} {where} in {_clock(self.clock() - self.started)}")
