"""Chat and instruction examples: render a conversation with the chat template, find what the
loss covers, tokenize.

The loss mask is located structurally, never by searching the rendered text for a reply (a
reply `a` would be found in `<|im_start|>`). The conversation is rendered a second time with
each turn's content replaced by a unique marker: the template puts every marker exactly where it
puts that turn's text. When substituting the real texts back gives the real rendering, each
assistant turn is where its marker was. Otherwise (a template that trims, rewrites or drops
parts of a turn, e.g. earlier reasoning) and for turns with tool calls, each assistant turn is
rendered with a marker in place of its content and calls, and its span is the part of the real
rendering that differs: what the template wrote for that turn and nothing else. A span starts
earlier where the template's generation prompt ends before it (what a template writes between
the two is the model's to generate). Templates with `{% generation %}` markers give their
spans directly. The span is extended over the end-of-turn token that closes it, so the model
learns to stop. A template that leaves a turn
out, or does not render a row's tool calls or tools, is refused for that row.

Nothing assumes that rendering a prefix of a conversation gives a prefix of its tokens, so
templates that rewrite earlier turns (default system prompts, date headers, stripped
reasoning) are masked correctly.

`tokenize_conversations` renders the conversations of a batch that have no tools in one template
call per kind of rendering (the conversation, its marked form, each generation prompt): the same
texts as one call per row, without the template machinery's overhead for every call.

`format_prompt` is the one place that renders a prompt for generation, exactly as training
renders it.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from typing import Any

from .turns import (  # noqa: F401 - re-exported: the chat task's public names live here
    OPENAI_ROLES,
    SHAREGPT_ROLES,
    RowError,
    conversation_style,
    instruction_messages,
    normalize_messages,
)

IGNORE_INDEX = -100
TRAIN_ON = ("assistant", "last", "all")


def _plain_render(messages: list[dict[str, Any]], eos: str) -> tuple[str, list[tuple[int, int]]]:
    """Without a chat template: user/system/tool text and a newline, assistant text and EOS."""
    if any(m.get("tool_calls") for m in messages):
        raise RowError("the conversation has tool calls and the tokenizer has no chat template to render them")
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
    learns to stop: a special token right after `pos`, past spaces and tabs only."""
    i = pos
    while i < len(text) and text[i] in " \t":
        i += 1
    for tok in specials:
        if tok and text.startswith(tok, i):
            return i + len(tok)
    return pos


def render(tokenizer, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None) -> tuple[str, list[tuple[int, int]]]:
    """Rendered conversation and the character span of every assistant turn in it."""
    text, turns = render_turns(tokenizer, messages, tools)
    return text, [(a, b) for _, a, b in turns]


def render_turns(tokenizer, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None,
                 rendered: dict[Any, str] | None = None) -> tuple[str, list[tuple[int, int, int]]]:
    """Rendered conversation and (turn index, start, end) of every assistant turn in it, in
    characters, the end-of-turn token included. `rendered` holds renderings made beforehand
    for many rows at once (see `_prerender`); what it lacks is rendered here."""
    rendered = rendered or {}
    template = getattr(tokenizer, "chat_template", None)
    if not template:
        if tools:
            raise RowError("the row has tools and the tokenizer has no chat template to render them")
        text, spans = _plain_render(messages, tokenizer.eos_token or "")
        return text, [(i, a, b) for i, (a, b) in zip(_assistant_turns(messages), spans)]
    if _has_generation_markers(tokenizer):
        # The template marks what the assistant generates: take its character spans.
        from transformers.utils.chat_template_utils import render_jinja_template

        plain = [{k: v for k, v in m.items() if v is not None} for m in messages]
        try:
            rendered, indices = render_jinja_template(conversations=[plain], tools=tools, chat_template=template,
                                                      return_assistant_tokens_mask=True, **tokenizer.special_tokens_map)
        except Exception as exc:  # noqa: BLE001 - a template raises what its author chose (raise_exception, TypeError, ...)
            raise _template_error(exc) from None
        turns = _assistant_turns(messages)
        if len(indices[0]) != len(turns):
            raise RowError(f"the chat template's {{% generation %}} blocks ({len(indices[0])}) do not match the assistant turns ({len(turns)})")
        return rendered[0], [(i, a, b) for i, (a, b) in zip(turns, indices[0])]
    text = rendered["text"] if "text" in rendered else _apply(tokenizer, messages, tools)
    if tools and _apply(tokenizer, messages, None) == text:
        raise RowError("the chat template does not render the row's tools (the rendering is the same without them)")
    specials = _specials(tokenizer)
    spans = _locate(tokenizer, messages, tools, text, rendered)
    return text, [(i, a, _end_of_turn(text, b, specials)) for i, a, b in spans]


