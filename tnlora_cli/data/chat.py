"""Conversations: normalise OpenAI / ShareGPT turns, render them, and find what the loss covers.

The loss mask is derived from the rendered text itself: each assistant turn's content is
located in the string the chat template produced (or taken from `{% generation %}` markers
when the template has them), and tokens are marked through the tokenizer's offset mapping.
Nothing assumes that rendering a prefix of a conversation gives a prefix of its tokens, so
templates that rewrite earlier turns (default system prompts, date headers, stripped
reasoning) are masked correctly.

`format_prompt` is the one place that renders a prompt for generation, exactly as training
renders it.
"""

from __future__ import annotations

from typing import Any

IGNORE_INDEX = -100
TRAIN_ON = ("assistant", "last", "all")

SHAREGPT_ROLES = {
    "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "chatgpt": "assistant",
    "system": "system", "tool": "tool", "function": "tool", "observation": "tool",
}
OPENAI_ROLES = ("system", "user", "assistant", "tool")


class RowError(ValueError):
    """One row is unusable; the caller adds file and row number."""


def _text(value: Any, what: str) -> str:
    """A turn's text: a string, or OpenAI content parts of type text."""
    if isinstance(value, str):
        return value
    if isinstance(value, list) and value and all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in value):
        return "".join(p["text"] for p in value)
    if value is None:
        raise RowError(f"{what} is missing or null")
    raise RowError(f"{what} is not text (got {type(value).__name__})")


def conversation_style(turns: Any) -> str | None:
    """'openai' (role/content), 'sharegpt' (from/value) or None, from the first turn."""
    if not isinstance(turns, list) or not turns or not isinstance(turns[0], dict):
        return None
    first = {k for k, v in turns[0].items() if v is not None}
    if {"role", "content"} <= first or ("role" in first and "tool_calls" in first):
        return "openai"
    if {"from", "value"} <= first:
        return "sharegpt"
    return None


def normalize_messages(turns: Any, style: str | None = None) -> list[dict[str, str]]:
    """OpenAI or ShareGPT turns as [{'role', 'content'}] with OpenAI role names."""
    if not isinstance(turns, list) or not turns:
        raise RowError("the conversation is missing, null or empty" if not turns else f"the conversation is not a list of turns (got {type(turns).__name__})")
    style = style or conversation_style(turns)
    if style is None:
        raise RowError("turns are neither OpenAI style (role/content) nor ShareGPT style (from/value)")
    role_key, text_key = ("role", "content") if style == "openai" else ("from", "value")
    out = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise RowError(f"turn {i + 1} is not a mapping")
        raw_role = turn.get(role_key)
        role = raw_role if style == "openai" and raw_role in OPENAI_ROLES else SHAREGPT_ROLES.get(str(raw_role).lower()) if style == "sharegpt" else None
        if role is None:
            known = ", ".join(OPENAI_ROLES if style == "openai" else ("human", "gpt", "system", "tool"))
            raise RowError(f"turn {i + 1} has {role_key} {raw_role!r}; expected one of {known}")
        out.append({"role": role, "content": _text(turn.get(text_key), f"turn {i + 1}'s {text_key}")})
    return out


def _plain_render(messages: list[dict[str, str]], eos: str) -> tuple[str, list[tuple[int, int]]]:
    """Without a chat template: user/system/tool text and a newline, assistant text and EOS."""
    text, spans = "", []
    for m in messages:
        if m["role"] == "assistant":
            start = len(text)
            text += m["content"] + eos
            spans.append((start, len(text)))
        else:
            text += m["content"] + "\n"
    return text, spans


def _end_of_turn(text: str, pos: int, specials: list[str]) -> int:
    """Extend an assistant span over the end-of-turn token that closes it, so the model
    learns to stop: the first special token after `pos`, past whitespace only."""
    i = pos
    while i < len(text) and text[i] in " \t":
        i += 1
    for tok in specials:
        if tok and text.startswith(tok, i):
            return i + len(tok)
    return pos


def render(tokenizer, messages: list[dict[str, str]]) -> tuple[str, list[tuple[int, int]]]:
    """Rendered conversation and the character span of every assistant turn in it."""
    template = getattr(tokenizer, "chat_template", None)
    if not template:
        return _plain_render(messages, tokenizer.eos_token or "")
    if _has_generation_markers(tokenizer):
        # The template marks what the assistant generates: take its character spans.
        from transformers.utils.chat_template_utils import render_jinja_template

        rendered, indices = render_jinja_template(conversations=[messages], chat_template=template, return_assistant_tokens_mask=True,
                                                  **tokenizer.special_tokens_map)
        return rendered[0], [(a, b) for a, b in indices[0]]
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    specials = sorted({t for t in tokenizer.all_special_tokens if t}, key=len, reverse=True)
    spans, cursor = [], 0
    for m in messages:
        # Every turn moves the cursor, so an assistant reply that repeats the user's words
        # is found in its own turn. A turn the template rewrote (not found) leaves it.
        content = m["content"].strip()
        start = text.find(content, cursor) if content else -1
        if m["role"] != "assistant":
            if start >= 0:
                cursor = start + len(content)
            continue
        if not content:
            raise RowError("an assistant turn is empty")
        if start < 0 and "</think>" in content:
            # Templates that strip the reasoning of earlier turns keep only the answer.
            content = content.rsplit("</think>", 1)[1].strip()
            start = text.find(content, cursor) if content else -1
        if start < 0:
            raise RowError("the chat template changed an assistant turn's text, so its tokens cannot be located; "
                           "add {% generation %} markers to the template")
        end = _end_of_turn(text, start + len(content), specials)
        spans.append((start, end))
        cursor = end
    return text, spans


