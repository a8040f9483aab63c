"""The length of a run: `training.epochs` and `training.warmup_ratio` resolved into steps.

One optimizer step consumes a global batch of

    batch_size x gradient_accumulation_steps x processes

training examples (every process takes its own slice of each global batch), so `epochs`
passes over a training split of n examples take

    max_steps = ceil(epochs x n / global batch)

steps; the last one may reach into the next pass (the batch stream runs on across epochs).
`warmup_ratio` becomes ceil(ratio x max_steps) warm-up steps, as the usual trainers count it.
The resolved recipe (max_steps and warmup_steps, epochs and warmup_ratio cleared) is what the
run directory keeps, so eval, merge and export see the exact schedule that was trained.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

from ..errors import RecipeError
from ..recipe.sections import MAX_STEPS_LIMIT, Recipe


@dataclass
class Schedule:
    recipe: Recipe  # with max_steps and warmup_steps resolved
    note: str | None  # how they were derived, for the log; None when nothing was derived


def global_batch(recipe: Recipe, processes: int) -> int:
    """Training examples consumed by one optimizer step over all processes."""
    cfg = recipe.training
    return cfg.batch_size * cfg.gradient_accumulation_steps * processes


def resolve_schedule(recipe: Recipe, train_examples: int, processes: int = 1) -> Schedule:
    """Turn `epochs` / `warmup_ratio` into step counts for a training split of this size."""
    cfg = recipe.training
    if cfg.epochs is None and cfg.warmup_ratio is None:
        return Schedule(recipe, None)
    notes = []
    steps = cfg.max_steps
    if cfg.epochs is not None:
        if train_examples < 1:
            raise RecipeError("training.epochs: the training split is empty", hint="check data.train and data.max_train_samples")
        batch = global_batch(recipe, processes)
        steps = max(1, math.ceil(cfg.epochs * train_examples / batch))
        if steps > MAX_STEPS_LIMIT:
            raise RecipeError(
                f"training.epochs: {cfg.epochs:g} epochs of {train_examples} examples are {steps:,} steps, more than the {MAX_STEPS_LIMIT:,} a run may have",
                hint="use fewer epochs (or set training.max_steps)",
            )
        notes.append(
            f"training.epochs {cfg.epochs:g} = {steps} steps (ceil({cfg.epochs:g} x {train_examples} examples / "
            f"{batch} per step = batch_size {cfg.batch_size} x accumulation {cfg.gradient_accumulation_steps} x {processes} process(es)))"
        )
    warmup = cfg.warmup_steps
    if cfg.warmup_ratio is not None:
        warmup = math.ceil(cfg.warmup_ratio * steps)
        notes.append(f"training.warmup_ratio {cfg.warmup_ratio:g} = {warmup} warm-up steps")
    if warmup >= steps:
        raise RecipeError(
            f"training: {warmup} warm-up steps leave no training in {steps} steps",
            hint="lower training.warmup_ratio / warmup_steps, or train longer",
        )
    training = cfg.model_copy(update={"max_steps": steps, "epochs": None, "warmup_steps": warmup, "warmup_ratio": None})
    return Schedule(recipe.model_copy(update={"training": training}), "; ".join(notes))


def lr_schedule(kind: str, warmup: int, total: int) -> Callable[[int], float]:
    """Learning-rate multiplier per step: linear warm-up, then linear decay to 0, half a
    cosine to 0, or constant (the usual schedules, as transformers defines them; written
    here because importing transformers' scheduler module also imports peft, ~3 s per process)."""

    def multiplier(step: int) -> float:
        if step < warmup:
            return step / max(1, warmup)
        if kind == "linear":
            return max(0.0, (total - step) / max(1, total - warmup))
        progress = (step - warmup) / max(1, total - warmup)
        if kind == "cosine":
            return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))
        return 1.0

    return multiplier
