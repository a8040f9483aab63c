"""Stopping at a step boundary: SIGINT (Ctrl-C) and SIGTERM (a cluster's preemption) while
training steps run.

The first signal asks the loop to stop after the optimizer step in progress; the loop then
saves a checkpoint (adapter, optimizer, scheduler and RNG state: `--resume auto` continues
bit for bit) and raises `StoppedBySignal`. Every process of a launch agrees on the step to
stop at (the request rides in the divergence guard's per-step reduction). A second signal
stops at once, as a KeyboardInterrupt, keeping only the checkpoints already written.
"""

from __future__ import annotations

import signal
import threading
from pathlib import Path
from typing import Any

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class StoppedBySignal(KeyboardInterrupt):
    """Training stopped on a signal after saving `checkpoint` at `step`."""

    def __init__(self, signal_name: str, step: int, max_steps: int, checkpoint: Path) -> None:
        super().__init__(signal_name)
        self.signal_name, self.step, self.max_steps, self.checkpoint = signal_name, step, max_steps, checkpoint


class StopRequest:
    """While entered (in the main thread): the first SIGINT/SIGTERM sets `requested`."""

    def __init__(self) -> None:
        self.requested = False
        self.signal_name = ""
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested:
            raise KeyboardInterrupt  # asked twice: stop now
        self.requested = True
        self.signal_name = signal.Signals(signum).name

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            for sig in SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous.clear()
