"""Which layers a recipe adapts: target matching and roles.

Target rules follow peft so that recipes carry over:
- a list: each entry is an exact module name or a name suffix (`query` matches
  `bert.encoder.layer.0.attention.self.query`);
- a string: a regex that must match the full module name (`re.fullmatch`);
- `all-linear`: every linear layer except the output head and the task head.
Only leaf `nn.Linear` / GPT-2 `Conv1D` modules (and slices of fused ones) are ever matched.
A layer's role is its path with the layer index removed: what shared tensors are keyed on.
"""

from __future__ import annotations

import difflib
import re

from torch import nn
from transformers.pytorch_utils import Conv1D

from ..adapters import AdaptedLinear, AdapterConfig
from ..errors import TargetError
from .fused import check_no_overlap, fused_slices


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


def is_inside(name: str, modules: list[str] | set[str]) -> bool:
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
        if not chosen:  # a CNN's only linear layer is its head
            raise TargetError(f"adapter.target_modules: 'all-linear' leaves out the output head, and this model has no other linear layer "
                              f"(its linear layers: {', '.join(linear) or 'none'})",
                              hint="name the layer to adapt (e.g. target_modules: [classifier.1], with adapter.modules_to_save naming "
                                   "what else to train in full, as recipes/mnist_resnet18_tensorguide.yaml does)")
    else:
        # Slices of fused layers (c_attn.q, ...) are named like layers, right after their layer.
        slices = fused_slices(model, linear, config)
        linear = [v for n in linear for v in [n, *(f"{n}.{s}" for s in slices.get(n, {}))]]
        chosen = [n for n in linear if _matches(n, spec)]
        check_no_overlap(chosen, slices)
        if not chosen:
            raise TargetError(_no_match_message(model, spec, linear), hint=_no_match_hint(spec, linear))
        chosen = [n for n in chosen if not is_inside(n, trained_in_full)]
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
