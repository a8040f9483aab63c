"""Adapter files and training state: safetensors only (no pickle anywhere), written into
directories that `run.atomic` publishes whole."""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from .. import __version__
from ..errors import CheckpointError
from .atomic import write_json
from .layout import ADAPTER_CONFIG, ADAPTER_WEIGHTS

FORMAT = "tnlora-adapter"
FORMAT_VERSION = 1


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
