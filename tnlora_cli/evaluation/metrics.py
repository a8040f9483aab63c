"""Held-out metrics: accuracy and macro-F1 (classification), loss and perplexity (LM)."""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..data.chat import IGNORE_INDEX
from ..data.examples import collate
from ..model.inject import adapters_disabled
from ..recipe.sections import CLASSIFICATION_TASKS


@torch.no_grad()
def evaluate_examples(
    model: nn.Module,
    examples: list[dict],
    task: str,
    pad_token_id: int,
    batch_size: int = 16,
    device: torch.device | str | None = None,
    diagnostics: dict | None = None,
    progress: Callable[[int], None] | None = None,
) -> dict[str, float]:
    """Metrics of `model` on tokenized examples (no gradients, small batches).

    `diagnostics`, when given, receives what `evaluation.verdict` judges a collapse by:
    `outputs` (classes or vocabulary size), `predictions` and `labels` (the distinct argmax
    predictions and gold labels over every scored position, up to two of each). `progress`
    is told how many examples are done after each batch."""
    device = device or next(model.parameters()).device
    was_training = model.training
    model.eval()
    loss_sum, count = 0.0, 0
    preds: list[int] = []
    golds: list[int] = []
    seen_preds: set[int] = set()
    seen_golds: set[int] = set()
    # Batches of similar length pad less; every metric here is order-free (predictions and
    # gold labels stay paired, the loss is a sum over tokens). Rows are read batch by batch.
    lengths = examples.lengths() if hasattr(examples, "lengths") else [len(e["input_ids"]) for e in examples]
    order = np.argsort(np.asarray(lengths), kind="stable")
    for i in range(0, len(order), batch_size):
        rows = [examples[int(j)] for j in order[i : i + batch_size]]
        batch = {k: v.to(device) for k, v in collate(rows, pad_token_id).items()}
        labels = batch.pop("labels")
        logits = model(**batch).logits.float()
        if task in CLASSIFICATION_TASKS:
            loss_sum += F.cross_entropy(logits, labels, reduction="sum").item()
            count += labels.numel()
            preds += logits.argmax(-1).tolist()
            golds += labels.tolist()
        else:
            # Token-weighted: every predicted token counts once, whatever its batch.
            shift_logits, shift_labels = logits[:, :-1], labels[:, 1:]
            loss_sum += F.cross_entropy(
                shift_logits.reshape(-1, shift_logits.size(-1)), shift_labels.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum"
            ).item()
            count += int((shift_labels != IGNORE_INDEX).sum())
            if diagnostics is not None and len(seen_preds) < 2:
                scored = shift_labels != IGNORE_INDEX
                seen_preds.update(shift_logits.argmax(-1)[scored].unique()[:2].tolist())
                seen_golds.update(shift_labels[scored].unique()[:2].tolist())
        if diagnostics is not None:
            diagnostics["outputs"] = logits.size(-1)
        if progress is not None:
            progress(min(i + batch_size, len(order)))
    model.train(was_training)
    loss = loss_sum / max(count, 1)
    if diagnostics is not None:
        if task in CLASSIFICATION_TASKS:
            seen_preds, seen_golds = set(preds), set(golds)
        diagnostics.update(predictions=sorted(seen_preds)[:2], labels=sorted(seen_golds)[:2])
    if task in CLASSIFICATION_TASKS:
        return {"loss": loss, "accuracy": sum(p == g for p, g in zip(preds, golds)) / len(golds), "macro_f1": macro_f1(preds, golds)}
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0))}


@torch.no_grad()
def confusion_matrix(model: nn.Module, examples, n_labels: int, batch_size: int = 16) -> list[list[int]]:
    """counts[gold][predicted] of a classification model on its held-out examples."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    counts = torch.zeros((n_labels, n_labels), dtype=torch.long)
    for i in range(0, len(examples), batch_size):
        batch = {k: v.to(device) for k, v in collate(examples[i : i + batch_size], 0).items()}
        labels = batch.pop("labels").cpu()
        predicted = model(**batch).logits.argmax(-1).cpu()
        counts.index_put_((labels, predicted), torch.ones_like(labels), accumulate=True)
    model.train(was_training)
    return counts.tolist()


def macro_f1(preds: list[int], golds: list[int]) -> float:
    """Unweighted mean F1 over the classes that occur in the gold labels or predictions."""
    scores = []
    for c in sorted(set(golds) | set(preds)):
        tp = sum(p == c and g == c for p, g in zip(preds, golds))
        fp = sum(p == c and g != c for p, g in zip(preds, golds))
        fn = sum(p != c and g == c for p, g in zip(preds, golds))
        scores.append(0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn))
    return sum(scores) / len(scores)


@contextlib.contextmanager
def _swapped_head(model: nn.Module, head_state: dict[str, torch.Tensor]):
    if not head_state:
        yield
        return
    current = {k: v.detach().clone() for k, v in model.state_dict().items() if k in head_state}
    model.load_state_dict(head_state, strict=False)
    try:
        yield
    finally:
        model.load_state_dict(current, strict=False)


def compare_with_base(
    model: nn.Module,
    initial_head: dict[str, torch.Tensor] | None,
    examples: list[dict],
    task: str,
    pad_token_id: int,
    batch_size: int = 16,
    diagnostics: dict[str, dict] | None = None,
    progress: Callable[[int], None] | None = None,
) -> dict[str, dict[str, float]]:
    """Rows 'base' (adapters off, task head as initialised), 'head only' (classification:
    adapters off, trained head) and 'tuned'. `initial_head=None`: the trained head cannot be
    swapped out (it is sharded), so there is no 'base' row. `diagnostics` receives the
    tuned row's (see `evaluate_examples`) under 'tuned'. `progress` counts the examples
    evaluated over all rows (`compared_rows` of them, each over every example)."""
    rows: dict[str, dict[str, float]] = {}
    done = 0

    def evaluate(diagnostics: dict | None = None) -> dict[str, float]:
        nonlocal done
        offset = done
        tick = None if progress is None else lambda n: progress(offset + n)
        metrics = evaluate_examples(model, examples, task, pad_token_id, batch_size, diagnostics=diagnostics, progress=tick)
        done += len(examples)
        return metrics

    if initial_head is not None:
        with adapters_disabled(model), _swapped_head(model, initial_head):
            rows["base"] = evaluate()
    if initial_head is None or initial_head:
        with adapters_disabled(model):
            rows["head only"] = evaluate()
    rows["tuned"] = evaluate(None if diagnostics is None else diagnostics.setdefault("tuned", {}))
    return rows


def compared_rows(initial_head: dict[str, torch.Tensor] | None) -> int:
    """How many rows `compare_with_base` evaluates (base, head only, tuned: those that apply)."""
    return (initial_head is not None) + (initial_head is None or bool(initial_head)) + 1


def held_out_digest(examples: list[dict]) -> str:
    """SHA-256 of tokenized examples (input ids and labels): says whether metrics recorded
    for a held-out set are of these very rows."""
    digest = hashlib.sha256()
    for e in examples:
        if "pixel_values" in e:
            digest.update(e["pixel_values"].numpy().tobytes() + json.dumps(e["labels"]).encode())
        else:
            digest.update(json.dumps([e["input_ids"], e["labels"]]).encode())
    return digest.hexdigest()


def majority_rate(examples: list[dict]) -> float | None:
    labels = [e["labels"] for e in examples]
    if not labels or not isinstance(labels[0], int):
        return None
    return max(labels.count(c) for c in set(labels)) / len(labels)
