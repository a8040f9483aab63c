"""Exact parameter accounting of an adapter on a model, without reading any weight.

The base model is usually on the meta device; the adapter tensors are real, so shapes,
sharing and seeds are exactly those of training. Every tensor is counted once by identity:
a shared core serves many layers and is counted once.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch

from ..recipe.sections import Recipe
from .inject import adapted_layers, inject_adapter
from .loading import head_module_names, output_head_names
from .state import SHARED_ATTR


@dataclass
class Counts:
    layers: int = 0
    trainable: int = 0
    frozen: int = 0
    #: adapter.save_frozen: false stores the seed and a checksum instead of the frozen tensors.
    frozen_saved: bool = True

    @property
    def stored(self) -> int:
        """What the adapter file holds: frozen random tensors too, unless save_frozen is false."""
        return self.trainable + (self.frozen if self.frozen_saved else 0)


@dataclass
class CountReport:
    model: str
    adapter: str
    roles: dict[str, Counts] = field(default_factory=dict)
    head: Counts = field(default_factory=Counts)
    #: The modules counted in `head` (modules_to_save) and whether they are the task's own head.
    head_modules: list[str] = field(default_factory=list)
    head_is_task_head: bool = True
    base_parameters: int = 0
    #: Layers the target list matched inside modules_to_save: trained in full, not adapted.
    not_adapted: list[str] = field(default_factory=list)

    @property
    def adapter_total(self) -> Counts:
        total = Counts(frozen_saved=all(c.frozen_saved for c in self.roles.values()))
        for c in self.roles.values():
            total.layers += c.layers
            total.trainable += c.trainable
            total.frozen += c.frozen
        return total

    @property
    def trainable_percent(self) -> float:
        """Adapter trainable parameters over base + adapter trainable (the papers' ratio)."""
        trainable = self.adapter_total.trainable
        return 100.0 * trainable / (self.base_parameters + trainable)

    def to_json(self) -> dict:
        total = self.adapter_total
        return {
            "model": self.model,
            "adapter": self.adapter,
            "roles": {k: {**asdict(v), "stored": v.stored} for k, v in self.roles.items()},
            "adapter_total": {**asdict(total), "stored": total.stored},
            "head": {**asdict(self.head), "stored": self.head.stored, "modules": self.head_modules},
            "base_parameters": self.base_parameters,
            "trainable_percent": self.trainable_percent,
        }


def unique_tensors(tensors) -> list[torch.Tensor]:
    seen, out = set(), []
    for t in tensors:
        if id(t) not in seen:
            seen.add(id(t))
            out.append(t)
    return out


def count_adapter(recipe: Recipe, model: torch.nn.Module) -> CountReport:
    """Attach the recipe's adapter to `model` (usually on the meta device) and count it:
    per role, trainable and frozen, every tensor once by identity, and the task head."""
    base_parameters = sum(t.numel() for t in unique_tensors(model.parameters()))
    modules_to_save = recipe.adapter.modules_to_save
    if modules_to_save is None:
        modules_to_save = head_module_names(model, recipe.task)
    injection = inject_adapter(model, recipe.adapter, modules_to_save=modules_to_save, excluded=output_head_names(model))
    report = CountReport(model=recipe.model, adapter=recipe.adapter.type, base_parameters=base_parameters,
                         not_adapted=injection.skipped_in_modules_to_save, head_modules=list(injection.modules_to_save),
                         head_is_task_head=set(injection.modules_to_save) <= set(head_module_names(model, recipe.task)))
    counted: set[int] = set()
    saved = recipe.adapter.save_frozen
    for name, layer in adapted_layers(model):
        counts = report.roles.setdefault(layer.adapter.role, Counts(frozen_saved=saved))
        counts.layers += 1
        for t in unique_tensors(list(layer.adapter.parameters()) + list(layer.adapter.buffers())):
            counted.add(id(t))
            if t.requires_grad:
                counts.trainable += t.numel()
            else:
                counts.frozen += t.numel()
    shared = getattr(model, SHARED_ATTR)
    for key, tensor in shared.tensors.items():
        role = shared.roles[key]
        counts = report.roles.setdefault(role if role != "*" else "shared (all roles)", Counts(frozen_saved=saved))
        if tensor.requires_grad:
            counts.trainable += tensor.numel()
        else:
            counts.frozen += tensor.numel()
    counted |= {id(t) for t in shared.tensors.values()}
    for name in injection.modules_to_save:
        for t in unique_tensors(model.get_submodule(name).parameters()):
            if id(t) not in counted:  # each tensor counted once, wherever it lives
                counted.add(id(t))
                report.head.trainable += t.numel()
        report.head.layers += 1
    return report
