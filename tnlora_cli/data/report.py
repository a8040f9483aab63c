"""The one-line summary of prepared data in the training log (counts, truncation, drops, cache)."""

from __future__ import annotations

from typing import Any


def data_summary(report: dict[str, Any]) -> str:
    """One line for the training log."""
    dropped = sum(report.get("dropped", {}).values())
    cache = report.get("cache", {})
    if report.get("image"):
        image = report["image"]
        reasons = ", ".join(f"{reason}: {n:,}" for reason, n in report.get("dropped", {}).items())
        return (
            f"data: {report.get('train_examples', 0):,} training / {report.get('eval_examples', 0):,} held-out images, "
            f"{len(report.get('label_names') or [])} classes, {image['channels']}x{image['height']}x{image['width']} "
            f"(preprocessing: {image['source']}); {dropped:,} rows dropped" + (f" ({reasons})" if reasons else "")
            + f"; cache {_cache_state(cache)} ({cache.get('path')})" + "".join(f"; {note}" for note in report.get("notes", []))
        )
    return (
        f"data: {report.get('train_examples', 0):,} training / {report.get('eval_examples', 0):,} held-out examples, "
        f"{report.get('train_tokens', 0):,} training tokens; {report.get('truncated', 0):,} truncated at {report.get('max_length')} tokens, "
        f"{dropped:,} rows dropped; "
        + (f"{report['train_tool_calls']:,} tool calls trained; " if report.get("train_tool_calls") else "")
        + f"cache {_cache_state(cache)} ({cache.get('path')})"
        + "".join(f"; {note}" for note in report.get("notes", []))
    )


def _cache_state(cache: dict[str, Any]) -> str:
    if cache.get("hit"):
        return "hit"
    return "rebuilt (the entry was damaged)" if cache.get("rebuilt") else "miss"
