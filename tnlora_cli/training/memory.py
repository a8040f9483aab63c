"""Memory: the estimate of a run (`tnlora train --dry-run`), the check that refuses a run
whose estimate exceeds what the machine has, and gradient checkpointing.

`batch_size: 1e20` or `max_length: 10**9` would otherwise grow memory until the machine
kills something. The estimate is made on the meta device (no weights read); the available
memory is the GPU's free memory when training runs on a GPU, else the system's
MemAvailable. `--skip-memory-check` (train(check_memory=False)) overrides it, for estimates
that are too pessimistic on an unusual model.

Estimated parts:

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
- the length: batches are padded to their longest example, so with the prepared data's
  lengths known (`train`, `--dry-run` of a recipe whose data is here) it is the widest batch
  the run is expected to meet: the expected longest of the examples it reads (every example
  when it reads them all, e.g. with `epochs`). The worst case, every batch at
  `data.max_length`, is the second figure; the memory check refuses on the first. Without
  the lengths (a shipped config without data) the worst case is the estimate;
- per process, with `processes` > 1: FSDP and ZeRO-3 divide weights, adapter tensors,
  gradients and optimizer states by the number of processes, ZeRO-2 only gradients and
  optimizer states, DDP nothing (activations are per process already). The blocks FSDP/ZeRO-3
  gather for one layer's forward come on top.
Runtime overheads (CUDA context, allocator caching, Python) are not included.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..errors import RecipeError
from ..model.accounting import CountReport, count_adapter
from ..model.loading import DTYPES, HEAD_NAMES
from ..model.meta import build_on_meta
from ..model.targets import is_linear_leaf
from ..recipe.sections import CLASSIFICATION_TASKS, IMAGE_TASK, Recipe
from .launch import launch_world_size


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


def estimate_memory(
    model: nn.Module, recipe: Recipe, counts: CountReport, processes: int = 1, lengths: np.ndarray | None = None
) -> tuple[dict[str, int], list[str]]:
    """Memory of one training process by part, and notes on what was assumed. With the
    training split's token `lengths`, activations are those of the widest batch the run is
    expected to meet (batches are padded to their longest example; "total"), and the worst
    case (every batch at data.max_length) is a second figure (`WORST_CASE`)."""
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
    if recipe.task == IMAGE_TASK:  # a ViT sees its patches and class token; a CNN is counted as one token
        side, patch = _config_value(config, "image_size"), _config_value(config, "patch_size")
        length = (side // patch) ** 2 + 1 if side and patch else 1
    hidden = _config_value(config, "hidden_size", "n_embd", "d_model")
    layers = _config_value(config, "num_hidden_layers", "n_layer", "num_layers")
    heads = _config_value(config, "num_attention_heads", "n_head")
    vocab = _config_value(config, "vocab_size")
    mixed = cfg.mixed_precision in ("bf16", "fp16") or (cfg.mixed_precision == "auto" and torch.cuda.is_available())
    act_elem = 2 if mixed else 4

    def activations_at(width: int) -> tuple[int, int]:
        """Activations and logits of one micro-batch padded to `width` tokens."""
        if not hidden or not layers:
            return 0, 0
        per_layer_token = 40 * hidden + 6 * heads * width
        if cfg.gradient_checkpointing:
            activations = batch * width * (hidden * layers + per_layer_token) * act_elem
        else:
            activations = batch * width * per_layer_token * layers * act_elem
        logits = 3 * batch * width * vocab * 4 if recipe.task not in CLASSIFICATION_TASKS else 0
        return int(activations), int(logits)

    if not hidden or not layers:
        notes.append("activations: the config names no hidden size or layer count; not estimated")
    widths = padded_widths(lengths, batch, _examples_read(recipe, lengths, processes)) if lengths is not None and len(lengths) else None
    width = min(widths[0], length) if widths else length
    activations, logits = activations_at(width)
    memory = {
        "base weights": int(weights),
        "adapter tensors (fp32)": (total.trainable + total.frozen + counts.head.trainable) * 4,
        "gradients (fp32)": trainable * 4,
        "AdamW states (fp32)": trainable * 8,
        "activations": activations,
        "logits, log-softmax, gradient": logits,
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
    precision = f"{'bf16/fp16' if mixed else 'fp32'}" + (", gradient checkpointing" if cfg.gradient_checkpointing else "")
    if recipe.task == IMAGE_TASK:  # every image is the same size: no padding, no worst case
        notes.append(f"activations at batch {batch} x {length} tokens per image, {precision}")
    elif widths is None:
        notes.append(f"activations at batch {batch} x {length} tokens (data.max_length: every batch padded to it, the worst case; "
                     f"the prepared lengths are not known here), {precision}")
    else:
        worst = memory["total"] - activations - logits + sum(activations_at(length))
        memory[WORST_CASE] = worst
        notes.append(
            f"activations at batch {batch} x {width} tokens: the widest batch expected in this run, batches padded to their "
            f"longest example (prepared lengths: mean {float(np.mean(lengths)):.0f}, longest {int(np.max(lengths))}; a typical batch "
            f"is {widths[1]} wide), {precision}; worst case, every batch at data.max_length {length}: {_gib(worst)}"
        )
    return memory, notes


#: The memory estimate's second figure: every batch padded to data.max_length.
WORST_CASE = "total, worst case (every batch at data.max_length)"


def expected_max(lengths: np.ndarray, draws: int) -> float:
    """Expected longest of `draws` examples drawn uniformly (with replacement) from `lengths`:
    sum over the sorted lengths of L_(j) * ((j/n)^k - ((j-1)/n)^k)."""
    ordered = np.sort(np.asarray(lengths, dtype=np.float64))
    n = len(ordered)
    if draws >= n:  # the run reads every example: its widest batch holds the longest
        return float(ordered[-1])
    cdf = (np.arange(n + 1, dtype=np.float64) / n) ** draws
    return float(np.sum(ordered * np.diff(cdf)))


def padded_widths(lengths: np.ndarray, batch: int, examples_read: int) -> tuple[int, int]:
    """(widest, typical) padded width of a micro-batch: the widest batch the run is expected to
    meet (the longest of the examples it reads), and the expected width of one batch."""
    return int(np.ceil(expected_max(lengths, examples_read))), int(np.ceil(expected_max(lengths, batch)))


def _examples_read(recipe: Recipe, lengths: np.ndarray, processes: int) -> int:
    """How many examples one process reads in the run (steps x batch x accumulation)."""
    cfg = recipe.training
    if cfg.max_steps is None:  # epochs: every example is read
        return len(lengths)
    return cfg.max_steps * cfg.batch_size * cfg.gradient_accumulation_steps


def available_memory() -> int | None:
    """Bytes the run may use: free GPU memory, or MemAvailable of the system."""
    if torch.cuda.is_available():
        free, _ = torch.cuda.mem_get_info(int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
        return int(free)
    meminfo = Path("/proc/meminfo")
    if meminfo.is_file():
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return None


def _gib(n: float) -> str:
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"


def check_memory_fits(recipe: Recipe, model_path: str, lengths: np.ndarray | None = None) -> None:
    """Refuse the run when its memory estimate exceeds what is available (see the module
    docstring). The estimate is made on a meta-device model built from the config of the
    already resolved `model_path`: no weight is read. With the training split's `lengths`,
    the estimate refused on is the widest batch expected (not every batch at max_length).
    A recipe the estimate cannot be made for fails here with the error training would meet later."""
    model = build_on_meta(recipe, config_source=model_path)
    counts = count_adapter(recipe, model)
    memory = estimate_memory(model, recipe, counts, launch_world_size(), lengths)[0]
    estimate = memory["total"]
    have = available_memory()
    if have is not None and estimate > have:
        cfg = recipe.training
        if WORST_CASE in memory:
            widest = padded_widths(lengths, cfg.batch_size, _examples_read(recipe, lengths, launch_world_size()))[0]
            basis = (f"batch_size {cfg.batch_size} x {min(widest, recipe.data.max_length)} tokens, the widest batch expected from the prepared "
                     f"lengths; {_gib(memory[WORST_CASE])} if every batch filled data.max_length {recipe.data.max_length}")
        else:
            basis = f"batch_size {cfg.batch_size} x data.max_length {recipe.data.max_length}"
        raise RecipeError(
            f"training: the memory estimate ({_gib(estimate)} at {basis}) exceeds the {_gib(have)} available",
            hint="lower training.batch_size or data.max_length, enable training.gradient_checkpointing, "
            "or pass --skip-memory-check if you know the run fits (see tnlora train --dry-run)",
        )


def enable_gradient_checkpointing(model: torch.nn.Module) -> None:
    """Non-reentrant checkpointing: gradients reach adapters inside checkpointed blocks
    without `enable_input_require_grads`, and parameters used by several layers (shared
    cores) are not "marked ready twice" under DDP, unlike the reentrant variant."""
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise RecipeError(
            f"training.gradient_checkpointing: {type(model).__name__} does not support gradient checkpointing",
            hint="set training.gradient_checkpointing: false",
        )
    options = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # the name since transformers 5.x; the old one warns
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=options)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=options)
    if getattr(model.config, "use_cache", None):
        model.config.use_cache = False  # a KV cache is useless in training and conflicts with checkpointing
