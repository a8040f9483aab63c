"""Prepare a recipe's data: read the sources, tokenize per task, split, cache, memory-map.

Preparation runs as batched `datasets.map` passes over Arrow tables and is cached on disk
(see `cache.py`), keyed by the sources' fingerprints, the tokenizer, the data section's
tokenization settings, the task and the code version: a second run, every process of a
multi-process launch after the first, and `train` / `eval` / `merge` of the same recipe open
the cache instead. The cache holds the examples before the train/held-out split; the split
(deterministic in `data.split_seed`) is made when the entry is opened, so changing a
held-out setting (`eval_fraction`, `max_eval_samples`, ...) does not tokenize again.

Examples are read from the memory-mapped cache one at a time (`Examples`), so memory does
not grow with the data set; batches are drawn in `training.batches` as a pure function of
(seed, step).

Rows that cannot be used (missing, null or non-text fields, a conversation with nothing to
train on) stop preparation with the file and row, or with `data.on_bad_rows: drop` are left
out and counted; examples cut at `data.max_length` are counted. Both are in the report.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ..errors import DataError
from ..recipe.sections import CLASSIFICATION_TASKS, IMAGE_TASK, DataConfig
from ..report.reporter import Reporter
from ..run.atomic import atomic_directory
from .cache import (
    cache_key,
    damage,
    data_cache_root,
    locked,
    remove_leftovers,
    tokenizer_fingerprint,
    touch,
    write_manifest,
)
from .chat import IGNORE_INDEX, tokenize_conversations
from .examples import Examples
from .mapped import release_mapped_pages
from .progress import phase
from .sources import SourceFile, check_label_feature, load_source, resolve_sources
from .turns import (
    RowError,
    conversation_style,
    count_tool_calls,
    instruction_messages,
    normalize_messages,
    row_tools,
)
from .unread import check_unread_keys
from .workers import worker_count

#: Held-out split made from `data.train`: `eval_fraction` of the examples, at most this many.
DEFAULT_MAX_HELD_OUT = 1000
#: Tasks whose rows are conversations (rendered with the chat template).
CONVERSATION_TASKS = ("instruction", "chat")
#: Data-section keys that do not change what is prepared (not part of the cache key).
_NOT_IN_KEY = {"group_by_length", "num_proc", "augment"}
#: Data-section keys of the train/held-out split, made when an entry is opened: changing them
#: reuses the tokenized data.
_SPLIT_KEYS = {"eval_fraction", "split_seed", "max_train_samples", "max_eval_samples", "max_held_out", "shots_per_class", "sample_seed"}


@dataclass
class TaskData:
    train: Sequence[dict[str, Any]]
    eval: Sequence[dict[str, Any]]
    label_names: list[str] | None = None
    #: What preparation did: rows read, examples, tokens, truncated and dropped counts, cache.
    report: dict[str, Any] = field(default_factory=dict)


def load_rows(source: str, key: str) -> list[dict[str, Any]]:
    """All rows of a source as Python dicts (small data only; preparation streams)."""
    rows: list[dict[str, Any]] = []
    for src in resolve_sources(source, key):
        rows += load_source(src).to_list()
    return rows


def split_rows(rows: list, fraction: float, seed: int, cap: int | None = None) -> tuple[list, list]:
    """Deterministic shuffle-and-cut; the held-out part has at least one row, at most `cap`."""
    train_idx, eval_idx = _split_indices(len(rows), fraction, seed, cap)
    return [rows[i] for i in train_idx], [rows[i] for i in eval_idx]


def _split_indices(n: int, fraction: float, seed: int, cap: int | None, report: dict | None = None) -> tuple[list[int], list[int]]:
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    n_eval = max(1, round(n * fraction))
    if cap is not None:
        n_eval = min(n_eval, cap)
    if n_eval >= n:
        drops, hint = _drops(report or {})
        raise DataError(f"data: {drops}{n:,} example{'s are' if n != 1 else ' is'} too few to hold out {fraction:.0%}", hint=hint or "add data or give data.eval")
    return order[n_eval:], order[:n_eval]


def _drops(report: dict) -> tuple[str, str | None]:
    """What was dropped, said before a refusal that follows from it: 'N of M rows were
    dropped (reason: count; ...), so ' and a hint for the commonest reason."""
    dropped = report.get("dropped") or {}
    if not dropped:
        return "", None
    read = sum(report.get("rows_read", {}).values())
    reasons = sorted(dropped.items(), key=lambda kv: -kv[1])
    said = "; ".join(f"{n:,}: {reason}" for reason, n in reasons)
    top = reasons[0][0]
    hint = ("raise data.max_length or shorten the prompts" if "max_length" in top
            else "fix or remove those rows (data.on_bad_rows: error stops at the first, naming its file and row)")
    return f"{sum(dropped.values()):,} of {read:,} rows read were dropped ({said}), so ", hint


