"""The working precision of tensor algebra on adapter updates."""

from __future__ import annotations

import torch


def at_least_fp32(t: torch.Tensor) -> torch.Tensor:
    """Upcast half-precision tensors to fp32 (fp64 stays fp64) for building ΔW."""
    return t.to(torch.promote_types(t.dtype, torch.float32))