def _has_generation_markers(tokenizer) -> bool:
    template = getattr(tokenizer, "chat_template", None) or ""
    return "{% generation %}" in template or "{%- generation %}" in template or "generation -%}" in template


def tokenize_conversations(tokenizer, conversations: list[list[dict[str, str]]], train_on: str, max_length: int) -> list[dict[str, Any] | RowError]:
    """For each conversation: input_ids, labels (IGNORE_INDEX where masked) and whether it was
    truncated, or the RowError that makes it unusable. Rendered texts are tokenized in one call."""
    results: list[dict[str, Any] | RowError] = []
    rendered: list[tuple[str, list[tuple[int, int]]] | RowError] = []
    for messages in conversations:
        if train_on != "all" and not any(m["role"] == "assistant" for m in messages):
            rendered.append(RowError("the conversation has no assistant turn to train on"))
            continue
        rendered.append(_guard(render, tokenizer, messages))
    texts = [r[0] for r in rendered if not isinstance(r, RowError)]
    enc = tokenizer(texts, add_special_tokens=False) if texts else None
    k = 0
    for r in rendered:
        if isinstance(r, RowError):
            results.append(r)
            continue
        ids = enc["input_ids"][k]
        spans = r[1][-1:] if train_on == "last" else r[1]
        ranges = [] if train_on == "all" else [_token_range(enc, k, len(ids), start, end) for start, end in spans]
        k += 1
        results.append(_finish(ids, ranges, train_on, max_length))
    return results


def _token_range(enc, row: int, n_tokens: int, start: int, end: int) -> tuple[int, int]:
    """Tokens overlapping the characters [start, end): the token at `start` to the token at
    `end - 1`, stepping over characters no token covers (whitespace some tokenizers drop)."""
    first = None
    for c in range(start, end):
        first = enc.char_to_token(row, c)
        if first is not None:
            break
    last = None
    for c in range(end - 1, start - 1, -1):
        last = enc.char_to_token(row, c)
        if last is not None:
            break
    if first is None or last is None:
        return (0, 0)
    return (first, min(last + 1, n_tokens))


def tokenize_conversation(tokenizer, messages: list[dict[str, str]], train_on: str, max_length: int) -> dict[str, Any]:
    """One conversation (see `tokenize_conversations`); raises RowError."""
    out = tokenize_conversations(tokenizer, [messages], train_on, max_length)[0]
    if isinstance(out, RowError):
        raise out
    return out


def _guard(fn, *args):
    try:
        return fn(*args)
    except RowError as exc:
        return exc


def _finish(ids: list[int], ranges: list[tuple[int, int]], train_on: str, max_length: int) -> dict[str, Any] | RowError:
    """Labels from the trained token ranges; `train_on: all` trains every token."""
    if train_on == "all":
        ranges = [(0, len(ids))]
    if not any(b > a for a, b in ranges):
        return RowError("no token of the conversation is trained (no assistant text in the rendered conversation)")
    truncated = len(ids) > max_length
    ids = ids[:max_length]
    labels = [IGNORE_INDEX] * len(ids)
    n_trained = 0
    for a, b in ranges:
        b = min(b, len(ids))
        if b > a:
            labels[a:b] = ids[a:b]
            n_trained += b - a
    return {"input_ids": ids, "labels": labels, "truncated": truncated, "n_trained": n_trained}


def instruction_messages(prompt: str, response: str | None = None, system: str | None = None) -> list[dict[str, str]]:
    messages = [{"role": "system", "content": system}] if system else []
    messages.append({"role": "user", "content": prompt})
    if response is not None:
        messages.append({"role": "assistant", "content": response})
    return messages


def format_prompt(tokenizer, messages_or_prompt: str | list[dict[str, Any]], system: str | None = None) -> str:
    """The text a model is given to generate its next assistant turn, formatted exactly as
    training formats it: a prompt string (instruction task) or a conversation of OpenAI or
    ShareGPT turns ending in a user turn (chat task). Tokenize it with add_special_tokens=False."""
    if isinstance(messages_or_prompt, str):
        messages = instruction_messages(messages_or_prompt, system=system)
    else:
        messages = normalize_messages(list(messages_or_prompt))
        if system and messages[0]["role"] != "system":
            messages.insert(0, {"role": "system", "content": system})
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return _plain_render(messages, tokenizer.eos_token or "")[0]