def prepare_data(cfg: DataConfig, task: str, tokenizer, warn: Callable[[str], None] | None = None,
                 reporter: Reporter | None = None) -> TaskData:
    """Read, check and tokenize the data of a recipe through the on-disk cache, then split it.

    The cache entry holds the tokenized examples before the split, so the held-out settings
    (`_SPLIT_KEYS`) reuse it. `warn` is told what the user should know about the cache: a
    damaged entry rebuilt, leftovers of killed processes removed, a wait for another process.
    `reporter` shows the progress of reading, tokenizing and writing (rows and rows/s)."""
    import datasets

    warn = warn or (lambda message: None)
    datasets.disable_progress_bars()
    if task == IMAGE_TASK:  # `tokenizer` is the model's ImageProcessing
        from .images import image_sources

        train_sources = image_sources(cfg.train, "data.train")
        eval_sources = image_sources(cfg.eval, "data.eval") if cfg.eval else []
        check_unread_keys(cfg, task, {s.key for s in train_sources + eval_sources if s.folder})
    else:
        check_unread_keys(cfg, task)
        train_sources = resolve_sources(cfg.train, "data.train")
        eval_sources = resolve_sources(cfg.eval, "data.eval") if cfg.eval else []
    section = {k: v for k, v in cfg.model_dump(mode="json").items() if k not in _NOT_IN_KEY | _SPLIT_KEYS}
    key = cache_key({
        "task": task,
        "data": section,
        "tokenizer": tokenizer.fingerprint() if task == IMAGE_TASK else tokenizer_fingerprint(tokenizer),
        "train": [s.fingerprint() for s in train_sources],
        "eval": [s.fingerprint() for s in eval_sources],
    })
    for item in remove_leftovers(data_cache_root(create=True)):
        if item.suffix != ".lock":  # lock files of finished runs are noise, not news
            warn(f"removed {item}, left in the data cache by an interrupted process")
    about = {"task": task, "train": [s.name for s in train_sources], "eval": [s.name for s in eval_sources],
             "tokenizer": getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__, "max_length": cfg.max_length}
    with locked(key, on_wait=warn) as path:
        problem = damage(path) if path.exists() else "absent"
        if problem not in (None, "absent"):
            warn(f"warning: the data cache entry {path} is damaged ({problem}); rebuilding it")
        if problem is not None:
            _build_entry(cfg, task, tokenizer, train_sources, eval_sources, path, about, reporter)
        try:
            stored = _open_entry(path)
        except Exception as exc:  # any reader error on an entry that passed its manifest: damage the samples missed
            if problem is not None:
                raise  # just built: not damage but a bug, with its traceback
            warn(f"warning: the data cache entry {path} is damaged ({type(exc).__name__}: {str(exc)[:120]}); rebuilding it")
            _build_entry(cfg, task, tokenizer, train_sources, eval_sources, path, about, reporter)
            stored = _open_entry(path)
            problem = "unreadable"
    touch(path)
    report = stored.pop("report")
    report["cache"] = {"path": str(path), "hit": problem is None, "rebuilt": problem not in (None, "absent")}
    data = _split(cfg, report, **stored)
    release_mapped_pages()  # the pages the split read around its columns (see mapped.py)
    return data


