"""Resolve a recipe's `model` and load the tokenizer and the task model."""

from __future__ import annotations

import contextlib
import importlib.util
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForImageClassification,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PreTrainedModel,
)
from transformers.models.auto.modeling_auto import (
    MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING,
    MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING,
)

from ..errors import ModelError
from ..recipe.sections import CLASSIFICATION_TASKS, IMAGE_TASK
from .checks import check_cpu_4bit_layers, check_model_dir, check_task_fits
from .embedded import HUB_IDS, MODELS, embedded_hub_id

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
#: Top-level modules that hold a task head created fresh for fine-tuning.
HEAD_NAMES = ("classifier", "score")


def resolve_model(name: str, trust_remote_code: bool = False, allow_pickle: bool = False) -> str:
    """An embedded alias, a local directory, or a hub id (checked now, before any work)."""
    if name in MODELS:
        return str(MODELS[name]())
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelError(f"model: {path} has no config.json", hint="point model at a Hugging Face model directory")
        check_model_dir(path, trust_remote_code, allow_pickle)
        return str(path)
    looks_local = name.startswith((".", "/", "~")) or name.count("/") > 1
    if looks_local:
        raise ModelError(f"model: directory {name} does not exist", hint=f"use an embedded alias ({', '.join(MODELS)}) or an existing directory")
    try:
        AutoConfig.from_pretrained(name, trust_remote_code=trust_remote_code)
    except Exception as exc:  # noqa: BLE001 - hub/network errors come in many types
        offline = os.environ.get("HF_HUB_OFFLINE") == "1"
        raise ModelError(
            f"model: '{name}' is not an embedded alias, not a local directory, and could not be fetched"
            + (" (HF_HUB_OFFLINE=1)" if offline else f" ({type(exc).__name__})"),
            hint=f"use one of {', '.join(MODELS)}, a local directory, or a hub id on a machine with network access",
        ) from None
    return name


def base_model_reference(name: str, resolved: str) -> dict[str, str | None]:
    """How saved and exported adapters name their base: a hub id where one is known (an
    embedded alias or its directory, or the hub id the recipe gave), else the local path;
    the local path is kept only as a hint for this machine."""
    hub_id = HUB_IDS.get(name) or embedded_hub_id(resolved)
    if hub_id is None and not Path(resolved).expanduser().is_dir():
        hub_id = resolved  # the recipe named a hub id
    return {"base_model_name_or_path": hub_id or resolved, "base_model_local_path": resolved if resolved != hub_id else None}


def load_tokenizer(path: str, trust_remote_code: bool = False):
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    if tokenizer.pad_token is None:
        # GPT-2 and Llama tokenizers have no pad token; padding positions are masked anyway.
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def model_class(task: str, config: object | None = None) -> type:
    """The Auto class of `task`; with `config`, a model that cannot do the task is refused
    with the task it needs (a vision model under a text task, or the reverse)."""
    if config is not None:
        check_task_fits(
            task,
            type(config).__name__,
            is_vision=type(config) in MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING and type(config) not in MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING,
        )
    if task == IMAGE_TASK:
        return AutoModelForImageClassification
    if task != "classification":
        return AutoModelForCausalLM
    return AutoModelForSequenceClassification


def check_model_task(path: str, task: str, trust_remote_code: bool = False) -> None:
    """Refuse a model that cannot do `task` (from its config alone, before any other load)."""
    model_class(task, AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code))


def quantization_config(quantization, keep_full: list[str]):
    """transformers' BitsAndBytesConfig for a recipe's `quantization` section. `keep_full`
    names modules left unquantized: the task head must be, or its forward fails."""
    from transformers import BitsAndBytesConfig

    compute = quantization.compute_dtype
    if compute == "auto":
        compute = "bfloat16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "float32"
    return BitsAndBytesConfig(
        load_in_4bit=quantization.bits == 4,
        load_in_8bit=quantization.bits == 8,
        bnb_4bit_quant_type=quantization.quant_type,
        bnb_4bit_use_double_quant=quantization.double_quant,
        bnb_4bit_compute_dtype=DTYPES[compute],
        llm_int8_skip_modules=sorted(set(keep_full) | {"lm_head", *HEAD_NAMES}),
    )


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def check_attn_implementation(name: str | None) -> None:
    """Refuse an attention kernel this machine cannot run, before any weight is read."""
    if name != "flash_attention_2":
        return
    problems = []
    if importlib.util.find_spec("flash_attn") is None:
        problems.append("the flash-attn package is not installed")
    if not torch.cuda.is_available():
        problems.append("no CUDA GPU is visible")
    if problems:
        raise ModelError(
            f"model_attn_implementation: flash_attention_2 is unavailable here ({'; '.join(problems)})",
            hint="use sdpa (the default) or eager, or pip install flash-attn on a machine with a CUDA GPU",
        )


