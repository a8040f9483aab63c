"""The on-disk cache of prepared data: one entry per (sources, tokenizer, tokenization
settings, task, code version), written atomically, opened memory-mapped.

An entry holds the tokenized examples before the train/held-out split (the split is cheap
and made when the entry is opened), so held-out settings reuse it. Each entry has a
`manifest.json` of its files' sizes and digests, checked whenever it is opened:

- sizes always (a `stat` per file);
- the full SHA-256 of files up to 1 MiB (the report, Arrow metadata);
- for larger files (the Arrow tables, up to gigabytes) a SHA-256 of sampled 64 KiB blocks:
  the first, the last and 14 evenly spaced between. Reading 1 MiB per file keeps opening a
  10 GB entry instant, where a full hash would read all of it on every `train`, `eval` and
  `prepare`; truncation (the common damage: a full disk, a killed copy) changes the size,
  and zeroed or overwritten regions are caught where they touch a sampled block or the
  Arrow structure (which opening reads).

A damaged entry is rebuilt, with a warning. A file lock per key makes concurrent
preparations of the same data (the processes of one multi-process launch, or two runs side
by side) tokenize once: the first takes the lock and builds, the others wait and open what
it wrote. Lock files are removed on release, and what killed processes left (temporary
entries, lock files) is removed by the next preparation, under that key's lock.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import re
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import DataError
from ..paths import cache_dir
from ..run.atomic import remove_path

#: Bump when preparation changes what it produces for the same inputs.
PREP_VERSION = "3"
MANIFEST = "manifest.json"
#: Files up to this size are hashed whole; larger ones by sampled blocks.
WHOLE_HASH_LIMIT = 1 << 20
SAMPLE_BLOCK = 64 << 10
SAMPLE_BLOCKS = 16
_KEY = re.compile(r"[0-9a-f]{24}")
_LEFTOVER = re.compile(r"\.([0-9a-f]{24})\.(tmp|old)-.*")


def data_cache_root(create: bool = False) -> Path:
    """$TNLORA_DATA_CACHE, else data/ under tnlora's cache ($TNLORA_CACHE or ~/.cache/tnlora).
    `create` makes it; a path that is a file (or lies under one) is refused by name."""
    env = os.environ.get("TNLORA_DATA_CACHE")
    root = Path(env).expanduser() if env else cache_dir() / "data"
    variable = "TNLORA_DATA_CACHE" if env else "TNLORA_CACHE" if os.environ.get("TNLORA_CACHE") else "the data cache (~/.cache/tnlora/data)"
    blocker = next((p for p in (root, *root.parents) if p.exists() and not p.is_dir()), None)
    if blocker is not None:
        raise DataError(
            f"{variable}: {root} is a file, not a directory" if blocker == root else f"{variable}: {root} is not a directory ({blocker} is a file)",
            hint=f"point {'TNLORA_CACHE' if variable == 'TNLORA_CACHE' else 'TNLORA_DATA_CACHE'} at a directory (it is created if missing)",
        )
    if create:
        root.mkdir(parents=True, exist_ok=True)
    return root


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


# ---------------------------------------------------------------------- locks


def _acquire(path: Path, blocking: bool) -> int | None:
    """flock `path`; None when another process holds it (non-blocking). The lock file may be
    removed by its holder on release: a lock taken on a file no longer at `path` is retried."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        except BlockingIOError:
            os.close(fd)
            return None
        try:
            current = os.stat(path)
        except FileNotFoundError:
            current = None
        if current is not None and os.path.samestat(os.fstat(fd), current):
            return fd
        os.close(fd)


def _release(path: Path, fd: int) -> None:
    # Removed while held: a waiter that opened this file sees it gone after its flock and retries.
    path.unlink(missing_ok=True)
    fcntl.flock(fd, fcntl.LOCK_UN)
    os.close(fd)


@contextlib.contextmanager
def locked(key: str, on_wait: Callable[[str], None] | None = None) -> Iterator[Path]:
    """Hold the key's lock; yields the entry's directory (which may not exist yet).
    `on_wait` is told when another process holds the lock (this one then waits)."""
    root = data_cache_root(create=True)
    lock = root / f"{key}.lock"
    fd = _acquire(lock, blocking=False)
    if fd is None:
        if on_wait is not None:
            on_wait(f"waiting for another process that prepares the same data ({lock})")
        fd = _acquire(lock, blocking=True)
    try:
        yield root / key
    finally:
        _release(lock, fd)


@contextlib.contextmanager
def _try_locked(root: Path, key: str) -> Iterator[bool]:
    lock = root / f"{key}.lock"
    fd = _acquire(lock, blocking=False)
    try:
        yield fd is not None
    finally:
        if fd is not None:
            _release(lock, fd)


def remove_leftovers(root: Path | None = None) -> list[Path]:
    """Remove what dead processes left in the cache: temporary entries (`.KEY.tmp-*`, an
    unfinished replacement's `.KEY.old-*`) and lock files, each only while holding its key's
    lock (so a live preparation, on this machine or another sharing the directory, keeps
    its own). Returns what was removed."""
    root = root or data_cache_root()
    if not root.is_dir():
        return []
    removed: list[Path] = []
    for item in sorted(root.iterdir()):
        leftover = _LEFTOVER.fullmatch(item.name)
        if leftover:
            with _try_locked(root, leftover.group(1)) as free:
                if free and item.exists():
                    remove_path(item)
                    removed.append(item)
        elif item.suffix == ".lock" and _KEY.fullmatch(item.stem):
            with _try_locked(root, item.stem) as free:
                if free:
                    removed.append(item)  # the release removes it
    return removed



