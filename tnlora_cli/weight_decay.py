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

from torch import nn

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
