"""Slices of fused projections as virtual layers that target lists can name.

GPT-2 computes q, k and v with one `c_attn` (a Conv1D of width 3·hidden); Phi-3-style models
fuse `qkv_proj` and `gate_up_proj`. The LoRA and TRAC papers adapt only the q and v *slices*.
tnlora exposes each slice as a child of its fused layer: `c_attn.q`, `c_attn.k`, `c_attn.v`,
`qkv_proj.q|k|v`, `gate_up_proj.gate|up`, and for any other fused layer the slices a recipe
declares in `adapter.fused_splits` (output sizes in order, contiguous blocks). A slice is
adapted like a layer of in_features × slice width; its update lands in exactly its output
rows (columns of a Conv1D weight), the rest of the fused weight untouched. This module finds
the slices; `adapters.layers.FusedAdaptedLinear` carries their adapters.
"""

from __future__ import annotations

from torch import nn
from transformers.pytorch_utils import Conv1D

from ..adapters.base import AdapterConfig, layer_dims
from ..errors import RecipeError, TargetError

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
