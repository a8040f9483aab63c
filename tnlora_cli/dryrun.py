"""`tnlora train --dry-run`: what a recipe will do and cost, before any weight is loaded.

The model is built on the meta device from its config, the adapter attached as in
training, and parameters counted exactly. Memory is an estimate:

- base weights: parameters x bytes of `model_dtype`; with `quantization`, the linear layers
  that bitsandbytes converts take 0.5 byte (4-bit) + block constants, or 1 byte (8-bit);
- adapter tensors (trainable and frozen) in fp32, gradients of the trainable ones in fp32,
  AdamW's two fp32 moments;
- activations kept for backward, per layer and token, 40·h + 6·heads·L values, in fp32 or in
  the mixed-precision dtype. That is Korthikanti et al.'s (2022) 17·h + 2.5·heads·L scaled by
  2.35, the factor that matches what training MiniLM and SmolLM2 adds to peak memory on CPU
  (measured growth 515 and 1,340 MiB; estimated 469 and 1,462 MiB): HF layers keep more than
  the textbook minimum (SwiGLU branches, fp32 norm upcasts, attention masks). With gradient
  checkpointing, each layer's input (h values) plus one layer recomputed at a time: this is
  optimistic on CPU (SmolLM2: 887 MiB measured, 288 MiB estimated);
- language models add the logits, their log-softmax and its gradient (3 x batch x length x
  vocab fp32 values);
- per process, with `processes` > 1: FSDP and ZeRO-3 divide weights, adapter tensors,
  gradients and optimizer states by the number of processes, ZeRO-2 only gradients and
  optimizer states, DDP nothing (activations are per process already). The blocks FSDP/ZeRO-3
  gather for one layer's forward come on top.
Runtime overheads (CUDA context, allocator caching, Python) are not included.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .count import CountReport, build_on_meta, count_params, shipped_configs
from .data import IGNORE_INDEX, prepare_data
from .errors import TnloraError
from .inject import adapted_layers, is_linear_leaf
from .modeling import DTYPES, HEAD_NAMES, load_tokenizer, resolve_model
from .recipe import Recipe


@dataclass
class DryRunReport:
    counts: CountReport
    modules: dict[str, list[str]]
    memory: dict[str, int]
    notes: list[str] = field(default_factory=list)
    samples: list[dict[str, Any]] = field(default_factory=list)


def _config_value(config, *names: str, default: int = 0) -> int:
    for name in names:
        value = getattr(config, name, None)
        if isinstance(value, int):
            return value
    return default


# which parts each engine divides across processes
SHARDED_PARTS = {
    "fsdp": ("base weights", "adapter tensors (fp32)", "gradients (fp32)", "AdamW states (fp32)"),
    "deepspeed-zero3": ("base weights", "adapter tensors (fp32)", "gradients (fp32)", "AdamW states (fp32)"),
    "deepspeed-zero2": ("gradients (fp32)", "AdamW states (fp32)"),
}


def estimate_memory(model: nn.Module, recipe: Recipe, counts: CountReport, processes: int = 1) -> tuple[dict[str, int], list[str]]:
    notes: list[str] = []
    config = model.config
    dtype_name = recipe.model_dtype if recipe.model_dtype != "auto" else str(getattr(config, "dtype", None) or "float32").replace("torch.", "")
    elem = torch.tensor([], dtype=DTYPES.get(dtype_name, torch.float32)).element_size()
    quant = recipe.quantization
    skip = set(HEAD_NAMES) | {"lm_head"} | set(recipe.adapter.modules_to_save or [])
    weights = 0.0
    seen: set[int] = set()
    for name, module in model.named_modules():
        if ".adapter" in name or name.startswith("tnlora_shared"):
            continue
        base = module.base_layer if hasattr(module, "base_layer") else module
        for pname, p in base.named_parameters(recurse=False):
            if id(p) in seen:
                continue
            seen.add(id(p))
            quantized = quant is not None and pname == "weight" and is_linear_leaf(base) and name.split(".")[0] not in skip and name.split(".")[-1] not in skip
            if quantized:
                per = 0.5 + (1.0 / 64 + 4.0 / (64 * 256) if quant.double_quant else 4.0 / 64) if quant.bits == 4 else 1.0
                weights += p.numel() * per
            else:
                weights += p.numel() * elem
    total = counts.adapter_total
    trainable = total.trainable + counts.head.trainable
    cfg = recipe.training
    batch, length = cfg.batch_size, recipe.data.max_length
    hidden = _config_value(config, "hidden_size", "n_embd", "d_model")
    layers = _config_value(config, "num_hidden_layers", "n_layer", "num_layers")
    heads = _config_value(config, "num_attention_heads", "n_head")
    vocab = _config_value(config, "vocab_size")
    mixed = cfg.mixed_precision in ("bf16", "fp16") or (cfg.mixed_precision == "auto" and torch.cuda.is_available())
    act_elem = 2 if mixed else 4
    per_layer_token = 40 * hidden + 6 * heads * length
    if cfg.gradient_checkpointing:
        activations = batch * length * (hidden * layers + per_layer_token) * act_elem
    else:
        activations = batch * length * per_layer_token * layers * act_elem
    logits = 3 * batch * length * vocab * 4 if recipe.task != "classification" else 0
    if not hidden or not layers:
        notes.append("activations: the config names no hidden size or layer count; not estimated")
        activations = 0
    memory = {
        "base weights": int(weights),
        "adapter tensors (fp32)": (total.trainable + total.frozen + counts.head.trainable) * 4,
        "gradients (fp32)": trainable * 4,
        "AdamW states (fp32)": trainable * 8,
        "activations": int(activations),
        "logits, log-softmax, gradient": int(logits),
    }
    engine = recipe.training.distributed
    if processes > 1:
        for part in SHARDED_PARTS.get(engine, ()):
            memory[part] = -(-memory[part] // processes)
        if engine == "auto":
            notes.append("training.distributed: auto follows the accelerate config at launch; estimated as ddp (nothing sharded)")
        notes.append(f"per process, {processes} processes, {'ddp' if engine == 'auto' else engine}")
    memory["total"] = sum(memory.values())
    if quant is not None:
        notes.append(f"{quant.bits}-bit linear layers; embeddings, lm_head and task heads stay in {dtype_name}")
    notes.append(f"activations at batch {batch} x {length} tokens, {'bf16/fp16' if mixed else 'fp32'}" + (", gradient checkpointing" if cfg.gradient_checkpointing else ""))
    return memory, notes


def _samples(recipe: Recipe, n: int = 2, processes: int = 1) -> tuple[list[dict[str, Any]], str | None]:
    """A few tokenized training examples with their loss mask, when tokenizer and data are here;
    the note says how `epochs` / `warmup_ratio` resolve for this data (or why nothing is shown)."""
    if recipe.model in shipped_configs() and recipe.model not in ("smollm2-135m",):
        return [], f"no tokenizer ships with the '{recipe.model}' config: samples are shown for local or embedded models"
    try:
        path = resolve_model(recipe.model, recipe.trust_remote_code, recipe.allow_pickle)
        tokenizer = load_tokenizer(path, recipe.trust_remote_code)
        data = prepare_data(recipe.data, recipe.task, tokenizer)
    except TnloraError as exc:
        return [], f"samples not shown: {exc.message}"
    out = []
    for example in data.train[:n]:
        ids = example["input_ids"]
        if isinstance(example["labels"], int):
            out.append({"tokens": [tokenizer.decode(ids)], "trained": None, "label": data.label_names[example["labels"]]})
        else:
            out.append({"tokens": [tokenizer.decode([t]) for t in ids], "trained": [label != IGNORE_INDEX for label in example["labels"]], "label": None})
    from .schedule import resolve_schedule

    try:
        return out, resolve_schedule(recipe, len(data.train), processes).note
    except TnloraError as exc:
        return out, f"schedule: {exc.message}"


def dry_run(recipe: Recipe, with_samples: bool = True, processes: int = 1) -> DryRunReport:
    model = build_on_meta(recipe)
    counts = count_params(recipe, model=model)
    modules: dict[str, list[str]] = {}
    for name, layer in adapted_layers(model):
        modules.setdefault(layer.adapter.role, []).append(name)
    memory, notes = estimate_memory(model, recipe, counts, processes)
    if counts.not_adapted:
        notes.append(f"{len(counts.not_adapted)} matched layers lie inside modules_to_save, trained in full, and are not adapted: {', '.join(counts.not_adapted)}")
    report = DryRunReport(counts, modules, memory, notes)
    if with_samples:
        report.samples, note = _samples(recipe, processes=processes)
        if note:
            report.notes.append(note)
    return report