def _build_entry(cfg: DataConfig, task: str, tokenizer, train_sources, eval_sources, path, about: dict[str, Any],
                 reporter: Reporter | None = None) -> None:
    # on_exists="replace": a damaged entry is replaced whole
    with atomic_directory(path, on_exists="replace") as tmp:
        build = _build_images if task == IMAGE_TASK else _build
        report = build(cfg, task, tokenizer, train_sources, eval_sources, tmp, reporter)
        (tmp / "report.json").write_text(json.dumps(report, indent=2))
        write_manifest(tmp, about)


def _open_entry(path) -> dict[str, Any]:
    import datasets

    report = json.loads((path / "report.json").read_text())
    if not isinstance(report, dict):
        raise TypeError("report.json is not a JSON object")
    train = datasets.load_from_disk(str(path / "train"))
    held_out = datasets.load_from_disk(str(path / "eval")) if (path / "eval").is_dir() else None
    for ds in (train, held_out):
        if ds is not None:
            ds.data.validate()  # the Arrow structure is read (cheap); a damaged table fails here
    return {"report": report, "train": train, "held_out": held_out}


def _split(cfg: DataConfig, report: dict[str, Any], train, held_out) -> TaskData:
    """The training and held-out examples of a tokenized entry: `data.eval`'s file, or a
    deterministic split of `train` (data.eval_fraction, split_seed, max_held_out), then
    data.max_train_samples / max_eval_samples."""
    report["notes"] = list(report.get("notes", []))
    n = train.num_rows
    if held_out is not None:
        train_pos, eval_pos = list(range(n)), list(range(held_out.num_rows))
    else:
        held_out = train
        cap = cfg.max_eval_samples or cfg.max_held_out
        train_pos, eval_pos = _split_indices(n, cfg.eval_fraction, cfg.split_seed, cap, report)
        if len(eval_pos) < max(1, round(n * cfg.eval_fraction)):
            key = "data.max_eval_samples" if cfg.max_eval_samples else "data.max_held_out"
            report["notes"].append(f"held out {len(eval_pos):,} of {n:,} examples ({cfg.eval_fraction:.0%} capped by {key}); the rest train")
    if cfg.shots_per_class:
        train_pos = _shots(train, train_pos, cfg.shots_per_class, cfg.sample_seed, report)
    if cfg.max_train_samples:
        train_pos = train_pos[: cfg.max_train_samples]
    if cfg.max_eval_samples:
        eval_pos = eval_pos[: cfg.max_eval_samples]
    if not train_pos or not eval_pos:
        _refuse_empty(report, "data.train" if not train_pos else "data.eval")
    # With data.eval the training split keeps file order; a split made from `train` keeps the
    # split's shuffled order, as earlier versions stored it, so their runs draw the same batches.
    train_rows = np.asarray(train_pos, dtype=np.int64)
    eval_rows = np.sort(np.asarray(eval_pos, dtype=np.int64))
    trained = _column(train, "n_trained")[train_rows].sum()
    report.update(
        train_examples=len(train_rows), eval_examples=len(eval_rows), train_tokens=int(_column(train, "length")[train_rows].sum()),
        train_trained_tokens=int(trained) if report.get("task") not in CLASSIFICATION_TASKS else None,
    )
    if report.get("task") == "chat":
        report["train_tool_calls"] = int(_column(train, "n_tool_calls")[train_rows].sum())
    if report.get("task") == IMAGE_TASK:
        from .images import ImageExamples

        train_examples = ImageExamples(train, train_rows, report["image"], augment=cfg.augment)
        eval_examples = ImageExamples(held_out, eval_rows, report["image"])  # evaluation never augments
    else:
        train_examples, eval_examples = Examples(train, train_rows), Examples(held_out, eval_rows, extra=("replies", "turns"))
    return TaskData(train=train_examples, eval=eval_examples, label_names=report.get("label_names"), report=report)


