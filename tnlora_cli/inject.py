"""Find target layers, attach adapters, freeze the base, and move adapter state in and out.

Target rules follow peft so that recipes carry over:
- a list: each entry is an exact module name or a name suffix (`query` matches
  `bert.encoder.layer.0.attention.self.query`);
- a string: a regex that must match the full module name (`re.fullmatch`);
- `all-linear`: every linear layer except the output head and the task head.
Only leaf `nn.Linear` / GPT-2 `Conv1D` modules are ever matched.
"""

from __future__ import annotations

import contextlib
import difflib
import re
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from .adapters import REGISTRY, AdaptedLinear, AdapterConfig, SharedStore
from .adapters.base import LayerSpec, layer_dims
from .errors import TargetError
from . import frozen
from .fused import AdaptedSlice, FusedAdaptedLinear, check_no_overlap, fused_slices
from .tensor.init import make_generator

SHARED_ATTR = "tnlora_shared"


@dataclass
class InjectionReport:
    targets: list[str]
    modules_to_save: list[str]
    roles: dict[str, list[str]] = field(default_factory=dict)
    #: Layers the target list matched inside modules trained in full: left unadapted.
    skipped_in_modules_to_save: list[str] = field(default_factory=list)


def is_linear_leaf(module: nn.Module) -> bool:
    return isinstance(module, (nn.Linear, Conv1D)) and not isinstance(module, AdaptedLinear)


def module_role(name: str) -> str:
    """The role of one layer: its path with the layer index removed (see `module_roles`)."""
    return module_roles([name])[name]


def _split_at_layer_index(name: str) -> tuple[str | None, str]:
    """(stack, rest) around the first numeric path component that is not the last one:
    `bert.encoder.layer.0.attention.output.dense` -> (`bert.encoder.layer`,
    `attention.output.dense`); (None, name) when there is no layer index (`lm_head`,
    `classifier.1`)."""
    parts = name.split(".")
    for i, part in enumerate(parts[:-1]):
        if part.isdigit():
            return ".".join(parts[:i]), ".".join(parts[i + 1 :])
    return None, name


def module_roles(names: list[str]) -> dict[str, str]:
    """The role of each layer: its position in the block, i.e. its path with the layer
    index removed (`attention.output.dense`, `intermediate.dense` and `output.dense` are
    three roles on BERT although all three layers are called `dense`; `self_attn.q_proj` on
    Llama). The stack before the index (`model.layers`) is kept only when the layers come
    from several stacks (an encoder and a decoder). Layers outside any stack keep their
    full path. Adapters that share tensors by role (TRAC) share exactly within a role."""
    split = {name: _split_at_layer_index(name) for name in names}
    stacks = {stack for stack, _ in split.values() if stack is not None}
    roles = {}
    for name, (stack, rest) in split.items():
        roles[name] = rest if stack is None or len(stacks) == 1 else f"{stack}.{rest}"
    return roles


def legacy_module_roles(names: list[str]) -> dict[str, str]:
    """The roles adapters saved before roles were paths used: the layer's own attribute
    name (an index in a container kept its parent's name). Only for loading those files."""
    roles = {}
    for name in names:
        parts = name.split(".")
        roles[name] = ".".join(parts[-2:]) if parts[-1].isdigit() and len(parts) > 1 else parts[-1]
    return roles


def _leaf_name(name: str) -> str:
    return legacy_module_roles([name])[name]


def _matches(name: str, spec: list[str] | str) -> bool:
    if isinstance(spec, str):
        return re.fullmatch(spec, name) is not None
    return any(name == entry or name.endswith("." + entry) for entry in spec)


def _inside(name: str, modules: list[str] | set[str]) -> bool:
    return any(name == m or name.startswith(m + ".") for m in modules)


