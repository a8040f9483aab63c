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
from typing import Any

from ..data.chat import IGNORE_INDEX

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
