"""Safetensors checkpoints of base models: shard lists and stored dtypes, shard sizes, and
streaming writes (one tensor produced and written at a time) for `tnlora merge`."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import MergeError
from ..report.reporter import Reporter
from .loading import DTYPES

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".msgpack", ".h5", ".ckpt")
INDEX_NAMES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")


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


def plain_key(key: str) -> str:
    """The key a weight has without tnlora's wrapper (x.base_layer.weight -> x.weight)."""
    return key.replace(".base_layer.", ".")


def copy_side_files(src: Path, dst: Path) -> None:
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
class TensorEntry:
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


def write_safetensors(path: Path, entries: list[TensorEntry]) -> None:
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


def write_shards(directory: Path, entries: list[TensorEntry], max_bytes: int, reporter: Reporter) -> int:
    """Split entries into shards of at most max_bytes, write them, and an index if several."""
    shards: list[list[TensorEntry]] = [[]]
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

            counted.append(TensorEntry(e.key, e.shape, e.dtype, counting))
        write_safetensors(directory / name, counted)
    reporter.finish()
    if n > 1:
        weight_map = {e.key: name for name, shard in zip(names, shards) for e in shard}
        index = {"metadata": {"total_size": sum(e.nbytes for e in entries)}, "weight_map": weight_map}
        (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return n
