"""Slices of fused projections as virtual layers that target lists can name.

GPT-2 computes q, k and v with one `c_attn` (a Conv1D of width 3·hidden); Phi-3-style models
fuse `qkv_proj` and `gate_up_proj`. The LoRA and TRAC papers adapt only the q and v *slices*.
tnlora exposes each slice as a child of its fused layer: `c_attn.q`, `c_attn.k`, `c_attn.v`,
`qkv_proj.q|k|v`, `gate_up_proj.gate|up`, and for any other fused layer the slices a recipe
declares in `adapter.fused_splits` (output sizes in order, contiguous blocks). A slice is
adapted like a layer of in_features × slice width; its update lands in exactly its output
rows (columns of a Conv1D weight), the rest of the fused weight untouched.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from .adapters.base import AdapterConfig, WrapsBaseLayer, at_least_fp32, layer_dims
from .errors import RecipeError, TargetError

Slices = dict[str, tuple[int, int]]  # slice name -> (start, stop) along the output


def _blocks(sizes: list[tuple[str, int]]) -> Slices:
    out, start = {}, 0
    for name, size in sizes:
        out[name] = (start, start + size)
        start += size
    return out


def _known_split(name: str, module: nn.Module, model_config) -> Slices | None:
    """The slices of a fused layer tnlora knows by its name and the model config."""
    leaf = name.rsplit(".", 1)[-1]
    n_in, n_out = layer_dims(module)
    if leaf == "c_attn" and isinstance(module, Conv1D) and n_out == 3 * n_in:
        return _blocks([("q", n_in), ("k", n_in), ("v", n_in)])
    if leaf == "gate_up_proj" and n_out % 2 == 0:
        return _blocks([("gate", n_out // 2), ("up", n_out // 2)])
    if leaf == "qkv_proj" and model_config is not None:
        heads = getattr(model_config, "num_attention_heads", None)
        if not heads:
            return None
        head_dim = getattr(model_config, "head_dim", None) or model_config.hidden_size // heads
        kv = getattr(model_config, "num_key_value_heads", None) or heads
        q, k = heads * head_dim, kv * head_dim
        if q + 2 * k == n_out:
            return _blocks([("q", q), ("k", k), ("v", k)])
    return None


def _matches(name: str, key: str) -> bool:
    return name == key or name.endswith("." + key)


def fused_slices(model: nn.Module, linear: list[str], config: AdapterConfig) -> dict[str, Slices]:
    """Fused layer name -> its slices, for the known fused layers and `adapter.fused_splits`."""
    found: dict[str, Slices] = {}
    model_config = getattr(model, "config", None)
    explicit = config.fused_splits or {}
    used = set()
    for name in linear:
        module = model.get_submodule(name)
        key = next((k for k in explicit if _matches(name, k)), None)
        if key is not None:
            used.add(key)
            sizes = explicit[key]
            n_out = layer_dims(module)[1]
            if sum(sizes.values()) != n_out or min(sizes.values(), default=0) < 1:
                raise RecipeError(
                    f"adapter.fused_splits.{key}: slice sizes {dict(sizes)} add up to {sum(sizes.values())}, but {name} has {n_out} outputs",
                    hint=f"give positive sizes that add up to {n_out}, in the order of the output rows",
                )
            found[name] = _blocks(list(sizes.items()))
            continue
        split = _known_split(name, module, model_config)
        if split is not None:
            found[name] = split
    unused = [k for k in explicit if k not in used]
    if unused:
        raise RecipeError(f"adapter.fused_splits: {unused[0]!r} names no linear layer of the model", hint="use a fused layer's name or name suffix, e.g. query_key_value")
    return found


def virtual_names(slices: dict[str, Slices]) -> list[str]:
    return [f"{layer}.{s}" for layer, split in slices.items() for s in split]


def check_no_overlap(targets: list[str], slices: dict[str, Slices]) -> None:
    """A fused layer is adapted whole or by slices, not both."""
    chosen = set(targets)
    for layer, split in slices.items():
        parts = [f"{layer}.{s}" for s in split if f"{layer}.{s}" in chosen]
        if layer in chosen and parts:
            raise TargetError(
                f"adapter.target_modules: {layer} is targeted whole and by its slice {parts[0].rsplit('.', 1)[1]}",
                hint="target either the fused layer or its slices",
            )


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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base_layer(x)
        pieces, at = [], 0
        for unit in self.slices():
            if not unit.adapter_enabled:
                continue
            delta = unit.adapter(x.to(unit.adapter.compute_dtype)).to(out.dtype)
            pieces += [out[..., at : unit.start], out[..., unit.start : unit.stop] + delta]
            at = unit.stop
        if not pieces:
            return out
        return torch.cat(pieces + [out[..., at:]], dim=-1)

    @property
    def is_linear(self) -> bool:
        return all(unit.adapter.is_linear for unit in self.slices())

    def delta_weight(self) -> torch.Tensor:
        """ΔW of the whole fused layer, (out, in), zero outside the adapted slices."""
        n_in, n_out = layer_dims(self.base_layer)
        parts = [at_least_fp32(unit.adapter.delta_weight()) for unit in self.slices()]
        delta = torch.zeros(n_out, n_in, dtype=parts[0].dtype, device=parts[0].device)
        for unit, part in zip(self.slices(), parts):
            delta[unit.start : unit.stop] = part
        return delta

    def low_rank_factors(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """A (in, Σk), B (out, Σk) with each slice's B in its own rows: ΔW = B Aᵀ."""
        factors = [unit.adapter.low_rank_factors() for unit in self.slices()]
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
    def merged_weight(self, dtype: torch.dtype | None = None, weight: torch.Tensor | None = None) -> torch.Tensor:
        """Base weight + each slice's ΔW in its own rows (Conv1D: columns); see AdaptedLinear."""
        base = self.base_layer.weight if weight is None else weight
        merged = at_least_fp32(base).clone()
        for unit in self.slices():
            delta = unit.adapter.delta_weight().to(merged.device, merged.dtype)
            if self.fan_in_fan_out:
                merged[:, unit.start : unit.stop] += delta.T
            else:
                merged[unit.start : unit.stop] += delta
        if not torch.isfinite(merged).all():
            from .errors import MergeError

            raise MergeError("a merged weight has non-finite values", hint="the adapter has diverged; merge an earlier checkpoint")
        return merged.to(dtype or base.dtype)
