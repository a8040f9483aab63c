"""LoRA (Hu et al., 2021): ΔW = (alpha / r) · B A.

A (r, in) is Kaiming-uniform (a = sqrt(5), as `nn.Linear`), B (out, r) is zero, so the
adapted model starts exactly at the base model. Dropout acts on the branch input only.
"""

from __future__ import annotations

import torch
from torch import nn

from ..tensor.init import kaiming_uniform
from .base import LowRankAdapter, SharedStore
from .configs import LoraConfig


class LoraAdapter(LowRankAdapter):
    config_class = LoraConfig

    def __init__(
        self,
        in_features: int,
        out_features: int,
        config: LoraConfig,
        shared: SharedStore,
        role: str,
        generator: torch.Generator,
    ) -> None:
        super().__init__(in_features, out_features, config, shared, role, generator)
        self.r = config.r
        self.scaling = config.scaling
        self.lora_A = nn.Parameter(kaiming_uniform((config.r, in_features), fan_in=in_features, generator=generator))
        self.lora_B = nn.Parameter(torch.zeros(out_features, config.r))
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.lora_A.T, self.lora_B
