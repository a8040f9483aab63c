"""Frozen random adapter tensors: stored in the adapter file, or regenerated from the seed.

VeRA's projections, TRAC's middle cores, TeRA's core and factors and TensorGuide's latent z
and start cores are random draws from a generator seeded by `adapter.seed`. With
`adapter.save_frozen: true` (the default) they are stored in `adapter_model.safetensors`, so
a reload never depends on how another machine or torch version draws random numbers. With
`save_frozen: false` the file holds only the trained tensors; `adapter_config.json` records
the seed and a SHA-256 checksum of the frozen tensors, and loading regenerates them on CPU
(injection does, from the recipe's seed), verifies the checksum, and refuses a mismatch.
"""

from __future__ import annotations

import hashlib
from typing import Any

import torch
from torch import nn

from ..errors import CheckpointError


def frozen_keys(model: nn.Module, is_adapter_key) -> list[str]:
    """State-dict keys of the adapter tensors nothing trains (buffers, frozen parameters)."""
    return sorted(
        k for k, v in model.state_dict(keep_vars=True).items()
        if is_adapter_key(k) and not (isinstance(v, nn.Parameter) and v.requires_grad)
    )


def checksum(tensors: dict[str, torch.Tensor]) -> str:
    """SHA-256 over names, dtypes, shapes and bytes, in name order."""
    digest = hashlib.sha256()
    for key in sorted(tensors):
        t = tensors[key].detach().cpu().contiguous()
        digest.update(f"{key}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


def verify(record: dict[str, Any], seed: int, regenerated: str, where: str) -> None:
    """Refuse regenerated frozen tensors that differ from those the adapter was trained with."""
    if record.get("seed") != seed:
        raise CheckpointError(
            f"{where}: the frozen tensors were drawn from seed {record.get('seed')}, the recipe says adapter.seed {seed}",
            hint="restore the recipe's adapter.seed the adapter was trained with",
        )
    if record.get("checksum") != regenerated:
        raise CheckpointError(
            f"{where}: the frozen tensors regenerated from seed {seed} do not match the checksum the adapter was saved with",
            hint="this torch draws other random numbers, or the adapter files were altered: retrain with adapter.save_frozen: true",
        )
