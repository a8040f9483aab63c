"""Conversation rows as the chat template reads them: OpenAI or ShareGPT turns normalised to
OpenAI messages, with tool calls, and a row's `tools`.

A message is {'role', 'content'} with OpenAI role names (system, developer, user, assistant,
tool). An assistant message may carry `tool_calls` ([{'type': 'function', 'function':
{'name', 'arguments'}}], arguments an object; OpenAI's JSON-string arguments are parsed, as
chat templates expect an object) and then may have no content (`content: null`, OpenAI's
shape), in which case the key is left out. A tool message keeps its `tool_call_id` and `name`.
"""

from __future__ import annotations

import json
from typing import Any

SHAREGPT_ROLES = {
    "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "chatgpt": "assistant",
    "system": "system", "tool": "tool", "function": "tool", "observation": "tool",
}
OPENAI_ROLES = ("system", "developer", "user", "assistant", "tool")
STYLE_NAMES = {"openai": "OpenAI style (role/content)", "sharegpt": "ShareGPT style (from/value)"}


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
    """'openai' (role/content) or 'sharegpt' (from/value) from the first turn, or None."""
    if not isinstance(turns, list) or not turns or not isinstance(turns[0], dict):
        return None
    first = {k for k, v in turns[0].items() if v is not None}
    if {"role", "content"} <= first or ("role" in first and "tool_calls" in first):
        return "openai"
    if {"from", "value"} <= first:
        return "sharegpt"
    return None


def normalize_messages(turns: Any, style: str | None = None, style_from: str = "") -> list[dict[str, Any]]:
    """OpenAI or ShareGPT turns as OpenAI messages (see the module docstring).

    `style` is the file's style when the caller detected it once for a whole file; `style_from`
    says where it came from (e.g. "the file's first conversation"), for messages about a row
    written in the other style."""
    if not isinstance(turns, list) or not turns:
        raise RowError("the conversation is missing, null or empty" if not turns else f"the conversation is not a list of turns (got {type(turns).__name__})")
    style = style or conversation_style(turns)
    if style is None:
        raise RowError("turns are neither OpenAI style (role/content) nor ShareGPT style (from/value)")
    role_key, text_key = ("role", "content") if style == "openai" else ("from", "value")
    read_as = STYLE_NAMES[style] + (f", as detected from {style_from}" if style_from else "")
    out = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise RowError(f"turn {i + 1} is not a mapping")
        raw_role = turn.get(role_key)
        if raw_role is None:
            own = conversation_style([turn])
            if own is not None and own != style:
                raise RowError(f"turn {i + 1} is {STYLE_NAMES[own]}, but the turns are read as {read_as}; use one style per file")
            raise RowError(f"turn {i + 1} has no '{role_key}' (turns are read as {read_as}; it has: {', '.join(sorted(turn)) or 'nothing'})")
        role = (raw_role if raw_role in OPENAI_ROLES else None) if style == "openai" else SHAREGPT_ROLES.get(str(raw_role).lower())
        if role is None:
            known = ", ".join(OPENAI_ROLES if style == "openai" else ("human", "gpt", "system", "tool"))
            raise RowError(f"turn {i + 1} has {role_key} {raw_role!r}; expected one of {known}")
        message: dict[str, Any] = {"role": role}
        content = turn.get(text_key)
        calls = (turn.get("tool_calls") or None) if style == "openai" else None  # [] is no call
        if calls is not None:
            if role != "assistant":
                raise RowError(f"turn {i + 1} has tool_calls but role {role!r}; only assistant turns call tools")
            message["tool_calls"] = _tool_calls(calls, i)
        if content is not None or calls is None:
            message["content"] = _text(content, f"turn {i + 1}'s {text_key}")
        if role == "tool":
            message.update({k: turn[k] for k in ("tool_call_id", "name") if isinstance(turn.get(k), str)})
        out.append(message)
    return out


def _tool_calls(calls: Any, turn: int) -> list[dict[str, Any]]:
    """OpenAI tool calls checked, arguments as objects."""
    where = f"turn {turn + 1}'s tool_calls"
    if not isinstance(calls, list) or not calls:
        raise RowError(f"{where} is not a non-empty list of calls")
    out = []
    for k, call in enumerate(calls):
        fn = call.get("function") if isinstance(call, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
            raise RowError(f"{where}[{k}] has no function name (expected {{type: function, function: {{name, arguments}}}})")
        arguments = fn.get("arguments", {})
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments) if arguments.strip() else {}
            except json.JSONDecodeError as exc:
                raise RowError(f"{where}[{k}] ({fn['name']}): arguments are not valid JSON ({exc.msg})") from None
        if not isinstance(arguments, dict):
            raise RowError(f"{where}[{k}] ({fn['name']}): arguments are not a JSON object (got {type(arguments).__name__})")
        entry = {"type": call.get("type") or "function", "function": {"name": fn["name"], "arguments": arguments}}
        if isinstance(call.get("id"), str):
            entry["id"] = call["id"]
        out.append(entry)
    return out


def row_tools(value: Any) -> list[dict[str, Any]] | None:
    """A row's `tools` (function schemas the template shows the model), or None."""
    if value is None:
        return None
    if not isinstance(value, list) or not all(isinstance(t, dict) for t in value):
        raise RowError(f"field 'tools' is not a list of tool schemas (got {type(value).__name__})")
    return value or None


def count_tool_calls(messages: list[dict[str, Any]]) -> int:
    return sum(len(m.get("tool_calls") or ()) for m in messages)


def instruction_messages(prompt: str, response: str | None = None, system: str | None = None) -> list[dict[str, Any]]:
    messages = [{"role": "system", "content": system}] if system else []
    messages.append({"role": "user", "content": prompt})
    if response is not None:
        messages.append({"role": "assistant", "content": response})
    return messages
