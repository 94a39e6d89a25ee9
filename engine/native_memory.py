"""The C library's heap, for processes that run for hours: fewer malloc arenas, and freed memory handed back.

glibc gives threads malloc arenas of their own (up to 8 per core) and keeps what they free mapped. A long render
(4 stage threads, an H.264 encoder opened and closed per segment) then grew its resident memory in steps as threads
moved to new arenas (+58 MB at once after 10 minutes of audio in benchmarks/bench_long.py), and a server's resident
memory grew by 5-15 MB per ended session. Both calls are no-ops where the C library has no such function (musl,
macOS, Windows).
"""
from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging
from typing import Optional

log = logging.getLogger(__name__)

M_ARENA_MAX = -8  # mallopt parameter number of glibc's arena limit (malloc.h)


@functools.lru_cache(maxsize=1)
def _libc() -> Optional[ctypes.CDLL]:
    """glibc, or None where this process runs on another C library."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None
    return libc if hasattr(libc, "malloc_trim") and hasattr(libc, "mallopt") else None


def limit_arenas(arenas: int = 2) -> bool:
    """Cap glibc's malloc arenas at ``arenas`` for the rest of the process (call before the worker threads start).
    Returns whether the C library took it."""
    libc = _libc()
    ok = bool(libc is not None and libc.mallopt(M_ARENA_MAX, int(arenas)))
    log.debug("malloc arenas capped at %d: %s", arenas, ok)
    return ok


def release_freed_memory() -> None:
    """Hand the memory this process has freed back to the system (glibc's malloc_trim; a few ms)."""
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)


__all__ = ["limit_arenas", "release_freed_memory"]
