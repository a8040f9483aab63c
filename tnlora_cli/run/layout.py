"""The layout of a run directory, and finding an adapter and its recipe in one.

    recipe.yaml                 resolved recipe
    adapter/                    final adapter: adapter_model.safetensors + adapter_config.json
    checkpoints/step-000100/    adapter/, recipe.yaml, training_state.{json,safetensors},
                                rng_state_<rank>.safetensors, manifest.json
    metrics.jsonl, loss.png, eval.json
"""

from __future__ import annotations

from pathlib import Path

from ..errors import CheckpointError

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"


def checkpoint_dirs(run_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first (only complete ones exist: they are renamed in)."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith("step-") and p.name[5:].isdigit()]
    return sorted(found, key=lambda p: int(p.name[5:]))


def resolve_adapter_dir(path: Path) -> Path:
    """A run directory, a checkpoint, or an adapter directory -> the adapter directory."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path} does not exist", hint="pass a run directory (the recipe's output_dir) or a checkpoint", exit_code=2)
    for candidate in (path, path / "adapter"):
        if (candidate / ADAPTER_CONFIG).is_file():
            return candidate
    checkpoints = checkpoint_dirs(path)
    if checkpoints:
        return checkpoints[-1] / "adapter"
    raise CheckpointError(f"{path} holds no adapter", hint="train first, or point at a run directory or checkpoint", exit_code=2)


def find_recipe_file(adapter_dir: Path) -> Path:
    for candidate in (adapter_dir / "recipe.yaml", adapter_dir.parent / "recipe.yaml"):
        if candidate.is_file():
            return candidate
    raise CheckpointError(f"no recipe.yaml beside {adapter_dir}", hint="the run directory or checkpoint must keep its recipe.yaml")
