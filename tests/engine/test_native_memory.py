"""engine/native_memory.py: what the C heap keeps after a free goes back to the system on release_freed_memory."""
import ctypes
import sys

import psutil
import pytest

from engine import native_memory as M

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux") or M._libc() is None, reason="needs glibc")


def test_freed_heap_memory_is_handed_back():
    libc = M._libc()
    libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    rss = lambda: psutil.Process().memory_info().rss / 2 ** 20  # noqa: E731
    # 1. 160 MB in blocks under the mmap threshold (they live in the heap), touched, then a block above them, so
    # freeing them cannot shrink the heap from its top: glibc keeps them mapped
    blocks = [libc.malloc(64 * 1024) for _ in range(2560)]
    for b in blocks:
        ctypes.memset(b, 1, 64 * 1024)
    sentinel = libc.malloc(64 * 1024)
    ctypes.memset(sentinel, 1, 64 * 1024)
    for b in blocks:
        libc.free(b)
    kept = rss()
    # 2. handed back
    M.release_freed_memory()
    after = rss()
    libc.free(sentinel)
    assert after < kept - 100, (kept, after)


def test_arena_limit_is_taken():
    assert M.limit_arenas(2) is True
