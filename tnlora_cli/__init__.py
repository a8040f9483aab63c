"""tnlora: fine-tune Hugging Face models with tensor-network adapters.

The library is importable on its own; `tnlora_cli.cli` is a thin Typer layer over it:

    from tnlora_cli import load_recipe, train, evaluate_run, merge_run

    result = train(load_recipe("recipes/quickstart.yaml"))

The names below are imported on first use, so `import tnlora_cli` (and the CLI's start-up)
does not pay for torch and transformers until a verb runs.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

#: public name -> the module that defines it
_EXPORTS = {
    "load_recipe": "recipe.load",
    "validate_recipe": "recipe.load",
    "Recipe": "recipe.sections",
    "TrainResult": "training.loop",
    "evaluate_run": "evaluate",
    "evaluate_generation": "evaluate",
    "merge_run": "merge",
    "export_as_lora": "export",
    "export_as_peft": "export",
    "inspect_run": "ranks",
    "count_params": "count",
    "dry_run": "dryrun",
    "prepare_report": "prepare",
    "load_generator": "generation.generator",
    "generate_rows": "generate",
    "inject_adapter": "model.inject",
    "REGISTRY": "adapters",
    "LoraConfig": "adapters",
    "VeraConfig": "adapters",
    "LorettaConfig": "adapters",
    "TensorGuideConfig": "adapters",
    "TracConfig": "adapters",
    "TeraConfig": "adapters",
    "TnloraError": "errors",
}

__all__ = ["__version__", "train", *_EXPORTS]

# Bound now, not on first use: the module `tnlora_cli.train` shares the verb's name, and
# importing a submodule sets the package attribute of its name to the module. Binding the
# function after that first import keeps `from tnlora_cli import train` the function. The
# module imports its machinery only when called, so this stays cheap.
from .train import train  # noqa: E402


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'tnlora_cli' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))


if TYPE_CHECKING:
    from .adapters import REGISTRY, LoraConfig, LorettaConfig, TensorGuideConfig, TeraConfig, TracConfig, VeraConfig
    from .count import count_params
    from .dryrun import dry_run
    from .errors import TnloraError
    from .evaluate import evaluate_generation, evaluate_run
    from .export import export_as_lora
    from .generate import generate_rows
    from .generation.generator import load_generator
    from .merge import merge_run
    from .model.inject import inject_adapter
    from .prepare import prepare_report
    from .ranks import inspect_run
    from .recipe.load import load_recipe, validate_recipe
    from .recipe.sections import Recipe
    from .training.loop import TrainResult
