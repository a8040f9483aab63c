"""Which trained tensors AdamW's weight decay applies to.

Every paper here trains through the Hugging Face Trainer, which exempts biases and
normalisation weights from weight decay; tnlora follows the same rule so that the papers'
`weight_decay` values mean the same thing. Exempt: any tensor inside an `nn.LayerNorm`, and
any tensor whose full name contains `bias`, `layernorm` or `rmsnorm`, or a path component
`norm` / ending in `_norm` (Llama's `input_layernorm`, `model.norm`, `q_norm`). Adapter
tensors (including TRAC's controllers and VeRA's λ vectors, which the Trainer also decays) are
decayed.
"""

from __future__ import annotations

import re
from typing import Any

import torch
from torch import nn

from ..adapters import REGISTRY
from ..recipe.sections import Recipe


def param_groups(model: torch.nn.Module, recipe: Recipe) -> list[dict[str, Any]]:
    """One AdamW group per learning rate (TRAC's controllers may have their own) and, with
    weight decay, per decay: biases and norms are exempt, as in the HF Trainer (`decay_exempt_names`)."""
    adapter_cls = REGISTRY[recipe.adapter.type]
    decay = recipe.training.weight_decay
    exempt = decay_exempt_names(model) if decay > 0 else set()
    groups: dict[tuple[float, float], list[torch.nn.Parameter]] = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            lr = adapter_cls.learning_rate(recipe.adapter, name, recipe.training.learning_rate)
            groups.setdefault((lr, 0.0 if name in exempt else decay), []).append(p)
    return [{"params": params, "lr": lr, "weight_decay": wd} for (lr, wd), params in groups.items()]


_EXEMPT = re.compile(r"bias|layernorm|rmsnorm|(?:^|\.)norm(?:$|\.)|_norm(?:$|\.)")


def decay_exempt_names(model: nn.Module) -> set[str]:
    """Names (as `named_parameters` gives them) of the parameters weight decay skips."""
    in_layer_norm = {
        f"{module_name}.{name}" if module_name else name
        for module_name, module in model.named_modules()
        if isinstance(module, nn.LayerNorm)
        for name, _ in module.named_parameters()
    }
    return {name for name, _ in model.named_parameters() if name in in_layer_norm or _EXEMPT.search(name.lower())}
