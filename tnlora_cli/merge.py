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
import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from .checkpoint import atomic_directory
from .outputs import protected_paths, refuse_overlap, require_finite
from .data import collate
from .errors import MergeError
from .inject import is_adapter_tensor, merge_into_base, merge_units, require_linear
from .modeling import DTYPES, load_tokenizer, model_class, resolve_model
from .pipeline import load_adapters_on_meta, load_run
from .reporting import Reporter

#: (absolute, relative to the largest reference logit) tolerance per merged dtype. fp32 allows
#: 1e-5 of the logit scale on top of 1e-4: a 30-layer model's logits (|z| ~ 20) differ by
#: ~1e-4 between x·W0 + x·A·B and x·(W0 + BA) from rounding alone.
TOLERANCES = {torch.float32: (1e-4, 1e-5), torch.float16: (1e-2, 1e-2), torch.bfloat16: (5e-2, 2e-2)}
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".msgpack", ".h5", ".ckpt")
INDEX_NAMES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")


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


def parse_size(text: str | int) -> int:
    """'5GB', '500MB', '2GiB' or a number of bytes."""
    if isinstance(text, int):
        return text
    units = {"kib": 2**10, "mib": 2**20, "gib": 2**30, "kb": 10**3, "mb": 10**6, "gb": 10**9, "b": 1}
    lowered = text.strip().lower()
    for unit, factor in units.items():
        if lowered.endswith(unit) and lowered[: -len(unit)].strip().replace(".", "", 1).isdigit():
            return int(float(lowered[: -len(unit)]) * factor)
    if lowered.isdigit():
        return int(lowered)
    raise MergeError(f"--max-shard-size {text!r}: not a size", hint="use e.g. 5GB, 500MB or a number of bytes", exit_code=2)


def human_size(n: float) -> str:
    """Bytes in the largest unit that keeps a digit before the point (B, KiB, MiB, GiB, TiB)."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024:
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} TiB"


def checkpoint_dtype(model_path: str) -> str:
    """The dtype the base checkpoint stores, from its config (float32 when unstated)."""
    config = json.loads((Path(model_path) / "config.json").read_text()) if Path(model_path).is_dir() else {}
    name = str(config.get("dtype") or config.get("torch_dtype") or "float32").replace("torch.", "")
    return name if name in DTYPES else "float32"


def safetensors_shards(model_path: str) -> list[Path] | None:
    """The base's safetensors files in order, or None when it has none."""
    root = Path(model_path)
    index = root / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return [root / name for name in dict.fromkeys(weight_map.values())]
    single = root / "model.safetensors"
    return [single] if single.is_file() else None


def _tied_partners(model: nn.Module) -> dict[str, list[str]]:
    """Plain weight name -> other plain names holding the same Parameter (tied weights)."""
    owners: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        owners.setdefault(id(param), []).append(_plain(name))
    return {n: [m for m in names if m != n] for names in owners.values() for n in names if len(set(names)) > 1}


def _plain(key: str) -> str:
    """The key a weight has without tnlora's wrapper (x.base_layer.weight -> x.weight)."""
    return key.replace(".base_layer.", ".")


def _untie_config(config) -> None:
    for cfg in (config, getattr(config, "text_config", None)):
        if cfg is not None and hasattr(cfg, "tie_word_embeddings"):
            cfg.tie_word_embeddings = False


def _copy_side_files(src: Path, dst: Path) -> None:
    """Everything of the base directory a loader may need, except weights and indexes."""
    for item in src.iterdir():
        if item.name in INDEX_NAMES or item.name == "config.json" or item.suffix in WEIGHT_SUFFIXES or item.name.startswith("."):
            continue
        if item.is_dir():
            shutil.copytree(item, dst / item.name, dirs_exist_ok=True)
        else:
            shutil.copy2(item, dst / item.name)


SAFETENSORS_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.int64: "I64",
    torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8", torch.bool: "BOOL",
}
SAFETENSORS_TO_TORCH = {v: k for k, v in SAFETENSORS_DTYPES.items()}


