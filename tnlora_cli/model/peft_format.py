"""tnlora adapters in peft's directory format: the tensor names both ways, and a peft-format
adapter read back as a tnlora adapter (recipe, tensors, config) for the verbs.

peft names (adapter name removed, as `save_pretrained` writes them):

    tnlora                              peft
    <layer>.adapter.<tensor>            base_model.model.<layer>.tnlora_adapter.<tensor>
    tnlora_shared.tensors.<key>         base_model.model.tn_shared.tnlora_store.tensors.<key>
    <head>.<tensor> (modules_to_save)   base_model.model.<head>.<tensor>

LoRA and VeRA go to peft's own types (`lora_A.weight`/`lora_B.weight`; `vera_lambda_b`,
`vera_lambda_d`, `base_model.vera_A`/`vera_B`), the four tensor-network adapters to tnlora's
peft types (`TNLORA_TRAC`, ...; `tnlora_cli.peft` registers them). No module here imports
peft: the files are plain JSON and safetensors.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from ..errors import CheckpointError
from ..recipe.load import validate_recipe
from ..recipe.sections import Recipe
from ..run.layout import ADAPTER_CONFIG, ADAPTER_WEIGHTS
from .state import SHARED_ATTR
from .targets import module_roles

PEFT_PREFIX = "base_model.model."
#: Where tnlora's peft tuner keeps each layer's adapter and the shared tensors.
LAYER_ATTR = "tnlora_adapter"
SHARED_HOLDER = "tn_shared"
SHARED_STORE_ATTR = "tnlora_store"
#: tnlora adapter type <-> peft type of the tensor-network adapters.
PEFT_TYPES = {"trac": "TNLORA_TRAC", "tera": "TNLORA_TERA", "loretta": "TNLORA_LORETTA", "tensorguide": "TNLORA_TENSORGUIDE"}
ADAPTER_TYPES = {v: k for k, v in PEFT_TYPES.items()}
#: peft task type <-> tnlora task.
TASK_TYPES = {"classification": "SEQ_CLS", "image-classification": None}  # peft has no image task type


def to_peft_key(key: str) -> str:
    """A tnlora adapter-file key -> its name in a tnlora-type peft adapter file."""
    if key.startswith(SHARED_ATTR + "."):
        return f"{PEFT_PREFIX}{SHARED_HOLDER}.{SHARED_STORE_ATTR}." + key.removeprefix(SHARED_ATTR + ".")
    if ".adapter." in key:
        layer, _, tensor = key.partition(".adapter.")
        return f"{PEFT_PREFIX}{layer}.{LAYER_ATTR}.{tensor}"
    return PEFT_PREFIX + key


def from_peft_key(key: str) -> str:
    """The inverse of `to_peft_key`."""
    key = key.removeprefix(PEFT_PREFIX)
    shared = f"{SHARED_HOLDER}.{SHARED_STORE_ATTR}."
    if key.startswith(shared):
        return f"{SHARED_ATTR}." + key.removeprefix(shared)
    return key.replace(f".{LAYER_ATTR}.", ".adapter.", 1)


def peft_task_type(task: str) -> str | None:
    return TASK_TYPES.get(task, "CAUSAL_LM")


def read_peft_config(adapter_dir: Path) -> dict[str, Any] | None:
    """The adapter_config.json of a peft-format tnlora adapter (a TNLORA_* peft type), else None."""
    path = Path(adapter_dir) / ADAPTER_CONFIG
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError):
        return None
    return config if isinstance(config, dict) and config.get("peft_type") in ADAPTER_TYPES else None


def peft_adapter_recipe(adapter_dir: Path) -> Recipe:
    """The recipe a peft-format tnlora adapter stands for: the base named by
    `base_model_name_or_path`, the adapter settings of its config, no training data."""
    adapter_dir = Path(adapter_dir)
    config = read_peft_config(adapter_dir)
    if config is None:
        raise CheckpointError(f"{adapter_dir / ADAPTER_CONFIG} is not a peft-format tnlora adapter")
    base = config.get("base_model_name_or_path")
    if not base:
        raise CheckpointError(
            f"{adapter_dir / ADAPTER_CONFIG}: base_model_name_or_path is empty, so tnlora cannot tell which base model this adapter is for",
            hint="set it to the base model's hub id or directory in adapter_config.json",
        )
    if not (config.get("frozen") or {}).get("saved", True):
        raise CheckpointError(
            f"{adapter_dir}: this peft adapter was saved with save_frozen=False, so its frozen random tensors are not in the file",
            hint="load it with peft (import tnlora_cli.peft) and save it again with save_frozen=True",
        )
    kind = ADAPTER_TYPES[config["peft_type"]]
    from ..adapters import REGISTRY

    fields = REGISTRY[kind].config_class.model_fields
    adapter = {k: v for k, v in config.items() if k in fields and k != "type"} | {"type": kind}
    if isinstance(adapter.get("target_modules"), list):
        adapter["target_modules"] = sorted(adapter["target_modules"])
    task = "classification" if config.get("task_type") == "SEQ_CLS" else "causal-lm"
    return validate_recipe(
        {"model": base, "task": task, "adapter": adapter, "data": {"train": str(adapter_dir / "no-training-data.jsonl")}, "output_dir": str(adapter_dir)},
        source=str(adapter_dir / ADAPTER_CONFIG),
    )


def load_peft_adapter(adapter_dir: Path) -> tuple[Recipe, dict[str, torch.Tensor], dict[str, Any]]:
    """A peft-format tnlora adapter as tnlora reads its own: the recipe (`peft_adapter_recipe`),
    the tensors under tnlora's names and a tnlora adapter config (targets, roles,
    modules_to_save). Verbs that need the base and the adapter only (merge, inspect-rank,
    export, generate) work; those that measure on data need a tnlora run."""
    adapter_dir = Path(adapter_dir)
    recipe = peft_adapter_recipe(adapter_dir)
    weights = adapter_dir / ADAPTER_WEIGHTS
    try:
        raw_state = load_file(str(weights))
    except Exception as exc:  # noqa: BLE001 - missing, truncated or garbage file
        raise CheckpointError(f"{weights} cannot be read ({str(exc).splitlines()[0][:80]})", hint="the adapter directory is damaged") from None
    state = {from_peft_key(k): v for k, v in raw_state.items()}
    # The layers a tnlora-type file adapts: exactly those its tensors name.
    targets = sorted({k.partition(".adapter.")[0] for k in state if ".adapter." in k}, key=_natural)
    tn_config = {
        "adapter": recipe.adapter.model_dump(mode="json"),
        "task": recipe.task,
        "targets": targets,
        "roles": module_roles(targets),
        "modules_to_save": list(recipe.adapter.modules_to_save or []),
        "label_names": None,
        "frozen": {"saved": True},
        "peft_format": True,
    }
    return recipe, state, tn_config


def _natural(name: str) -> list:
    """Sort key that puts layer 2 before layer 10."""
    return [(0, int(p), "") if p.isdigit() else (1, 0, p) for p in name.split(".")]
