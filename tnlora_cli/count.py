"""`tnlora count-params`: exact parameter accounting without loading any weights.

The base model is built on the meta device from its config (a shipped paper config, an
embedded model's, or a local `config.json`); the adapter tensors are real, so shapes,
sharing and seeds are exactly those of training. Every tensor is counted once by identity:
a shared core serves many layers and is counted once.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from transformers import AutoConfig, PretrainedConfig

from .embedded import minilm_path
from .errors import ModelError
from .inject import SHARED_ATTR, adapted_layers, inject_adapter
from .modeling import head_module_names, label_config, model_class, output_head_names
from .recipe import Recipe

CONFIG_DIR = Path(__file__).parent / "model_configs"


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
            "head": {**asdict(self.head), "stored": self.head.stored},
            "base_parameters": self.base_parameters,
            "trainable_percent": self.trainable_percent,
        }


def shipped_configs() -> list[str]:
    return sorted(p.stem for p in CONFIG_DIR.glob("*.json"))


def load_config(name: str, trust_remote_code: bool = False) -> PretrainedConfig:
    """A shipped paper config, an embedded model's config, a directory, or a hub id."""
    shipped = CONFIG_DIR / f"{name}.json"
    if shipped.is_file():
        data = json.loads(shipped.read_text())
        return AutoConfig.for_model(data.pop("model_type"), **data)
    if name == "minilm":
        return AutoConfig.from_pretrained(minilm_path())
    path = Path(name).expanduser()
    if path.is_dir() or (path.parent.is_dir() and path.name == "config.json"):
        if (path if path.is_dir() else path.parent).joinpath("config.json").is_file():
            from .model_check import check_model_dir

            check_model_dir(path if path.is_dir() else path.parent, trust_remote_code, weights=False)
        return AutoConfig.from_pretrained(path if path.is_dir() else path.parent, trust_remote_code=trust_remote_code)
    try:
        return AutoConfig.from_pretrained(name, trust_remote_code=trust_remote_code)
    except Exception:  # noqa: BLE001 - network and format errors alike
        raise ModelError(
            f"model: no config for '{name}'",
            hint=f"use one of the shipped configs ({', '.join(shipped_configs())}), minilm, or a directory with config.json",
        ) from None


def build_on_meta(recipe: Recipe, label_names: list[str] | None = None) -> torch.nn.Module:
    """The recipe's task model on the meta device. Without `label_names`, a classification
    head has the recipe's `data.labels` (or 2) classes."""
    config = load_config(recipe.model, recipe.trust_remote_code)
    if recipe.task == "classification":
        config.update(label_config(label_names or recipe.data.labels or ["LABEL_0", "LABEL_1"]))
    with torch.device("meta"):
        return model_class(recipe.task, config).from_config(config, trust_remote_code=recipe.trust_remote_code)


def _unique(tensors) -> list[torch.Tensor]:
    seen, out = set(), []
    for t in tensors:
        if id(t) not in seen:
            seen.add(id(t))
            out.append(t)
    return out


def count_params(recipe: Recipe, model: torch.nn.Module | None = None) -> CountReport:
    """Count the recipe's adapter on its model (built on the meta device unless given; the
    adapter is attached to `model`)."""
    model = model if model is not None else build_on_meta(recipe)
    base_parameters = sum(t.numel() for t in _unique(model.parameters()))
    modules_to_save = recipe.adapter.modules_to_save
    if modules_to_save is None:
        modules_to_save = head_module_names(model, recipe.task)
    injection = inject_adapter(model, recipe.adapter, modules_to_save=modules_to_save, excluded=output_head_names(model))
    report = CountReport(model=recipe.model, adapter=recipe.adapter.type, base_parameters=base_parameters,
                         not_adapted=injection.skipped_in_modules_to_save)
    counted: set[int] = set()
    saved = recipe.adapter.save_frozen
    for name, layer in adapted_layers(model):
        counts = report.roles.setdefault(layer.adapter.role, Counts(frozen_saved=saved))
        counts.layers += 1
        for t in _unique(list(layer.adapter.parameters()) + list(layer.adapter.buffers())):
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
        for t in _unique(model.get_submodule(name).parameters()):
            if id(t) not in counted:  # each tensor counted once, wherever it lives
                counted.add(id(t))
                report.head.trainable += t.numel()
        report.head.layers += 1
    return report
