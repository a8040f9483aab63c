"""Adapter registry: recipe `adapter.type` -> adapter class (its config is `cls.config_class`).

The config classes (`configs.py`, `CONFIGS`) need neither torch nor transformers; the adapter
classes do, so they are imported on first use: checking a recipe stays fast.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .configs import CONFIGS, AdapterConfig, LoraConfig, LorettaConfig, TensorGuideConfig, TeraConfig, TracConfig, VeraConfig

#: `adapter.type` -> the class of its adapter, in its module of the same name (imported on first use)
_ADAPTER_CLASSES = {
    "lora": "LoraAdapter", "vera": "VeraAdapter", "loretta": "LorettaAdapter",
    "tensorguide": "TensorGuideAdapter", "trac": "TracAdapter", "tera": "TeraAdapter",
}
#: the other public names -> the submodule that defines each
_LAZY = {"Adapter": "base", "LowRankAdapter": "base", "SharedStore": "base", "AdaptedLinear": "layers"}
_LAZY |= {name: kind for kind, name in _ADAPTER_CLASSES.items()}


def __getattr__(name: str) -> Any:
    if name == "REGISTRY":
        value: Any = {kind: getattr(importlib.import_module(f".{kind}", __name__), cls) for kind, cls in _ADAPTER_CLASSES.items()}
    elif name in _LAZY:
        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value  # later lookups skip this function
    return value


if TYPE_CHECKING:
    from .base import Adapter, LowRankAdapter, SharedStore
    from .layers import AdaptedLinear
    from .lora import LoraAdapter
    from .loretta import LorettaAdapter
    from .tensorguide import TensorGuideAdapter
    from .tera import TeraAdapter
    from .trac import TracAdapter
    from .vera import VeraAdapter

    REGISTRY: dict[str, type[Adapter]]

__all__ = [
    "CONFIGS", "REGISTRY", "AdaptedLinear", "Adapter", "AdapterConfig", "LowRankAdapter", "SharedStore",
    "LoraAdapter", "LoraConfig", "LorettaAdapter", "LorettaConfig", "TensorGuideAdapter", "TensorGuideConfig",
    "TeraAdapter", "TeraConfig", "TracAdapter", "TracConfig", "VeraAdapter", "VeraConfig",
]
