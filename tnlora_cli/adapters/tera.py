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
from ..tensor.tucker import mode_dot, mode_dot_cost, outer_vectors
from .base import Adapter, SharedStore, Update, at_least_fp32
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
        """The frozen A_i: (R_i, I_i); identities for TeRA_iden (built here only: the forward
        and ΔW skip identity factors instead of multiplying by them)."""
        if self.variant == "iden":
            return [torch.eye(d.numel(), dtype=d.dtype, device=d.device) for d in self.d]
        return [self._frozen(f"factor{i}") for i in range(len(self.d))]

    def _factor_list(self) -> list[torch.Tensor | None]:
        """The frozen A_i, None where A_i is the identity."""
        if self.variant == "iden":
            return [None] * len(self.d)
        return [self._frozen(f"factor{i}") for i in range(len(self.d))]

    def _build(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """ΔW as an (in, out) matrix: G ×_i (A_iᵀ D_i) = (G scaled by d_1 ⊗ ... ⊗ d_N) ×_i A_iᵀ.

        The diagonals meet the core once, as one elementwise product with their outer product;
        the frozen factors then never carry a gradient of their own (only the core's does)."""
        cast = (lambda t: t.to(dtype)) if dtype is not None else at_least_fp32
        core = cast(self._frozen("core"))
        h = core * cast(outer_vectors(list(self.d))).reshape(core.shape)
        for mode, a in enumerate(self._factor_list()):
            if a is not None:
                h = mode_dot(h, cast(a).T, mode)
        return h.reshape(self.in_features, self.out_features)

    def costs(self, tokens: int, training: bool = False) -> tuple[int, int]:
        """Multiply-adds of (input path, dense path) for a call with `tokens` rows; with
        `training`, forward and backward (docs/benchmarks.md, "TeRA's contraction order").

        Input path: the input-mode factors (T·n·ΣI_in), one scaling by the input diagonals
        (T·n), the core (T·n·m), one scaling (T·m), the output-mode factors (T·m·ΣI_out); its
        backward is the same products once more (the frozen maps need no gradient of their
        own, the diagonals' gradients are elementwise). Dense path: ΔW built from the scaled
        core (n·m + n·m·ΣI over factored modes), then T·n·m; its backward is two more
        T·n·m products (the input's and ΔW's gradients) plus the build's own backward.
        Identity factors (TeRA_iden) cost nothing on either path."""
        n, m = self.in_features, self.out_features
        factored = self.variant != "iden"
        n_in = len(self.in_modes)
        mats = [(s, s) for s in self.in_modes + self.out_modes] if factored else []
        x_in = mode_dot_cost([tokens] + self.in_modes, mats[:n_in], list(range(1, n_in + 1))) if factored else 0
        x_out = mode_dot_cost([tokens] + self.out_modes, mats[n_in:], list(range(1, len(self.out_modes) + 1))) if factored else 0
        via_input = x_in + tokens * n + tokens * n * m + tokens * m + x_out
        build = n * m + (mode_dot_cost(self.in_modes + self.out_modes, mats, list(range(len(mats)))) if factored else 0)
        dense = build + tokens * n * m
        if training:
            return 2 * via_input, 2 * build + 3 * tokens * n * m
        return via_input, dense

    def _choose_path(self, tokens: int, built_anyway: bool = False) -> str:
        """The cheaper path for this many tokens, computed once per (tokens, training, built_anyway).
        `built_anyway`: ΔW is built in this forward whatever the path (DoRA's norm needs it), so
        the dense path's forward build costs nothing extra."""
        if self.path != "auto":
            return self.path
        training = torch.is_grad_enabled() and self.d[0].requires_grad
        key = (tokens, training, built_anyway)
        chosen = self._path_cache.get(key)
        if chosen is None:
            via_input, dense = self.costs(tokens, training)
            if built_anyway:
                via_input += self.build_cost()
            chosen = self._path_cache[key] = "input" if via_input <= dense else "dense"
        return chosen

    def build_cost(self) -> int:
        """Multiply-adds of one build of ΔW (the dense path's, without its backward)."""
        return self.costs(0)[1]

    @property
    def _path_cache(self) -> dict[tuple[int, bool], str]:
        # Kept out of the module's attributes that state_dict and deepcopy care about.
        return self.__dict__.setdefault("_paths", {})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        tokens = x.numel() // self.in_features
        if self._choose_path(tokens) == "dense":
            return x @ self._build(x.dtype)
        factors = self._factor_list()
        n_in = len(self.in_modes)
        # Frozen factor first, then the diagonals on the activations: scaling the factor
        # instead would make autograd form a (I_i, I_i) gradient (a T·n·I_i product) per call.
        h = x.reshape(tokens, *self.in_modes)
        for mode, a in enumerate(factors[:n_in]):
            if a is not None:
                h = mode_dot(h, a.to(x.dtype), mode + 1)  # x ×_i A_i: (T, .., I_i, ..) -> (T, .., R_i, ..)
        h = h.reshape(tokens, self.in_features) * outer_vectors(list(self.d[:n_in])).to(x.dtype)
        # through the core: (T, ΠR_in) @ (ΠR_in, ΠR_out), then the output diagonals
        h = h @ self._frozen("core").to(x.dtype).reshape(self.in_features, self.out_features)
        h = (h * outer_vectors(list(self.d[n_in:])).to(x.dtype)).reshape(tokens, *self.out_modes)
        for mode, a in enumerate(factors[n_in:]):
            if a is not None:
                h = mode_dot(h, a.T.to(x.dtype), mode + 1)  # ×_i A_iᵀ: (T, .., R_i, ..) -> (T, .., I_i, ..)
        return h.reshape(*lead, self.out_features)

    def branch_and_update(self, x: torch.Tensor) -> tuple[torch.Tensor, Update]:
        # On the dense path, ΔW is built for the branch anyway: one build serves both when it is
        # in at least fp32 (a half-precision build would round the norm's ΔW).
        tokens = x.numel() // self.in_features
        if self._choose_path(tokens, built_anyway=True) == "dense" and x.dtype == at_least_fp32(x).dtype:
            delta = self._build(x.dtype)
            return x @ delta, delta.T
        with torch.no_grad():  # for the norm only, a constant in backward
            delta = self.delta_weight()
        return self(x), delta

    def delta_weight(self) -> torch.Tensor:
        return self._build().T
