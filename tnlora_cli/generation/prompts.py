"""Prompts for `tnlora generate`: `--prompt TEXT`, or JSONL rows of `--input` with a prompt
and an optional reference, checked line by line. Each prompt knows where it came from, so a
later refusal (too long for the model) names the line."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from ..errors import InputError


@dataclass
class PromptRow:
    prompt: str
    reference: str | None = None
    #: Where the prompt came from, for messages: "--prompt" or "--input FILE line N".
    where: str = "--prompt"


def prompt_option(text: str) -> PromptRow:
    """The `--prompt` text; an empty one would generate from nothing (or crash a causal LM)."""
    if not text.strip():
        raise InputError("--prompt is empty", hint="give the text to reply to or continue, e.g. --prompt \"Do you like music?\"")
    return PromptRow(text)


def _text_of(path: Path) -> str:
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise InputError(
            f"--input: {path} is not UTF-8 text (byte {exc.start}, line {line})",
            hint="save the prompt file as UTF-8 (e.g. iconv -f latin1 -t utf-8)",
        ) from None


def read_prompt_file(path: str | Path, prompt_field: str = "prompt", reference_field: str | None = "response") -> list[PromptRow]:
    """Rows of a JSONL file; each must have a non-empty `prompt_field` (a string). A
    `reference` field, or `reference_field`, is kept as the reference."""
    path = Path(path)
    if path.is_dir():
        raise InputError(f"--input: {path} is a directory", hint="give a JSONL file with one {\"prompt\": ...} object per line")
    if not path.is_file():
        raise InputError(f"--input: {path} does not exist", hint="give a JSONL file with one {\"prompt\": ...} object per line")
    rows: list[PromptRow] = []
    for number, line in enumerate(_text_of(path).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise InputError(f"--input: {path} line {number} is not valid JSON ({exc.msg})", hint="one JSON object per line") from None
        if isinstance(row, dict) and row.get(prompt_field) is not None and not isinstance(row[prompt_field], str):
            value = row[prompt_field]
            raise InputError(f"--input: {path} line {number}: '{prompt_field}' is not text (got {type(value).__name__} {str(value)[:40]!r})",
                             hint=f"write the prompt as a JSON string: {{\"{prompt_field}\": \"...\"}}")
        if not isinstance(row, dict) or not isinstance(row.get(prompt_field), str):
            got = ", ".join(sorted(row)) if isinstance(row, dict) else type(row).__name__
            raise InputError(
                f"--input: {path} line {number} has no '{prompt_field}' text field (it has: {got or 'nothing'})",
                hint=f"every row needs \"{prompt_field}\": the prompt text (the run's data.prompt_column)",
            )
        if not row[prompt_field].strip():
            raise InputError(
                f"--input: {path} line {number} has an empty '{prompt_field}'",
                hint="write the prompt text, or remove the line",
            )
        reference = row.get("reference", row.get(reference_field) if reference_field else None)
        rows.append(PromptRow(row[prompt_field], None if reference is None else str(reference), where=f"--input {path} line {number}"))
    if not rows:
        raise InputError(f"--input: {path} has no rows", hint="write one {\"prompt\": ...} object per line")
    return rows