def find_targets(
    model: nn.Module,
    config: AdapterConfig,
    excluded: set[str] | None = None,
    trained_in_full: list[str] | None = None,
) -> list[str]:
    """Names of the leaf linear layers selected by `config.target_modules`. Layers inside
    `trained_in_full` (modules_to_save) are never targets, whatever the list says: they are
    trained in full already, and adapting them too would train and count them twice."""
    excluded = excluded or set()
    trained_in_full = trained_in_full or []
    linear = [name for name, module in model.named_modules() if is_linear_leaf(module)]
    spec = config.target_modules
    if isinstance(spec, str) and spec == "all-linear":
        chosen = [n for n in linear if n not in excluded and not any(n == e or n.startswith(e + ".") for e in excluded)]
    else:
        # Slices of fused layers (c_attn.q, ...) are named like layers, right after their layer.
        slices = fused_slices(model, linear, config)
        linear = [v for n in linear for v in [n, *(f"{n}.{s}" for s in slices.get(n, {}))]]
        chosen = [n for n in linear if _matches(n, spec)]
        check_no_overlap(chosen, slices)
        if not chosen:
            raise TargetError(_no_match_message(model, spec, linear), hint=_no_match_hint(spec, linear))
        chosen = [n for n in chosen if not _inside(n, trained_in_full)]
        if not chosen:
            raise TargetError(
                f"adapter.target_modules: {spec!r} matches only layers inside adapter.modules_to_save ({', '.join(trained_in_full)}), which are trained in full",
                hint="target layers of the base model, or leave the head out of modules_to_save",
            )
    if config.exclude_modules:
        chosen = [n for n in chosen if not _matches(n, config.exclude_modules)]
    if not chosen:
        raise TargetError("adapter.target_modules: every matching layer was excluded", hint="loosen adapter.exclude_modules")
    return chosen


def _no_match_message(model: nn.Module, spec: list[str] | str, linear: list[str]) -> str:
    not_linear = [n for n, _ in model.named_modules() if n and _matches(n, spec)]
    if not_linear:
        kinds = sorted({type(model.get_submodule(n)).__name__ for n in not_linear})
        return f"adapter.target_modules: {spec!r} matches only non-linear modules ({', '.join(kinds)}), e.g. {not_linear[0]}"
    return f"adapter.target_modules: {spec!r} matches no linear layer of the model"


