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

import json
import re
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass
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


@dataclass
class HeldOutReply:
    """One reply to score: the tokens before it (the prompt, exactly as training tokenized the
    conversation), its reference tokens, and the conversation before it as readable text."""

    example: int  # index of the held-out example
    turn: int | None  # index of the reply's turn in its conversation (None when not recorded)
    prompt_ids: list[int]
    reference_ids: list[int]
    prompt_text: str


#: What `held_out_replies` scores, per data.train_on (said in eval --generate's output).
SCORED_REPLIES = {
    "assistant": "every assistant turn (data.train_on: assistant), each with the conversation before it as the prompt",
    "last": "the last assistant turn (data.train_on: last), with the conversation before it as the prompt",
    "all": "every assistant turn (data.train_on: all), each with the conversation before it as the prompt",
}


def held_out_replies(examples: list[dict[str, Any]], decode: Callable[[list[int]], str]) -> list[HeldOutReply]:
    """The replies of held-out examples that eval --generate scores: the assistant turns the
    loss covers (`data.train_on`; every assistant turn with `all`), each prompted with the
    whole conversation before it. A reply cut at data.max_length is not scored. Examples
    prepared without reply positions fall back to the runs of trained tokens."""
    out = []
    for k, example in enumerate(examples):
        ids = list(example["input_ids"])
        replies = example.get("replies")
        if replies is None:
            triples = [(None, a, b) for a, b in _trained_runs(example["labels"])]
        else:
            triples = [tuple(replies[j : j + 3]) for j in range(0, len(replies), 3)]
        messages = json.loads(example["turns"]) if example.get("turns") else None
        for turn, a, b in triples:
            text = conversation_text(messages[:turn]) if messages is not None and turn is not None else decode(ids[:a])
            out.append(HeldOutReply(k, turn, ids[:a], ids[a:b], text))
    return out


def _trained_runs(labels: list[int]) -> list[tuple[int, int]]:
    runs, start = [], None
    for i, label in enumerate([*labels, IGNORE_INDEX]):
        if label != IGNORE_INDEX and start is None:
            start = i
        elif label == IGNORE_INDEX and start is not None:
            runs.append((start, i))
            start = None
    return runs


def conversation_text(messages: list[dict[str, Any]]) -> str:
    """A conversation as plain text: a lone user turn is its text; otherwise one 'role: text'
    line per turn, tool calls as 'name(arguments)'."""
    if len(messages) == 1 and messages[0]["role"] == "user":
        return messages[0]["content"]
    lines = []
    for m in messages:
        calls = [f"{c['function']['name']}({json.dumps(c['function']['arguments'], ensure_ascii=False)})" for c in m.get("tool_calls") or ()]
        lines.append(f"{m['role']}: " + " ".join(filter(None, [m.get("content") or "", *calls])))
    return "\n".join(lines)
