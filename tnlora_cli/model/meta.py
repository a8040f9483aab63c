"""Models on the meta device: built from a config alone (a shipped paper config, an
embedded model's, a local `config.json` or a hub id), no weight read. What counting, the
dry run, the memory check and the streaming merge work on."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from transformers import AutoConfig, PretrainedConfig

from ..errors import ModelError
from ..recipe.sections import CLASSIFICATION_TASKS, Recipe
from .embedded import minilm_path
from .loading import label_config, model_class

CONFIG_DIR = Path(__file__).parent / "configs"


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
        directory = path if path.is_dir() else path.parent
        if not (directory / "config.json").is_file():
            raise ModelError(f"model: {directory} has no config.json", hint="point model at a Hugging Face model directory, or use a shipped config")
        from .checks import check_model_dir

        check_model_dir(directory, trust_remote_code, weights=False)
        return AutoConfig.from_pretrained(directory, trust_remote_code=trust_remote_code)
    try:
        return AutoConfig.from_pretrained(name, trust_remote_code=trust_remote_code)
    except Exception:  # noqa: BLE001 - network and format errors alike
        offline = os.environ.get("HF_HUB_OFFLINE") == "1"
        same = name.rsplit("/", 1)[-1]
        hint = (f"the shipped config '{same}' describes this model: --set model={same} counts it without the hub"
                if same in shipped_configs() else
                f"use one of the shipped configs ({', '.join(shipped_configs())}), minilm, or a directory with config.json")
        raise ModelError(
            f"model: no config for '{name}'" + (" (HF_HUB_OFFLINE=1: the hub is not consulted)" if offline else " (not on the hub, or the hub is unreachable)"),
            hint=hint,
        ) from None


def build_on_meta(recipe: Recipe, label_names: list[str] | None = None, config_source: str | None = None) -> torch.nn.Module:
    """The recipe's task model on the meta device. Without `label_names`, a classification
    head has the recipe's `data.labels` (or 2) classes. `config_source` is where the config
    comes from when the recipe's model was resolved already (default: the recipe's model)."""
    config = load_config(config_source or recipe.model, recipe.trust_remote_code)
    if recipe.task in CLASSIFICATION_TASKS:
        config.update(label_config(label_names or recipe.data.labels or ["LABEL_0", "LABEL_1"]))
    with torch.device("meta"):
        return model_class(recipe.task, config).from_config(config, trust_remote_code=recipe.trust_remote_code)
