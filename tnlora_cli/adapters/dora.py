"""DoRA (Liu et al., 2024) over any linear adapter: the weight split into magnitude and direction.

    W' = m ⊙ (W0 + ΔW) / ‖W0 + ΔW‖        (norm per output row, over the inputs)

ΔW is the adapter's own update (scaling included), m a trained vector of out_features per
adapted layer (per slice of a fused layer), started at ‖W0 + ΔW‖ of the initial update, which
is ‖W0‖ for every adapter that starts at zero: W' = W0 at the start.

The norm is treated as a constant in backward (the paper's §4.3, as peft does): it is computed
from the dense ΔW without gradient, so ΔW gets its gradient only through the cheap branch.
The forward never multiplies x by W': with s = m / ‖W0 + ΔW‖ and the frozen layer's output
W0 x + b,

    y = W0 x + b + (s − 1) ⊙ (W0 x) + s ⊙ branch(x)

so the frozen product is computed once, by the layer itself. With input dropout active (training,
p > 0), x is dropped once for both parts, as peft does: y = W0 x + b + (s − 1) ⊙ W0 drop(x) +
s ⊙ branch(drop(x)), which costs one more product with W0.

The base weight comes from `BaseWeight.dense()`: dequantized for bitsandbytes 4-bit and 8-bit
layers. These functions are reached through the `Adapter` hooks when `adapter.use_dora` is set.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..tensor.precision import at_least_fp32

# `adapter` below is an `adapters.base.Adapter` and `base` a `BaseWeight`; this module is below
# base.py (whose hooks call it), so it names neither.
Adapter = nn.Module

#: The attribute (and adapter-file tensor name) of the trained magnitude.
MAGNITUDE = "magnitude"


def attach_magnitude(adapter: Adapter, base: Any) -> None:
    """Give `adapter` its magnitude, ‖W0 + ΔW‖ per output row of `base`, and keep `base`."""
    if not adapter.is_linear:
        raise ValueError(f"{type(adapter).__name__} is not a weight update: DoRA needs one")  # recipes refuse it first
    # A plain attribute, not a submodule: the base layer is registered once, by its wrapper.
    adapter.__dict__["_dora_base"] = base
    device = next((p.device for p in adapter.parameters()), torch.device("cpu"))
    weight = base.dense()
    if weight.device.type == "meta":  # counting, or a saved adapter about to be loaded over it
        norm = torch.zeros(base.shape[0])
    else:
        with torch.no_grad():
            norm = row_norm(weight + at_least_fp32(adapter.delta_weight()).to(weight.device))
    adapter.register_parameter(MAGNITUDE, nn.Parameter(norm.to(device=device, dtype=adapter.compute_dtype)))


def bound_base(adapter: Adapter) -> Any:
    return adapter.__dict__["_dora_base"]


def row_norm(weight: torch.Tensor) -> torch.Tensor:
    """‖W_i‖ over the inputs, per output row i of an (out, in) weight."""
    return torch.linalg.vector_norm(weight, dim=1)


@torch.no_grad()
def direction_norm(adapter: Adapter, base_weight: torch.Tensor) -> torch.Tensor:
    """‖W0 + ΔW‖ per output row, without gradient (a constant in backward)."""
    return row_norm(base_weight + at_least_fp32(adapter.delta_weight()).to(base_weight.device))


def dora_combine(adapter: Adapter, x: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
    """The DoRA layer output from its input and the frozen layer's output (bias included)."""
    base = bound_base(adapter)
    weight = base.dense()
    scale = (at_least_fp32(getattr(adapter, MAGNITUDE)) / direction_norm(adapter, weight)).to(base_out.dtype)
    dropout = getattr(adapter, "dropout", None)
    if isinstance(dropout, nn.Dropout) and dropout.training and dropout.p > 0:
        dropped = dropout(x)
        frozen = F.linear(dropped, weight.to(dropped.dtype)).to(base_out.dtype)
        branch = adapter.undropped(dropped.to(adapter.compute_dtype))
    else:
        bias = base.bias()
        frozen = base_out if bias is None else base_out - bias.to(base_out.dtype)
        branch = adapter(x.to(adapter.compute_dtype))
    return base_out + (scale - 1) * frozen + scale * branch.to(base_out.dtype)


def dora_merged_weight(adapter: Adapter, base_weight: torch.Tensor) -> torch.Tensor:
    """W' = m ⊙ (W0 + ΔW) / ‖W0 + ΔW‖ from the W0 rows `base_weight` (out, in, at least fp32)."""
    updated = base_weight + at_least_fp32(adapter.delta_weight()).to(base_weight.device)
    magnitude = at_least_fp32(getattr(adapter, MAGNITUDE)).to(updated)
    return updated * (magnitude / row_norm(updated).detach())[:, None]


def dora_weight_change(adapter: Adapter, base_weight: torch.Tensor | None = None) -> torch.Tensor:
    """W' − W0 (out, in), from `base_weight` or the bound base weight."""
    if base_weight is None:
        base_weight = bound_base(adapter).dense()
        if base_weight.device.type == "meta":
            raise ValueError("DoRA's weight change needs the base weight, which is on the meta device here")
    base_weight = at_least_fp32(base_weight)
    return dora_merged_weight(adapter, base_weight) - base_weight
