"""Evaluation by generation: greedy replies to the held-out prompts, scored against the references.

Metrics per model row (base = adapters off, tuned):
- `exact_match`: share of replies equal to the reference after `normalize`;
- `answer_accuracy`: share of examples whose extracted answer (`eval_generate.answer_pattern`,
  default the last number) equals the reference's, over the examples whose reference has one;
- `bleu`, `chrf`: corpus BLEU and chrF from sacrebleu (0-100, sacrebleu's defaults);
- `rouge_l`: mean ROUGE-L F1 from rouge-score (0-1).
The loss and perplexity of the same rows come from `evaluate.compare_with_base`, or from
training's eval.json when its digests show the same adapter and held-out rows.
"""

from __future__ import annotations

import re
import unicodedata
from pathlib import Path
from typing import Any

from .checkpoint import adapter_digest, find_recipe_file, resolve_adapter_dir, write_json
from .data import IGNORE_INDEX
from .errors import InputError
from .evaluate import compare_with_base, held_out_digest
from .generation import SamplingSettings, inspect_source, load_generator, write_jsonl
from .reporting import Reporter

_EDGE_PUNCT = " \t\n.!?,;:\"'`"


def normalize(text: str) -> str:
    """Unicode NFKC, lower case, whitespace runs collapsed to one space, and surrounding
    whitespace, quotes and sentence punctuation (. ! ? , ; :) removed."""
    text = " ".join(unicodedata.normalize("NFKC", text).lower().split())
    return text.strip(_EDGE_PUNCT)


def extract_answer(text: str, pattern: str) -> str | None:
    """The last match of `pattern` in `text` (its group 1 if it has groups), without
    thousands separators and surrounding spaces; None when nothing matches."""
    matches = list(re.finditer(pattern, text))
    if not matches:
        return None
    last = matches[-1]
    answer = last.group(1) if last.re.groups else last.group(0)
    return None if answer is None else answer.replace(",", "").strip()


def score_generations(predictions: list[str], references: list[str], answer_pattern: str) -> dict[str, float]:
    """Exact match, extracted-answer accuracy (when any reference has an answer), BLEU, chrF, ROUGE-L."""
    import sacrebleu
    from rouge_score import rouge_scorer

    n = len(references)
    scores: dict[str, float] = {"exact_match": sum(normalize(p) == normalize(r) for p, r in zip(predictions, references)) / n}
    pairs = [(extract_answer(p, answer_pattern), extract_answer(r, answer_pattern)) for p, r in zip(predictions, references)]
    answerable = [(p, r) for p, r in pairs if r is not None]
    if answerable:
        scores["answer_accuracy"] = sum(p == r for p, r in answerable) / len(answerable)
    scores["bleu"] = sacrebleu.corpus_bleu(predictions, [references]).score
    scores["chrf"] = sacrebleu.corpus_chrf(predictions, [references]).score
    scorer = rouge_scorer.RougeScorer(["rougeL"])
    scores["rouge_l"] = sum(scorer.score(r, p)["rougeL"].fmeasure for p, r in zip(predictions, references)) / n
    return scores


def split_prompt_reference(example: dict[str, Any]) -> tuple[list[int], list[int]]:
    """Token ids of the prompt (everything before the first trained token) and of the first
    reply (the run of trained tokens that follows), exactly as training tokenized them."""
    labels = example["labels"]
    start = next(i for i, label in enumerate(labels) if label != IGNORE_INDEX)
    end = start
    while end < len(labels) and labels[end] != IGNORE_INDEX:
        end += 1
    return example["input_ids"][:start], example["input_ids"][start:end]


def evaluate_generation(
    path: str | Path,
    *,
    batch_size: int | None = None,
    max_new_tokens: int | None = None,
    reporter: Reporter | None = None,
) -> dict[str, Any]:
    """Loss, perplexity and generation metrics of base and tuned on the run's held-out split.

    Writes `generations.jsonl` (prompt, reference, base, tuned per example) beside the run's
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
    settings = SamplingSettings(
        max_new_tokens=max_new_tokens or cfg.max_new_tokens,
        batch_size=batch_size or cfg.batch_size or source.recipe.training.eval_batch_size or source.recipe.training.batch_size,
    ).check()
    adapter_dir = resolve_adapter_dir(Path(path))
    run_dir = find_recipe_file(adapter_dir).parent
    eval_json = _read_eval_json(run_dir / "eval.json")  # refuse a broken file before the long part
    gen = load_generator(path, reporter=reporter)
    prepared = gen.run.prepared
    examples = prepared.data.eval[: cfg.max_examples] if cfg.max_examples else prepared.data.eval
    rows = _training_losses(eval_json, adapter_dir, examples)
    if rows is None:
        reporter.status(f"loss of base and tuned on {len(examples)} held-out examples")
        rows = compare_with_base(prepared.model, prepared.initial_head, examples, source.task, prepared.tokenizer.pad_token_id, settings.batch_size)
    else:
        reporter.status(f"loss of base and tuned on {len(examples)} held-out examples: from training's eval.json (same adapter, same rows)")
    split = [split_prompt_reference(e) for e in examples]
    prompts = [p for p, _ in split]
    references = [gen.decode(r) for _, r in split]
    outputs: dict[str, list[str]] = {}
    for name, adapters in (("base", False), ("tuned", True)):  # base first: the tuned model merges the adapters
        reporter.start(len(prompts), f"generating ({name})")
        try:
            outputs[name] = gen.generate(prompts, settings, adapters=adapters, progress=reporter.advance)
        finally:
            reporter.finish()
        rows[name].update(score_generations(outputs[name], references, cfg.answer_pattern))
    records = [
        {"prompt": prepared.tokenizer.decode(p), "reference": r, "base": b, "tuned": t}
        for p, r, b, t in zip(prompts, references, outputs["base"], outputs["tuned"])
    ]
    write_jsonl(run_dir / "generations.jsonl", records)
    settings_json = {"max_new_tokens": settings.max_new_tokens, "batch_size": settings.batch_size, "decoding": "greedy",
                     "answer_pattern": cfg.answer_pattern, "tuned_model": gen.mode}
    report = {
        "run": str(path),
        "task": source.task,
        "n_examples": len(examples),
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
    import json

    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise InputError(f"{path} is not valid JSON ({exc.msg}), so the generation metrics cannot be added to it",
                         hint="move the file away or repair it, then run again") from None
