"""`tnlora eval`: held-out metrics of a run against its base model, and with `--generate`
evaluation by generated text (`evaluation.text`); `--harness` is in `evaluation.harness`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .errors import CheckpointError, InputError
from .evaluation.metrics import (
    compare_with_base,
    compared_rows,
    confusion_matrix,
    held_out_digest,
    majority_rate,
)
from .evaluation.text import SCORED_REPLIES, held_out_replies, score_generations
from .generation.generator import SamplingSettings, inspect_source, load_generator
from .model.build import load_run
from .recipe.sections import IMAGE_TASK
from .report.plots import plot_confusion
from .report.reporter import Reporter
from .run.atomic import write_json, write_jsonl
from .run.checkpoint import adapter_digest
from .run.layout import find_recipe_file, resolve_adapter_dir


def evaluate_run(path: str | Path, batch_size: int | None = None, reporter: Reporter | None = None) -> dict[str, Any]:
    """Evaluate a run (or checkpoint) and its base model on the run's held-out split."""
    reporter = reporter or Reporter()
    reporter.status(f"loading {path}")
    run = load_run(path, warn=reporter.status)
    if run.config.get("peft_format"):
        raise CheckpointError(
            f"{run.adapter_dir} is a peft-format adapter: it brings no held-out data to evaluate on",
            hint="evaluate a tnlora run, or load the adapter with peft and evaluate it on your data", exit_code=2,
        )
    prepared = run.prepared
    run.load_weights()
    recipe = prepared.recipe
    bs = batch_size or recipe.training.eval_batch_size or recipe.training.batch_size
    reporter.status(f"evaluating {len(prepared.data.eval)} held-out examples")
    rows = compare_with_base(prepared.model, prepared.initial_head, prepared.data.eval, recipe.task, prepared.tokenizer.pad_token_id, bs)
    report = {
        "run": str(path),
        "adapter_dir": str(run.adapter_dir),
        "task": recipe.task,
        "n_examples": len(prepared.data.eval),
        "majority_rate": majority_rate(prepared.data.eval),
        "metrics": rows,
    }
    if recipe.task == IMAGE_TASK:  # per-class accuracy and the confusion matrix of the tuned model
        names = prepared.data.label_names
        counts = confusion_matrix(prepared.model, prepared.data.eval, len(names), bs)
        report["per_class_accuracy"] = {name: (row[i] / sum(row) if sum(row) else None) for i, (name, row) in enumerate(zip(names, counts))}
        report["confusion_matrix"] = {"labels": names, "counts": counts}
        png = find_recipe_file(run.adapter_dir).parent / "confusion.png"
        plot_confusion(counts, names, png, title=f"{path}: tuned, {len(prepared.data.eval)} held-out images")
        report["confusion_png"] = str(png)
    return report