def _shots(train, train_pos: list[int], k: int, seed: int, report: dict[str, Any]) -> list[int]:
    """K training examples of each class, drawn with `seed` (the split's order kept); the
    classes and their counts go into the report."""
    names = report.get("label_names")
    if not names:
        raise DataError("data.shots_per_class: only classification data has classes to draw shots from", hint="remove data.shots_per_class")
    labels = _column(train, "labels")[np.asarray(train_pos, dtype=np.int64)]
    generator = torch.Generator().manual_seed(seed)
    chosen: list[int] = []
    for c, name in enumerate(names):
        where = np.flatnonzero(labels == c)
        if len(where) < k:
            raise DataError(f"data.shots_per_class: class '{name}' has {len(where)} training example{'s' if len(where) != 1 else ''}, fewer than {k}",
                            hint="lower data.shots_per_class, or add examples of that class")
        chosen += where[torch.randperm(len(where), generator=generator)[:k].numpy()].tolist()
    report["shots_per_class"] = {name: k for name in names}
    report["notes"].append(f"{k} training examples per class ({len(names)} classes) drawn with data.sample_seed {seed}")
    return [train_pos[i] for i in sorted(chosen)]


def _refuse_empty(report: dict[str, Any], empty: str) -> None:
    drops, hint = _drops(report)
    raise DataError(f"data: {drops}{empty} has no usable example after tokenization", hint=hint or "check the columns and data.max_length")


def _features(task: str):
    from datasets import Features, List, Value

    labels = Value("int64") if task == "classification" else List(Value("int32"))
    columns = {"input_ids": List(Value("int32")), "labels": labels, "length": Value("int32"),
               "n_trained": Value("int32"), "truncated": Value("bool"), "drop": Value("string")}
    if task in CONVERSATION_TASKS:
        # replies: [turn, first token, end token] per scored reply (eval --generate); turns: the
        # normalised messages as JSON (the prompts eval --generate shows); tool calls trained.
        columns.update(replies=List(Value("int32")), turns=Value("string"), n_tool_calls=Value("int32"))
    return Features(columns)


def _build(cfg: DataConfig, task: str, tokenizer, train_sources: list[SourceFile], eval_sources: list[SourceFile], tmp,
           reporter: Reporter | None = None) -> dict[str, Any]:
    """Tokenize into `tmp`: train/ (and eval/ with data.eval) hold the usable examples in
    file order, before any split; the returned report says what was read, cut and dropped."""
    report: dict[str, Any] = {"task": task, "rows_read": {}, "dropped": {}, "truncated": 0, "notes": [], "max_length": cfg.max_length}
    train_raw = _read(train_sources, report, reporter)
    eval_raw = _read(eval_sources, report, reporter) if eval_sources else []
    label_ids = None
    if task == "classification":
        report["label_names"] = _label_names(cfg, train_raw, eval_raw)
        label_ids = {name: i for i, name in enumerate(report["label_names"])}
    parts = tmp / "parts"
    parts.mkdir()
    # Each split: a flat Arrow table of tokenized rows and the rows kept (not dropped).
    keep = ["input_ids", "labels", "length", "n_trained"]
    if task in CONVERSATION_TASKS:
        keep += ["replies", "turns", "n_tool_calls"]
    train, train_keep = _tokenize(train_raw, cfg, task, tokenizer, label_ids, parts, "train", report, reporter)
    if not len(train_keep):  # refused here, with the drops: an empty table is not stored
        if not eval_sources:
            _split_indices(0, cfg.eval_fraction, cfg.split_seed, None, report)
        _refuse_empty(report, "data.train")
    with phase(reporter, "writing the prepared training examples", on_update=release_mapped_pages):
        train.select(train_keep).select_columns(keep).save_to_disk(str(tmp / "train"))
    if eval_sources:
        held_out, eval_keep = _tokenize(eval_raw, cfg, task, tokenizer, label_ids, parts, "eval", report, reporter)
        if not len(eval_keep):
            _refuse_empty(report, "data.eval")
        with phase(reporter, "writing the prepared held-out examples", on_update=release_mapped_pages):
            held_out.select(eval_keep).select_columns(keep).save_to_disk(str(tmp / "eval"))
        del held_out
    del train
    shutil.rmtree(parts, ignore_errors=True)
    return report


