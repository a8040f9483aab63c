"""The on-disk cache of prepared data: one directory per (sources, tokenizer, data section,
task, code version), written atomically, opened memory-mapped.

A file lock makes concurrent preparations of the same data (the processes of one
multi-process launch, or two runs side by side) tokenize once: the first takes the lock and
builds, the others wait and open what it wrote.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ..paths import cache_dir

#: Bump when preparation changes what it produces for the same inputs.
PREP_VERSION = "3"


def data_cache_root() -> Path:
    """$TNLORA_DATA_CACHE, else data/ under tnlora's cache ($TNLORA_CACHE or ~/.cache/tnlora)."""
    env = os.environ.get("TNLORA_DATA_CACHE")
    return Path(env) if env else cache_dir() / "data"


def tokenizer_fingerprint(tokenizer) -> str:
    """Vocabulary, merges, normalizers, special tokens and chat template."""
    h = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        h.update(backend.to_str().encode())
    else:
        from datasets.fingerprint import Hasher

        h.update(Hasher.hash(tokenizer).encode())
    extra = {
        "class": type(tokenizer).__name__,
        "chat_template": getattr(tokenizer, "chat_template", None),
        "special": {k: str(v) for k, v in sorted(tokenizer.special_tokens_map.items())},
        "eos": tokenizer.eos_token_id,
    }
    h.update(json.dumps(extra, sort_keys=True, default=str).encode())
    return h.hexdigest()


def cache_key(parts: dict[str, Any]) -> str:
    blob = json.dumps({"version": PREP_VERSION, **parts}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


@contextlib.contextmanager
def locked(key: str) -> Iterator[Path]:
    """Hold the key's lock; yields the cache directory (which may not exist yet)."""
    from filelock import FileLock

    root = data_cache_root()
    root.mkdir(parents=True, exist_ok=True)
    with FileLock(str(root / f"{key}.lock")):
        yield root / key


def is_complete(path: Path) -> bool:
    return (path / "report.json").is_file() and (path / "train").is_dir() and (path / "eval").is_dir()