def _no_match_hint(spec: list[str] | str, linear: list[str]) -> str:
    suffixes = sorted({_leaf_name(n) for n in linear})
    entries = [spec] if isinstance(spec, str) else spec
    near: list[str] = []
    for entry in entries:
        near += difflib.get_close_matches(_leaf_name(entry), suffixes, n=3, cutoff=0.4)
    near_text = f"did you mean {', '.join(dict.fromkeys(near))}? " if near else ""
    return f"{near_text}linear layers in this model end in: {', '.join(suffixes)} (or use 'all-linear')"


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
    adapter_cls = REGISTRY[config.type]
    modules_to_save = list(modules_to_save or [])
    skipped: list[str] = []
    if targets is None:
        targets = find_targets(model, config, excluded=set(excluded or ()) | set(modules_to_save), trained_in_full=modules_to_save)
        if config.target_modules != "all-linear":
            skipped = [n for n in find_targets(model, config, excluded=set(excluded or ())) if _inside(n, modules_to_save)]
    shared = SharedStore()
    generator = make_generator(config.seed)
    linear = [n for n, m in model.named_modules() if is_linear_leaf(m)]
    slices = fused_slices(model, linear, config) if any(n not in set(linear) for n in targets) else {}
    specs = []
    roles = roles or module_roles(targets)
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
    model.add_module(SHARED_ATTR, shared)
    by_role: dict[str, list[str]] = {}
    for spec in specs:
        name, role = spec.name, spec.role
        adapter = adapter_cls(spec.in_features, spec.out_features, config, shared, role, generator)
        adapter.to(device=_materialisable(_base_weight(model, name, slices).device))
        layer, _, part = name.rpartition(".")
        if part in slices.get(layer, {}):
            fused = model.get_submodule(layer)
            if not isinstance(fused, FusedAdaptedLinear):
                fused = FusedAdaptedLinear(fused)
                _replace(model, layer, fused)
            fused.add_slice(part, adapter, *slices[layer][part])
        else:
            _replace(model, name, AdaptedLinear(model.get_submodule(name), adapter))
        by_role.setdefault(role, []).append(name)
    shared.to(device)
    freeze_base(model, modules_to_save)
    keys = frozen.frozen_keys(model, is_adapter_tensor)
    shared.frozen_record = {"saved": config.save_frozen, "seed": config.seed, "tensors": len(keys)}
    if not config.save_frozen:
        # Checksum of the frozen random tensors as drawn (before any engine shards them):
        # saved with the adapter, and compared on loading, when they are regenerated.
        state = model.state_dict()
        shared.frozen_record["checksum"] = frozen.checksum({k: state[k] for k in keys})
    return InjectionReport(targets=targets, modules_to_save=modules_to_save, roles=by_role, skipped_in_modules_to_save=skipped)


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
    """Every layer whose weight changes on merging, with `merged_weight(dtype, weight)`: an
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


def is_adapter_tensor(key: str) -> bool:
    """A state-dict key of an adapter tensor (per layer, or shared in the store)."""
    return ".adapter." in key or key.startswith(SHARED_ATTR + ".")


def _is_adapter_key(key: str, modules_to_save: list[str]) -> bool:
    return is_adapter_tensor(key) or any(key.startswith(m + ".") for m in modules_to_save)


def require_linear(model: nn.Module, what: str) -> None:
    """Refuse, before anything is written, an adapter whose branch is not a weight update."""
    from .errors import MergeError

    for name, layer in adapted_layers(model):
        if not layer.adapter.is_linear:
            raise MergeError(
                f"{name}: this adapter's update is nonlinear in the input, so {what}",
                hint="only tensorguide with activation: none (the default) has a weight update",
            )


def adapter_state_dict(model: nn.Module, modules_to_save: list[str], include_frozen: bool | None = None) -> dict[str, torch.Tensor]:
    """Everything that is not the frozen base: adapter tensors (trainable and frozen),
    shared tensors once, and the modules trained in full. Frozen random adapter tensors are
    left out when `include_frozen` is false (default: the recipe's `adapter.save_frozen`)."""
    if include_frozen is None:
        include_frozen = frozen_record(model).get("saved", True)
    skip = set() if include_frozen else set(frozen.frozen_keys(model, is_adapter_tensor))
    return {k: v.detach() for k, v in model.state_dict().items() if _is_adapter_key(k, modules_to_save) and k not in skip}


def frozen_record(model: nn.Module) -> dict:
    """{"saved", "seed", "checksum", "tensors"} of the model's frozen random adapter tensors,
    as drawn at injection (written to adapter_config.json as `frozen`)."""
    shared = getattr(model, SHARED_ATTR, None)
    return dict(getattr(shared, "frozen_record", None) or {})


def load_adapter_state_dict(
    model: nn.Module, state: dict[str, torch.Tensor], modules_to_save: list[str], frozen_saved: dict | None = None
) -> None:
    """Load an adapter file's tensors. `frozen_saved` is the file's `frozen` record: when its
    frozen tensors were not stored, the ones injection regenerated must match its checksum."""
    include = True if frozen_saved is None else frozen_saved.get("saved", True)
    if not include:
        drawn = frozen_record(model)
        frozen.verify(frozen_saved, drawn.get("seed"), drawn.get("checksum"), "adapter")
    expected = set(adapter_state_dict(model, modules_to_save, include_frozen=include))
    missing, unexpected = expected - set(state), set(state) - expected
    if missing or unexpected:
        from .errors import CheckpointError

        raise CheckpointError(
            f"adapter weights do not fit the model: {len(missing)} missing (e.g. {sorted(missing)[:2]}), "
            f"{len(unexpected)} unexpected (e.g. {sorted(unexpected)[:2]})",
            hint="load the adapter into the base model and recipe it was trained with",
        )
    model.load_state_dict(state, strict=False)


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


@torch.no_grad()
def merge_into_base(model: nn.Module, dtype: torch.dtype | None = None) -> int:
    """Replace each AdaptedLinear (and each fused layer with adapted slices) by its base
    layer holding W0 + ΔW. Returns the number of layers merged."""
    require_linear(model, "it cannot be merged into a weight")
    count = 0
    for name, layer in list(merge_units(model)):
        base = layer.base_layer
        base.weight.data = layer.merged_weight(dtype)
        if base.bias is not None and dtype is not None:
            base.bias.data = base.bias.data.to(dtype)
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, base)
        count += 1
    if hasattr(model, SHARED_ATTR):
        delattr(model, SHARED_ATTR)
    return count


def logical_numel(t: torch.Tensor) -> int:
    """Elements of the weight a tensor stands for: a bitsandbytes 4-bit parameter packs two
    values per byte (its numel is half), so count its original shape; a parameter
    partitioned by DeepSpeed ZeRO-3 is an empty placeholder that knows its full size."""
    if getattr(t, "ds_numel", None) is not None:
        return int(t.ds_numel)
    quant_state = getattr(t, "quant_state", None)
    shape = getattr(quant_state, "shape", None)
    if shape is not None:
        n = 1
        for s in shape:
            n *= s
        return n
    return t.numel()


def count_parameters(model: nn.Module) -> dict[str, int]:
    """Unique parameters counted once: trainable, and all (base + adapter + head)."""
    seen: set[int] = set()
    trainable = total = 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += logical_numel(p)
        if p.requires_grad:
            trainable += p.numel()
    return {"trainable": trainable, "total": total}
