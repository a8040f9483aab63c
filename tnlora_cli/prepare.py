"""`tnlora prepare`: build (or reuse) a recipe's prepared data and report what it holds."""

from __future__ import annotations

from typing import Any

from .data.chat import IGNORE_INDEX
from .data.prepare import prepare_data
from .model.loading import load_tokenizer, resolve_model
from .recipe.sections import Recipe


def prepare_report(recipe: Recipe, n_samples: int = 2) -> dict[str, Any]:
    """Prepare the recipe's data (through the cache) and return the report with samples:
    the first training examples as stored (input_ids, labels with -100 where masked) and
    their tokens decoded one by one."""
    path = resolve_model(recipe.model, recipe.trust_remote_code)
    tokenizer = load_tokenizer(path, recipe.trust_remote_code)
    data = prepare_data(recipe.data, recipe.task, tokenizer)
    report = dict(data.report)
    report["cache"] = "hit" if data.report["cache"]["hit"] else "miss"
    report["cache_path"] = data.report["cache"]["path"]
    report["rows"] = sum(report.get("rows_read", {}).values())
    samples = []
    for example in data.train[:n_samples]:
        sample = {"input_ids": list(example["input_ids"]), "labels": example["labels"]}
        sample["tokens"] = [tokenizer.decode([t]) for t in example["input_ids"]]
        if isinstance(example["labels"], int):
            sample["label"] = data.label_names[example["labels"]]
        else:
            sample["trained"] = [label != IGNORE_INDEX for label in example["labels"]]
        samples.append(sample)
    report["samples"] = samples
    return report
