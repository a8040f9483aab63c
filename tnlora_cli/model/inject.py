"""Attach adapters to a model's target layers and freeze the base.

`inject_adapter` matches targets (`targets.py`), builds one adapter per target from one
seeded generator, hands each the same `SharedStore` (registered once on the model as
`tnlora_shared`) and its base weight (`Adapter.bind_base`), and wraps the layer
(`adapters.layers`). The iterators here find adapted layers again; `adapters_disabled` runs
the base model alone.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch import nn

from ..adapters import REGISTRY, AdaptedLinear, Adapter, AdapterConfig, SharedStore
from ..adapters.base import BaseWeight, LayerSpec, layer_dims
from ..adapters.layers import AdaptedSlice, FusedAdaptedLinear
from ..errors import TargetError
from ..tensor.init import make_generator
from . import frozen
from .fused import fused_slices
from .state import SHARED_ATTR, is_adapter_tensor
from .targets import find_targets, is_inside, is_linear_leaf, module_roles


@dataclass
class InjectionReport:
    targets: list[str]
    modules_to_save: list[str]
    roles: dict[str, list[str]] = field(default_factory=dict)
    #: Layers the target list matched inside modules trained in full: left unadapted.
    skipped_in_modules_to_save: list[str] = field(default_factory=list)


def inject_adapter(
    model: nn.Module,
    config: AdapterConfig,
    *,
    targets: list[str] | None = None,
    modules_to_save: list[str] | None = None,
    excluded: set[str] | None = None,
    roles: dict[str, str] | None = None,
) -> InjectionReport:
    """Attach an adapter of `config.type` to each target layer and freeze everything else.

    `targets` and `roles` (from a saved adapter) bypass matching and role naming so
    reloading is exact. Adapters are built in module order from one generator seeded by
    `config.seed`.
    """
    modules_to_save = list(modules_to_save or [])
    skipped: list[str] = []
    if targets is None:
        targets = find_targets(model, config, excluded=set(excluded or ()) | set(modules_to_save), trained_in_full=modules_to_save)
        if config.target_modules != "all-linear":
            skipped = [n for n in find_targets(model, config, excluded=set(excluded or ())) if is_inside(n, modules_to_save)]
    shared = SharedStore()
    built = build_adapters(model, config, targets, roles or module_roles(targets), shared)
    model.add_module(SHARED_ATTR, shared)
    by_role: dict[str, list[str]] = {}
    for unit in built:
        if unit.part is not None:
            fused = model.get_submodule(unit.layer_name)
            if not isinstance(fused, FusedAdaptedLinear):
                fused = FusedAdaptedLinear(fused)
                _replace(model, unit.layer_name, fused)
            fused.add_slice(unit.part, unit.adapter, unit.start, unit.stop)
        else:
            _replace(model, unit.name, AdaptedLinear(unit.base, unit.adapter))
        by_role.setdefault(unit.adapter.role, []).append(unit.name)
    freeze_base(model, modules_to_save)
    keys = frozen.frozen_keys(model, is_adapter_tensor)
    shared.frozen_record = {"saved": config.save_frozen, "seed": config.seed, "tensors": len(keys)}
    if not config.save_frozen:
        # Checksum of the frozen random tensors as drawn (before any engine shards them):
        # saved with the adapter, and compared on loading, when they are regenerated.
        state = model.state_dict()
        shared.frozen_record["checksum"] = frozen.checksum({k: state[k] for k in keys})
    return InjectionReport(targets=targets, modules_to_save=modules_to_save, roles=by_role, skipped_in_modules_to_save=skipped)


@dataclass
class BuiltAdapter:
    """One adapter built for one target, not yet attached: `base` is the frozen layer it
    updates (rows [start, stop) of it; `part` names the slice of a fused layer, else None)."""

    name: str
    adapter: Adapter
    base: nn.Module
    start: int
    stop: int
    part: str | None = None

    @property
    def layer_name(self) -> str:
        return self.name.rpartition(".")[0] if self.part is not None else self.name


def build_adapters(model: nn.Module, config: AdapterConfig, targets: list[str], roles: dict[str, str], shared: SharedStore) -> list[BuiltAdapter]:
    """Build one adapter per target, in target order, from one generator seeded by
    `config.seed`, with the shared tensors in `shared` and each adapter bound to its base
    weight. The model is not changed: the caller attaches them (`inject_adapter` here, the
    peft tuner in `integrations.peft`), so every way in gets the same tensors for a seed."""
    adapter_cls = REGISTRY[config.type]
    generator = make_generator(config.seed)
    linear = [n for n, m in model.named_modules() if is_linear_leaf(m)]
    slices = fused_slices(model, linear, config) if any(n not in set(linear) for n in targets) else {}
    specs = []
    for name in targets:
        layer, _, part = name.rpartition(".")
        if part in slices.get(layer, {}):
            base = model.get_submodule(layer)
            start, stop = slices[layer][part]
            specs.append(LayerSpec(name, roles[name], layer_dims(base)[0], stop - start))
            continue
        base = model.get_submodule(name)
        if not is_linear_leaf(base):
            raise TargetError(f"{name} is a {type(base).__name__}, not a linear layer")
        specs.append(LayerSpec(name, roles[name], *layer_dims(base)))
    device = _materialisable(_base_weight(model, specs[0].name, slices).device)
    adapter_cls.prepare_shared(shared, config, specs, generator)
    built = []
    for spec in specs:
        adapter = adapter_cls(spec.in_features, spec.out_features, config, shared, spec.role, generator)
        adapter.to(device=_materialisable(_base_weight(model, spec.name, slices).device))
        layer, _, part = spec.name.rpartition(".")
        if part in slices.get(layer, {}):
            unit = BuiltAdapter(spec.name, adapter, model.get_submodule(layer), *slices[layer][part], part=part)
        else:
            base = model.get_submodule(spec.name)
            unit = BuiltAdapter(spec.name, adapter, base, 0, layer_dims(base)[1])
        adapter.bind_base(BaseWeight(unit.base, unit.start, unit.stop))
        built.append(unit)
    shared.to(device)
    return built


def _replace(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def _base_weight(model: nn.Module, name: str, slices: dict) -> torch.Tensor:
    """The frozen weight a target (a layer, or a slice of a fused one) lives on."""
    layer, _, part = name.rpartition(".")
    module = model.get_submodule(layer if part in slices.get(layer, {}) else name)
    return getattr(module, "base_layer", module).weight


def _materialisable(device: torch.device) -> torch.device:
    """Adapters live beside their layer, except on the meta device (count-params), where
    they are real CPU tensors so that their sizes and seeds are exact."""
    return torch.device("cpu") if device.type == "meta" else device


def _adapters(model: nn.Module) -> Iterator[AdaptedLinear | AdaptedSlice]:
    for _, module in adapted_layers(model):
        yield module


def adapted_layers(model: nn.Module) -> Iterator[tuple[str, AdaptedLinear | AdaptedSlice]]:
    """Every adapter unit with its target name: adapted layers and adapted slices of fused
    layers (`...c_attn.q`). Each has `.adapter` and `.fan_in_fan_out`."""
    for name, module in model.named_modules():
        if isinstance(module, (AdaptedLinear, AdaptedSlice)):
            yield name, module


def merge_units(model: nn.Module) -> Iterator[tuple[str, AdaptedLinear | FusedAdaptedLinear]]:
    """Every layer whose weight changes on merging, for `merged_weight`: an
    adapted layer, or a fused layer with all its adapted slices at once."""
    for name, module in model.named_modules():
        if isinstance(module, (AdaptedLinear, FusedAdaptedLinear)):
            yield name, module


def freeze_base(model: nn.Module, modules_to_save: list[str]) -> None:
    """Freeze everything except adapter parameters the adapter marked trainable and the
    modules trained in full (task head)."""
    trainable = {id(p) for m in _adapters(model) for p in m.adapter.parameters() if p.requires_grad}
    shared = getattr(model, SHARED_ATTR, None)
    if shared is not None:
        trainable |= {id(p) for p in shared.parameters() if p.requires_grad}
    for name in modules_to_save:
        trainable |= {id(p) for p in model.get_submodule(name).parameters()}
    for p in model.parameters():
        p.requires_grad_(id(p) in trainable)


def require_linear(model: nn.Module, what: str) -> None:
    """Refuse, before anything is written, an adapter whose branch is not a weight update."""
    from ..errors import MergeError

    for name, layer in adapted_layers(model):
        if not layer.adapter.is_linear:
            raise MergeError(
                f"{name}: this adapter's update is nonlinear in the input, so {what}",
                hint="only tensorguide with activation: none (the default) has a weight update",
            )


@contextlib.contextmanager
def adapters_disabled(model: nn.Module) -> Iterator[None]:
    """Run the base model alone (the task head, if trained, stays as it is)."""
    layers = list(_adapters(model))
    for layer in layers:
        layer.adapter_enabled = False
    try:
        yield
    finally:
        for layer in layers:
            layer.adapter_enabled = True
