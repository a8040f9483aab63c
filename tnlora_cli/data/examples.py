"""Prepared examples as training reads them: memory-mapped rows of the cache (`Examples`)
and `collate`, which pads a list of examples into one batch."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from .chat import (
    IGNORE_INDEX,
)


class Examples(Sequence):
    """Tokenized examples backed by a memory-mapped Arrow table: `len()` is free, items are
    {'input_ids', 'labels'} dicts read on demand. `rows` picks and orders the table's rows
    (a split of the prepared data; default: all, in order); `extra` names further columns the
    items carry where the table has them (held-out chat and instruction examples: 'replies'
    and 'turns' for eval --generate, see `prepare._features`)."""

    #: The columns every item is made from.
    columns: tuple[str, ...] = ("input_ids", "labels")

    def __init__(self, dataset, rows: np.ndarray | None = None, extra: tuple[str, ...] = ()) -> None:
        self.dataset = dataset
        # Only the columns items carry are read (a batch never reads the held-out text).
        self._items = dataset.select_columns([*self.columns, *(c for c in extra if c in dataset.column_names)])
        self.rows = np.arange(dataset.num_rows, dtype=np.int64) if rows is None else np.asarray(rows, dtype=np.int64)

    def _item(self, row: dict[str, Any]) -> dict[str, Any]:
        """One item from its table row (the columns read)."""
        return row

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(i)
        return self._item(dict(self._items[int(self.rows[i])]))

    def take(self, indices: list[int]) -> list[dict]:
        """Several examples in one read (a batch)."""
        cols = self._items[self.rows[np.asarray(indices, dtype=np.int64)].tolist()]
        return [self._item(dict(zip(cols, values))) for values in zip(*cols.values())]

    def lengths(self) -> np.ndarray:
        return np.asarray(self.dataset.data.column("length").to_numpy(), dtype=np.int64)[self.rows]

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Sequence) and len(self) == len(other) and all(a == b for a, b in zip(self, other))

    __hash__ = None  # type: ignore[assignment]


def collate(examples: list[dict], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a batch; padded label positions are ignored by the loss. Images
    (`pixel_values`, all of one size) are stacked."""
    if "pixel_values" in examples[0]:
        return {"pixel_values": torch.stack([e["pixel_values"] for e in examples]), "labels": torch.tensor([e["labels"] for e in examples])}
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


#: Plain sentences any tokenizer encodes: inputs for comparing two models' logits when an
#: adapter comes without data (a peft-format adapter trained elsewhere).
PROBE_TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "Tensor networks factorise a large matrix into small cores.",
    "Once upon a time there was a small village by the sea.",
    "def add(a, b):\n    return a + b",
]


def probe_examples(tokenizer: Any) -> list[dict]:
    """PROBE_TEXTS as causal-LM examples (labels = inputs)."""
    rows = []
    for text in PROBE_TEXTS:
        ids = tokenizer(text)["input_ids"][:64] or [tokenizer.pad_token_id or 0]
        rows.append({"input_ids": ids, "labels": list(ids)})
    return rows