def evaluate_generation(
    path: str | Path,
    *,
    batch_size: int | None = None,
    max_new_tokens: int | None = None,
    reporter: Reporter | None = None,
) -> dict[str, Any]:
    """Loss, perplexity and generation metrics of base and tuned on the run's held-out split.

    Scores the replies `evaluation.text.held_out_replies` picks (the assistant turns the loss
    covers, each prompted with the conversation before it). Writes `generations.jsonl`
    (example, turn, the prompt as text, reference, base, tuned per reply) beside the run's
    recipe and adds a `generate` entry to its `eval.json`, keeping what else is there.
    """
    reporter = reporter or Reporter()
    source = inspect_source(path)
    if source.kind != "run" or source.task not in ("instruction", "chat"):
        raise InputError(
            f"{path}: eval --generate scores replies to held-out prompts, so it needs an instruction run (this is a {source.task} {source.kind})",
            hint="train an instruction recipe; for a causal-lm run use `tnlora eval` (loss, perplexity) or `tnlora generate`",
        )
    cfg = source.recipe.eval_generate
    # Options given are used as given (0 is refused by check(), not replaced by the recipe's value).
    recipe_batch = cfg.batch_size or source.recipe.training.eval_batch_size or source.recipe.training.batch_size
    settings = SamplingSettings(
        max_new_tokens=cfg.max_new_tokens if max_new_tokens is None else max_new_tokens,
        batch_size=recipe_batch if batch_size is None else batch_size,
    ).check()
    adapter_dir = resolve_adapter_dir(Path(path))
    run_dir = find_recipe_file(adapter_dir).parent
    eval_json = _read_eval_json(run_dir / "eval.json")  # refuse a broken file before the long part
    gen = load_generator(path, reporter=reporter, data=True)
    prepared = gen.run.prepared
    examples = prepared.data.eval[: cfg.max_examples] if cfg.max_examples else prepared.data.eval
    replies = held_out_replies(examples, gen.decode)
    if not replies:
        raise InputError(f"{path}: no held-out reply lies wholly within data.max_length, so there is nothing to score",
                         hint="raise data.max_length (and prepare again), or give data.eval with shorter conversations")
    prompts = [r.prompt_ids for r in replies]
    where = [f"held-out example {r.example + 1}" + (f", turn {r.turn + 1}" if r.turn is not None else "") for r in replies]
    gen.check_room(prompts, settings.max_new_tokens, where)  # before the losses, the long part
    rows = _training_losses(eval_json, adapter_dir, examples)
    if rows is None:
        reporter.start(compared_rows(prepared.initial_head) * len(examples), f"held-out loss of base and tuned ({len(examples)} examples each)")
        try:
            rows = compare_with_base(prepared.model, prepared.initial_head, examples, source.task, prepared.tokenizer.pad_token_id,
                                     settings.batch_size, progress=reporter.advance)
        finally:
            reporter.finish()
    else:
        reporter.status(f"loss of base and tuned on {len(examples)} held-out examples: from training's eval.json (same adapter, same rows)")
    references = [gen.decode(r.reference_ids) for r in replies]
    outputs: dict[str, list[str]] = {}
    for name, adapters in (("base", False), ("tuned", True)):  # base first: the tuned model merges the adapters
        if adapters and prompts:
            gen.use_tuned(min(prompts, key=len))
        reporter.start(len(prompts), f"generating ({name})")
        try:
            outputs[name] = gen.generate(prompts, settings, adapters=adapters, progress=reporter.advance, where=where)
        finally:
            reporter.finish()
        rows[name].update(score_generations(outputs[name], references, cfg.answer_pattern))
    records = [
        {"example": reply.example + 1, **({"turn": reply.turn + 1} if reply.turn is not None else {}), "prompt": reply.prompt_text,
         "reference": r, "base": b, "tuned": t}
        for reply, r, b, t in zip(replies, references, outputs["base"], outputs["tuned"])
    ]
    write_jsonl(run_dir / "generations.jsonl", records)
    settings_json = {"max_new_tokens": settings.max_new_tokens, "batch_size": settings.batch_size, "decoding": "greedy",
                     "answer_pattern": cfg.answer_pattern, "tuned_model": gen.mode}
    report = {
        "run": str(path),
        "task": source.task,
        "n_examples": len(examples),
        "n_replies": len(replies),
        "scored": SCORED_REPLIES[source.recipe.data.train_on],
        "settings": settings_json,
        "metrics": rows,
        "examples": records[: cfg.show],
        "generations": str(run_dir / "generations.jsonl"),
    }
    # Training's metrics in eval.json stay; the `generate` entry is added (or replaced).
    write_json(run_dir / "eval.json", {**eval_json, "generate": {k: v for k, v in report.items() if k != "examples"}})
    return report


def _training_losses(eval_json: dict[str, Any], adapter_dir: Path, examples: list[dict]) -> dict[str, dict[str, float]] | None:
    """Base and tuned loss and perplexity as training recorded them, when they are of this
    adapter on these rows (their digests match); otherwise None, and they are computed."""
    metrics = eval_json.get("metrics", {})
    if not all(isinstance(metrics.get(row), dict) and "loss" in metrics[row] for row in ("base", "tuned")):
        return None
    if eval_json.get("adapter_sha256") != adapter_digest(adapter_dir) or eval_json.get("held_out_sha256") != held_out_digest(examples):
        return None
    return {row: {k: metrics[row][k] for k in ("loss", "perplexity")} for row in ("base", "tuned")}


def _read_eval_json(path: Path) -> dict[str, Any]:

    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise InputError(f"{path} is not valid JSON ({exc.msg}), so the generation metrics cannot be added to it",
                         hint="move the file away or repair it, then run again") from None