def _build_images(cfg: DataConfig, task: str, processing, train_sources, eval_sources, tmp, reporter: Reporter | None = None) -> dict[str, Any]:
    """Decode the images into `tmp` (train/, and eval/ with data.eval), before any split:
    uint8 at the model's input size (`data.images`); the report says what was read and dropped."""
    from .images import read_images

    report: dict[str, Any] = {"task": task, "rows_read": {}, "dropped": {}, "truncated": 0, "notes": [], "max_length": None,
                              "image": processing.describe(), "converted": {}, "per_class": {}}
    parts = tmp / "parts"
    parts.mkdir()
    keep = ["pixels", "labels", "length", "n_trained"]
    with phase(reporter, "decoding the training images"):
        train, train_keep, names = read_images(cfg, processing, train_sources, None, parts, "train", report)
    report["label_names"] = names
    if not len(train_keep):
        if not eval_sources:
            _split_indices(0, cfg.eval_fraction, cfg.split_seed, None, report)
        _refuse_empty(report, "data.train")
    with phase(reporter, "writing the prepared training images"):
        train.select(train_keep).select_columns(keep).save_to_disk(str(tmp / "train"))
    if eval_sources:
        with phase(reporter, "decoding the held-out images"):
            held_out, eval_keep, _ = read_images(cfg, processing, eval_sources, names, parts, "eval", report)
        if not len(eval_keep):
            _refuse_empty(report, "data.eval")
        with phase(reporter, "writing the prepared held-out images"):
            held_out.select(eval_keep).select_columns(keep).save_to_disk(str(tmp / "eval"))
        del held_out
    del train
    for conversion, n in report["converted"].items():
        report["notes"].append(f"{n:,} image{'s' if n != 1 else ''} converted {conversion} (the model has {processing.channels} channel{'s' if processing.channels > 1 else ''})")
    shutil.rmtree(parts, ignore_errors=True)
    return report


def _column(ds, name: str) -> np.ndarray:
    """One column of a flat (unselected) dataset, without a Python pass over its rows."""
    return np.asarray(ds.data.column(name).to_numpy())


def _read(sources: list[SourceFile], report: dict, reporter: Reporter | None = None) -> list[tuple[SourceFile, Any]]:
    """Each file's rows, with per-source `max_rows` applied across the files of a source."""
    out, left = [], {}
    for src in sources:
        with phase(reporter, f"reading {src.name}"):
            ds = load_source(src)
        if src.max_rows is not None:
            remaining = left.setdefault(src.group, src.max_rows)
            if remaining <= 0:
                continue
            if ds.num_rows > remaining:
                ds = ds.select(range(remaining))
            left[src.group] = remaining - ds.num_rows
        report["rows_read"][src.name] = report["rows_read"].get(src.name, 0) + ds.num_rows
        out.append((src, ds))
    return out


def _label_names(cfg: DataConfig, train_raw, eval_raw) -> list[str]:
    col = cfg.label_column
    present: set[str] = set()
    for src, ds in train_raw:
        _require(src, ds, [("data.label_column", col)])
        check_label_feature(ds, col, src.name)
        present |= {str(v) for v in ds.unique(col) if v is not None}
    present_sorted = sorted(present)
    if cfg.labels is not None:
        unknown = [label for label in cfg.labels if label not in present]
        if unknown:
            raise DataError(f"data.labels: {unknown} do not occur in column '{col}'", hint=f"labels present: {', '.join(present_sorted)}")
        names = list(cfg.labels)
    else:
        names = present_sorted
    if len(names) < 2:
        raise DataError(f"data.label_column: column '{col}' has fewer than two classes", hint="classification needs at least two labels")
    if cfg.labels is None:
        for src, ds in eval_raw:
            _require(src, ds, [("data.label_column", col)])
            check_label_feature(ds, col, src.name)
            extra = sorted({str(v) for v in ds.unique(col) if v is not None} - set(names))
            if extra:
                raise DataError(f"data.eval: labels {extra} do not occur in data.train", hint="held-out labels must be a subset of the training labels")
    return names


