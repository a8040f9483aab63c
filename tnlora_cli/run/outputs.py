"""Guards for what commands write: a new directory from a run (merge, export), a new file (generate --output).

`--out --force` replaces its destination, so the destination must not be, contain or lie
inside anything the command reads: the run, its adapter, or the base model (overwriting the
base with a merged model would make a later `eval` apply the adapter twice).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from ..errors import CheckpointError, InputError, MergeError


def protected_paths(given: str | Path, adapter_dir: str | Path, model_path: str | Path) -> dict[str, Path]:
    """What a merge or export of `given` reads: the path given, its run, adapter and base model."""
    adapter = Path(adapter_dir)
    # A standalone adapter (peft's format, no recipe.yaml beside it) is its own run.
    run = adapter.parent if (adapter.parent / "recipe.yaml").is_file() or not (adapter / "adapter_config.json").is_file() else adapter
    paths = {"the run": run, "its adapter": adapter, "the path given": Path(given)}
    if adapter.parent.parent.name == "checkpoints":
        paths["the checkpoint"] = adapter.parent
        paths["the run"] = adapter.parent.parent.parent
    if Path(model_path).exists():
        paths["the base model"] = Path(model_path)
    return paths


def refuse_overlap(out: str | Path, protected: dict[str, Path]) -> None:
    target = Path(out).expanduser().resolve()
    resolved = {label: path.expanduser().resolve() for label, path in protected.items()}
    tests = (("is", lambda p: target == p), ("contains", lambda p: target in p.parents), ("lies inside", lambda p: p in target.parents))
    for relation, holds in tests:  # the most telling relation first: `--out RUN` "is the run"
        for label, p in resolved.items():
            if not holds(p):
                continue
            path = protected[label]
            raise MergeError(
                f"--out {out} {relation} {label} ({path}); writing there would destroy what is being read",
                hint="choose an --out outside the run directory and the base model",
                exit_code=2,
            )


def refuse_mount_point(out: str | Path) -> None:
    """`--out` is replaced as a whole (a finished temporary sibling is renamed onto it), which
    a mount point cannot be (EBUSY): refused before any work."""
    target = Path(out).expanduser()
    if target.is_dir() and os.path.ismount(target):
        raise MergeError(
            f"--out {out} is a mount point; tnlora writes a complete directory beside --out and renames it into place, which a mount point cannot take",
            hint=f"choose a directory inside it, e.g. --out {target / 'merged'}",
            exit_code=2,
        )


def require_finite(state: dict[str, torch.Tensor], where: str | Path) -> None:
    """An adapter with NaN or infinite values has no meaningful ΔW (and SVDs of it fail)."""
    bad = [k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise CheckpointError(
            f"{where}: the adapter holds non-finite values ({len(bad)} tensors, e.g. {bad[0]}); the training run diverged",
            hint="use an earlier checkpoint, or train again with a lower learning rate",
        )


def check_output_file(path: str | Path, option: str, force: bool, missing_folder_ok: bool = True) -> None:
    """Before any work: `path` can take a new file (written atomically at the end). A directory,
    a folder that is a file, an existing file without `--force`, or an unwritable folder is refused;
    so is a folder that does not exist, unless `missing_folder_ok` (the write makes it)."""
    target = Path(path)
    if target.is_dir():
        raise InputError(f"{option} {path} is a directory", hint=f"give a file path (in it, for example {target / 'NAME'})")
    if not missing_folder_ok and not target.parent.is_dir() and not target.parent.exists():
        raise InputError(f"{option} {path} is in {target.parent}, which does not exist", hint="create the folder first, or choose a path in an existing one")
    folder = next((p for p in target.absolute().parents if p.exists()), None)
    if folder is not None and not folder.is_dir():
        raise InputError(f"{option} {path}: {folder} is a file, not a folder", hint="choose a path in a folder")
    if folder is not None and not os.access(folder, os.W_OK | os.X_OK):
        raise InputError(f"{option} {path}: cannot write in {folder} (permission denied)", hint="choose a writable folder")
    if target.exists() and not force:
        raise InputError(f"{option} {path} already exists", hint=f"pass --force to replace it, or choose another {option}")