def load_model(
    path: str,
    task: str,
    dtype: str = "float32",
    label_names: list[str] | None = None,
    pad_token_id: int | None = None,
    trust_remote_code: bool = False,
    device: str | torch.device | None = None,
    quantization=None,
    keep_full: list[str] | None = None,
    empty: bool = False,
    attn_implementation: str | None = None,
) -> PreTrainedModel:
    """Load the base model for `task`. The classification head is created from the global
    RNG, so callers seed it first (the same seed gives the same head in train and eval).

    `empty=True` builds the same model on the meta device and reads no weights: for ranks
    that receive theirs from rank 0 once the model is sharded."""
    check_attn_implementation(attn_implementation)
    attn = {"attn_implementation": attn_implementation} if attn_implementation else {}
    labels = label_config(label_names) if task in CLASSIFICATION_TASKS else {}
    if empty:
        config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code, **labels)
        attn = _without_unused_sdpa(task, config, attn)
        with torch.device("meta"), _attn_errors(attn_implementation):
            model = model_class(task, config).from_config(
                config, dtype=config.dtype if dtype == "auto" else DTYPES[dtype], trust_remote_code=trust_remote_code, **attn
            )
        if pad_token_id is not None and model.config.pad_token_id is None:
            model.config.pad_token_id = pad_token_id
        return model
    kwargs: dict = {"trust_remote_code": trust_remote_code, "dtype": "auto" if dtype == "auto" else DTYPES[dtype], **labels}
    if quantization is not None:
        kwargs["quantization_config"] = quantization_config(quantization, keep_full or [])
        device = device or default_device()
    if device is not None:
        kwargs["device_map"] = {"": device}
    config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    cls = model_class(task, config)
    attn = _without_unused_sdpa(task, config, attn)
    remade_head = None
    if task == IMAGE_TASK:
        # A pretrained vision checkpoint's head has its own classes (ImageNet's 1,000, or none):
        # the head is made anew for the data's labels, and the report says so.
        kwargs.update(ignore_mismatched_sizes=True, output_loading_info=True)
        remade_head = _zero3_mismatched_head(config, len(label_names or []))
        if remade_head is not None:
            kwargs.update(label_config([str(i) for i in range(remade_head)]))
            # Loading under ZeRO-3 draws from the RNG (one process does not): the new head
            # draws from the state before it, as in one process.
            rng_before_loading = torch.random.get_rng_state()
    with _attn_errors(attn_implementation):
        model = cls.from_pretrained(path, **kwargs, **attn)
    if task == IMAGE_TASK:
        model, info = model
        if remade_head is not None:
            torch.random.set_rng_state(rng_before_loading)
            model.tnlora_head_note = remake_head(model, remade_head, label_names)
        else:
            model.tnlora_head_note = new_head_note(model, info)
    if quantization is not None and quantization.bits == 4:
        check_cpu_4bit_layers(model)
    if pad_token_id is not None and model.config.pad_token_id is None:
        model.config.pad_token_id = pad_token_id
    return model


def _without_unused_sdpa(task: str, config, attn: dict[str, str]) -> dict[str, str]:
    """The recipe's default kernel (sdpa) asked of a vision model without attention (a CNN)
    means nothing: it is not passed, where transformers would refuse it."""
    if task == IMAGE_TASK and attn.get("attn_implementation") == "sdpa":
        concrete = MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING.get(type(config), None)
        if concrete is not None and not getattr(concrete, "_supports_sdpa", False):
            return {}
    return attn


