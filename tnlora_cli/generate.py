"""`tnlora generate` and `tnlora chat`: completions for a prompt file or a conversation, from
the base model, the tuned one, or both side by side."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from .generation.generator import Generator, SamplingSettings
from .generation.prompts import PromptRow
from .report.reporter import Reporter


@dataclass
class GenerationResult:
    rows: list[dict[str, Any]]
    mode: str
    merge_max_diff: float | None


def generate_rows(
    gen: Generator,
    rows: list[PromptRow],
    settings: SamplingSettings,
    *,
    base: bool = False,
    compare: bool = False,
    raw: bool = False,
    reporter: Reporter | None = None,
) -> GenerationResult:
    """Completions for prompt rows: tuned (default), base (`base`), or both (`compare`, base first)."""
    reporter = reporter or Reporter()
    prompts = [gen.encode(gen.format([{"role": "user", "content": r.prompt}], raw=raw)) for r in rows]
    where = [r.where for r in rows]
    gen.check_room(prompts, settings.max_new_tokens, where)  # before any pass: a batch file is all or nothing
    passes = [("base", False)] if base else [("base", False), ("tuned", True)] if compare else [("tuned", True)]
    outputs: dict[str, list[str]] = {}
    for name, adapters in passes:
        if adapters and prompts:  # the merge and its check are a phase of their own, before the pass
            gen.use_tuned(min(prompts, key=len))
        reporter.start(len(prompts), f"generating ({name})" if gen.has_adapter else "generating")
        try:
            outputs[name] = gen.generate(prompts, settings, adapters=adapters, progress=reporter.advance, where=where)
        finally:
            reporter.finish()
    result = []
    for i, r in enumerate(rows):
        row: dict[str, Any] = {"prompt": r.prompt}
        if compare:
            row["base_completion"] = outputs["base"][i]
        row["completion"] = outputs["tuned" if "tuned" in outputs else "base"][i]
        if r.reference is not None:
            row["reference"] = r.reference
        result.append(row)
    return GenerationResult(result, "base model (adapters off)" if base else gen.mode, gen.merge_max_diff)


def chat_session(
    gen: Generator,
    settings: SamplingSettings,
    lines: Iterator[str],
    write: Callable[[str], None],
    *,
    system: str | None = None,
    base: bool = False,
) -> list[dict[str, str]]:
    """A multi-turn conversation: each input line is a user turn, the reply is streamed to
    `write`. `/reset` starts over (keeping the system prompt), `/exit` or end of input ends.
    Returns the final conversation."""
    start = [{"role": "system", "content": system}] if system else []
    messages = list(start)
    write("type a message; /reset starts over, /exit ends\n")
    for line in lines:
        text = line.rstrip("\n")
        if text.strip() == "/exit":
            break
        if text.strip() == "/reset":
            messages = list(start)
            write("(conversation reset)\n")
            continue
        if not text.strip():
            continue
        messages.append({"role": "user", "content": text})
        prompt = gen.encode(gen.format(messages))
        problem = gen.room_problem(len(prompt), settings.max_new_tokens, "the conversation")
        if problem is not None:  # the session goes on: the turn is dropped and /reset makes room
            messages.pop()
            write(f"({problem}; /reset starts over)\n")
            continue
        write("assistant: ")
        reply = gen.stream(prompt, settings, write, adapters=not base, where="the conversation")
        write("\n")
        messages.append({"role": "assistant", "content": reply})
    return messages
