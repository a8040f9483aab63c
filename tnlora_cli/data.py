"""Load rows (embedded alias or local file), split off a held-out set, and tokenize per task.

Examples are lists of token ids; `collate` pads a batch. Everything is deterministic in
`data.split_seed`, so `train`, `eval` and `merge` see the same held-out split.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .embedded import DATASETS
from .errors import DataError
from .recipe import DataConfig

LOADERS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet", ".txt": "text"}
IGNORE_INDEX = -100


@dataclass
class TaskData:
    train: list[dict[str, Any]]
    eval: list[dict[str, Any]]
    label_names: list[str] | None = None


def load_rows(source: str, key: str) -> list[dict[str, Any]]:
    """Rows of an embedded alias or a local file; `key` is the recipe path for errors."""
    if source in DATASETS:
        return DATASETS[source]()
    path = Path(source).expanduser()
    suffix = path.suffix.lower()
    if suffix not in LOADERS:
        raise DataError(
            f"{key}: '{source}' is neither an embedded dataset ({', '.join(DATASETS)}) nor a .jsonl/.json/.csv/.parquet/.txt file",
            hint="point it at a local data file or an embedded alias",
        )
    if not path.is_file():
        raise DataError(f"{key}: file {path} does not exist", hint="check the path (relative paths start where tnlora runs)")
    import datasets

    datasets.disable_progress_bars()
    kwargs = {"sample_by": "document"} if LOADERS[suffix] == "text" else {}
    try:
        ds = datasets.load_dataset(LOADERS[suffix], data_files=str(path), split="train", **kwargs)
    except Exception as exc:  # noqa: BLE001 - parser errors differ per format
        raise DataError(f"{key}: could not read {path}: {exc}", hint="check the file's format") from None
    return ds.to_list()


def _require_columns(rows: list[dict], columns: list[tuple[str, str]], source: str) -> None:
    if not rows:
        raise DataError(f"data: {source} has no rows")
    present = set(rows[0])
    for recipe_key, column in columns:
        if column not in present:
            raise DataError(
                f"{recipe_key}: column '{column}' is not in {source}",
                hint=f"set {recipe_key} to one of: {', '.join(sorted(present))}",
            )


def split_rows(rows: list, fraction: float, seed: int) -> tuple[list, list]:
    """Deterministic shuffle-and-cut; the held-out part has at least one row."""
    order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(seed)).tolist()
    n_eval = max(1, round(len(rows) * fraction))
    if n_eval >= len(rows):
        raise DataError(f"data: {len(rows)} rows are too few to hold out {fraction:.0%}", hint="add data or give data.eval")
    return [rows[i] for i in order[n_eval:]], [rows[i] for i in order[:n_eval]]


def prepare_data(cfg: DataConfig, task: str, tokenizer) -> TaskData:
    """Load, check, split and tokenize the data of a recipe."""
    train_rows = load_rows(cfg.train, "data.train")
    eval_rows = load_rows(cfg.eval, "data.eval") if cfg.eval else None
    if task == "classification":
        columns = [("data.text_column", cfg.text_column), ("data.label_column", cfg.label_column)]
        if cfg.text_pair_column:
            columns.append(("data.text_pair_column", cfg.text_pair_column))
    elif task == "instruction":
        columns = [("data.prompt_column", cfg.prompt_column), ("data.response_column", cfg.response_column)]
    else:
        columns = [("data.text_column", cfg.text_column)]
    _require_columns(train_rows, columns, cfg.train)
    if eval_rows is not None:
        _require_columns(eval_rows, columns, cfg.eval)

    label_names = None
    if task == "classification":
        train_rows, eval_rows, label_names = _select_labels(cfg, train_rows, eval_rows)

    if task == "causal-lm":
        # Blocks are split, not documents, so one long text still gets a held-out part.
        train = _causal_lm_examples(train_rows, cfg, tokenizer)
        if eval_rows is None:
            train, held_out = split_rows(train, cfg.eval_fraction, cfg.split_seed)
        else:
            held_out = _causal_lm_examples(eval_rows, cfg, tokenizer)
    else:
        if eval_rows is None:
            train_rows, eval_rows = split_rows(train_rows, cfg.eval_fraction, cfg.split_seed)
        if task == "classification":
            label_ids = {name: i for i, name in enumerate(label_names)}
            train = [_classification_example(r, cfg, tokenizer, label_ids) for r in train_rows]
            held_out = [_classification_example(r, cfg, tokenizer, label_ids) for r in eval_rows]
        else:
            train = [_instruction_example(r, cfg, tokenizer) for r in train_rows]
            held_out = [_instruction_example(r, cfg, tokenizer) for r in eval_rows]
            train = [e for e in train if e is not None]
            held_out = [e for e in held_out if e is not None]
    if cfg.max_train_samples:
        train = train[: cfg.max_train_samples]
    if cfg.max_eval_samples:
        held_out = held_out[: cfg.max_eval_samples]
    if not train or not held_out:
        raise DataError("data: no usable examples after tokenization", hint="check the columns and data.max_length")
    return TaskData(train=train, eval=held_out, label_names=label_names)


def _select_labels(cfg: DataConfig, train_rows: list, eval_rows: list | None) -> tuple[list, list | None, list[str]]:
    col = cfg.label_column
    present = sorted({str(r[col]) for r in train_rows})
    if cfg.labels is not None:
        unknown = [label for label in cfg.labels if label not in present]
        if unknown:
            raise DataError(f"data.labels: {unknown} do not occur in column '{col}'", hint=f"labels present: {', '.join(present)}")
        names = list(cfg.labels)
        keep = set(names)
        train_rows = [r for r in train_rows if str(r[col]) in keep]
        if eval_rows is not None:
            eval_rows = [r for r in eval_rows if str(r[col]) in keep]
    else:
        names = present
    if len(names) < 2:
        raise DataError(f"data.label_column: column '{col}' has fewer than two classes", hint="classification needs at least two labels")
    if eval_rows is not None:
        extra = sorted({str(r[col]) for r in eval_rows} - set(names))
        if extra:
            raise DataError(f"data.eval: labels {extra} do not occur in data.train", hint="held-out labels must be a subset of the training labels")
    return train_rows, eval_rows, names


def _classification_example(row: dict, cfg: DataConfig, tokenizer, label_ids: dict[str, int]) -> dict:
    pair = str(row[cfg.text_pair_column]) if cfg.text_pair_column else None
    enc = tokenizer(str(row[cfg.text_column]), pair, truncation=True, max_length=cfg.max_length)
    return {"input_ids": enc["input_ids"], "labels": label_ids[str(row[cfg.label_column])]}


def _causal_lm_examples(rows: list, cfg: DataConfig, tokenizer) -> list[dict]:
    eos = tokenizer.eos_token_id
    texts = [str(r[cfg.text_column]) for r in rows]
    encoded = tokenizer(texts, add_special_tokens=False)["input_ids"]
    if not cfg.packing:
        return [{"input_ids": ids[: cfg.max_length], "labels": ids[: cfg.max_length]} for ids in encoded if len(ids) > 1]
    stream: list[int] = []
    for ids in encoded:
        stream.extend(ids)
        if eos is not None:
            stream.append(eos)
    n = cfg.max_length
    return [{"input_ids": stream[i : i + n], "labels": stream[i : i + n]} for i in range(0, len(stream) - n + 1, n)]


def format_prompt(tokenizer, messages: list[dict[str, str]]) -> str:
    """The text a model reads before writing the next assistant turn, as training formats it.

    With a chat template: the template with its generation prompt. Without one, the plain
    format: each system or user text followed by a newline, each assistant reply by the EOS
    token (a single turn is `prompt + "\\n"`, the reply follows). Generation and chat call this.
    """
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    eos = tokenizer.eos_token or ""
    return "".join(m["content"] + (eos if m["role"] == "assistant" else "\n") for m in messages)


def _instruction_example(row: dict, cfg: DataConfig, tokenizer) -> dict | None:
    """Prompt tokens are masked out of the loss; only the response is learnt."""
    prompt, response = str(row[cfg.prompt_column]), str(row[cfg.response_column])
    user = [{"role": "user", "content": prompt}]
    prompt_text = format_prompt(tokenizer, user)
    if getattr(tokenizer, "chat_template", None):
        full_text = tokenizer.apply_chat_template(user + [{"role": "assistant", "content": response}], tokenize=False)
        if not full_text.startswith(prompt_text):
            # Templates that rewrite earlier turns: fall back to plain concatenation.
            full_text = prompt_text + response + (tokenizer.eos_token or "")
    else:
        full_text = prompt_text + response + (tokenizer.eos_token or "")
    prompt_ids = tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
    full_ids = tokenizer(full_text, add_special_tokens=False)["input_ids"][: cfg.max_length]
    n_prompt = min(len(prompt_ids), len(full_ids))
    labels = [IGNORE_INDEX] * n_prompt + full_ids[n_prompt:]
    if all(label == IGNORE_INDEX for label in labels):
        return None  # prompt fills max_length: nothing to learn from this row
    return {"input_ids": full_ids, "labels": labels}


def collate(examples: list[dict], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a batch; padded label positions are ignored by the loss."""
    width = max(len(e["input_ids"]) for e in examples)
    ids = torch.full((len(examples), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for i, e in enumerate(examples):
        ids[i, : len(e["input_ids"])] = torch.tensor(e["input_ids"])
        mask[i, : len(e["input_ids"])] = 1
    batch = {"input_ids": ids, "attention_mask": mask}
    if isinstance(examples[0]["labels"], int):
        batch["labels"] = torch.tensor([e["labels"] for e in examples])
    else:
        labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
        for i, e in enumerate(examples):
            labels[i, : len(e["labels"])] = torch.tensor(e["labels"])
        batch["labels"] = labels
    return batch
