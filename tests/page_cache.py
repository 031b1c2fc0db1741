"""Page-cache residency of file ranges (``mincore``), for the read-ahead tests."""

from __future__ import annotations

import os
import time


def cached_fraction(path: str, start: int, end: int) -> float:
    """The fraction of the file's pages in ``[start, end)`` that are in the page cache (``mincore`` of a map)."""
    import ctypes
    import mmap

    libc = ctypes.CDLL(None, use_errno=True)
    page = mmap.PAGESIZE
    lo, hi = start // page * page, -(-end // page) * page
    with open(path, "rb") as f:
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
    try:
        base = ctypes.addressof(ctypes.c_char.from_buffer(mm))
        n = (hi - lo) // page
        vec = (ctypes.c_ubyte * n)()
        if libc.mincore(ctypes.c_void_p(base + lo), ctypes.c_size_t(hi - lo), vec) != 0:
            raise OSError(ctypes.get_errno(), "mincore")
        return sum(v & 1 for v in vec) / n
    finally:
        del base
        mm.close()


def evicted_file(path: str, nbytes: int) -> bool:
    """Write ``nbytes`` to ``path`` and drop its clean pages from the page cache; False where they stay (tmpfs)."""
    with open(path, "wb") as f:
        f.write(os.urandom(nbytes))
        f.flush()
        os.fsync(f.fileno())
        os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
    return cached_fraction(path, 0, nbytes) < 0.5


def wait_cached(path: str, start: int, end: int, timeout: float = 20.0) -> float:
    deadline = time.monotonic() + timeout
    while cached_fraction(path, start, end) < 0.99 and time.monotonic() < deadline:
        time.sleep(0.05)
    return cached_fraction(path, start, end)
