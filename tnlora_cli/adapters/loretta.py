"""LoRETTA-rep / TT-LoRA (Yang et al., 2024): each LoRA factor is a tensor train.

A (in, r) and B (out, r) are each a TT with all cores trainable; ΔW = (alpha / r) B Aᵀ.
Two TT forms (see `tensor.tt.factor_core_shapes`): by default r is a last mode and the TT
ranks are [1, t, ..., t, 1] (LoRETTA); explicit `ranks_a`/`ranks_b` ending in r make r the
open last rank instead (the "All Trainable" baseline of the TRAC paper).

Start: LoRETTA's code starts from ΔW != 0; tnlora zeroes the last core of B, so ΔW = 0 while
A and the other B cores stay random and the zero core gets a non-zero gradient at step 1.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch import nn

from ..tensor.tt import tt_normal, tt_to_matrix
from .base import AdapterConfig, LowRankAdapter, SharedStore, alpha_scaling, rslora_field
from .tt_common import check_ranks, dim_modes


class LorettaConfig(AdapterConfig):
    type: Literal["loretta"] = "loretta"
    r: int = Field(8, gt=0, description="LoRA rank.")
    alpha: float = Field(16.0, gt=0, description="The update is multiplied by alpha / r (alpha / sqrt(r) with use_rslora).")
    use_rslora: bool = rslora_field()
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    tt_rank: int = Field(5, gt=0, description="TT rank t: ranks [1, t, ..., t, 1] over the dimension's modes and r.")
    n_modes: int = Field(3, ge=1, le=8, description="Modes a layer dimension is factorised into when `modes` does not list it.")
    modes: dict[int, list[int]] | None = Field(None, description="Modes per dimension, e.g. {768: [8, 8, 12]}.")
    ranks_a: list[int] | None = Field(None, description="Explicit TT ranks of A (overrides tt_rank).")
    ranks_b: list[int] | None = Field(None, description="Explicit TT ranks of B (overrides tt_rank).")


class LorettaAdapter(LowRankAdapter):
    config_class = LorettaConfig

    def __init__(self, in_features: int, out_features: int, config: LorettaConfig, shared: SharedStore, role: str, generator: torch.Generator) -> None:
        super().__init__(in_features, out_features, config, shared, role, generator)
        self.scaling = alpha_scaling(config.alpha, config.r, config.use_rslora)
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        self.cores_a = self._train(in_features, config, config.ranks_a, "ranks_a", generator)
        self.cores_b = self._train(out_features, config, config.ranks_b, "ranks_b", generator)
        with torch.no_grad():
            self.cores_b[-1].zero_()

    @staticmethod
    def _train(dim: int, config: LorettaConfig, ranks: list[int] | None, key: str, generator: torch.Generator) -> nn.ParameterList:
        modes = dim_modes(dim, config.modes, config.n_modes)
        if ranks is None:
            ranks = [1] + [config.tt_rank] * len(modes) + [1]
        shapes = check_ranks(ranks, modes, config.r, key)
        return nn.ParameterList(nn.Parameter(c) for c in tt_normal(shapes, fan_sum=dim + config.r, generator=generator))

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """A (in, r) and B (out, r), contracted from their cores (cheap: no token dimension)."""
        return tt_to_matrix(list(self.cores_a), self.in_features), tt_to_matrix(list(self.cores_b), self.out_features)

