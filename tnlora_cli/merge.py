"""`tnlora merge`: W0 + ΔW into a plain Hugging Face directory, then verified.

ΔW is built in fp32 from the adapter's own tensors and added to the base weight in fp32,
then cast once: to the base checkpoint's stored dtype unless `--dtype` says otherwise (never
a silent upcast). When the base is a safetensors checkpoint (one file, or shards with an
index) the merge streams: it reads one tensor at a time, writes output shards of at most
`max_shard_size` and an index, so memory stays near one output shard plus the adapter. The
adapters are rebuilt on a meta-device model (no base weights in memory). A base that is not
a safetensors checkpoint, or whose tensor names cannot be matched, is merged in memory.

Everything is written into a temporary directory beside the destination, reloaded with
`from_pretrained` and compared with the adapter model, and only then renamed into place.
"""

from __future__ import annotations

import gc
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from .adapters.layers import merged_weight
from .data.examples import collate
from .errors import MergeError
from .model.build import load_adapters_on_meta, load_preprocessor, load_run
from .model.inject import merge_units, require_linear
from .model.loading import DTYPES, model_class, resolve_model
from .model.merging import TOLERANCES, merge_into_base, tied_partners, untie_config, untie_in_memory
from .model.shards import (
    SAFETENSORS_TO_TORCH,
    TensorEntry,
    checkpoint_dtype,
    copy_side_files,
    human_size,
    parse_size,
    plain_key,
    safetensors_shards,
    write_shards,
)
from .model.state import is_adapter_tensor
from .report.reporter import Reporter
from .run.atomic import atomic_directory
from .run.outputs import protected_paths, refuse_mount_point, refuse_overlap, require_finite


@dataclass
class MergeReport:
    out: Path
    dtype: str
    merged_layers: int
    mode: str  # "streaming" or "in memory"
    shards: int = 1
    untied: list[str] = field(default_factory=list)
    max_abs_diff: float | None = None
    mean_abs_diff: float | None = None
    tolerance: float | None = None
    #: Trained on a bitsandbytes base: max |logit| difference between that quantized adapter
    #: model and the merged full-precision model (the quantization error, not a merge error).
    quantization_gap: float | None = None
    quantized_bits: int | None = None


@torch.no_grad()
def merge_run(
    path: str | Path,
    out: str | Path,
    *,
    dtype: str | None = None,
    force: bool = False,
    verify: bool = True,
    max_shard_size: str | int = "5GB",
    streaming: bool = True,
    n_verify: int = 8,
    reporter: Reporter | None = None,
) -> MergeReport:
    """Merge a run's adapter into its base; see the module docstring."""
    reporter = reporter or Reporter()
    out = Path(out)
    refuse_mount_point(out)
    if out.exists() and not force:
        raise MergeError(f"{out} already exists", hint="pass --force to replace it, or choose another --out", exit_code=2)
    if dtype is not None and dtype not in DTYPES:
        raise MergeError(f"--dtype {dtype}: unknown", hint=f"use one of {', '.join(DTYPES)}", exit_code=2)
    max_bytes = parse_size(max_shard_size)
    reporter.status(f"reading the adapter of {path}")
    model, meta = load_adapters_on_meta(path)
    recipe = meta["recipe"]
    require_linear(model, "it cannot be merged into a weight")
    model_path = resolve_model(recipe.model, recipe.trust_remote_code, recipe.allow_pickle)
    refuse_overlap(out, protected_paths(path, meta["adapter_dir"], model_path))
    require_finite(meta["state"], meta["adapter_dir"])
    target_name = dtype or checkpoint_dtype(model_path)
    target = DTYPES[target_name]
    shards = safetensors_shards(model_path) if streaming else None
    with atomic_directory(out, on_exists="replace" if force else "error") as tmp:
        report = None
        if shards is not None:
            report = _merge_streaming(model, meta, model_path, shards, tmp, target_name, dtype is not None, max_bytes, reporter)
        if report is None:
            reporter.status("merging in memory (the base is not a safetensors checkpoint tnlora can stream)")
            report = _merge_in_memory(path, tmp, target_name)
        report.out = out
        del model
        gc.collect()
        if verify:
            _verify(path, tmp, recipe.task, target, n_verify, report, reporter)
    return report


