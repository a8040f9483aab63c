"""Trusting a checkpoint: every file verified, and the resumed recipe checked against it.

A checkpoint carries `manifest.json` (size and SHA-256 of each of its files, written last,
before the directory is renamed into place). Verifying it catches a truncated or altered
file; older checkpoints without a manifest are checked by opening each file. `--resume auto`
falls back from a damaged newest checkpoint to the newest valid one, with a warning.

The recipe a run is resumed with must continue the same run: changing the model, data,
adapter or optimisation would silently train something else from the checkpoint's state.
Only the keys in `SAFE_ON_RESUME` may change.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from ..errors import CheckpointError, RecipeError
from .atomic import write_json
from .layout import ADAPTER_CONFIG, ADAPTER_WEIGHTS, checkpoint_dirs

MANIFEST = "manifest.json"

#: Recipe keys a resumed run may change: how long to train, how often to log, evaluate and
#: save, how many checkpoints to keep, the evaluation batch size, where the run is, and the
#: engine (checkpoints hold full tensors under every engine). A new `training.max_steps`
#: recomputes the linear/cosine schedule for the new total. (`data.max_eval_samples` is not
#: here: with a split made from `train` it decides which rows train.)
SAFE_ON_RESUME = (
    "training.max_steps",
    "training.log_every",
    "training.eval_every",
    "training.save_every",
    "training.save_every_minutes",
    "training.save_total_limit",
    "training.eval_batch_size",
    "training.distributed",
    "output_dir",
)
#: May change together as long as the global batch (x processes) stays the same: the same
#: examples then make each optimizer step, e.g. a 2-process checkpoint resumed in one process.
BATCH_SPLIT_KEYS = ("training.batch_size", "training.gradient_accumulation_steps")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_manifest(directory: Path) -> None:
    files = sorted(p for p in directory.rglob("*") if p.is_file() and p.name != MANIFEST)
    entries = {str(p.relative_to(directory)): {"bytes": p.stat().st_size, "sha256": _sha256(p)} for p in files}
    write_json(directory / MANIFEST, {"files": entries})


def checkpoint_problem(directory: Path) -> str | None:
    """Why this checkpoint cannot be trusted, or None when every file checks out."""
    manifest = directory / MANIFEST
    required = ["training_state.json", "training_state.safetensors", "recipe.yaml", f"adapter/{ADAPTER_CONFIG}", f"adapter/{ADAPTER_WEIGHTS}"]
    for name in required:
        if not (directory / name).is_file():
            return f"{name} is missing"
    if manifest.is_file():
        try:
            entries = json.loads(manifest.read_text())["files"]
        except (ValueError, KeyError, TypeError, UnicodeDecodeError):
            return f"{MANIFEST} is unreadable"
        for name, entry in entries.items():
            path = directory / name
            if not path.is_file():
                return f"{name} is missing"
            if path.stat().st_size != entry["bytes"]:
                return f"{name} has {path.stat().st_size} bytes, {entry['bytes']} were written"
            if _sha256(path) != entry["sha256"]:
                return f"{name} does not match its checksum"
        return None
    # No manifest (written by an older tnlora): open every file instead.
    from safetensors import safe_open

    try:
        meta = json.loads((directory / "training_state.json").read_text())
        if not isinstance(meta.get("step"), int):
            return "training_state.json has no step"
        json.loads((directory / "adapter" / ADAPTER_CONFIG).read_text())
        for path in [directory / "training_state.safetensors", directory / "adapter" / ADAPTER_WEIGHTS, *directory.glob("rng_state_*.safetensors")]:
            with safe_open(str(path), framework="pt") as f:
                for key in f.keys():
                    f.get_tensor(key)
    except Exception as exc:  # noqa: BLE001 - any failure to read means "damaged"
        return f"a file cannot be read ({type(exc).__name__}: {str(exc)[:80]})"
    return None


def latest_valid_checkpoint(run_dir: Path, warn: Callable[[str], None]) -> Path | None:
    """The newest checkpoint whose files all check out; damaged newer ones are named."""
    for candidate in reversed(checkpoint_dirs(run_dir)):
        problem = checkpoint_problem(candidate)
        if problem is None:
            return candidate
        warn(f"warning: checkpoint {candidate} is damaged ({problem}); falling back to an earlier one")
    return None


def require_valid(checkpoint: Path) -> None:
    problem = checkpoint_problem(checkpoint)
    if problem is not None:
        raise CheckpointError(f"--resume {checkpoint}: the checkpoint is damaged ({problem})", hint="use --resume auto to take the newest valid checkpoint", exit_code=2)


def _flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(obj, dict):
        out: dict[str, Any] = {}
        for key, value in obj.items():
            out.update(_flatten(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: obj}


def check_resumed_recipe(recipe: Any, checkpoint: Path, step: int, processes: int = 1) -> list[str]:
    """Refuse recipe changes that alter the continued run; return the safe ones made.
    `processes`: of this launch, to compare global batches with the checkpoint's."""
    from ..recipe.load import validate_recipe

    try:
        saved = validate_recipe(yaml.safe_load((checkpoint / "recipe.yaml").read_text()) or {}, source=str(checkpoint / "recipe.yaml"))
    except (RecipeError, yaml.YAMLError, OSError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{checkpoint}/recipe.yaml cannot be read ({str(exc).splitlines()[0]})") from None
    old, new = _flatten(saved.model_dump(mode="json")), _flatten(recipe.model_dump(mode="json"))
    changed = sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k))
    saved_world = json.loads((checkpoint / "training_state.json").read_text()).get("world_size", 1)
    same_global_batch = (
        old["training.batch_size"] * old["training.gradient_accumulation_steps"] * saved_world
        == new["training.batch_size"] * new["training.gradient_accumulation_steps"] * processes
    )
    unsafe = [k for k in changed if k not in SAFE_ON_RESUME and not (same_global_batch and k in BATCH_SPLIT_KEYS)]
    if unsafe:
        shown = ", ".join(f"{k} ({old.get(k)!r} -> {new.get(k)!r})" for k in unsafe[:6]) + (" ..." if len(unsafe) > 6 else "")
        raise RecipeError(
            f"--resume: the recipe differs from the checkpoint's in {shown}; resuming would continue a different run",
            hint=f"resume with the checkpoint's settings (see {checkpoint}/recipe.yaml), or start a new run; "
            f"keys that may change on resume: {', '.join(SAFE_ON_RESUME)}",
        )
    if recipe.training.max_steps < step:
        raise RecipeError(
            f"training.max_steps: {recipe.training.max_steps} is below the checkpoint's step {step}",
            hint=f"set training.max_steps to at least {step}",
        )
    return changed