def _specials(tokenizer) -> list[str]:
    """The tokenizer's special tokens, longest first."""
    return sorted({t for t in tokenizer.all_special_tokens if t}, key=len, reverse=True)


def _marked(messages: list[dict[str, Any]], tools: Any) -> tuple[str, list[str], list[bool], list[dict[str, Any]]]:
    """The marker prefix, each turn's marker, which turns have text, and the conversation with
    each text replaced by its marker."""
    nonce = _marker_nonce(messages, tools)
    marker = [f"{nonce}{i}E" for i in range(len(messages))]
    has_text = [isinstance(m.get("content"), str) and m["content"] != "" for m in messages]
    return nonce, marker, has_text, [{**m, "content": marker[i]} if has_text[i] else m for i, m in enumerate(messages)]


def _prerender(tokenizer, conversations: list[list[dict[str, Any]]]) -> list[dict[Any, str]]:
    """For conversations without tools under a template without generation markers, the
    renderings `render_turns` needs, made in one template call per kind for all rows (the same
    texts, without the per-call overhead): the conversation ("text"), its marked form ("shape")
    and, for assistant turn i, the generation prompt before it (("prompt", i)). A row the
    template refuses is left out and rendered on its own (its error names the row)."""
    out: list[dict[Any, str]] = [{} for _ in conversations]
    jobs: dict[Any, list[tuple[int, list[dict[str, Any]]]]] = {"text": [], "shape": []}
    for k, messages in enumerate(conversations):
        jobs["text"].append((k, messages))
        jobs["shape"].append((k, _marked(messages, None)[3]))
        for i in _assistant_turns(messages):
            jobs.setdefault(("prompt", i), []).append((k, messages[:i]))
    for kind, rows in jobs.items():
        rows = [(k, m) for k, m in rows if m]  # an empty prefix is rendered (or refused) on its own
        if not rows:
            continue
        try:
            texts = tokenizer.apply_chat_template([m for _, m in rows], tokenize=False, add_generation_prompt=kind not in ("text", "shape"))
        except Exception:  # noqa: BLE001, S112 - some row is refused: every row of this kind is rendered on its own
            continue
        for (k, _), text in zip(rows, texts):
            out[k][kind] = text
    return out


def _assistant_turns(messages: list[dict[str, Any]]) -> list[int]:
    return [i for i, m in enumerate(messages) if m["role"] == "assistant"]


def _apply(tokenizer, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None, **kwargs) -> str:
    try:
        return tokenizer.apply_chat_template(messages, tools=tools or None, tokenize=False, **kwargs)
    except Exception as exc:  # noqa: BLE001 - a template raises what its author chose (raise_exception, TypeError, ...)
        raise _template_error(exc) from None


def _template_error(exc: Exception) -> RowError:
    detail = str(exc).splitlines()[0][:300] if str(exc) else type(exc).__name__
    return RowError(f"the chat template cannot render this conversation ({detail})")