@contextlib.contextmanager
def _attn_errors(name: str | None) -> Iterator[None]:
    """transformers refuses a kernel the architecture lacks (checked before weights load)."""
    try:
        yield
    except (ValueError, ImportError) as exc:
        if name is None or "attention" not in str(exc).lower():
            raise
        raise ModelError(
            f"model_attn_implementation: {name} is not available for this model: {str(exc).splitlines()[0]}",
            hint="set model_attn_implementation to eager (every architecture has it) or sdpa",
        ) from None


def label_config(label_names: list[str] | None) -> dict[str, Any]:
    """Config entries of a classification head with these labels."""
    assert label_names is not None, "classification needs its label names"
    return {"num_labels": len(label_names), "id2label": dict(enumerate(label_names)), "label2id": {n: i for i, n in enumerate(label_names)}}


def new_head_note(model: nn.Module, info: dict[str, Any]) -> str | None:
    """What loading did to a vision checkpoint's classification head: created (the checkpoint
    has none) or re-created at the data's size (it had another), from the seeded RNG."""
    heads = [name for name in HEAD_NAMES if isinstance(getattr(model, name, None), nn.Module)]
    mismatched = [k for k, *_ in info.get("mismatched_keys", []) if k.split(".")[0] in heads]
    missing = sorted({k for k in info.get("missing_keys", []) if k.split(".")[0] in heads})
    if mismatched:
        shapes = {k: (tuple(old), tuple(new)) for k, old, new in info["mismatched_keys"] if k in mismatched}
        said = ", ".join(f"{k} {old} -> {new}" for k, (old, new) in shapes.items())
        return f"classification head re-created for {model.config.num_labels} labels (the checkpoint's has another size: {said})"
    if missing:
        return f"classification head created for {model.config.num_labels} labels (the checkpoint has none: {', '.join(missing)})"
    return None


def _zero3_mismatched_head(config, num_labels: int) -> int | None:
    """The checkpoint's label count when weights load under DeepSpeed ZeRO-3 and its
    classification head has another size than the data's; else None.

    ZeRO-3 loads partitioned weights through a path of transformers that cannot skip a
    tensor of another shape (ignore_mismatched_sizes does not apply there): such a head is
    loaded at its own size and then made anew (`remake_head`), as one process makes it."""
    from transformers.integrations import is_deepspeed_zero3_enabled

    if not is_deepspeed_zero3_enabled():
        return None
    has_head = any(str(a).endswith("ForImageClassification") for a in getattr(config, "architectures", None) or [])
    saved = int(getattr(config, "num_labels", 0) or 0)
    return saved if has_head and saved != num_labels else None


def remake_head(model: PreTrainedModel, saved_labels: int, label_names: list[str]) -> str:
    """Replace every linear layer of the task head that outputs the checkpoint's
    `saved_labels` classes with a fresh one for `label_names`, initialised by the model's own
    rule from the global RNG (built on the meta device first, so that construction draws
    nothing from it); the label config follows. Returns the report's note."""
    resized = []
    for head in HEAD_NAMES:
        for name, layer in list(getattr(model, head, nn.Module()).named_modules(prefix=head)):
            if isinstance(layer, nn.Linear) and layer.out_features == saved_labels:
                with torch.device("meta"):
                    fresh = nn.Linear(layer.in_features, len(label_names), bias=layer.bias is not None)
                fresh = fresh.to_empty(device=layer.weight.device).to(layer.weight.dtype)
                model._init_weights(fresh)
                parent, _, attr = name.rpartition(".")
                setattr(model.get_submodule(parent) if parent else model, attr, fresh)
                resized.append(f"{name} ({saved_labels} -> {len(label_names)} outputs)")
    model.config.update(label_config(label_names))
    return f"classification head re-created for {len(label_names)} labels (the checkpoint's has another size: {', '.join(resized)})"


def head_module_names(model: nn.Module, task: str) -> list[str]:
    """Modules trained in full by default: the freshly created classification head."""
    if task not in CLASSIFICATION_TASKS:
        return []
    return [name for name in HEAD_NAMES if isinstance(getattr(model, name, None), nn.Module)]


def output_head_names(model: PreTrainedModel) -> set[str]:
    """Names of the output projection (lm_head), excluded from 'all-linear'."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return {name for name, module in model.named_modules() if head is not None and module is head}