def resume_point(output_dir: Path, resume: str | None, overwrite: bool, warn: Callable[[str], None]) -> Path | None:
    """Which checkpoint to continue from; refuse to clobber a previous run by accident.
    Damaged checkpoints are skipped (auto) or refused (an explicit path)."""
    has_run = (output_dir / "adapter").exists() or bool(checkpoint_dirs(output_dir))
    if resume is None:
        if has_run and not overwrite:
            raise RecipeError(
                f"output_dir: {output_dir} already holds a run",
                hint="pass --resume auto to continue it, --overwrite to start again, or set output_dir (--set output_dir=...)",
            )
        return None
    if resume == "auto":
        found = checkpoint_dirs(output_dir)
        if not found and (output_dir / "adapter").exists():
            raise RecipeError(
                f"--resume auto: {output_dir} holds a finished run and no checkpoint to continue from",
                hint="raise training.max_steps with save_every set to continue later runs, or pass --overwrite to start again",
            )
        if not found:
            warn(f"--resume auto: {output_dir} holds no checkpoint yet; starting a new run from step 0")
            return None
        valid = latest_valid_checkpoint(output_dir, warn)
        if valid is None:
            raise CheckpointError(
                f"--resume auto: every checkpoint in {output_dir}/checkpoints is damaged", hint="start again with --overwrite", exit_code=2
            )
        return valid
    path = Path(resume)
    if not (path / "training_state.json").is_file():
        raise CheckpointError(f"--resume {resume}: not a checkpoint directory", hint=f"use --resume auto or a path like {output_dir}/checkpoints/step-000100", exit_code=2)
    require_valid(path)
    return path


def checkpoint_step(checkpoint: Path) -> int:
    return json.loads((checkpoint / "training_state.json").read_text())["step"]
