"""Modules that attach adapters to frozen linear layers, and the one merge path.

`AdaptedLinear` wraps a whole `nn.Linear` (or GPT-2 `Conv1D`); `FusedAdaptedLinear` wraps a
fused projection (GPT-2's `c_attn`, `qkv_proj`, `gate_up_proj`) whose output slices carry
their own adapters (`AdaptedSlice`, children named by slice). Either way the adapter sees
its base weight through a `BaseWeight` view, joins the base output through
`Adapter.combine` and defines the merged weight through `Adapter.merge_weight`; every merged
weight tnlora writes or loads comes from `merged_weight` below.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from ..errors import MergeError
from .base import Adapter, at_least_fp32, layer_dims


class WrapsBaseLayer(nn.Module):
    """A module standing in for its frozen `base_layer`. Some model code reads `layer.weight`
    or `layer.bias` (dtype and device probes, tied weights); they keep answering."""

    base_layer: nn.Module
    #: GPT-2's Conv1D stores its weight as (in, out): the transpose of nn.Linear.
    fan_in_fan_out: bool

    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base_layer.bias

    def updates(self) -> list[tuple[Adapter, int, int]]:
        """(adapter, start, stop): each adapter with the output rows it updates."""
        raise NotImplementedError


class AdaptedLinear(WrapsBaseLayer):
    """A frozen `nn.Linear` (or GPT-2 `Conv1D`) plus an adapter branch."""

    def __init__(self, base_layer: nn.Module, adapter: Adapter) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.adapter = adapter
        self.fan_in_fan_out = isinstance(base_layer, Conv1D)
        self.adapter_enabled = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base_layer(x)
        if not self.adapter_enabled:
            return out
        return self.adapter.combine(x, out)

    def updates(self) -> list[tuple[Adapter, int, int]]:
        return [(self.adapter, 0, layer_dims(self.base_layer)[1])]


class AdaptedSlice(nn.Module):
    """The adapter of output rows [start, stop) of a fused layer (a child of it)."""

    def __init__(self, adapter: nn.Module, start: int, stop: int, fan_in_fan_out: bool) -> None:
        super().__init__()
        self.adapter = adapter
        self.start, self.stop = start, stop
        self.fan_in_fan_out = fan_in_fan_out
        self.adapter_enabled = True


class FusedAdaptedLinear(WrapsBaseLayer):
    """A frozen fused layer whose slices carry their own adapters (children named by slice)."""

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.fan_in_fan_out = isinstance(base_layer, Conv1D)
        self.slice_names: list[str] = []

    def add_slice(self, name: str, adapter: nn.Module, start: int, stop: int) -> AdaptedSlice:
        unit = AdaptedSlice(adapter, start, stop, self.fan_in_fan_out)
        self.add_module(name, unit)
        self.slice_names.append(name)
        self.slice_names.sort(key=lambda n: getattr(self, n).start)
        return unit

    def slices(self) -> list[AdaptedSlice]:
        return [getattr(self, n) for n in self.slice_names]

    def updates(self) -> list[tuple[Adapter, int, int]]:
        return [(unit.adapter, unit.start, unit.stop) for unit in self.slices()]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base_layer(x)
        pieces, at = [], 0
        for unit in self.slices():
            if not unit.adapter_enabled:
                continue
            if unit.adapter.is_additive and pieces == []:
                # The base output is a fresh tensor whose backward never reads it: the branch is
                # added into its slice in place (a view), and the rest of it is never copied.
                out[..., unit.start : unit.stop].add_(unit.adapter.branch(x, out.dtype))
                continue
            pieces += [out[..., at : unit.start], unit.adapter.combine(x, out[..., unit.start : unit.stop])]
            at = unit.stop
        if not pieces:
            return out
        # A method with its own combine (it may keep the base output for its backward): new
        # tensors for its slices, joined with the untouched rest.
        return torch.cat(pieces + [out[..., at:]], dim=-1)

    @property
    def is_linear(self) -> bool:
        return all(unit.adapter.is_linear for unit in self.slices())

    def weight_change(self) -> torch.Tensor:
        """W' − W0 of the whole fused layer, (out, in), zero outside the adapted slices."""
        n_in, n_out = layer_dims(self.base_layer)
        parts = [at_least_fp32(unit.adapter.weight_change()) for unit in self.slices()]
        delta = torch.zeros(n_out, n_in, dtype=parts[0].dtype, device=parts[0].device)
        for unit, part in zip(self.slices(), parts):
            delta[unit.start : unit.stop] = part
        return delta

    def weight_change_factors(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """A (in, Σk), B (out, Σk) with each slice's B in its own rows: ΔW = B Aᵀ."""
        factors = [unit.adapter.weight_change_factors() for unit in self.slices()]
        if any(f is None for f in factors):
            return None
        n_out = layer_dims(self.base_layer)[1]
        a = torch.cat([f[0] for f in factors], dim=1)
        b = torch.zeros(n_out, a.shape[1], dtype=a.dtype, device=a.device)
        col = 0
        for unit, (_, b_i) in zip(self.slices(), factors):
            b[unit.start : unit.stop, col : col + b_i.shape[1]] = b_i
            col += b_i.shape[1]
        return a, b


@torch.no_grad()
def merged_weight(layer: WrapsBaseLayer, dtype: torch.dtype | None = None, weight: torch.Tensor | None = None) -> torch.Tensor:
    """The merged weight of an adapted (or fused) layer: every merge in tnlora comes here.

    Each adapter's rows are replaced by `adapter.merge_weight(W0 rows)` (W0 + ΔW by default),
    computed in at least fp32 in nn.Linear orientation, then checked for non-finite values
    and cast once to `dtype` (default: the base weight's). `weight` replaces the layer's own
    base weight in the layer's storage orientation: the streaming merge reads the original
    checkpoint tensor when the layer itself is quantized or on the meta device.
    """
    base = layer.base_layer.weight if weight is None else weight
    merged = at_least_fp32(base).clone()  # at_least_fp32 returns an fp32 weight itself: never write into it
    rows = merged.T if layer.fan_in_fan_out else merged  # a view: writing rows writes `merged`
    for adapter, start, stop in layer.updates():
        rows[start:stop] = adapter.merge_weight(rows[start:stop])
    if not torch.isfinite(merged).all():
        raise MergeError("a merged weight has non-finite values", hint="the adapter has diverged; merge an earlier checkpoint")
    return merged.to(dtype or base.dtype)
