"""TRAC (Ye, Zhang, Zhang): tensor-train LoRA factors shared across layers.

A (in, r) and B (out, r) are 3-core TTs, cores (1, n1, r1), (r1, n2, r2), (r2, n3, r):
- core 1: per layer, trainable;
- core 2: frozen random, shared by every layer of the same role (query, value, ...) and factor;
- core 3: trainable, shared the same way, gated per layer by controller vectors
  b (r2) and d (n3): core3~ = act(b)[:, None, None] * act(d)[None, :, None] * core3,
  act = identity (`none`) or len(v) * softmax(v) (`softmax`, the paper's "exponential").
ΔW = (alpha / r) B Aᵀ; B's core 3 starts at zero, so ΔW = 0.

Ablations (paper §5 and the official code's parameter structure): `cores_a`/`cores_b` set each
core to trained or frozen per layer, or shared trained/frozen per role (every shared trained
core gets its own controllers); `controllers: false` is "Shared TT"; `init` picks TTNorm,
TTUnif, KaimingNorm or KaimingUnif.

Roles are the layers' paths with the layer index removed, never a substring guess: `up_proj`,
`down_proj` and `gate_proj` share nothing, nor do BERT's three kinds of `dense` layer
(`attention.output.dense`, `intermediate.dense`, `output.dense`): the paper allocates one
shared pair per type of matrix.

Initialisation is TT-normal with sigma = sqrt(1 / (in + out)) of the adapted layer (paper
eq. 7 and the official code), per-layer cores with order 3 and shared cores with order 4, as
in the official code.
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import RecipeError
from ..tensor.tt import tt_random, tt_to_matrix
from .base import LowRankAdapter, SharedStore
from .configs import RankSpec, TracConfig
from .shapes import check_ranks, dim_modes

#: Paper defaults by hidden size (TRAC's tensor_cfg): modes, A ranks, B ranks (r appended).
DEFAULT_MODES = {768: [8, 8, 12], 1024: [8, 8, 16], 1280: [8, 8, 20], 4096: [16, 16, 16], 5120: [16, 16, 20]}
DEFAULT_RANKS_A = {768: [1, 8, 12], 1024: [1, 8, 12], 1280: [1, 12, 24], 4096: [1, 12, 24], 5120: [1, 15, 30]}
DEFAULT_RANKS_B = {768: [1, 24, 36], 1024: [1, 24, 36], 1280: [1, 36, 72], 4096: [1, 36, 72], 5120: [1, 45, 90]}


def _ranks_for(spec: RankSpec, table: dict[int, list[int]], dim: int, modes: list[int], r: int) -> list[int]:
    if isinstance(spec, dict):
        if dim in spec:
            return list(spec[dim])
    elif spec is not None:
        return list(spec)
    if dim in table and dim in DEFAULT_MODES and modes == DEFAULT_MODES[dim]:
        return list(table[dim])
    # Other sizes: the 768 ranks, capped by what a TT of these modes can use.
    base = table[768]
    r1 = min(base[1], modes[0])
    return [1, r1, min(base[2], r1 * modes[1], modes[2] * r)]


def _draw(shape: tuple[int, int, int], config: TracConfig, factor: str, n_in: int, n_out: int, order: int, generator: torch.Generator) -> torch.Tensor:
    """One core of the chosen initialisation (official TTNorm, TTUnif, KaimingNorm, KaimingUnif)."""
    if config.init.startswith("tt"):
        sigma = (1.0 / (n_in + n_out)) ** 0.5  # the adapted layer's in + out (paper eq. 7)
    else:
        sigma = (2.0 / (n_in if factor == "a" else config.r)) ** 0.5
    return tt_random([shape], sigma, generator, order=order, uniform=config.init.endswith("uniform"))[0]


def _activate(v: torch.Tensor, kind: str) -> torch.Tensor:
    return v.numel() * torch.softmax(v, dim=0) if kind == "softmax" else v


class TracAdapter(LowRankAdapter):
    config_class = TracConfig

    def __init__(self, in_features: int, out_features: int, config: TracConfig, shared: SharedStore, role: str, generator: torch.Generator) -> None:
        super().__init__(in_features, out_features, config, shared, role, generator)
        self.scaling = config.scaling
        self.activation = config.activation
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        keys: dict[str, str] = {}
        self.structure = {"a": list(config.cores_a), "b": list(config.cores_b)}
        for factor, dim, ranks, table in (("a", in_features, config.ranks_a, DEFAULT_RANKS_A), ("b", out_features, config.ranks_b, DEFAULT_RANKS_B)):
            modes = dim_modes(dim, config.modes, 3, DEFAULT_MODES)
            if len(modes) != 3:
                raise RecipeError(f"adapter.modes.{dim}: TRAC uses exactly 3 modes, got {modes}", hint="give three modes per dimension")
            rank_list = _ranks_for(ranks, table, dim, modes, config.r)
            shapes = check_ranks(rank_list + [config.r], modes, config.r, f"ranks_{factor}")
            # Store keys cannot hold dots: attention.output.dense -> attention-output-dense.
            key = f"trac_{role.replace('.', '-')}_{factor}_{dim}_{'x'.join(map(str, modes))}_{'x'.join(map(str, rank_list))}_r{config.r}"
            kinds = self.structure[factor]
            shared_ids = [k for k, kind in enumerate(kinds) if kind.startswith("shared")]
            draw_shared = bool(shared_ids) and f"{key}_core{shared_ids[0] + 1}" not in shared.tensors
            for k, (kind, shape) in enumerate(zip(kinds, shapes)):
                name = f"core{k + 1}_{factor}"
                if kind.startswith("shared"):
                    if not draw_shared:
                        keys[name] = key + f"_core{k + 1}"
                        continue
                    # Drawn once, at the first layer of this role and factor; shared cores use
                    # the order of the full train, r included (4), as the official code.
                    core = _draw(shape, config, factor, in_features, out_features, 4, generator)
                else:
                    core = _draw(shape, config, factor, in_features, out_features, 3, generator)
                if factor == "b" and k == 2:
                    core = torch.zeros_like(core)  # ΔW = 0 at the start
                if kind.startswith("shared"):
                    shared.get_or_create(key + f"_core{k + 1}", lambda c=core: c, trainable=kind == "shared_trained", role=role)
                    keys[name] = key + f"_core{k + 1}"
                elif kind == "trained":
                    setattr(self, name, nn.Parameter(core))
                else:
                    self.register_buffer(name, core)
            if config.controllers:
                fill = torch.ones if config.controller_init == "ones" else torch.zeros
                for k in self._gated(factor):
                    suffix = factor if k == 2 else f"{factor}{k + 1}"  # the default gates core 3 only
                    setattr(self, f"controller_rank_{suffix}", nn.Parameter(fill(shapes[k][0])))
                    setattr(self, f"controller_dim_{suffix}", nn.Parameter(fill(shapes[k][1])))
        self.controllers = config.controllers
        self.use_shared(shared, **keys)
        # What `_factor` reads, per factor and core, named once here: no string building per forward.
        self._plan = {factor: [self._core_plan(factor, k, kind) for k, kind in enumerate(self.structure[factor])] for factor in ("a", "b")}

    def _core_plan(self, factor: str, k: int, kind: str) -> tuple[str, bool, tuple[str, str] | None]:
        """(core name, shared?, controller names or None) of core k of a factor."""
        gates = None
        if self.controllers and kind == "shared_trained":
            suffix = factor if k == 2 else f"{factor}{k + 1}"  # the default gates core 3 only
            gates = (f"controller_rank_{suffix}", f"controller_dim_{suffix}")
        return f"core{k + 1}_{factor}", kind.startswith("shared"), gates

    def _gated(self, factor: str) -> list[int]:
        """Indices of the cores the controllers gate: the shared trained ones."""
        return [k for k, kind in enumerate(self.structure[factor]) if kind == "shared_trained"]

    @classmethod
    def learning_rate(cls, config: TracConfig, param_name: str, base_lr: float) -> float:
        if "controller_" in param_name and config.controller_learning_rate is not None:
            return config.controller_learning_rate
        return base_lr

    def _factor(self, factor: str, rows: int) -> torch.Tensor:
        cores = []
        for name, shared, gates in self._plan[factor]:
            core = self.shared_tensor(name) if shared else getattr(self, name)
            if gates is not None:
                gate_rank = _activate(getattr(self, gates[0]), self.activation)
                gate_dim = _activate(getattr(self, gates[1]), self.activation)
                core = core * gate_rank[:, None, None] * gate_dim[None, :, None]
            cores.append(core)
        # (n1, r1) x (r1, n2, r2) first: the frozen core meets the small per-layer core, then
        # the gated shared core; no step depends on the number of tokens.
        return tt_to_matrix(cores, rows)

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self._factor("a", self.in_features), self._factor("b", self.out_features)