def _require(src: SourceFile, ds, columns: list[tuple[str, str]]) -> None:
    present = ds.column_names
    for recipe_key, column in columns:
        if column not in present:
            raise DataError(f"{recipe_key}: column '{column}' is not in {src.name}", hint=f"set {recipe_key} to one of: {', '.join(sorted(present))}")


def _columns(task: str, cfg: DataConfig, ds, src: SourceFile, report: dict) -> dict[str, str | None]:
    """The columns this file's rows are read from (chat and Alpaca fall-backs resolved)."""
    names = ds.column_names
    if task == "classification":
        cols = {"text": cfg.text_column, "pair": cfg.text_pair_column, "label": cfg.label_column}
        _require(src, ds, [("data.text_column", cfg.text_column), ("data.label_column", cfg.label_column)]
                 + ([("data.text_pair_column", cfg.text_pair_column)] if cfg.text_pair_column else []))
    elif task == "causal-lm":
        cols = {"text": cfg.text_column}
        _require(src, ds, [("data.text_column", cfg.text_column)])
    elif task == "chat":
        col = cfg.messages_column
        if col not in names and col == "messages" and "conversations" in names:
            col = "conversations"
            report["notes"].append(f"{src.name}: turns read from column 'conversations'")
        cols = {"messages": col, "tools": "tools" if "tools" in names and col != "tools" else None}
        _require(src, ds, [("data.messages_column", col)])
        if cols["tools"]:
            report["notes"].append(f"{src.name}: tool schemas read from column 'tools'")
    else:
        cols = {"prompt": cfg.prompt_column, "response": cfg.response_column, "input": cfg.input_column}
        alpaca = cfg.prompt_column == "prompt" and cfg.response_column == "response" and cfg.input_column is None
        if alpaca and "prompt" not in names and {"instruction", "output"} <= set(names):
            cols = {"prompt": "instruction", "response": "output", "input": "input" if "input" in names else None}
            report["notes"].append(f"{src.name}: Alpaca columns instruction/input/output")
        _require(src, ds, [("data.prompt_column", cols["prompt"]), ("data.response_column", cols["response"])]
                 + ([("data.input_column", cols["input"])] if cols["input"] else []))
    return cols


def _text_field(row: dict, column: str, optional: bool = False) -> str | None:
    value = row.get(column)
    if isinstance(value, str):
        return value
    if value is None:
        if optional:
            return None
        raise RowError(f"field '{column}' is missing or null")
    raise RowError(f"field '{column}' is not text (got {type(value).__name__} {str(value)[:40]!r})")