# ---------------------------------------------------------------------- manifest


def _sample_offsets(size: int) -> list[int]:
    last = size - SAMPLE_BLOCK
    return sorted({round(last * i / (SAMPLE_BLOCKS - 1)) for i in range(SAMPLE_BLOCKS)})


def file_digest(path: Path, size: int) -> str:
    """SHA-256 of the whole file up to WHOLE_HASH_LIMIT bytes, else of sampled blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        if size <= WHOLE_HASH_LIMIT:
            h.update(f.read())
        else:
            for offset in _sample_offsets(size):
                f.seek(offset)
                h.update(f.read(SAMPLE_BLOCK))
    return h.hexdigest()


def write_manifest(entry: Path, about: dict[str, Any]) -> None:
    """Record every file of a finished (not yet published) entry; `about` says what it holds."""
    files = {}
    for path in sorted(p for p in entry.rglob("*") if p.is_file() and p.name != MANIFEST):
        size = path.stat().st_size
        files[path.relative_to(entry).as_posix()] = {"size": size, "digest": file_digest(path, size)}
    manifest = {"version": PREP_VERSION, "created": time.time(), "about": about, "files": files}
    (entry / MANIFEST).write_text(json.dumps(manifest, indent=1))


def read_manifest(entry: Path) -> dict[str, Any] | None:
    try:
        manifest = json.loads((entry / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    return manifest if isinstance(manifest, dict) and isinstance(manifest.get("files"), dict) else None


def damage(entry: Path) -> str | None:
    """What is wrong with an entry (None if its files match its manifest)."""
    manifest = read_manifest(entry)
    if manifest is None:
        return f"{MANIFEST} is missing or unreadable"
    for name, record in manifest["files"].items():
        path = entry / name
        try:
            size = path.stat().st_size
        except OSError:
            return f"{name} is missing"
        if not isinstance(record, dict) or size != record.get("size"):
            return f"{name} has {size:,} bytes, the manifest says {record.get('size') if isinstance(record, dict) else '?'}"
        if file_digest(path, size) != record.get("digest"):
            return f"{name} does not match its digest"
    return None


def touch(entry: Path) -> None:
    """Record that an entry was used now (its directory's modification time)."""
    with contextlib.suppress(OSError):  # a read-only shared cache is still usable
        os.utime(entry)


# ---------------------------------------------------------------------- listing and pruning


@dataclass
class CacheEntry:
    key: str
    path: Path
    size: int
    last_used: float
    #: What the entry holds (task, sources, tokenizer), from its manifest; empty if unreadable.
    about: dict[str, Any]
    #: The manifest's version; None when absent (an older tnlora's entry, or damaged).
    version: str | None

    @property
    def current(self) -> bool:
        """Whether this version of tnlora uses the entry (older versions' entries are never opened)."""
        return self.version == PREP_VERSION


def _size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())


def list_entries(root: Path | None = None) -> list[CacheEntry]:
    """The entries of the cache, most recently used first."""
    root = root or data_cache_root()
    if not root.is_dir():
        return []
    entries = []
    for path in root.iterdir():
        if path.is_dir() and _KEY.fullmatch(path.name):
            manifest = read_manifest(path) or {}
            entries.append(CacheEntry(path.name, path, _size(path), path.stat().st_mtime, manifest.get("about") or {}, manifest.get("version")))
    return sorted(entries, key=lambda e: -e.last_used)


@dataclass
class PruneResult:
    removed: list[CacheEntry]
    #: Entries that matched but another process was using (its lock held).
    in_use: list[CacheEntry]
    leftovers: list[Path]

    @property
    def freed(self) -> int:
        return sum(e.size for e in self.removed)


def prune(older_than_days: float | None, root: Path | None = None) -> PruneResult:
    """Remove entries not used for `older_than_days` days (every entry with None), each under
    its key's lock, and what dead processes left."""
    if older_than_days is not None and not (older_than_days >= 0 and older_than_days != float("inf")):
        raise DataError(f"--older-than {older_than_days:g}: must be a number of days >= 0", hint="e.g. --older-than 30")
    root = root or data_cache_root()
    leftovers = remove_leftovers(root)
    cutoff = None if older_than_days is None else time.time() - older_than_days * 86400
    removed, in_use = [], []
    for entry in list_entries(root):
        if cutoff is not None and entry.last_used >= cutoff:
            continue
        with _try_locked(root, entry.key) as free:
            if not free:
                in_use.append(entry)
                continue
            # renamed first, so the entry disappears at once even if removal is interrupted
            aside = root / f".{entry.key}.old-prune-{uuid.uuid4().hex[:8]}"
            try:
                os.replace(entry.path, aside)
            except OSError as exc:
                if exc.errno == errno.ENOENT:
                    continue
                raise
            remove_path(aside)
            removed.append(entry)
    return PruneResult(removed, in_use, leftovers)
