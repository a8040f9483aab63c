"""Merging in memory: adapted layers replaced by base layers holding the merged weight
(from `adapters.layers.merged_weight`, the one merge path), tied weights untied first,
and the logit tolerances a merge is verified against."""

from __future__ import annotations

import torch
from torch import nn

from ..adapters.layers import merged_weight
from .inject import merge_units, require_linear
from .shards import plain_key
from .state import SHARED_ATTR


@torch.no_grad()
def merge_into_base(model: nn.Module, dtype: torch.dtype | None = None) -> int:
    """Replace each AdaptedLinear (and each fused layer with adapted slices) by its base
    layer holding W0 + ΔW. Returns the number of layers merged."""
    require_linear(model, "it cannot be merged into a weight")
    count = 0
    for name, layer in list(merge_units(model)):
        base = layer.base_layer
        base.weight.data = merged_weight(layer, dtype)
        if base.bias is not None and dtype is not None:
            base.bias.data = base.bias.data.to(dtype)
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, base)
        count += 1
    if hasattr(model, SHARED_ATTR):
        delattr(model, SHARED_ATTR)
    return count


#: (absolute, relative to the largest reference logit) tolerance per merged dtype. fp32 allows
#: 1e-4 of the logit scale on top of 1e-4: rounding alone moves a 30-layer model's logits by
#: 2.4e-5 of their scale (SmolLM2 with VeRA + DoRA trained at rate 0.3: the fp32 adapter path is
#: 9.1e-4 from its fp64 value at |z| = 37, merged against unmerged 5.2e-4, both 0 in fp64),
#: while leaving one layer's update out moves them by far more (test_merge).
TOLERANCES = {torch.float32: (1e-4, 1e-4), torch.float16: (1e-2, 1e-2), torch.bfloat16: (5e-2, 2e-2)}


def tied_partners(model: nn.Module) -> dict[str, list[str]]:
    """Plain weight name -> other plain names holding the same Parameter (tied weights)."""
    owners: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        owners.setdefault(id(param), []).append(plain_key(name))
    return {n: [m for m in names if m != n] for names in owners.values() for n in names if len(set(names)) > 1}


def untie_config(config) -> None:
    for cfg in (config, getattr(config, "text_config", None)):
        if cfg is not None and hasattr(cfg, "tie_word_embeddings"):
            cfg.tie_word_embeddings = False


def untie_in_memory(model: nn.Module) -> list[str]:
    """Give an adapted weight tied to another module its own copy, and tell the config."""
    tied = tied_partners(model)
    untied = []
    for name, layer in merge_units(model):
        key = f"{name}.weight"
        if key in tied:
            layer.base_layer.weight = nn.Parameter(layer.base_layer.weight.detach().clone(), requires_grad=False)
            untied.append(f"{name} (was tied to {', '.join(k.removesuffix('.weight') for k in tied[key])})")
    if untied:
        untie_config(model.config)
    return untied
