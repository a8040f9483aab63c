"""LoRETTA-rep / TT-LoRA (Yang et al., 2024): each LoRA factor is a tensor train.

A (in, r) and B (out, r) are each a TT with all cores trainable; ΔW = (alpha / r) B Aᵀ.
Two TT forms (see `tensor.tt.factor_core_shapes`): by default r is a last mode and the TT
ranks are [1, t, ..., t, 1] (LoRETTA); explicit `ranks_a`/`ranks_b` ending in r make r the
open last rank instead (the "All Trainable" baseline of the TRAC paper).

Start: LoRETTA's code starts from ΔW != 0; tnlora zeroes the last core of B, so ΔW = 0 while
A and the other B cores stay random and the zero core gets a non-zero gradient at step 1.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..errors import RecipeError
from ..tensor.tt import tt_normal, tt_to_matrix
from .base import LowRankAdapter, SharedStore
from .configs import LorettaConfig
from .shapes import check_ranks, dim_modes

#: The official shape tables (rank -> dimension -> modes of the dim·r elements), entries checked.
OFFICIAL_SHAPES = {
    8: {768: [8, 8, 12, 8], 1024: [4, 8, 8, 8, 4], 4096: [16, 16, 8, 4, 4]},
    16: {768: [8, 16, 12, 8], 4096: [16, 16, 16, 4, 4]},
}


def _folded_modes(dim: int, config: LorettaConfig) -> list[int]:
    given = (config.folded_modes or {}).get(dim) or OFFICIAL_SHAPES.get(config.r, {}).get(dim)
    if given is None:
        raise RecipeError(
            f"adapter.folded_modes: no modes for dimension {dim} at r = {config.r} (the official table has none)",
            hint=f"give adapter.folded_modes.{dim}: modes multiplying to {dim}·{config.r} = {dim * config.r}",
        )
    if math.prod(given) != dim * config.r:
        raise RecipeError(f"adapter.folded_modes.{dim}: {given} multiply to {math.prod(given)}, not {dim}·{config.r} = {dim * config.r}")
    return list(given)


class LorettaAdapter(LowRankAdapter):
    config_class = LorettaConfig

    def __init__(self, in_features: int, out_features: int, config: LorettaConfig, shared: SharedStore, role: str, generator: torch.Generator) -> None:
        super().__init__(in_features, out_features, config, shared, role, generator)
        self.scaling = config.scaling
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        self.fold_rank, self.r = config.fold_rank, config.r
        make = self._folded if config.fold_rank else self._train
        self.cores_a = make(in_features, config, config.ranks_a, "ranks_a", generator)
        self.cores_b = make(out_features, config, config.ranks_b, "ranks_b", generator)
        with torch.no_grad():
            self.cores_b[-1].zero_()

    @staticmethod
    def _train(dim: int, config: LorettaConfig, ranks: list[int] | None, key: str, generator: torch.Generator) -> nn.ParameterList:
        modes = dim_modes(dim, config.modes, config.n_modes)
        if ranks is None:
            ranks = [1] + [config.tt_rank] * len(modes) + [1]
        shapes = check_ranks(ranks, modes, config.r, key)
        return nn.ParameterList(nn.Parameter(c) for c in tt_normal(shapes, fan_sum=dim + config.r, generator=generator))

    @staticmethod
    def _folded(dim: int, config: LorettaConfig, ranks: list[int] | None, key: str, generator: torch.Generator) -> nn.ParameterList:
        modes = _folded_modes(dim, config)
        ranks = [1] + [config.tt_rank] * (len(modes) - 1) + [1]
        shapes = [(ranks[k], n, ranks[k + 1]) for k, n in enumerate(modes)]
        return nn.ParameterList(nn.Parameter(c) for c in tt_normal(shapes, fan_sum=dim + config.r, generator=generator))

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """A (in, r) and B (out, r), contracted from their cores (cheap: no token dimension)."""
        if self.fold_rank:
            # The official layout: A's elements are (in, r) row-major, B's are (r, out).
            return tt_to_matrix(list(self.cores_a), self.in_features), tt_to_matrix(list(self.cores_b), self.r).T
        return tt_to_matrix(list(self.cores_a), self.in_features), tt_to_matrix(list(self.cores_b), self.out_features)
