"""The adapter contract: what every method implements, and the config keys they share.

An adapter is an `nn.Module` that computes only the update branch of one linear layer:

    y = base(x) + adapter(x),   adapter(x) == x @ adapter.delta_weight().T   (when linear)

Each method lives in its own module (`lora.py`, ...) with an `Adapter` subclass; its strict
config class is in `configs.py`, which imports no torch, so recipes are checked before torch
loads. The injector (`tnlora_cli.model.inject`) builds one adapter per matched layer and hands
every adapter the same `SharedStore`, where tensors shared across layers are registered exactly
once. The wrappers that put an adapter on a layer live in `layers.py`.
Optional hooks (`bind_base`, `combine`, `merge_weight`) let a method see the base weight and
define how it joins the base output and the merged weight; their defaults are additive, and
`adapter.use_dora` makes every method weight-decomposed through them (`dora.py`), which reads
the branch and the update it was computed from in one call (`branch_and_update`).
"""

from __future__ import annotations

import copy
import weakref
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from ..tensor.precision import at_least_fp32
from . import dora
from .configs import AdapterConfig, ScaledLowRankConfig, StrictModel  # noqa: F401 - re-exported

#: An update as `branch_and_update` hands it over: thin factors (A (in, k), B (out, k), ΔW = B Aᵀ,
#: scaling included) or the dense ΔW (out, in).
Update = tuple[torch.Tensor, torch.Tensor] | torch.Tensor


class SharedStore(nn.Module):
    """Tensors shared by several adapted layers, registered here once.

    Layers keep plain (unregistered) references, so `state_dict`, `parameters()`, DDP and
    safetensors see each shared tensor exactly once.
    """

    def __init__(self) -> None:
        super().__init__()
        self.tensors = nn.ParameterDict()
        #: key -> the module role it serves ("*" for every role), for parameter accounting.
        self.roles: dict[str, str] = {}

    def get_or_create(self, key: str, factory: Any, trainable: bool, role: str = "*") -> nn.Parameter:
        """Return the shared tensor `key`, creating it with `factory()` on first use.

        Keys use "_" separators only (ParameterDict keys cannot contain dots).
        """
        if key not in self.tensors:
            self.tensors[key] = nn.Parameter(factory(), requires_grad=trainable)
            self.roles[key] = role
        return self.tensors[key]


@dataclass(frozen=True)
class LayerSpec:
    """What an adapter needs to know of one target layer before anything is built."""

    name: str
    role: str
    in_features: int
    out_features: int