@dataclass
class _Entry:
    """One output tensor: where it comes from and what it becomes."""

    key: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    produce: Callable[[], torch.Tensor]

    @property
    def nbytes(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n * torch.tensor([], dtype=self.dtype).element_size()


def _write_safetensors(path: Path, entries: list[_Entry]) -> None:
    """Write a safetensors file one tensor at a time: the header is computed from shapes and
    dtypes first, so memory holds a single tensor, never the whole shard."""
    header: dict[str, dict] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for e in entries:
        header[e.key] = {"dtype": SAFETENSORS_DTYPES[e.dtype], "shape": list(e.shape), "data_offsets": [offset, offset + e.nbytes]}
        offset += e.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the format aligns the data to 8 bytes
    with path.open("wb") as f:
        f.write(len(raw).to_bytes(8, "little"))
        f.write(raw)
        for e in entries:
            tensor = e.produce()
            if tuple(tensor.shape) != e.shape or tensor.dtype != e.dtype:
                raise AssertionError(f"{e.key}: produced {tuple(tensor.shape)} {tensor.dtype}, planned {e.shape} {e.dtype}")
            if tensor.numel():
                # A memoryview of the tensor's bytes: no second copy of the largest tensor.
                f.write(memoryview(tensor.contiguous().view(torch.uint8).numpy()))


def _write_shards(directory: Path, entries: list[_Entry], max_bytes: int, reporter: Reporter) -> int:
    """Split entries into shards of at most max_bytes, write them, and an index if several."""
    shards: list[list[_Entry]] = [[]]
    size = 0
    for e in entries:
        if shards[-1] and size + e.nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(e)
        size += e.nbytes
    n = len(shards)
    names = ["model.safetensors"] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    done = 0
    reporter.start(len(entries), "merging")
    for name, shard in zip(names, shards):
        counted = []
        for e in shard:
            produce = e.produce

            def counting(produce=produce):
                nonlocal done
                tensor = produce()
                done += 1
                reporter.advance(done)
                return tensor

            counted.append(_Entry(e.key, e.shape, e.dtype, counting))
        _write_safetensors(directory / name, counted)
    reporter.finish()
    if n > 1:
        weight_map = {e.key: name for name, shard in zip(names, shards) for e in shard}
        index = {"metadata": {"total_size": sum(e.nbytes for e in entries)}, "weight_map": weight_map}
        (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return n


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
    with atomic_directory(out, overwrite=force) as tmp:
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
    plain_keys = {_plain(k) for k in model.state_dict() if not is_adapter_tensor(k)}
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
    tied = _tied_partners(model)
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
        return layers[model_key].merged_weight(target, weight=read(path, key))

    def plain_copy(path: Path, key: str, out_dtype: torch.dtype) -> torch.Tensor:
        return read(path, key).to(out_dtype)

    entries: list[_Entry] = []
    for shard in shards:
        with safe_open(str(shard), framework="pt") as f:
            for key in f.keys():
                model_key = to_model_key(key)
                if model_key in heads:
                    continue  # replaced by the trained head below
                info = f.get_slice(key)
                shape, stored = tuple(info.get_shape()), SAFETENSORS_TO_TORCH[info.get_dtype()]
                if model_key in layers:
                    entries.append(_Entry(model_key, shape, target, lambda m=model_key, p=shard, k=key: merged(m, p, k)))
                else:
                    out_dtype = target if cast_all and stored.is_floating_point else stored
                    entries.append(_Entry(model_key, shape, out_dtype, lambda p=shard, k=key, d=out_dtype: plain_copy(p, k, d)))
    for key, source in extra.items():
        path, ckpt_key = ckpt_keys[source]
        shape = tuple(layers[key].base_layer.weight.shape)
        entries.append(_Entry(key, shape, target, lambda m=key, p=path, k=ckpt_key: merged(m, p, k)))
    for key, tensor in heads.items():
        out_dtype = target if tensor.is_floating_point() else tensor.dtype
        entries.append(_Entry(key, tuple(tensor.shape), out_dtype, lambda t=tensor, d=out_dtype: t.to(d)))

    needed = sum(e.nbytes for e in entries) * 1.02 + 2**20
    free = shutil.disk_usage(tmp).free
    if free < needed:
        raise MergeError(f"not enough disk space: the merged model needs about {human_size(needed)}, {human_size(free)} are free", hint="free space or choose another --out")
    n_shards = _write_shards(tmp, entries, max_bytes, reporter)

    _copy_side_files(Path(model_path), tmp)
    model.config.dtype = target
    model.config.architectures = [type(model).__name__]
    if untied:
        _untie_config(model.config)
    model.config.save_pretrained(tmp)
    load_tokenizer(model_path, recipe.trust_remote_code).save_pretrained(tmp)
    return MergeReport(tmp, target_name, len(layers), "streaming", n_shards, untied)


def _merge_in_memory(path: str | Path, tmp: Path, target_name: str) -> MergeReport:
    target = DTYPES[target_name]
    run = load_run(path, dtype="auto", quantize=False)
    run.load_weights()
    model = run.prepared.model.eval()
    untied = _untie_in_memory(model)
    merged = merge_into_base(model, target)
    model.to(target)
    model.config.dtype = target
    model.save_pretrained(tmp)
    run.prepared.tokenizer.save_pretrained(tmp)
    return MergeReport(tmp, target_name, merged, "in memory", 1, untied)


def _untie_in_memory(model: nn.Module) -> list[str]:
    """Give an adapted weight tied to another module its own copy, and tell the config."""
    tied = _tied_partners(model)
    untied = []
    for name, layer in merge_units(model):
        key = f"{name}.weight"
        if key in tied:
            layer.base_layer.weight = nn.Parameter(layer.base_layer.weight.detach().clone(), requires_grad=False)
            untied.append(f"{name} (was tied to {', '.join(k.removesuffix('.weight') for k in tied[key])})")
    if untied:
        _untie_config(model.config)
    return untied


def _verify(path: str | Path, merged_dir: Path, task: str, target: torch.dtype, n: int, report: MergeReport, reporter: Reporter) -> None:
    """Adapter model and merged model, one after the other, on the same held-out inputs."""
    reporter.status("computing reference logits with the adapter model")
    # The reference is the adapter on the original (unquantized) base weights: that is what
    # the merged model must equal. A quantized training base is measured separately below.
    run = load_run(path, dtype="auto", quantize=False)
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
