"""`tnlora prepare`: build (or reuse) a recipe's prepared data and report what it holds;
list and prune the data cache."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .data.cache import CacheEntry, PruneResult, data_cache_root, list_entries, prune
from .data.chat import IGNORE_INDEX
from .data.prepare import prepare_data
from .model.build import load_preprocessor, resolve_checked
from .recipe.sections import Recipe
from .report.reporter import Reporter


def prepare_report(recipe: Recipe, n_samples: int = 2, reporter: Reporter | None = None, contact_sheet: Path | None = None) -> dict[str, Any]:
    """Prepare the recipe's data (through the cache) and return the report with samples:
    the first training examples as stored (input_ids, labels with -100 where masked) and
    their tokens decoded one by one. The model is resolved as `train` resolves it
    (`allow_pickle`, `trust_remote_code`, positions against `data.max_length`).
    `contact_sheet` (images): a PNG of the first training images with their labels, as
    stored and, with data.augment, as augmented (seeded with training.seed)."""
    reporter = reporter or Reporter()
    path = resolve_checked(recipe)
    tokenizer = load_preprocessor(recipe, path)
    data = prepare_data(recipe.data, recipe.task, tokenizer, warn=reporter.status, reporter=reporter)
    report = dict(data.report)
    report["cache"] = "hit" if data.report["cache"]["hit"] else "rebuilt (damaged)" if data.report["cache"]["rebuilt"] else "miss"
    report["cache_path"] = data.report["cache"]["path"]
    report["rows"] = sum(report.get("rows_read", {}).values())
    samples = []
    for example in data.train[:n_samples]:
        if "pixel_values" in example:  # images: what the model sees, in numbers
            pixels = example["pixel_values"]
            said = f"image {'x'.join(map(str, pixels.shape))}, pixel values mean {float(pixels.mean()):.3f} std {float(pixels.std()):.3f}"
            samples.append({"tokens": [said], "trained": None, "label": data.label_names[example["labels"]], "labels": example["labels"]})
            continue
        sample = {"input_ids": list(example["input_ids"]), "labels": example["labels"]}
        sample["tokens"] = [tokenizer.decode([t]) for t in example["input_ids"]]
        if isinstance(example["labels"], int):
            sample["label"] = data.label_names[example["labels"]]
        else:
            sample["trained"] = [label != IGNORE_INDEX for label in example["labels"]]
        samples.append(sample)
    report["samples"] = samples
    if contact_sheet is not None:
        import torch

        from .report.plots import plot_contact_sheet

        examples = data.train.unaugmented()[:8]
        with torch.random.fork_rng():
            torch.manual_seed(recipe.training.seed)
            augmented = data.train[:8] if data.train.augment != "none" else None
        plot_contact_sheet(examples, augmented, data.label_names, report["image"], contact_sheet)
        report["contact_sheet"] = str(contact_sheet)
    return report


def list_cache() -> tuple[str, list[CacheEntry]]:
    """The data cache's location and its entries, most recently used first."""
    root = data_cache_root()
    return str(root), list_entries(root)


def prune_cache(older_than_days: float | None) -> PruneResult:
    """Remove cache entries not used for `older_than_days` days (None: all), skipping those
    in use, and whatever killed preparations left."""
    return prune(older_than_days, data_cache_root())
