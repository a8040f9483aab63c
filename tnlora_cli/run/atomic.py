"""Atomic writes: the one way tnlora puts a file or a directory on disk.

Everything is written under a hidden temporary name beside its destination,
`.NAME.tmp-PID-RANDOM[SUFFIX]` (unique per process and per call, so two writers never share
one), flushed to disk (fsync), then renamed into place. A crash or kill at any point leaves
the destination as it was (absent or the previous version); the temporary a dead process
left behind is removed by the next write to the same destination.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, Literal

from ..errors import CheckpointError

#: What a directory write does when its destination exists by the end.
OnExists = Literal["error", "replace", "keep"]


def _temporary_name(dest: Path, suffix: str = "") -> Path:
    return dest.parent / f".{dest.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}{suffix}"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _fsync(path: Path) -> None:
    """Flush a file, or a directory's entries, to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def remove_path(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def remove_dead_temporaries(dest: Path) -> list[Path]:
    """Remove `.name.tmp-PID-*` siblings of `dest` whose process no longer runs, and put
    back a previous version a killed `publish_directory` had moved aside."""
    removed = []
    for item in dest.parent.glob(f".{dest.name}.tmp-*"):
        pid = item.name[len(dest.name) + 6 :].split("-")[0]
        if pid.isdigit() and not _alive(int(pid)):
            remove_path(item)
            removed.append(item)
    olds = sorted(dest.parent.glob(f".{dest.name}.old-*"))
    if olds and not dest.exists():
        os.replace(olds.pop(0), dest)
    for old in olds:
        shutil.rmtree(old, ignore_errors=True)
    return removed


def publish_directory(tmp: Path, dest: Path) -> None:
    """Rename a finished temporary directory to `dest`, replacing any previous version.

    The old version is first moved aside, so `dest` is never a mix of old and new files.
    """
    old = None
    if dest.exists():
        old = dest.parent / f".{dest.name}.old-{uuid.uuid4().hex[:8]}"
        os.replace(dest, old)
    os.replace(tmp, dest)
    _fsync(dest.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def atomic_directory(dest: Path, on_exists: OnExists = "error") -> Iterator[Path]:
    """Yield a new temporary sibling directory of `dest`; it becomes `dest` (every file in it
    flushed) only if the block succeeds. `on_exists` says what happens when `dest` exists by
    then: refuse ("error"), replace it, or keep it (another process produced it first)."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    remove_dead_temporaries(dest)
    tmp = _temporary_name(dest)
    try:
        # Made inside the try: an interrupt that lands just after the directory appears (a
        # SIGTERM sent on seeing it) must still remove it.
        tmp.mkdir()
        yield tmp
        if dest.exists() and on_exists == "keep":
            return
        if dest.exists() and on_exists == "error":
            raise CheckpointError(f"{dest} already exists", hint="choose another path or allow overwriting")
        for path in tmp.rglob("*"):
            if path.is_file():
                _fsync(path)
        publish_directory(tmp, dest)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def atomic_file(dest: Path, keep_suffix: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside `dest` to write; it replaces `dest` (flushed) only if
    the block succeeds. `keep_suffix` ends the temporary name with dest's extension, for
    writers that choose the format by it (matplotlib's savefig)."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    remove_dead_temporaries(dest)
    tmp = _temporary_name(dest, dest.suffix if keep_suffix else "")
    try:
        yield tmp
        _fsync(tmp)
        os.replace(tmp, dest)
        _fsync(dest.parent)
    finally:
        tmp.unlink(missing_ok=True)


def write_text(path: Path, text: str) -> None:
    """Write a whole text file (UTF-8) atomically."""
    with atomic_file(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(path: Path, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2) + "\n")


def write_jsonl(path: str | Path, rows: Iterable[dict[str, Any]]) -> None:
    """Write all rows or nothing, one JSON object per line."""
    write_text(Path(path), "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
