"""Keep the resident memory of preparation flat in the number of rows.

`datasets` reads Arrow files through read-only memory maps. Every page of a file that a pass
reads stays in the process's resident set until the process ends (nothing asks the kernel to
take it back while memory is free), so a pass over a 1M-row file would grow the resident set by
the size of every file it read. Those pages are clean copies of the file: telling the kernel
that this process no longer needs them (madvise MADV_DONTNEED) drops them from the resident set
at no risk, and a later read maps them again from the page cache. Linux only; elsewhere, or if
anything fails, nothing happens.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import mmap
import sys

_MADV_DONTNEED = getattr(mmap, "MADV_DONTNEED", 4)
_libc = None


def _madvise():
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        _libc.madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    return _libc.madvise


def release_mapped_pages(suffix: str = ".arrow") -> int:
    """Drop this process's resident pages of read-only file maps whose path ends in `suffix`
    (the Arrow files `datasets` reads); they are read again from the page cache when used.
    Returns the bytes of the maps released."""
    if not sys.platform.startswith("linux"):
        return 0
    released = 0
    try:
        madvise = _madvise()
        with open("/proc/self/maps") as maps:
            for line in maps:
                fields = line.split(maxsplit=5)
                if len(fields) < 6 or "w" in fields[1] or not fields[5].rstrip("\n").endswith(suffix):
                    continue
                start, end = (int(x, 16) for x in fields[0].split("-"))
                if madvise(start, end - start, _MADV_DONTNEED) == 0:
                    released += end - start
    except (OSError, AttributeError, ValueError):
        return released
    return released