def _marker_nonce(messages: list[dict[str, Any]], tools: Any) -> str:
    """A marker prefix that occurs nowhere in the row (letters and digits only, so templates
    that JSON-encode a turn keep it intact)."""
    blob = json.dumps([messages, tools], default=str)
    k = 0
    while f"TNLORA{k}Q" in blob:
        k += 1
    return f"TNLORA{k}Q"


def _locate(tokenizer, messages: list[dict[str, Any]], tools: Any, text: str, rendered: dict[Any, str]) -> list[tuple[int, int, int]]:
    """(turn, start, end) of each assistant turn's rendered text in `text` (see the module docstring)."""
    nonce, marker, has_text, marked = _marked(messages, tools)
    shape = rendered["shape"] if "shape" in rendered else _apply(tokenizer, marked, tools)
    pieces = re.split(f"({nonce}\\d+E)", shape)
    seen = Counter(int(p[len(nonce):-1]) for p in pieces[1::2])
    for i, m in enumerate(messages):
        if has_text[i] and not seen[i]:
            raise RowError(f"the chat template leaves out turn {i + 1} (role {m['role']}); its text would be lost")
    # Quick path: the real texts in the markers' places give the real rendering.
    rebuilt, where, pos = [], {}, 0
    for k, piece in enumerate(pieces):
        if k % 2:
            i = int(piece[len(nonce):-1])
            piece = messages[i]["content"]
            where.setdefault(i, []).append((pos, pos + len(piece)))
        rebuilt.append(piece)
        pos += len(piece)
    exact = "".join(rebuilt) == text
    out = []
    for i in _assistant_turns(messages):
        m = messages[i]
        if exact and not m.get("tool_calls") and len(where.get(i, ())) == 1:
            start, end = where[i][0]
        else:
            start, end = _differing_span(tokenizer, messages, tools, text, i, marker[i])
        out.append((i, _output_start(tokenizer, messages, tools, text, i, start, rendered.get(("prompt", i))), end))
    return out


def _output_start(tokenizer, messages: list[dict[str, Any]], tools: Any, text: str, i: int, start: int, prompt: str | None = None) -> int:
    """Where the model's own output for turn `i` begins: the end of the generation prompt that
    precedes it, when that prompt is a prefix of the rendering ending before `start`. What a
    template writes between its generation prompt and the turn's text (Qwen-3's `<think>`
    block) is generated by the model at inference, so it is trained too."""
    if prompt is None:
        prompt = _apply(tokenizer, messages[:i], tools, add_generation_prompt=True)
    return len(prompt) if len(prompt) < start and text.startswith(prompt) else start


def _differing_span(tokenizer, messages: list[dict[str, Any]], tools: Any, text: str, i: int, marker: str) -> tuple[int, int]:
    """The characters of `text` that the template wrote for assistant turn `i`: the part that
    changes when the turn's content and tool calls are replaced by a marker."""
    m = messages[i]
    if m.get("tool_calls"):
        without = [*messages[:i], {"role": "assistant", "content": m.get("content") or ""}, *messages[i + 1:]]
        if _apply(tokenizer, without, tools) == text:
            raise RowError(f"the chat template does not render tool calls (turn {i + 1} has {len(m['tool_calls'])})")
    other = _apply(tokenizer, [*messages[:i], {"role": "assistant", "content": marker}, *messages[i + 1:]], tools)
    if other.count(marker) != 1:
        raise RowError(f"the chat template renders assistant turn {i + 1} {'more than once' if other.count(marker) else 'not at all'}, "
                       "so its tokens cannot be located; add {% generation %} markers to the template")
    p = other.index(marker)
    # Both renderings agree before the turn and after it; the cap keeps a reply that begins
    # (ends) with the marker's first (last) character from shifting the span.
    start = min(p, _common_prefix(text, other))
    end = len(text) - min(len(other) - p - len(marker), _common_prefix(text[::-1], other[::-1]))
    if end <= start:
        raise RowError(f"assistant turn {i + 1} is empty in the rendered conversation")
    return start, end


