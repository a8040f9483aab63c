"""VeRA (Kopiczko et al., 2024): ΔW = diag(λ_b) B diag(λ_d) A.

One frozen pair A (r, max_in) and B (max_out, r) serves the whole model; each layer uses
the slices A[:, :in] and B[:out, :]. Both are Kaiming-uniform draws with gain sqrt(2), as in
the reference implementation: U(-b, b), b = sqrt(6 / fan_in), fan-in max_in for A and r for B
(torch's default a = sqrt(5) would give 1/sqrt(fan_in), sqrt(6) smaller, and the papers' VeRA
learning rates would not transfer). They come from a generator seeded by `adapter.seed` (A
first, then B) and are saved with the adapter. Per layer, λ_b (out) starts at 0, so ΔW = 0, and λ_d (r) at `d_initial`.
Trainable per layer: out + r.
"""

from __future__ import annotations

import torch
from torch import nn

from ..tensor.init import kaiming_uniform, make_generator
from .base import Adapter, LayerSpec, SharedStore, Update, at_least_fp32
from .configs import VeraConfig


class VeraAdapter(Adapter):
    config_class = VeraConfig

    @classmethod
    def prepare_shared(cls, shared: SharedStore, config: VeraConfig, layers: list[LayerSpec], generator: torch.Generator) -> None:
        max_in = max(spec.in_features for spec in layers)
        max_out = max(spec.out_features for spec in layers)
        # Own generator: the projections depend on the seed and sizes alone.
        g = make_generator(config.seed)
        # a = 0: gain sqrt(2), bound sqrt(6 / fan_in) (the reference implementation's init).
        a = kaiming_uniform((config.r, max_in), fan_in=max_in, generator=g, a=0.0)
        b = kaiming_uniform((max_out, config.r), fan_in=config.r, generator=g, a=0.0)
        shared.get_or_create("vera_A", lambda: a, trainable=False)
        shared.get_or_create("vera_B", lambda: b, trainable=False)

    def __init__(self, in_features: int, out_features: int, config: VeraConfig, shared: SharedStore, role: str, generator: torch.Generator) -> None:
        super().__init__(in_features, out_features, config, shared, role, generator)
        self.use_shared(shared, A="vera_A", B="vera_B")
        self.lambda_b = nn.Parameter(torch.zeros(out_features))
        self.lambda_d = nn.Parameter(torch.full((config.r,), float(config.d_initial)))
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        self.r = config.r

    def _projections(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.shared_tensor("A")[:, : self.in_features], self.shared_tensor("B")[: self.out_features, :]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.undropped(self.dropout(x))

    def undropped(self, x: torch.Tensor) -> torch.Tensor:
        if self._dense_is_cheaper(x):
            return x @ self.delta_weight().T.to(x.dtype)
        a, b = self._projections()
        return self.lambda_b * ((self.lambda_d * (x @ a.T.to(x.dtype))) @ b.T.to(x.dtype))

    def branch_and_update(self, x: torch.Tensor) -> tuple[torch.Tensor, Update]:
        if self._dense_is_cheaper(x):
            delta = self.delta_weight()
            return x @ delta.T.to(x.dtype), delta
        return self.undropped(x), self.low_rank_factors()

    def _dense_is_cheaper(self, x: torch.Tensor) -> bool:
        # x-path: T·r·(n+m); dense: n·m·r to build ΔW, then T·n·m. With r of 256-1024 the
        # dense path wins for long batches (methods.md §9); pick the cheaper one per call.
        tokens = x.numel() // self.in_features
        n, m, r = self.in_features, self.out_features, self.r
        return tokens * r * (n + m) > n * m * r + tokens * n * m

    def low_rank_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        a, b = self._projections()
        return (at_least_fp32(a) * at_least_fp32(self.lambda_d)[:, None]).T, at_least_fp32(self.lambda_b)[:, None] * at_least_fp32(b)

    def delta_weight(self) -> torch.Tensor:
        a, b = self.low_rank_factors()
        return b @ a.T
