"""Adapter registry: recipe `adapter.type` -> adapter class (its config is `cls.config_class`)."""

from __future__ import annotations

from .base import AdaptedLinear, Adapter, AdapterConfig, SharedStore
from .lora import LoraAdapter, LoraConfig

REGISTRY: dict[str, type[Adapter]] = {
    "lora": LoraAdapter,
}

__all__ = ["REGISTRY", "AdaptedLinear", "Adapter", "AdapterConfig", "SharedStore", "LoraAdapter", "LoraConfig"]