def _common_prefix(a: str, b: str) -> int:
    """Length of the common prefix (a binary search over slice comparisons, which run in C)."""
    lo, hi = 0, min(len(a), len(b))
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if a[:mid] == b[:mid]:
            lo = mid
        else:
            hi = mid - 1
    return lo


def _has_generation_markers(tokenizer) -> bool:
    template = getattr(tokenizer, "chat_template", None) or ""
    return re.search(r"\{%-?\s*generation\s*-?%\}", template) is not None


def tokenize_conversations(tokenizer, conversations: list[list[dict[str, Any]]], train_on: str, max_length: int,
                           tools: list[list[dict[str, Any]] | None] | None = None) -> list[dict[str, Any] | RowError]:
    """For each conversation: input_ids, labels (IGNORE_INDEX where masked), whether it was
    truncated, the trained token count, and `replies`: [turn, first token, end token] of each
    assistant turn the loss covers (every one with `train_on: all`) that lies wholly within
    `max_length`, flattened; or the RowError that makes it unusable. `tools[k]` are the tool
    schemas of conversation k. Rendered texts are tokenized in one call."""
    results: list[dict[str, Any] | RowError] = []
    rendered: list[tuple[str, list[tuple[int, int, int]]] | RowError | None] = []
    for messages in conversations:
        if train_on != "all" and not any(m["role"] == "assistant" for m in messages):
            rendered.append(RowError("the conversation has no assistant turn to train on"))
            continue
        empty = next((i for i in _assistant_turns(messages) if not _message_text(messages[i]).strip() and not messages[i].get("tool_calls")), None)
        rendered.append(RowError(f"assistant turn {empty + 1} is empty") if empty is not None else None)
    batchable = [k for k, r in enumerate(rendered) if r is None and conversations[k] and not (tools and tools[k])]
    pre: dict[int, dict[Any, str]] = {}
    if getattr(tokenizer, "chat_template", None) and not _has_generation_markers(tokenizer) and batchable:
        pre = dict(zip(batchable, _prerender(tokenizer, [conversations[k] for k in batchable])))
    for k, messages in enumerate(conversations):
        if rendered[k] is None:
            rendered[k] = _guard(render_turns, tokenizer, messages, tools[k] if tools else None, pre.get(k))
    texts = [r[0] for r in rendered if not isinstance(r, RowError)]
    enc = tokenizer(texts, add_special_tokens=False) if texts else None
    k = 0
    for r in rendered:
        if isinstance(r, RowError):
            results.append(r)
            continue
        ids = enc["input_ids"][k]
        turns = [(i, *_token_range(enc, k, len(ids), a, b)) for i, a, b in r[1]]
        k += 1
        scored = turns[-1:] if train_on == "last" else turns
        ranges = [] if train_on == "all" else [(a, b) for _, a, b in scored]
        result = _finish(ids, ranges, train_on, max_length)
        if not isinstance(result, RowError):
            result["replies"] = [x for i, a, b in scored if a < b <= max_length for x in (i, a, b)]
        results.append(result)
    return results


def _message_text(message: dict[str, Any]) -> str:
    """A message's text ('' when it has none, e.g. an assistant turn of tool calls only)."""
    content = message.get("content")
    return content if isinstance(content, str) else ""


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


def tokenize_conversation(tokenizer, messages: list[dict[str, Any]], train_on: str, max_length: int,
                          tools: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """One conversation (see `tokenize_conversations`); raises RowError."""
    out = tokenize_conversations(tokenizer, [messages], train_on, max_length, [tools])[0]
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


def format_prompt(tokenizer, messages_or_prompt: str | list[dict[str, Any]], system: str | None = None,
                  tools: list[dict[str, Any]] | None = None) -> str:
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
        return tokenizer.apply_chat_template(messages, tools=tools or None, add_generation_prompt=True, tokenize=False)
    return _plain_render(messages, tokenizer.eos_token or "")[0]
