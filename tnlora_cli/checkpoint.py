"""Adapter files, checkpoints and run directories; safetensors only, every write atomic.

Layout of a run directory:

    recipe.yaml                 resolved recipe
    adapter/                    final adapter: adapter_model.safetensors + adapter_config.json
    checkpoints/step-000100/    adapter/, recipe.yaml, training_state.{json,safetensors},
                                rng_state_<rank>.safetensors
    metrics.jsonl, loss.png, eval.json
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from . import __version__
from .errors import CheckpointError

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
FORMAT = "tnlora-adapter"
FORMAT_VERSION = 1


@contextlib.contextmanager
def atomic_directory(dest: Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling of `dest`; rename it to `dest` only if the block succeeds.

    A crash or kill at any point leaves `dest` as it was (absent or the previous version);
    at worst a hidden `.name.tmp-PID-*` sibling remains, removed by the next write to `dest`
    once its process is gone.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    remove_dead_temporaries(dest)
    tmp = dest.parent / f".{dest.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
        if dest.exists() and not overwrite:
            raise CheckpointError(f"{dest} already exists", hint="choose another path or allow overwriting")
        publish_directory(tmp, dest)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_dead_temporaries(dest: Path) -> list[Path]:
    """Remove `.name.tmp-PID-*` siblings of `dest` whose process no longer runs, and put
    back a previous version a killed `publish_directory` had moved aside."""
    removed = []
    for item in dest.parent.glob(f".{dest.name}.tmp-*"):
        pid = item.name[len(dest.name) + 6 :].split("-")[0]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(item, ignore_errors=True)
            removed.append(item)
    olds = sorted(dest.parent.glob(f".{dest.name}.old-*"))
    if olds and not dest.exists():
        os.replace(olds.pop(0), dest)
    for old in olds:
        shutil.rmtree(old, ignore_errors=True)
    return removed


def publish_directory(tmp: Path, dest: Path) -> None:
    """Rename a finished temporary directory to `dest`, replacing any previous version.

    The old version is first moved aside, so `dest` is never a mix of old and new files.
    """
    old = None
    if dest.exists():
        old = dest.parent / f".{dest.name}.old-{uuid.uuid4().hex[:8]}"
        os.replace(dest, old)
    os.replace(tmp, dest)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def write_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)


# --------------------------------------------------------------------------- adapter


def save_adapter(directory: Path, state: dict[str, torch.Tensor], config: dict[str, Any]) -> None:
    """Write `state` and `config` into an existing (temporary) directory."""
    # safetensors refuses tensors that share storage; contiguous copies of the few
    # adapter tensors are cheap and make every entry self-contained.
    save_file({k: v.detach().contiguous().cpu().clone() for k, v in state.items()}, str(directory / ADAPTER_WEIGHTS))
    write_json(directory / ADAPTER_CONFIG, {"format": FORMAT, "format_version": FORMAT_VERSION, "tnlora_version": __version__, **config})


def adapter_digest(directory: Path) -> str:
    """SHA-256 of an adapter directory's files (names and bytes): says whether metrics
    recorded for an adapter are of the one on disk now."""
    digest = hashlib.sha256()
    for path in sorted(p for p in directory.iterdir() if p.is_file()):
        digest.update(path.name.encode() + b"\0")
        with path.open("rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def load_adapter(directory: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    cfg_path, weights = directory / ADAPTER_CONFIG, directory / ADAPTER_WEIGHTS
    if not cfg_path.is_file() or not weights.is_file():
        raise CheckpointError(f"{directory} holds no tnlora adapter ({ADAPTER_CONFIG} + {ADAPTER_WEIGHTS})")
    try:
        config = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{cfg_path} is not valid JSON ({str(exc).splitlines()[0][:80]})", hint="the adapter directory is damaged; use another checkpoint") from None
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        raise CheckpointError(f"{cfg_path} is not a tnlora adapter config")
    if config.get("format_version", 0) > FORMAT_VERSION:
        raise CheckpointError(f"{cfg_path} was written by a newer tnlora ({config.get('tnlora_version')})", hint="upgrade tnlora")
    try:
        state = load_file(str(weights))
    except Exception as exc:  # noqa: BLE001 - SafetensorError for truncated or garbage files
        raise CheckpointError(f"{weights} is damaged ({str(exc).splitlines()[0][:80]})", hint="the adapter directory is damaged; use another checkpoint") from None
    return state, config


# ------------------------------------------------------------------- training state


def save_training_state(directory: Path, opt: dict[str, Any], scheduler: Any, step: int, extra: dict) -> None:
    """An optimizer state dict (full tensors) in safetensors, everything else in JSON (no pickle anywhere)."""
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for index, entry in opt["state"].items():
        for key, value in entry.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optimizer.{index}.{key}"] = value.detach().cpu().contiguous()
            else:
                scalars.setdefault(str(index), {})[key] = value
    save_file(tensors, str(directory / "training_state.safetensors"))
    meta = {
        "step": step,
        "param_groups": opt["param_groups"],
        "optimizer_scalars": scalars,
        "scheduler": {k: v for k, v in scheduler.state_dict().items() if k != "lr_lambdas"},
        **extra,
    }
    write_json(directory / "training_state.json", meta)


def load_training_state(directory: Path, scheduler: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """Restore the scheduler; return the checkpoint's metadata and optimizer state dict."""
    meta = json.loads((directory / "training_state.json").read_text())
    tensors = load_file(str(directory / "training_state.safetensors"))
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        _, index, key = name.split(".", 2)
        state.setdefault(int(index), {})[key] = value
    for index, entry in meta["optimizer_scalars"].items():
        state.setdefault(int(index), {}).update(entry)
    scheduler.load_state_dict({**scheduler.state_dict(), **meta["scheduler"]})
    return meta, {"state": state, "param_groups": meta["param_groups"]}


def save_rng_state(path: Path) -> None:
    py_version, py_state, py_gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    tensors = {"torch": torch.get_rng_state(), "numpy_keys": torch.from_numpy(np.asarray(np_keys, dtype=np.int64))}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda_{i}"] = s
    meta = {"python": json.dumps([py_version, list(py_state), py_gauss]), "numpy": json.dumps([np_name, int(np_pos), int(np_has_gauss), float(np_gauss)])}
    save_file(tensors, str(path), metadata=meta)


def load_rng_state(path: Path) -> None:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    torch.set_rng_state(tensors["torch"])
    cuda = [tensors[k] for k in sorted(k for k in tensors if k.startswith("cuda_"))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
    version, state, gauss = json.loads(meta["python"])
    random.setstate((version, tuple(state), gauss))
    name, pos, has_gauss, cached = json.loads(meta["numpy"])
    np.random.set_state((name, tensors["numpy_keys"].numpy().astype(np.uint32), pos, has_gauss, cached))


# ---------------------------------------------------------------------- run layout


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