def _merge_streaming(
    model: nn.Module, meta: dict, model_path: str, shards: list[Path], tmp: Path, target_name: str, cast_all: bool, max_bytes: int, reporter: Reporter
) -> MergeReport | None:
    target = DTYPES[target_name]
    recipe, state = meta["recipe"], meta["state"]
    shapes = {plain_key(k): tuple(v.shape) for k, v in model.state_dict().items() if not is_adapter_tensor(k)}
    plain_keys = set(shapes)
    prefix = getattr(model, "base_model_prefix", "")

    def to_model_key(key: str) -> str:
        if key in plain_keys:
            return key
        return f"{prefix}.{key}" if prefix and f"{prefix}.{key}" in plain_keys else key

    ckpt_keys: dict[str, tuple[Path, str]] = {}
    for shard in shards:
        with safe_open(str(shard), framework="pt") as f:
            for key in f.keys():
                ckpt_keys[to_model_key(key)] = (shard, key)
    layers = {f"{name}.weight": layer for name, layer in merge_units(model)}
    tied = tied_partners(model)
    untied: list[str] = []
    extra: dict[str, str] = {}  # adapted key missing from the checkpoint -> tied key to start from
    for key in layers:
        if key in tied:
            untied.append(f"{key.removesuffix('.weight')} (was tied to {', '.join(k.removesuffix('.weight') for k in tied[key])})")
        if key not in ckpt_keys:
            source = next((k for k in tied.get(key, []) if k in ckpt_keys), None)
            if source is None:
                return None  # names we cannot match: let from_pretrained do it in memory
            extra[key] = source
    heads = {k: v for k, v in state.items() if not is_adapter_tensor(k)}

    def read(path: Path, key: str) -> torch.Tensor:
        # Open per tensor: the memory map of a shard never stays resident.
        with safe_open(str(path), framework="pt") as f:
            return f.get_tensor(key)

    def merged(model_key: str, path: Path, key: str) -> torch.Tensor:
        return merged_weight(layers[model_key], target, weight=read(path, key))

    def plain_copy(path: Path, key: str, out_dtype: torch.dtype) -> torch.Tensor:
        return read(path, key).to(out_dtype)

    entries: list[TensorEntry] = []
    for shard in shards:
        with safe_open(str(shard), framework="pt") as f:
            for key in f.keys():
                model_key = to_model_key(key)
                if model_key in heads:
                    continue  # replaced by the trained head below
                info = f.get_slice(key)
                shape, stored = tuple(info.get_shape()), SAFETENSORS_TO_TORCH[info.get_dtype()]
                if shapes.get(model_key, shape) != shape:
                    return None  # a head re-created at another size (not stored with the adapter): built in memory
                if model_key in layers:
                    entries.append(TensorEntry(model_key, shape, target, lambda m=model_key, p=shard, k=key: merged(m, p, k)))
                else:
                    out_dtype = target if cast_all and stored.is_floating_point else stored
                    entries.append(TensorEntry(model_key, shape, out_dtype, lambda p=shard, k=key, d=out_dtype: plain_copy(p, k, d)))
    for key, source in extra.items():
        path, ckpt_key = ckpt_keys[source]
        shape = tuple(layers[key].base_layer.weight.shape)
        entries.append(TensorEntry(key, shape, target, lambda m=key, p=path, k=ckpt_key: merged(m, p, k)))
    for key, tensor in heads.items():
        out_dtype = target if tensor.is_floating_point() else tensor.dtype
        entries.append(TensorEntry(key, tuple(tensor.shape), out_dtype, lambda t=tensor, d=out_dtype: t.to(d)))

    needed = sum(e.nbytes for e in entries) * 1.02 + 2**20
    free = shutil.disk_usage(tmp).free
    if free < needed:
        raise MergeError(f"not enough disk space: the merged model needs about {human_size(needed)}, {human_size(free)} are free", hint="free space or choose another --out")
    n_shards = write_shards(tmp, entries, max_bytes, reporter)

    copy_side_files(Path(model_path), tmp)
    model.config.dtype = target
    model.config.architectures = [type(model).__name__]
    if untied:
        untie_config(model.config)
    model.config.save_pretrained(tmp)
    load_preprocessor(recipe, model_path).save_pretrained(tmp)  # tokenizer, or image processor
    return MergeReport(tmp, target_name, len(layers), "streaming", n_shards, untied)


def _merge_in_memory(path: str | Path, tmp: Path, target_name: str) -> MergeReport:
    target = DTYPES[target_name]
    run = load_run(path, dtype="auto", quantize=False)
    run.load_weights()
    model = run.prepared.model.eval()
    untied = untie_in_memory(model)
    merged = merge_into_base(model, target)
    model.to(target)
    model.config.dtype = target
    model.save_pretrained(tmp)
    run.prepared.tokenizer.save_pretrained(tmp)
    return MergeReport(tmp, target_name, merged, "in memory", 1, untied)


def _verify(path: str | Path, merged_dir: Path, task: str, target: torch.dtype, n: int, report: MergeReport, reporter: Reporter) -> None:
    """Adapter model and merged model, one after the other, on the same held-out inputs."""
    reporter.status("computing reference logits with the adapter model")
    # The reference is the adapter on the original (unquantized) base weights: that is what
    # the merged model must equal. A quantized training base is measured separately below.
    run = load_run(path, dtype="auto", quantize=False, warn=reporter.status)
    run.load_weights()
    batch = collate(run.prepared.data.eval[:n], run.prepared.tokenizer.pad_token_id)
    batch.pop("labels")
    reference = run.prepared.model.eval()(**batch).logits.float()
    quantization = run.prepared.recipe.quantization
    del run
    gc.collect()
    quantized_logits = None
    if quantization is not None:
        reporter.status(f"measuring the {quantization.bits}-bit training model against the merged one")
        run = load_run(path)
        run.load_weights()
        quantized_logits = run.prepared.model.eval()(**batch).logits.float()
        del run
        gc.collect()
    reporter.status("reloading the merged model to compare logits")
    reloaded = model_class(task).from_pretrained(merged_dir, dtype=target).eval()
    logits = reloaded(**batch).logits.float()
    diff = (logits - reference).abs()
    atol, rtol = TOLERANCES[target]
    report.max_abs_diff, report.mean_abs_diff = diff.max().item(), diff.mean().item()
    report.tolerance = atol + rtol * reference.abs().max().item()
    if quantized_logits is not None:
        report.quantization_gap = (quantized_logits - logits).abs().max().item()
        report.quantized_bits = quantization.bits
    if not report.max_abs_diff <= report.tolerance:
        raise MergeError(
            f"verification failed: merged logits differ from the adapter model's by up to {report.max_abs_diff:.3g} "
            f"(tolerance {report.tolerance:.3g}); nothing was written",
            hint="merge in a wider dtype (--dtype float32) or report this as a bug",
        )
