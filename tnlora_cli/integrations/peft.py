"""tnlora's tensor-network adapters as peft methods.

Importing this module adds TRAC, TeRA, LoRETTA and TensorGuide to peft's method tables
(`PEFT_TYPE_TO_CONFIG_MAPPING`, `PEFT_TYPE_TO_TUNER_MAPPING`, `PEFT_TYPE_TO_PREFIX_MAPPING`)
under keys of tnlora's own `str` enum (`TNLORA_TRAC`, ...): peft's `register_peft_method`
only accepts members of its closed `PeftType`, its tables are plain dicts, and a `str` enum
member is looked up by its value, so `adapter_config.json` round-trips and transformers'
`load_adapter` (which reads `peft_type.value`) works.

Nothing here computes an update. The tuner matches targets with tnlora's rules
(`model.targets.find_targets`), builds the adapters with `model.inject.build_adapters` (one
generator seeded by `seed`, shared tensors drawn once into a `SharedStore`: the same tensors
`tnlora train` draws), and puts them behind peft's `BaseTunerLayer` interface:

- `TnloraLayer` wraps one frozen linear layer (its `base_layer`) and holds one tnlora adapter
  per peft adapter name in `tnlora_adapter`; the output is `Adapter.combine`, the merged
  weight `adapters.layers.merged_weight` (tnlora's one merge path, with its non-finite check).
- `TnloraSharedTensors`, registered once on the model as `tn_shared`, holds each adapter's
  `SharedStore` in `tnlora_store`; layers keep unregistered references, so a shared core is
  one entry in `state_dict`, `parameters()` and the adapter file.

Checkpoint keys (adapter name removed, as peft saves them):
`base_model.model.<layer>.tnlora_adapter.<tensor>` and
`base_model.model.tn_shared.tnlora_store.tensors.<key>`.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import enum
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import peft
from packaging.version import Version

#: The peft versions this registration is tested with: [first, end). It relies on peft's
#: method tables and tuner hooks, which are internal API.
PEFT_TESTED = ("0.21.2", "0.22")


def check_peft_version(found: str) -> None:
    """Refuse, with one message, a peft outside the tested range (its internals may differ)."""
    first, end = PEFT_TESTED
    if not Version(first) <= Version(found) < Version(end):
        raise ImportError(
            f"tnlora_cli.peft: peft {found} is installed, but tnlora registers its adapters with peft >= {first}, < {end} "
            f"(the versions it is tested with). Install a supported one: pip install 'tnlora[peft]' (or 'peft>={first},<{end}')"
        )


check_peft_version(peft.__version__)

import pydantic
import torch
from peft.config import PeftConfig
from peft.mapping import (
    PEFT_TYPE_TO_CONFIG_MAPPING,
    PEFT_TYPE_TO_PREFIX_MAPPING,
    PEFT_TYPE_TO_TUNER_MAPPING,
)
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer, check_adapters_to_merge
from torch import nn
from transformers.pytorch_utils import Conv1D

from .. import __version__ as TNLORA_VERSION
from ..adapters import REGISTRY, AdaptedLinear, Adapter, AdapterConfig, SharedStore
from ..adapters.base import at_least_fp32
from ..adapters.dora import direction_norm
from ..adapters.layers import merged_weight
from ..errors import TnloraError
from ..model import frozen
from ..model.inject import BuiltAdapter, build_adapters
from ..model.loading import output_head_names
from ..model.peft_format import PEFT_TYPES, SHARED_HOLDER
from ..model.targets import find_targets, module_roles
from ..run.atomic import write_text

#: The prefix of every tnlora tensor attribute (`tnlora_adapter`, `tnlora_store`: the names
#: `model.peft_format` maps); transformers' `load_adapter` inserts the adapter name after it.
PREFIX = "tnlora_"


#: tnlora's peft types: `str` members, so `peft_type.value` and JSON both give the name.
TnloraMethod = enum.Enum("TnloraMethod", {name: name for name in PEFT_TYPES.values()}, type=str, module=__name__)

#: tnlora adapter type -> (peft config class name, peft type).
METHODS = {
    kind: (name, TnloraMethod(PEFT_TYPES[kind]))
    for kind, name in (("trac", "TracConfig"), ("tera", "TeraConfig"), ("loretta", "LorettaConfig"), ("tensorguide", "TensorGuideConfig"))
}


@dataclasses.dataclass
class TnloraPeftConfig(PeftConfig):
    """Base of the tnlora methods' peft configs. Each subclass's fields are its recipe's
    `adapter:` keys (generated from the tnlora config class: one home for them) plus peft's."""

    adapter_type: ClassVar[str]
    tnlora_version: str | None = dataclasses.field(default=None, metadata={"help": "The tnlora version that wrote this adapter."})
    frozen: dict | None = dataclasses.field(
        default=None, metadata={"help": "Seed and checksum of the frozen random tensors as drawn; filled in on injection."}
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = METHODS[self.adapter_type][1]
        if self.tnlora_version is None:
            self.tnlora_version = TNLORA_VERSION
        if self.target_modules is None:
            raise ValueError(
                f"{type(self).__name__}: target_modules is required, e.g. target_modules=['q_proj', 'v_proj'] or 'all-linear'"
            )
        self.to_tnlora()  # every check of the recipe, now

    def to_tnlora(self) -> AdapterConfig:
        """The same settings as tnlora's own adapter config (validated as a recipe is)."""
        config_class = REGISTRY[self.adapter_type].config_class
        values = {name: getattr(self, name) for name in config_class.model_fields if name != "type"}
        for name in ("target_modules", "exclude_modules", "modules_to_save"):
            if isinstance(values[name], (set, frozenset, tuple)):
                values[name] = sorted(values[name])
        try:
            return config_class(type=self.adapter_type, **values)
        except pydantic.ValidationError as error:
            first = error.errors()[0]
            where = ".".join(str(p) for p in first["loc"])
            raise ValueError(f"{type(self).__name__}.{where}: {first['msg']} (got {first.get('input')!r})") from None
        except TnloraError as error:
            raise ValueError(f"{type(self).__name__}: {str(error).replace('adapter.', '')}") from None

    def save_pretrained(self, save_directory: str, **kwargs: Any) -> None:
        super().save_pretrained(save_directory, **kwargs)
        # peft writes its model card just before the config: say how to load this adapter.
        add_card_section(save_directory, self)


def add_card_section(directory: str, config: TnloraPeftConfig) -> None:
    """Append to the directory's README.md (peft's model card, if any) how to load the adapter."""
    path = Path(directory) / "README.md"
    text = path.read_text() if path.exists() else ""
    if "import tnlora_cli.peft" in text:
        return
    name = METHODS[config.adapter_type][0]
    text += (
        f"\n## Loading this adapter\n\nA tnlora {config.adapter_type} adapter (peft type `{config.peft_type.value}`, "
        f"written by tnlora {config.tnlora_version}). peft knows this type once tnlora has registered it; without that,\n"
        f"loading fails in peft with `KeyError: '{config.peft_type.value}'`. Install tnlora and import its peft module first:\n\n"
        "```bash\npip install tnlora\n```\n\n"
        "```python\nimport tnlora_cli.peft  # registers tnlora's adapters with peft\nfrom peft import PeftModel\n\n"
        f"model = PeftModel.from_pretrained(base_model, {Path(directory).name!r})\n```\n\n"
        f"To train one: `from tnlora_cli.peft import {name}`.\n"
    )
    write_text(path, text)


def _config_class(adapter_type: str) -> type[TnloraPeftConfig]:
    """A peft config class whose fields are those of tnlora's `adapter_type` config."""
    name, _ = METHODS[adapter_type]
    source = REGISTRY[adapter_type].config_class
    fields = []
    for key, info in source.model_fields.items():
        if key == "type":
            continue
        default = None if info.is_required() else info.default
        meta = {"help": info.description or ""}
        if isinstance(default, (list, dict, set)):
            field = dataclasses.field(default_factory=lambda d=default: copy.deepcopy(d), metadata=meta)
        else:
            field = dataclasses.field(default=default, metadata=meta)
        fields.append((key, Any, field))
    doc = (
        f"peft config of tnlora's {adapter_type} adapter: the keys of a recipe's `adapter:` section "
        f"(see `tnlora_cli.adapters.{source.__module__.rsplit('.', 1)[-1]}`), plus peft's task_type and inference_mode."
    )
    return dataclasses.make_dataclass(
        name, fields, bases=(TnloraPeftConfig,), namespace={"adapter_type": adapter_type, "__doc__": doc, "__module__": __name__}
    )


TracConfig = _config_class("trac")
TeraConfig = _config_class("tera")
LorettaConfig = _config_class("loretta")
TensorGuideConfig = _config_class("tensorguide")
CONFIG_CLASSES: dict[str, type[TnloraPeftConfig]] = {
    "trac": TracConfig, "tera": TeraConfig, "loretta": LorettaConfig, "tensorguide": TensorGuideConfig,
}


class TnloraLayer(nn.Module, BaseTunerLayer):
    """A frozen `nn.Linear` (or GPT-2 `Conv1D`) with one tnlora adapter per peft adapter name."""

    adapter_layer_names = ("tnlora_adapter",)

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.tnlora_adapter = nn.ModuleDict()
        self.fan_in_fan_out = isinstance(base_layer, Conv1D)
        self.merged_adapters: list[str] = []
        self._disable_adapters = False

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        out = self.base_layer(x, *args, **kwargs)
        if self.merged:
            return out
        for name in self.active_adapters:
            if name in self.tnlora_adapter:
                out = self.tnlora_adapter[name].combine(x, out)
        return out

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """W' − W0 of one adapter (ΔW, or DoRA's rescaled update) in the base weight's orientation
        (peft's convention: (in, out) for GPT-2's Conv1D), at least fp32. peft's `save_as_lora`
        factorises it."""
        delta = self.tnlora_adapter[adapter_name].weight_change()
        return delta.T if self.fan_in_fan_out else delta

    def supports_lora_conversion(self, adapter_name: str = "default") -> bool:
        return all(a.is_linear for a in self.tnlora_adapter.values())

    @torch.no_grad()
    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        # merged_weight always checks for non-finite values, so safe_merge changes nothing.
        base = self.get_base_layer()
        if getattr(base.weight, "quant_state", None) is not None or getattr(base.weight, "SCB", None) is not None:
            raise ValueError(
                "this base layer is quantized (bitsandbytes): merging would have to requantize it. Load the base "
                "unquantized and merge there, or use `tnlora merge` on the adapter directory (it merges into the original weights)"
            )
        for name in check_adapters_to_merge(self, adapter_names):
            if name not in self.tnlora_adapter:
                continue
            adapter = self.tnlora_adapter[name]
            if not adapter.is_linear:
                raise ValueError(f"the {name} adapter's update is nonlinear in the input (tensorguide with an activation): it cannot be merged")
            if adapter.use_dora:
                # DoRA's merged weight is not W0 plus something that can be subtracted back
                # from it alone: keep the norm the merge divided by, to invert it exactly.
                weight = at_least_fp32(base.weight)
                self.__dict__.setdefault("_dora_norms", {})[name] = direction_norm(weight.T if self.fan_in_fan_out else weight, adapter.delta_weight())
            base.weight.data = merged_weight(AdaptedLinear(base, adapter))
            self.merged_adapters.append(name)

    @torch.no_grad()
    def unmerge(self) -> None:
        base = self.get_base_layer()
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            adapter = self.tnlora_adapter[name]
            delta = adapter.delta_weight()
            merged = base.weight.float().T if self.fan_in_fan_out else base.weight.float()
            if adapter.use_dora:  # W' = m ⊙ (W0 + ΔW) / n, with n kept by `merge`
                scale = self.__dict__["_dora_norms"].pop(name) / at_least_fp32(adapter.magnitude)
                merged = merged * scale.to(merged)[:, None]
            weight = merged - delta.to(merged)
            base.weight.data = (weight.T if self.fan_in_fan_out else weight).to(base.weight.dtype).contiguous()


class TnloraSharedTensors(nn.Module):
    """The shared tensors of every tnlora adapter on a model: `tnlora_store[name]` is that
    adapter's `SharedStore`. Only the tensors it drew as trainable ever train. Not a peft tuner
    layer (it has no weight update of its own, which peft's LoRA conversion would ask for): the
    tuner selects its tensors for saving and loading and switches them with the layers."""

    def __init__(self) -> None:
        super().__init__()
        self.tnlora_store = nn.ModuleDict()

    def set_trainable(self, names: set[str], requires_grad: bool) -> None:
        for name, store in self.tnlora_store.items():
            if name in names:
                for key, tensor in store.tensors.items():
                    tensor.requires_grad_(requires_grad and key in store.trainable_keys)

    def set_active(self, names: list[str], inference_mode: bool) -> None:
        self.set_trainable(set(self.tnlora_store) - set(names), False)
        self.set_trainable(set(names), not inference_mode)


def _holder(model: nn.Module) -> TnloraSharedTensors | None:
    return getattr(model, SHARED_HOLDER, None)


def _holder_prefixes(model: nn.Module, adapter_name: str) -> dict[str, str]:
    """State-dict key prefix of each adapter store on `model` (a PeftModel or the model itself)."""
    return {
        f"{name}.tnlora_store.{adapter_name}.": name
        for name, module in model.named_modules()
        if isinstance(module, TnloraSharedTensors) and adapter_name in module.tnlora_store
    }


@contextlib.contextmanager
def _bases_exposed(model: nn.Module) -> Iterator[None]:
    """Put each adapted layer's base layer back in its place for a moment, so that target
    matching and building see the plain model whatever adapters it already carries."""
    wrapped = [(n, m) for n, m in model.named_modules() if isinstance(m, TnloraLayer)]
    for name, layer in wrapped:
        _set_submodule(model, name, layer.base_layer)
    try:
        yield
    finally:
        for name, layer in wrapped:
            _set_submodule(model, name, layer)


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def frozen_checksum(built: list[BuiltAdapter], store: SharedStore) -> tuple[int, str]:
    """(count, SHA-256) of the frozen random tensors just drawn, under their checkpoint keys."""
    tensors = {f"{unit.name}.tnlora_adapter.{b}": t for unit in built for b, t in unit.adapter.named_buffers()}
    tensors |= {f"{SHARED_HOLDER}.tnlora_store.tensors.{k}": t for k, t in store.tensors.items() if k not in store.trainable_keys}
    return len(tensors), frozen.checksum(tensors)


class TnloraModel(BaseTuner):
    """peft's tuner for tnlora's adapters (one class for all four: the config says which)."""

    prefix = PREFIX
    tuner_layer_cls = TnloraLayer
    target_module_mapping: ClassVar[dict[str, list[str]]] = {}

    def inject_adapter(
        self,
        model: nn.Module,
        adapter_name: str,
        autocast_adapter_dtype: bool = True,
        low_cpu_mem_usage: bool = False,
        state_dict: dict[str, torch.Tensor] | None = None,
    ) -> None:
        config: TnloraPeftConfig = self.peft_config[adapter_name]
        tn = config.to_tnlora()
        store = SharedStore()
        with _bases_exposed(model):
            keep = list(tn.modules_to_save or [])
            targets = find_targets(model, tn, excluded=output_head_names(model) | set(keep), trained_in_full=keep)
            linear = {n for n, m in model.named_modules() if isinstance(m, (nn.Linear, Conv1D))}
            slices = [n for n in targets if n not in linear]
            if slices:
                raise ValueError(
                    f"{type(config).__name__}: slices of fused layers ({slices[0]}, ...) are tnlora-only targets; "
                    "through peft, target whole layers"
                )
            built = build_adapters(model, tn, targets, module_roles(targets), store)
        store.trainable_keys = {k for k, t in store.tensors.items() if t.requires_grad}
        count, checksum = frozen_checksum(built, store)
        saved = config.frozen
        if saved and not saved.get("saved", True):
            frozen.verify(saved, tn.seed, checksum, "adapter_config.json")
        config.frozen = {"saved": tn.save_frozen, "seed": tn.seed, "tensors": count, "checksum": checksum}
        self._building = {unit.name: unit.adapter for unit in built}
        try:
            super().inject_adapter(
                model, adapter_name, autocast_adapter_dtype=autocast_adapter_dtype, low_cpu_mem_usage=low_cpu_mem_usage, state_dict=state_dict
            )
        finally:
            self._building = {}
        holder = _holder(model)
        if holder is None:
            holder = TnloraSharedTensors()
            model.add_module(SHARED_HOLDER, holder)
        holder.tnlora_store[adapter_name] = store
        holder.set_trainable({adapter_name}, adapter_name in self.active_adapters and not config.inference_mode)

    def set_adapter(self, adapter_name: str | list[str], inference_mode: bool = False) -> None:
        super().set_adapter(adapter_name, inference_mode=inference_mode)
        if _holder(self.model) is not None:
            _holder(self.model).set_active([adapter_name] if isinstance(adapter_name, str) else list(adapter_name), inference_mode)

    def _enable_adapter_layers(self, enabled: bool = True) -> None:
        super()._enable_adapter_layers(enabled)
        if _holder(self.model) is not None:
            if enabled:
                _holder(self.model).set_active(self.active_adapters, inference_mode=False)
            else:
                _holder(self.model).set_trainable(set(_holder(self.model).tnlora_store), False)

    def set_requires_grad(self, adapter_names: str | list[str], requires_grad: bool = True) -> None:
        super().set_requires_grad(adapter_names, requires_grad)
        if _holder(self.model) is not None:
            _holder(self.model).set_trainable({adapter_names} if isinstance(adapter_names, str) else set(adapter_names), requires_grad)

    def delete_adapter(self, adapter_name: str) -> None:
        super().delete_adapter(adapter_name)
        holder = _holder(self.model)
        if holder is not None and adapter_name in holder.tnlora_store:
            del holder.tnlora_store[adapter_name]

    def _check_target_module_exists(self, peft_config: PeftConfig, key: str) -> bool:
        return key in getattr(self, "_building", {})

    def _create_and_replace(
        self,
        peft_config: PeftConfig,
        adapter_name: str,
        target: nn.Module,
        target_name: str,
        parent: nn.Module,
        current_key: str,
        parameter_name: str | None = None,
    ) -> None:
        adapter: Adapter = self._building[current_key]
        if isinstance(target, TnloraLayer):
            target.tnlora_adapter[adapter_name] = adapter
            return
        layer = TnloraLayer(target)
        layer.tnlora_adapter[adapter_name] = adapter
        self._replace_module(parent, target_name, layer, target)

    def _unload_and_optionally_merge(self, merge: bool = True, progressbar: bool = False, safe_merge: bool = False, adapter_names: list[str] | None = None):
        model = super()._unload_and_optionally_merge(merge=merge, progressbar=progressbar, safe_merge=safe_merge, adapter_names=adapter_names)
        if hasattr(model, SHARED_HOLDER):
            delattr(model, SHARED_HOLDER)
        return model

    @classmethod
    def _get_adapter_state_dict(cls, model: nn.Module, config: PeftConfig, adapter_name: str, state_dict: dict, unwanted_adapter_names: list[str]) -> dict:
        selected = super()._get_adapter_state_dict(model, config, adapter_name, state_dict, unwanted_adapter_names)
        holders = tuple(_holder_prefixes(model, adapter_name))
        selected |= {k: v for k, v in state_dict.items() if k.startswith(holders)} if holders else {}
        if getattr(config, "save_frozen", True):
            return selected
        # save_frozen: false: the file holds the trained tensors only; the config holds the
        # seed and checksum, and loading regenerates the rest and checks them.
        drop = set()
        for name, module in model.named_modules():
            if isinstance(module, TnloraLayer) and adapter_name in module.tnlora_adapter:
                drop |= {f"{name}.tnlora_adapter.{adapter_name}.{b}" for b, _ in module.tnlora_adapter[adapter_name].named_buffers()}
            elif isinstance(module, TnloraSharedTensors) and adapter_name in module.tnlora_store:
                store = module.tnlora_store[adapter_name]
                drop |= {f"{name}.tnlora_store.{adapter_name}.tensors.{k}" for k in store.tensors if k not in store.trainable_keys}
        return {k: v for k, v in selected.items() if k not in drop}

    @classmethod
    def _remap_adapter_state_dict_for_load(cls, model: nn.Module, config: PeftConfig, adapter_name: str, state_dict: dict) -> dict:
        remapped = super()._remap_adapter_state_dict_for_load(model, config, adapter_name, state_dict)
        holders = tuple(_holder_prefixes(model, adapter_name))
        if not holders:
            return remapped
        to_model = {}
        for model_key in model.state_dict():
            if model_key.startswith(holders):
                checkpoint_key = cls._remove_adapter_name_from_key(model_key, adapter_name)
                to_model[checkpoint_key] = model_key
                to_model["base_model.model." + checkpoint_key] = model_key  # files always carry peft's prefix
        return {to_model.get(k, k): v for k, v in remapped.items()}

    @classmethod
    def _remove_adapter_name_from_key(cls, key: str, adapter_name: str) -> str:
        # The adapter name sits right after tnlora_adapter / tnlora_store, whatever follows
        # (TeRA's `d.0`, a store's `tensors.<key>`).
        ours = re.sub(rf"(^|\.)({PREFIX}adapter|{PREFIX}store)\.{re.escape(adapter_name)}(?=\.|$)", r"\1\2", key)
        return ours if ours != key else super()._remove_adapter_name_from_key(key, adapter_name)


def register() -> None:
    """Add tnlora's methods to peft's tables (idempotent)."""
    for adapter_type, (_, method) in METHODS.items():
        PEFT_TYPE_TO_CONFIG_MAPPING[method] = CONFIG_CLASSES[adapter_type]
        PEFT_TYPE_TO_TUNER_MAPPING[method] = TnloraModel
        PEFT_TYPE_TO_PREFIX_MAPPING[method] = PREFIX


register()
