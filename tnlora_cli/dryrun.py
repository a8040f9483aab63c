"""`tnlora train --dry-run`: what a recipe will do and cost, before any weight is loaded.

The model is built on the meta device from its config, the adapter attached as in
training, and parameters counted exactly. Memory is an estimate (`training.memory` says
what it counts); a few tokenized samples show the loss mask.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .data.chat import IGNORE_INDEX
from .data.prepare import prepare_data
from .errors import TnloraError
from .model.accounting import CountReport, count_adapter
from .model.inject import adapted_layers
from .model.build import load_preprocessor
from .model.loading import resolve_model
from .model.meta import build_on_meta, shipped_configs
from .recipe.sections import Recipe
from .training.memory import estimate_memory


@dataclass
class DryRunReport:
    counts: CountReport
    modules: dict[str, list[str]]
    memory: dict[str, int]
    notes: list[str] = field(default_factory=list)
    samples: list[dict[str, Any]] = field(default_factory=list)


def _prepared(recipe: Recipe) -> tuple[Any, Any, str | None]:
    """(tokenizer, prepared data, None) when the tokenizer and data are here, else (None, None, why)."""
    if recipe.model in shipped_configs() and recipe.model not in ("smollm2-135m",):
        return None, None, f"no tokenizer ships with the '{recipe.model}' config: samples are shown for local or embedded models"
    try:
        path = resolve_model(recipe.model, recipe.trust_remote_code, recipe.allow_pickle)
        tokenizer = load_preprocessor(recipe, path)
        notes: list[str] = []
        data = prepare_data(recipe.data, recipe.task, tokenizer, warn=notes.append)
    except TnloraError as exc:
        return None, None, f"samples not shown: {exc.message}"
    return tokenizer, data, "; ".join(notes) or None


def _samples(recipe: Recipe, tokenizer, data, n: int = 2, processes: int = 1) -> tuple[list[dict[str, Any]], str | None]:
    """A few tokenized training examples with their loss mask; the note says how `epochs` /
    `warmup_ratio` resolve for this data."""
    out = []
    for example in data.train[:n]:
        if "pixel_values" in example:
            out.append({"tokens": [f"image {'x'.join(map(str, example['pixel_values'].shape))}"], "trained": None, "label": data.label_names[example["labels"]]})
            continue
        ids = example["input_ids"]
        if isinstance(example["labels"], int):
            out.append({"tokens": [tokenizer.decode(ids)], "trained": None, "label": data.label_names[example["labels"]]})
        else:
            out.append({"tokens": [tokenizer.decode([t]) for t in ids], "trained": [label != IGNORE_INDEX for label in example["labels"]], "label": None})
    from .training.schedule import resolve_schedule

    try:
        return out, resolve_schedule(recipe, len(data.train), processes).note
    except TnloraError as exc:
        return out, f"schedule: {exc.message}"


def dry_run(recipe: Recipe, with_samples: bool = True, processes: int = 1) -> DryRunReport:
    """`with_samples`: also prepare the data (when tokenizer and data are here), show samples
    and estimate activations from the prepared lengths; without, the worst case."""
    model = build_on_meta(recipe)
    counts = count_adapter(recipe, model)
    modules: dict[str, list[str]] = {}
    for name, layer in adapted_layers(model):
        modules.setdefault(layer.adapter.role, []).append(name)
    tokenizer, data, data_note = _prepared(recipe) if with_samples else (None, None, None)
    lengths = data.train.lengths() if data is not None else None
    memory, notes = estimate_memory(model, recipe, counts, processes, lengths)
    if counts.not_adapted:
        notes.append(f"{len(counts.not_adapted)} matched layers lie inside modules_to_save, trained in full, and are not adapted: {', '.join(counts.not_adapted)}")
    report = DryRunReport(counts, modules, memory, notes)
    if data_note:
        report.notes.append(data_note)
    if data is not None:
        report.samples, note = _samples(recipe, tokenizer, data, processes=processes)
        if note:
            report.notes.append(note)
    return report