class Adapter(nn.Module):
    """Base class of every adapter branch.

    Subclasses set `config_class`, build their tensors in `__init__` (trainable ones as
    `nn.Parameter`, frozen ones as persistent buffers or frozen shared tensors), and
    implement `forward` and `delta_weight`.
    """

    config_class: ClassVar[type[AdapterConfig]]
    #: False for adapters whose branch is not a linear map of x (nonlinear TensorGuide).
    is_linear: ClassVar[bool] = True

    def __init__(
        self,
        in_features: int,
        out_features: int,
        config: AdapterConfig,
        shared: SharedStore,
        role: str,
        generator: torch.Generator,
    ) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.role = role
        #: DoRA: a trained magnitude per output row is added by `bind_base` (see `dora.py`).
        self.use_dora = bool(getattr(config, "use_dora", False))

    @classmethod
    def prepare_shared(cls, shared: SharedStore, config: AdapterConfig, layers: list[LayerSpec], generator: torch.Generator) -> None:
        """Build model-wide tensors that depend on all target layers (VeRA sizes its
        projections by the largest layer). Called once, before any layer is built."""

    def use_shared(self, shared: SharedStore, **names: str) -> None:
        """Declare the store entries this layer uses (local name -> store key).

        The layer keeps the store, not the tensors: `shared_tensor` looks them up at call time,
        so a wrapper that replaces registered parameters (FSDP2's sharding, `to_empty`) is seen
        by every layer. The store is not made a submodule: it is registered once, on the model.
        """
        self.__dict__["_store"] = shared
        self._shared_keys = dict(names)

    def shared_tensor(self, name: str) -> torch.Tensor:
        return self.__dict__["_store"].tensors[self._shared_keys[name]]

    @classmethod
    def learning_rate(cls, config: AdapterConfig, param_name: str, base_lr: float) -> float:
        """Learning rate of one trainable tensor (TRAC gives its controllers their own)."""
        return base_lr

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., in) -> (..., out)
        raise NotImplementedError

    def undropped(self, x: torch.Tensor) -> torch.Tensor:
        """The branch on an input that has already been through this adapter's dropout (DoRA
        drops the input once for the frozen and the adapter part alike). Adapters with a
        `dropout` on their input override it; the others have nothing to skip."""
        return self(x)

    def branch_and_update(self, x: torch.Tensor) -> tuple[torch.Tensor, Update]:
        """`undropped(x)` and ΔW, from one build of the tensors the update is made of.

        DoRA needs both in every forward, the branch and ΔW for its norm; adapters whose
        branch contracts its own factors (tensor trains, generated matrices) override this so
        that the factors are built once and serve both. ΔW comes as thin factors where it is a
        product of them (the norm then never forms the (out, in) matrix), dense otherwise; it
        may carry gradient (the caller detaches it). The default builds twice."""
        factors = self.low_rank_factors()
        if factors is None:
            with torch.no_grad():  # the norm is a constant: no graph for a dense ΔW
                factors = self.delta_weight()
        return self.undropped(x), factors

    def delta_weight(self) -> torch.Tensor:
        """The update as a dense (out, in) matrix in at least fp32, scaling included."""
        raise NotImplementedError

    # The three hooks below are how an adapter may go beyond y = base(x) + branch(x). Their
    # defaults are that additive rule, which every adapter shipped today follows; a
    # weight-decomposed method (DoRA) overrides all three.

    def bind_base(self, base: BaseWeight) -> None:
        """Called once, right after construction, with the frozen weight this adapter updates
        (`base.dense()`: (out, in), at least fp32, dequantized when quantized; on the meta
        device for counting). Additive adapters never need it; with `use_dora` the magnitude
        is created here."""
        if self.use_dora:
            dora.attach_magnitude(self, base)

    def combine(self, x: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
        """The adapted layer's output (..., out) from its input x (..., in) and the frozen
        layer's output `base_out` (..., out): base_out + branch(x) by default."""
        if self.use_dora:
            return dora.dora_combine(self, x, base_out)
        return base_out + self.branch(x, base_out.dtype)

    def branch(self, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """The additive branch for input x (..., in), computed in the adapter's dtype and
        returned in `dtype`."""
        return self(x.to(self.compute_dtype)).to(dtype)

    @property
    def is_additive(self) -> bool:
        """True when `combine` is the default base_out + branch(x), so a caller may add the
        branch into the base output in place (fused layers do); DoRA rescales, so it is not."""
        return type(self).combine is Adapter.combine and not self.use_dora

    def merge_weight(self, base_weight: torch.Tensor) -> torch.Tensor:
        """The merged weight (out, in) given W0 (out, in, at least fp32): W0 + ΔW by default.
        Must agree with `combine`: base(x) combined with the branch == x @ merged.T + bias."""
        if self.use_dora:
            return dora.dora_merged_weight(self, base_weight)
        return base_weight + self.delta_weight().to(base_weight.device)

    def low_rank_factors(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(A (in, k), B (out, k)) with ΔW = B Aᵀ when the update is a product of thin
        factors (exact rank and spectrum come cheap from them); None for other updates."""
        return None

    def weight_change(self, base_weight: torch.Tensor | None = None) -> torch.Tensor:
        """W' − W0, (out, in), at least fp32: what merging adds to the base weight. ΔW for
        additive adapters; with DoRA the rescaled difference, from `base_weight` (W0 rows) or,
        by default, the bound base weight."""
        if self.use_dora:
            return dora.dora_weight_change(self, base_weight)
        return self.delta_weight()

    def weight_change_factors(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Thin factors of `weight_change()` (as `low_rank_factors`), None where there are none:
        a DoRA rescaling W0 + ΔW row by row is not a product of thin factors."""
        return None if self.use_dora else self.low_rank_factors()

    @property
    def compute_dtype(self) -> torch.dtype:
        for p in self.parameters():
            return p.dtype
        return torch.float32


class LowRankAdapter(Adapter):
    """An adapter whose update is scaling · B Aᵀ with thin factors A (in, r), B (out, r).

    Subclasses set `scaling` and `dropout` and implement `factors()`; the forward pass never
    builds the (out, in) matrix: (x A) Bᵀ costs T·r·(in + out).
    """

    scaling: float
    dropout: nn.Module

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """A (in, r) and B (out, r)."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.undropped(self.dropout(x))

    def undropped(self, x: torch.Tensor) -> torch.Tensor:
        return self._through(x, *self.factors())

    def _through(self, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        # The scaling goes on B (out, r), not on the (tokens, out) output: one pass fewer.
        return (x @ a.to(x.dtype)) @ (b.T * self.scaling).to(x.dtype)

    def branch_and_update(self, x: torch.Tensor) -> tuple[torch.Tensor, Update]:
        a, b = self.factors()
        return self._through(x, a, b), (at_least_fp32(a), at_least_fp32(b) * self.scaling)

    def low_rank_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        a, b = self.factors()
        return at_least_fp32(a), at_least_fp32(b) * self.scaling

    def delta_weight(self) -> torch.Tensor:
        a, b = self.factors()
        return at_least_fp32(b) @ at_least_fp32(a).T * self.scaling


def layer_dims(layer: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of an nn.Linear or a Conv1D."""
    if isinstance(layer, Conv1D):
        # a weight partitioned by DeepSpeed ZeRO-3 at load time is an empty placeholder
        in_features, out_features = getattr(layer.weight, "ds_shape", layer.weight.shape)
        return int(in_features), int(out_features)
    return int(layer.in_features), int(layer.out_features)


@dataclass(frozen=True, eq=False)
class BaseWeight:
    """The frozen weight one adapter updates: output rows [start, stop) of `layer`.

    Handed to `Adapter.bind_base` at construction. Not a module: an adapter that keeps it
    does not register the base layer a second time.
    """

    layer: nn.Module
    start: int
    stop: int

    @property
    def shape(self) -> tuple[int, int]:
        """(out, in) of this adapter's part of the weight."""
        return self.stop - self.start, layer_dims(self.layer)[0]

    def dense(self) -> torch.Tensor:
        """The rows as a dense (out, in) matrix in at least fp32, nn.Linear orientation,
        dequantized when the layer is a bitsandbytes 4-bit or 8-bit layer."""
        weight = dequantized_weight(self.layer)
        if isinstance(self.layer, Conv1D):
            weight = weight.T
        return weight[self.start : self.stop]

    def squared_row_norms(self) -> torch.Tensor:
        """‖W0_o‖² per row of `dense()`, in at least fp32. W0 is frozen: computed once and kept
        while the layer holds the same weight tensor, unchanged (same storage and version)."""
        if torch.compiler.is_compiling():
            # In a compiled graph the checks below would break it; one pass over W0 instead.
            return self.dense().square().sum(dim=1)
        weight = self.layer.weight
        key = (weight.device, weight.data_ptr(), weight._version, torch.is_inference_mode_enabled())
        cached = self.__dict__.get("_squared_row_norms")
        if cached is None or cached[0]() is not weight or cached[1] != key:
            with torch.no_grad():
                squares = self.dense().square().sum(dim=1)
            # The weight itself by a weak reference: a replaced weight must not be kept alive.
            cached = (weakref.ref(weight), key, squares)
            self.__dict__["_squared_row_norms"] = cached
        return cached[2]

    def __getstate__(self) -> dict[str, Any]:
        # The cache holds a weak reference, which cannot be pickled; it is rebuilt on use.
        return {k: v for k, v in self.__dict__.items() if k != "_squared_row_norms"}

    def bias(self) -> torch.Tensor | None:
        """The bias of these rows (out,), None when the layer has none."""
        bias = self.layer.bias
        return None if bias is None else bias[self.start : self.stop]


def dequantized_weight(layer: nn.Module) -> torch.Tensor:
    """A linear layer's weight in at least fp32, as stored (Conv1D: (in, out)); bitsandbytes
    4-bit and 8-bit weights are dequantized, never returned packed."""
    weight = layer.weight
    quant_state = getattr(weight, "quant_state", None)
    if quant_state is not None:  # bnb Params4bit: 4-bit codes in uint8 with absmax blocks
        import bitsandbytes.functional as bnbf

        codes = weight.data
        if getattr(quant_state, "packing_format_for_cpu", False):
            # On CPUs with AVX512-BF16, bitsandbytes repacks an inference layer's codes for its
            # kernel and keeps absmax per block, unquantized, as (in / blocksize, out). Unpack the
            # codes (the inverse rebinds fields of the state it is given: hand it a copy) and use
            # that absmax, which is what the kernel multiplies by.
            codes, _ = bnbf._convert_weight_packed_for_cpu_inverse(codes, copy.copy(quant_state))
            quant_state = bnbf.QuantState(
                absmax=quant_state.absmax.T.reshape(-1).float(), shape=quant_state.shape, code=quant_state.code,
                blocksize=quant_state.blocksize, quant_type=quant_state.quant_type, dtype=torch.float32,
            )
        return bnbf.dequantize_4bit(codes, quant_state).float()
    scales = getattr(weight, "SCB", None)
    if weight.dtype == torch.int8 and scales is not None:  # bnb Int8Params: per-row absmax / 127
        return weight.data.float() * (scales.float().unsqueeze(1) / 127.0)
    return at_least_fp32(weight.detach())
