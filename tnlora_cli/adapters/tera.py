"""TeRA (Gu, Zhou, Iacovides, Mandic): a Tucker-like random tensor network with only
diagonal vectors trained, giving high-rank updates.

ΔW (in, out) is folded into a tensor with input modes I_1..I_k (mode size `indim`) and
output modes I_{k+1}..I_N (`outdim`); a mode size at least the whole dimension leaves that
side unfolded. With a frozen core G (R_1..R_N) and frozen factors A_i (R_i, I_i),

    ΔW_tensor = G ×_1 (A_1ᵀ D_1) ... ×_N (A_Nᵀ D_N),   D_i = diag(d_i), R_i = I_i,

and only the d_i are trained (Σ I_i per layer). G and the A_i are shared by every layer with
the same folding (a layer of another shape, such as Llama-3's smaller v_proj, gets its own
set), drawn from the adapter's seed and saved with it. All d_i start at 1 except the last,
which starts at 0, so ΔW = 0 (the paper leaves open which one).

Frozen tensors: Kaiming-normal with gain 1 (A_i: fan-in I_i; G: fan-in = the input
dimension), so that with all d_i = 1 the entries of ΔW have std 1/sqrt(in), like a fresh
linear layer. The paper says "Kaiming" without the exact distribution.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..errors import RecipeError
from ..tensor.tt import fold_dim
from ..tensor.tucker import mode_dot_cost, multi_mode_dot, tucker_to_tensor
from .base import Adapter, SharedStore, at_least_fp32
from .configs import TeraConfig


def _fold(dim: int, mode_size: int | None, key: str) -> list[int]:
    try:
        return fold_dim(dim, mode_size or dim)
    except ValueError:
        raise RecipeError(
            f"adapter.{key}: mode size {mode_size} does not fold a layer dimension of {dim} ({dim} is not divisible by {mode_size})",
            hint=f"use a mode size that divides {dim} (e.g. {min(p for p in range(2, dim + 1) if dim % p == 0)}), or null to leave it unfolded",
        ) from None


def _kaiming_normal(shape: tuple[int, ...], fan_in: int, generator: torch.Generator) -> torch.Tensor:
    return torch.randn(shape, generator=generator) / math.sqrt(fan_in)


class TeraAdapter(Adapter):
    config_class = TeraConfig

    def __init__(self, in_features: int, out_features: int, config: TeraConfig, shared: SharedStore, role: str, generator: torch.Generator) -> None:
        super().__init__(in_features, out_features, config, shared, role, generator)
        self.in_modes = _fold(in_features, config.indim, "indim")
        self.out_modes = _fold(out_features, config.outdim, "outdim")
        self.path = config.path
        modes = self.in_modes + self.out_modes
        self.variant = config.variant
        key = f"tera_{'x'.join(map(str, self.in_modes))}_{'x'.join(map(str, self.out_modes))}"
        if config.variant == "unique":
            # Ablation TeRA_unique: a frozen network of the layer's own (the paper's Table 8).
            self.register_buffer("core", _kaiming_normal(tuple(modes), in_features, generator))
            for i, size in enumerate(modes):
                self.register_buffer(f"factor{i}", _kaiming_normal((size, size), size, generator))
        else:
            if key + "_core" not in shared.tensors:
                shared.get_or_create(key + "_core", lambda: _kaiming_normal(tuple(modes), in_features, generator), trainable=False)
                if config.variant == "shared":
                    for i, size in enumerate(modes):
                        shared.get_or_create(f"{key}_factor{i}", lambda s=size: _kaiming_normal((s, s), s, generator), trainable=False)
            names = {} if config.variant == "iden" else {f"factor{i}": f"{key}_factor{i}" for i in range(len(modes))}
            self.use_shared(shared, core=key + "_core", **names)
        self.d = nn.ParameterList(nn.Parameter(torch.ones(size)) for size in modes)
        with torch.no_grad():
            self.d[-1].zero_()

    def _frozen(self, name: str) -> torch.Tensor:
        return getattr(self, name) if self.variant == "unique" else self.shared_tensor(name)

    def frozen_factors(self) -> list[torch.Tensor]:
        """The frozen A_i: (R_i, I_i); identities for TeRA_iden."""
        if self.variant == "iden":
            return [torch.eye(d.numel(), dtype=d.dtype, device=d.device) for d in self.d]
        return [self._frozen(f"factor{i}") for i in range(len(self.d))]

    def _scaled_factors(self) -> list[torch.Tensor]:
        """A_iᵀ D_i: (I_i, R_i)."""
        return [a.T * d for a, d in zip(self.frozen_factors(), self.d)]

    def _delta_in_out(self) -> torch.Tensor:
        """ΔW as an (in, out) matrix."""
        return tucker_to_tensor(self._frozen("core"), self._scaled_factors()).reshape(self.in_features, self.out_features)

    def costs(self, tokens: int) -> tuple[int, int]:
        """Multiply-adds of (input path, dense path) for a call with `tokens` rows."""
        n_in, modes = len(self.in_modes), self.in_modes + self.out_modes
        mats = [(m, m) for m in modes]
        x_in = mode_dot_cost([tokens] + self.in_modes, mats[:n_in], list(range(1, n_in + 1)))
        x_core = tokens * self.in_features * self.out_features
        x_out = mode_dot_cost([tokens] + self.out_modes, mats[n_in:], list(range(1, len(self.out_modes) + 1)))
        build = mode_dot_cost(modes, mats, list(range(len(modes))))
        return x_in + x_core + x_out, build + tokens * self.in_features * self.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        tokens = x.numel() // self.in_features
        path = self.path
        if path == "auto":
            via_input, dense = self.costs(tokens)
            path = "input" if via_input <= dense else "dense"
        if path == "dense":
            return x @ self._delta_in_out().to(x.dtype)
        factors = [f.to(x.dtype) for f in self._scaled_factors()]
        n_in = len(self.in_modes)
        # x ×_i (D_i A_i) over the input modes: (T, I_1..I_k) -> (T, R_1..R_k)
        h = multi_mode_dot(x.reshape(tokens, *self.in_modes), [f.T for f in factors[:n_in]], list(range(1, n_in + 1)))
        # through the core: (T, ΠR_in) @ (ΠR_in, ΠR_out)
        h = h.reshape(tokens, -1) @ self._frozen("core").to(x.dtype).reshape(h[0].numel(), -1)
        # ×_i (A_iᵀ D_i) over the output modes: (T, R_k+1..R_N) -> (T, I_k+1..I_N)
        h = multi_mode_dot(h.reshape(tokens, *self.out_modes), factors[n_in:], list(range(1, len(self.out_modes) + 1)))
        return h.reshape(*lead, self.out_features)

    def delta_weight(self) -> torch.Tensor:
        core = at_least_fp32(self._frozen("core"))
        factors = [at_least_fp32(a).T * at_least_fp32(d) for a, d in zip(self.frozen_factors(), self.d)]
        return tucker_to_tensor(core, factors).reshape(self.in_features, self.out_features).T