def _tokenize(raw: list[tuple[SourceFile, Any]], cfg: DataConfig, task: str, tokenizer, label_ids, parts, split: str, report: dict,
              reporter: Reporter | None = None):
    """Tokenize every file with a batched map into `parts`, apply the bad-row policy, pack."""
    from datasets import concatenate_datasets

    tokenized = []
    for k, (src, ds) in enumerate(raw):
        cols = _columns(task, cfg, ds, src, report)
        style = None
        if task == "chat":
            first = next((t for t in ds[cols["messages"]][:100] if t), None)  # detected per file
            style = conversation_style(first)
            if style is None:
                raise DataError(f"data: {src.name}: column '{cols['messages']}' holds neither OpenAI turns (role/content) nor ShareGPT turns (from/value)",
                                hint="each row needs a list like [{role: user, content: ...}, {role: assistant, content: ...}]")
        fn = _row_function(task, cfg, tokenizer, cols, style, label_ids)

        def batch_fn(batch: dict, indices: list[int], src=src, fn=fn, calls=[0]) -> dict:  # noqa: B006 - a counter per process
            calls[0] += 1
            if calls[0] % 8 == 0:  # every 8,000 rows, in whichever process reads them: see mapped.py
                release_mapped_pages()
            rows = [dict(zip(batch, values)) for values in zip(*batch.values())]
            out = {name: [] for name in _features(task)}
            for i, result in zip(indices, fn(rows)):
                if isinstance(result, RowError):
                    if cfg.on_bad_rows == "error" and not getattr(result, "always_drop", False):
                        raise DataError(f"data: {src.name} row {i + 1}: {result}",
                                        hint="fix or remove the row, or set data.on_bad_rows: drop to leave such rows out (they are counted)")
                    result = {"input_ids": [], "labels": 0 if task == "classification" else [], "truncated": False, "drop": str(result)}
                ids = result["input_ids"]
                out["input_ids"].append(ids)
                out["labels"].append(result["labels"])
                out["length"].append(len(ids))
                lab = result["labels"]
                n_trained = result.get("n_trained")
                if n_trained is None:
                    n_trained = sum(1 for t in lab if t != IGNORE_INDEX) if isinstance(lab, list) else 1
                out["n_trained"].append(n_trained)
                out["truncated"].append(result["truncated"])
                out["drop"].append(result.get("drop", ""))
                for name, empty in (("replies", []), ("turns", ""), ("n_tool_calls", 0)):
                    if name in out:
                        out[name].append(result.get(name, empty))
            return out

        fp = hashlib.sha256(f"{src.fingerprint()}:{split}:{k}:{id(parts)}".encode()).hexdigest()[:16]
        with phase(reporter, f"tokenizing {src.name}"):
            mapped = ds.map(batch_fn, with_indices=True, batched=True, batch_size=1000, remove_columns=ds.column_names,
                            features=_features(task), cache_file_name=str(parts / f"{split}-{k}.arrow"), new_fingerprint=fp,
                            num_proc=worker_count(cfg.num_proc, ds.num_rows), load_from_cache_file=False)
        tokenized.append(mapped)
    ds = concatenate_datasets(tokenized) if len(tokenized) > 1 else tokenized[0]
    drops = ds.data.column("drop").to_pylist()
    truncated = np.asarray(ds.data.column("truncated").to_pylist(), dtype=bool)
    keep = np.asarray([i for i, d in enumerate(drops) if not d], dtype=np.int64)
    for reason, n in Counter(d for d in drops if d).items():
        report["dropped"][reason] = report["dropped"].get(reason, 0) + n
    if task == "causal-lm" and cfg.packing:
        packed = _pack(ds.select(keep), cfg.max_length, tokenizer.eos_token_id, parts / f"{split}-packed.arrow")
        return packed, np.arange(packed.num_rows, dtype=np.int64)
    report["truncated"] += int(truncated[keep].sum())
    return ds, keep


