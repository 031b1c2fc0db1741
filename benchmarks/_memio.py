"""Measurement helpers shared by the benchmarks (standard library only: they also run in Megatron Bridge's
environment): reading a checkpoint's files once, this process's RSS and its peak, dropping the page cache."""

from __future__ import annotations

import os
import time
from typing import Dict, Optional

DROP_CACHES = "/proc/sys/vm/drop_caches"


def read_files_once(path: str) -> float:
    """Seconds to read every ``*.safetensors`` file under ``path`` once, sequentially, into one reused buffer."""
    files = [os.path.join(path, f) for f in sorted(os.listdir(path)) if f.endswith(".safetensors")]
    buf = bytearray(64 * 1024 * 1024)
    t0 = time.perf_counter()
    for f in files:
        with open(f, "rb", buffering=0) as fh:
            while fh.readinto(buf):
                pass
    return time.perf_counter() - t0


def rss() -> Dict[str, int]:
    """This process's ``VmRSS`` and ``VmHWM`` (peak since the last :func:`reset_peak`), in bytes."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("VmRSS:", "VmHWM:")):
                k, v = line.split(":")
                out[k] = int(v.split()[0]) * 1024
    return out


def reset_peak() -> bool:
    """Resets ``VmHWM`` to the current RSS (Linux ``clear_refs``); False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def drop_page_cache(warm: Optional[str] = None) -> None:
    """Writes back dirty pages and drops the (clean) page cache, then reads ``warm`` (a checkpoint directory) once so
    that its files are cached again. Needs root (the benchmarks' ``--drop-caches``).

    Why: on a machine whose memory is mostly page cache (earlier checkpoints, earlier outputs), every fresh page a
    process touches must first be reclaimed from the cache; on the virtual machines measured here that made fresh
    memory cost 1.5-3 s/GiB instead of ~0.2-0.4 s/GiB, and the cost depended on what ran before. Dropping the cache
    before each measured run gives every side the same state: only the checkpoint being read is cached.
    """
    os.sync()
    with open(DROP_CACHES, "w") as f:
        f.write("3\n")
    if warm:
        read_files_once(warm)
