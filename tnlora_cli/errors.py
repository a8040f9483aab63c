"""User-facing errors.

A `TnloraError` is raised where a user mistake is found. The CLI prints its message and
hint on one line each and exits with `exit_code`, without a traceback. Any other exception
is a bug and keeps its traceback.
"""

from __future__ import annotations


class TnloraError(Exception):
    """A mistake the user can fix: what is wrong, where, and how to fix it."""

    exit_code = 1

    def __init__(self, message: str, hint: str | None = None, exit_code: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint
        if exit_code is not None:  # a path or option the user gave: 2, whatever the class
            self.exit_code = exit_code

    def __str__(self) -> str:
        return self.message if not self.hint else f"{self.message}\n  hint: {self.hint}"


class RecipeError(TnloraError):
    """The recipe (YAML or a --set override) is invalid."""

    exit_code = 2


class TargetError(RecipeError):
    """adapter.target_modules matches nothing usable in the model."""


class DataError(RecipeError):
    """The data section points at missing files or columns."""


class ModelError(RecipeError):
    """The model cannot be found or loaded."""


class CheckpointError(TnloraError):
    """A run directory, checkpoint or adapter file is missing or inconsistent."""


class MergeError(TnloraError):
    """A merge was refused or failed verification."""


class InputError(TnloraError):
    """A command-line option or an input file (prompts, ...) is invalid."""

    exit_code = 2


class RunInUseError(TnloraError):
    """Another live process holds the run directory's lock."""

    exit_code = 2


class DivergenceError(TnloraError):
    """Training produced a non-finite loss, gradient or adapter."""


class InterruptedRun(TnloraError):
    """SIGINT/SIGTERM during training: what was saved and how to continue."""

    exit_code = 130