def _row_function(task: str, cfg: DataConfig, tokenizer, cols: dict, style: str | None, label_ids: dict | None):
    """rows -> one result per row: an example dict, or the RowError that makes it unusable."""
    n = cfg.max_length

    def classification(rows):
        out, texts, pairs, where = [], [], [], []
        for row in rows:
            try:
                text = _text_field(row, cols["text"])
                pair = _text_field(row, cols["pair"]) if cols["pair"] else None
                if row.get(cols["label"]) is None:
                    raise RowError(f"field '{cols['label']}' is missing or null")
                label = str(row[cols["label"]])
                if label not in label_ids:
                    err = RowError("label not in data.labels")
                    err.always_drop = True  # the user asked for a subset: filtered and counted
                    raise err
            except RowError as exc:
                out.append(exc)
                continue
            where.append(len(out))
            out.append({"labels": label_ids[label]})
            texts.append(text)
            pairs.append(pair)
        if texts:
            args = (texts, pairs) if cols["pair"] else (texts,)
            full = tokenizer(*args)["input_ids"]
            cut = tokenizer(*args, truncation=True, max_length=n)["input_ids"]
            for j, a, b in zip(where, full, cut):
                out[j].update(input_ids=b, truncated=len(a) > len(b))
        return out

    def causal_lm(rows):
        out, texts, where = [], [], []
        for row in rows:
            try:
                texts.append(_text_field(row, cols["text"]))
                where.append(len(out))
                out.append(None)
            except RowError as exc:
                out.append(exc)
        if texts:
            for j, ids in zip(where, tokenizer(texts, add_special_tokens=False)["input_ids"]):
                if cfg.packing:
                    out[j] = {"input_ids": ids, "labels": [], "truncated": False}
                elif len(ids) < 2:
                    err = RowError("text has fewer than 2 tokens")
                    err.always_drop = True
                    out[j] = err
                else:
                    out[j] = {"input_ids": ids[:n], "labels": ids[:n], "truncated": len(ids) > n}
        return out

    def conversations(rows):
        convs, tools, out = [], [], []
        for row in rows:
            try:
                if task == "chat":
                    messages = normalize_messages(row.get(cols["messages"]), style, "the file's first conversation")
                    tools.append(row_tools(row.get(cols["tools"])) if cols["tools"] else None)
                else:
                    prompt = _text_field(row, cols["prompt"])
                    extra = _text_field(row, cols["input"], optional=True) if cols["input"] else None
                    if extra and extra.strip():
                        prompt = f"{prompt}\n\n{extra}"
                    messages = instruction_messages(prompt, _text_field(row, cols["response"]))
                    tools.append(None)
                convs.append(messages)
                out.append(None)
            except RowError as exc:
                out.append(exc)
        results = iter(tokenize_conversations(tokenizer, convs, cfg.train_on, n, tools))
        for j, (value, messages) in enumerate(zip(out, _each_kept(out, convs))):
            if value is None:
                value = next(results)
                if not isinstance(value, RowError) and value["n_trained"] == 0:
                    value = RowError(f"no trained token within data.max_length={n} (the prompt fills it)")
                    value.always_drop = True
                if not isinstance(value, RowError):
                    value["turns"] = json.dumps(messages, ensure_ascii=False)
                    value["n_tool_calls"] = count_tool_calls([m for m in messages if m["role"] == "assistant"][-1:] if cfg.train_on == "last" else messages)
                out[j] = value
        return out

    return {"classification": classification, "causal-lm": causal_lm}.get(task, conversations)


def _each_kept(out: list, convs: list) -> list:
    """The conversation of each row (None for rows already refused), aligned with `out`."""
    it = iter(convs)
    return [next(it) if value is None else None for value in out]


def _pack(ds, block: int, eos: int | None, path) -> Any:
    """Concatenate all token ids (EOS between texts) and cut blocks of `block` tokens;
    streamed through an Arrow writer, the tail shorter than a block is left out."""
    from datasets import Dataset
    from datasets.arrow_writer import ArrowWriter

    features = _features("causal-lm")
    carry: list[int] = []
    with ArrowWriter(features=features, path=str(path)) as writer:
        for batch in ds.select_columns(["input_ids"]).iter(batch_size=1000):
            out = {k: [] for k in features}
            for ids in batch["input_ids"]:
                carry.extend(ids)
                if eos is not None:
                    carry.append(eos)
                start = 0
                while len(carry) - start >= block:
                    chunk = carry[start : start + block]
                    start += block
                    for k, v in (("input_ids", chunk), ("labels", chunk), ("length", block), ("n_trained", block), ("truncated", False), ("drop", "")):
                        out[k].append(v)
                del carry[:start]
            if out["input_ids"]:
                writer.write_batch(out)
        writer.finalize()
    return Dataset.from_file(str(path))
