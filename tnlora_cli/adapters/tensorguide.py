"""TensorGuide (Qi et al., 2025): one tensor-train network generates both LoRA-style matrices.

Per adapted layer, a TT-matrix with cores (r_k, n_k, m_k, r_{k+1}) maps a fixed Gaussian
z (prod n_k, drawn from the adapter's seed and saved with it) to a flat vector of
M·(in + out) entries, split into W1 (in, M) and W2 (M, out):

    y = W0 x + s · σ(x W1) W2,   hidden width M, σ = none (default) | relu | gelu | tanh.

With σ = none the update is linear, ΔW = s (W1 W2)ᵀ, and merges; otherwise merge and rank
inspection refuse. The output modes m_k are factorised from M·(in + out) when not given.

Start. W1 and W2 come from the same cores, so zeroing a core would zero both and every
gradient. tnlora's default (`start: zero`) subtracts the branch at the initial cores,
regenerated from a frozen copy of the initial cores: the model starts exactly at the base and every core
gets gradients from step 1. `start: paper` follows the official code instead: cores
~ N(0, 0.1²), no subtraction (set `scale: 0.01` as it does).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import RecipeError
from ..tensor.tt import factorize_dim, tt_matrix_apply
from .base import Adapter, SharedStore, Update, at_least_fp32
from .configs import TensorGuideConfig

ACTIVATIONS = {"none": None, "relu": F.relu, "gelu": F.gelu, "tanh": torch.tanh, "sigmoid": torch.sigmoid}


class TensorGuideAdapter(Adapter):
    config_class = TensorGuideConfig

    def __init__(self, in_features: int, out_features: int, config: TensorGuideConfig, shared: SharedStore, role: str, generator: torch.Generator) -> None:
        super().__init__(in_features, out_features, config, shared, role, generator)
        self.hidden, self.scale = config.hidden, config.scale
        self.activation_name = config.activation
        total = config.hidden * (in_features + out_features)
        d = len(config.in_modes)
        out_modes = config.out_modes or factorize_dim(total, d)
        if len(out_modes) != d or math.prod(out_modes) != total:
            raise RecipeError(
                f"adapter.out_modes: {out_modes} must be {d} modes multiplying to hidden·(in+out) = {config.hidden}·({in_features}+{out_features}) = {total}",
                hint=f"e.g. {factorize_dim(total, d)}, or remove the key to factorise per layer",
            )
        ranks = config.ranks if isinstance(config.ranks, list) else [1] + [config.ranks] * (d - 1) + [1]
        self.register_buffer("z", torch.randn(math.prod(config.in_modes), generator=generator))
        shapes = [(ranks[k], config.in_modes[k], out_modes[k], ranks[k + 1]) for k in range(d)]
        if config.init == "xavier_uniform":
            cores = [(torch.rand(s, generator=generator) * 2 - 1) * math.sqrt(6.0 / (s[0] * s[1] + s[2] * s[3])) for s in shapes]
        elif config.start == "paper":
            cores = [torch.randn(s, generator=generator) * 0.1 for s in shapes]
        else:
            # Entries of the generated vector get std 1/sqrt(in): each core contributes
            # (1/sqrt(in))^(1/d) and the 1/sqrt(n_k r_{k+1}) that its sums add up.
            # A ring (boundary rank R > 1) sums R such trains: 1/sqrt(R) more, spread over the cores.
            ring = ranks[0] ** (-0.5 / d)
            cores = [torch.randn(s, generator=generator) * ring * in_features ** (-0.5 / d) / math.sqrt(s[1] * s[3]) for s in shapes]
        self.cores = nn.ParameterList(nn.Parameter(c) for c in cores)
        self.subtract_start = config.start == "zero"
        self.resample = config.latent == "resampled"
        if self.subtract_start:
            # The initial cores, not W1_0/W2_0: as small as the trainable part, and the
            # generated start costs one more (token-free) contraction per forward.
            for k, c in enumerate(cores):
                self.register_buffer(f"start_core{k}", c.clone())

    @property
    def is_linear(self) -> bool:  # type: ignore[override]
        return self.activation_name == "none"

    def _start_cores(self) -> list[torch.Tensor]:
        return [getattr(self, f"start_core{k}") for k in range(len(self.cores))]

    def start_pair(self) -> tuple[torch.Tensor, torch.Tensor]:
        """W1_0, W2_0 from the frozen start cores, generated once and cached: they never
        change in training. The key includes the buffers' version counters, so loading a
        state dict or moving the module regenerates them."""
        cores = self._start_cores()
        if torch.compiler.is_compiling():
            # The version check below cannot be traced (a cache filled before compiling, as
            # DoRA's start fills it, would break the graph): generate in the graph, token-free.
            with torch.no_grad():
                return self.generate(cores)
        key = (cores[0].device, cores[0].dtype, tuple(c._version for c in cores))
        cached = self.__dict__.get("_start_cache")
        if cached is None or cached[0] != key:
            with torch.no_grad():
                cached = (key, self.generate(cores))
            self.__dict__["_start_cache"] = cached
        return cached[1]

    def generate(self, cores: list[torch.Tensor] | None = None, z: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """W1 (in, M) and W2 (M, out) from the TT network applied to z (no token dimension)."""
        cores = list(self.cores) if cores is None else cores
        z = self.z if z is None else z
        flat = tt_matrix_apply(z.to(cores[0].dtype), cores)
        split = self.in_features * self.hidden
        return flat[:split].reshape(self.in_features, self.hidden), flat[split:].reshape(self.hidden, self.out_features)

    def _branch(self, x: torch.Tensor, pair: tuple[torch.Tensor, torch.Tensor], start: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
        """s·(σ(x W1) W2 − σ(x W1_0) W2_0) as one pair of products of width 2M.

        With h_Δ = x (W1 − W1_0), h_0 = x W1_0 and a_0 = σ(h_0):
            σ(x W1) W2 − a_0 W2_0 = [σ(h_Δ + h_0) − a_0, a_0] @ [W2; W2 − W2_0],
        (for σ = none the first block is h_Δ itself). At the start W1 − W1_0 and W2 − W2_0 are
        exactly zero, so the branch is exactly zero whatever the products' rounding; the scale
        is folded into the (M, out) matrix rather than applied to every output token.
        """
        w1, w2 = pair
        act = ACTIVATIONS[self.activation_name]
        # (W1, W2 come in the cores' precision, generated outside autocast: the differences
        # W1 − W1_0 and W2 − W2_0 are then exact before the products round them.)
        if start is None:
            h = x @ w1.to(x.dtype)
            return (act(h) if act is not None else h) @ (w2 * self.scale).to(x.dtype)
        s1, s2 = start
        h = x @ torch.cat([w1 - s1, s1], dim=1).to(x.dtype)  # (..., 2M): [h_Δ, h_0]
        if act is not None:
            h_delta, h_start = h.split(self.hidden, dim=-1)
            a_start = act(h_start)
            h = torch.cat([act(h_delta + h_start) - a_start, a_start], dim=-1)
        return h @ (torch.cat([w2, w2 - s2], dim=0) * self.scale).to(x.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pair, start = self._generated()
        return self._branch(x, pair, start)

    def _generated(self) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor] | None]:
        """(W1, W2) and the start pair (None without subtraction) of this forward."""
        with torch.autocast(self.z.device.type, enabled=False):
            if self.resample and self.training:
                # Algorithm 1: a fresh latent per step, from the global RNG (seeded, and saved in
                # checkpoints, so resumed runs draw the same). The start branch uses the same z.
                z = torch.randn(self.z.shape, device=self.z.device, dtype=self.z.dtype)
                start = None
                if self.subtract_start:
                    with torch.no_grad():
                        start = self.generate(self._start_cores(), z=z)
                return self.generate(z=z), start
            return self.generate(), self.start_pair() if self.subtract_start else None

    def branch_and_update(self, x: torch.Tensor) -> tuple[torch.Tensor, Update]:
        pair, start = self._generated()
        return self._branch(x, pair, start), self._thin_factors(pair, start)

    def _thin_factors(self, pair: tuple[torch.Tensor, torch.Tensor], start: tuple[torch.Tensor, torch.Tensor] | None) -> tuple[torch.Tensor, torch.Tensor]:
        """ΔW = s (W1 W2 − W1_0 W2_0)ᵀ = B Aᵀ with A = [W1 − W1_0, W1_0] (in, 2M) and
        B = s [W2ᵀ, (W2 − W2_0)ᵀ] (out, 2M): the split `_branch` uses, so that every product
        with a factor is exactly zero at the start (A's first and B's second block are)."""
        w1, w2 = (at_least_fp32(t) for t in pair)
        if start is None:
            return w1, self.scale * w2.T
        s1, s2 = (at_least_fp32(t) for t in start)
        return torch.cat([w1 - s1, s1], dim=1), self.scale * torch.cat([w2.T, (w2 - s2).T], dim=1)

    def low_rank_factors(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Thin factors of ΔW (see `_thin_factors`); None when σ is nonlinear."""
        if not self.is_linear:
            return None
        return self._thin_factors(self.generate(), self.start_pair() if self.subtract_start else None)

    def delta_weight(self) -> torch.Tensor:
        if not self.is_linear:
            raise RecipeError(
                f"tensorguide with activation '{self.activation_name}' has no weight update: its branch is nonlinear in the input",
                hint="merge and rank inspection need activation: none",
            )
        w1, w2 = (at_least_fp32(t) for t in self.generate())
        delta = w1 @ w2
        if self.subtract_start:
            # Two products, then the difference: exactly zero at the start.
            s1, s2 = (at_least_fp32(t) for t in self.start_pair())
            delta = delta - s1 @ s2
        return (delta * self.scale).T
