"""Adapter registry: recipe `adapter.type` -> adapter class (its config is `cls.config_class`)."""

from __future__ import annotations

from .base import Adapter, AdapterConfig, LowRankAdapter, SharedStore
from .layers import AdaptedLinear
from .lora import LoraAdapter, LoraConfig
from .loretta import LorettaAdapter, LorettaConfig
from .tensorguide import TensorGuideAdapter, TensorGuideConfig
from .tera import TeraAdapter, TeraConfig
from .trac import TracAdapter, TracConfig
from .vera import VeraAdapter, VeraConfig

REGISTRY: dict[str, type[Adapter]] = {
    "lora": LoraAdapter,
    "vera": VeraAdapter,
    "loretta": LorettaAdapter,
    "tensorguide": TensorGuideAdapter,
    "trac": TracAdapter,
    "tera": TeraAdapter,
}

__all__ = [
    "REGISTRY", "AdaptedLinear", "Adapter", "AdapterConfig", "LowRankAdapter", "SharedStore",
    "LoraAdapter", "LoraConfig", "LorettaAdapter", "LorettaConfig", "TensorGuideAdapter", "TensorGuideConfig",
    "TeraAdapter", "TeraConfig", "TracAdapter", "TracConfig", "VeraAdapter", "VeraConfig",
]
