"""Writing checkpoint files past the page cache: ``O_DIRECT`` writes from a few reused, aligned staging buffers.

A buffered write copies every byte into newly allocated page-cache pages, which the kernel then writes back
(throttling the writer while too many are dirty) and keeps, evicting what the user had cached. For a file written
once and fsynced, that allocation and throttling is most of a writer's time. Here each byte is copied once into one
of a few staging buffers (page aligned and reused, so their pages stay resident), and a thread of its own writes the
full buffers with ``O_DIRECT`` (and hashes them, where asked) while the caller fills the next one. Only whole aligned
blocks go that way: the partial blocks at the ends of a range go through the page cache. The two never share a page,
so the kernel keeps them coherent, and the file's ``fsync`` makes both durable.

Where the file system refuses ``O_DIRECT`` (tmpfs, some network and FUSE file systems: ``EINVAL`` at the open or at
the first write) the same bytes are written through the page cache instead; ``MEGATRON_BRIDGE_DIRECT_IO=0`` asks
for that everywhere.
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import queue
import sys
import threading
from typing import Any, List, Optional, Tuple

import numpy as np

__all__ = ["DirectWriter", "SequentialFile", "direct_io_enabled", "pwrite_all", "start_writeback", "DIRECT_IO_ENV",
           "ALIGN", "STAGE_BYTES"]

#: set to ``0`` to write every file through the page cache
DIRECT_IO_ENV = "MEGATRON_BRIDGE_DIRECT_IO"

#: file offsets, lengths and buffer addresses of direct writes are multiples of this (a page: never shared with a
#: block written through the page cache)
ALIGN = max(4096, mmap.PAGESIZE)

#: bytes of one staging buffer
STAGE_BYTES = 8 << 20

#: staging buffers of one writer (one being filled, the others waiting or being written: enough to carry the writes
#: on while the caller waits for its reads, and the reads while a write waits for the disk; 128 MiB in all)
STAGES = 16

_REFUSED = (errno.EINVAL, errno.EOPNOTSUPP, getattr(errno, "ENOTSUP", errno.EOPNOTSUPP))


def _writeback_starter():
    """``sync_file_range(fd, offset, nbytes, SYNC_FILE_RANGE_WRITE)`` where the C library has it (Linux), else None.

    Starting the write-back of each range as soon as it is written (through the page cache) keeps the disk busy while
    the next bytes are produced, so the final fsync of a file finds little left to do.
    """
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.sync_file_range
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    fn.restype = ctypes.c_int

    def start(fd: int, offset: int, nbytes: int) -> None:
        fn(fd, offset, nbytes, 2)  # SYNC_FILE_RANGE_WRITE: initiate write-out, do not wait; advisory

    return start


start_writeback = _writeback_starter()


def direct_io_enabled() -> bool:
    """Whether writers may use ``O_DIRECT`` here (the platform has it and ``MEGATRON_BRIDGE_DIRECT_IO`` is not 0)."""
    return hasattr(os, "O_DIRECT") and os.environ.get(DIRECT_IO_ENV, "1").strip() not in ("0", "false", "no")


def _address(view: Any) -> int:
    """The address of the first byte of a contiguous buffer (read-only ones included)."""
    return int(np.frombuffer(view, dtype=np.uint8).ctypes.data)


def pwrite_all(fd: int, view: memoryview, offset: int) -> None:
    """All of ``view`` at ``offset`` of ``fd`` (``pwrite`` again after a short write)."""
    done = 0
    while done < len(view):
        n = os.pwrite(fd, view[done:], offset + done)
        if n <= 0:
            raise OSError(errno.EIO, f"pwrite at offset {offset + done} wrote {n} bytes")
        done += n


class _Direct:
    """A file's two descriptors: the caller's (through the page cache) and, where the file system takes it, one
    opened with ``O_DIRECT`` (dropped, for good, at the first write it refuses)."""

    def __init__(self, fd: int, path: str) -> None:
        self.fd = fd
        self.path = path
        self.dfd: Optional[int] = None
        if direct_io_enabled():
            try:
                self.dfd = os.open(path, os.O_WRONLY | os.O_DIRECT)
            except OSError as e:
                if e.errno not in _REFUSED:
                    raise

    def write(self, view: memoryview, offset: int) -> None:
        """``view`` at ``offset``: its whole aligned blocks directly (``offset`` is aligned), the rest buffered."""
        n = len(view)
        whole = n - n % ALIGN
        if self.dfd is not None and whole:
            try:
                pwrite_all(self.dfd, view[:whole], offset)
            except OSError as e:
                if e.errno not in _REFUSED:
                    raise
                self.close_direct()  # refused: this file is written through the page cache from here on
                whole = 0
        else:
            whole = 0
        if whole < n:
            pwrite_all(self.fd, view[whole:], offset + whole)
            if self.dfd is None and start_writeback is not None:  # called on the writing thread, never the caller's
                start_writeback(self.fd, offset + whole, n - whole)

    def close_direct(self) -> None:
        if self.dfd is not None:
            os.close(self.dfd)
            self.dfd = None


class DirectWriter:
    """Staging buffers and the two threads that hash them (for a :class:`SequentialFile`) and write them, shared by
    the files of one writer.

    :meth:`write_at` copies the whole aligned blocks of a range into the buffers (the caller's tensor may be freed at
    once) and a copy of its partial end blocks, which the writing thread writes through the page cache; :meth:`join`
    waits until everything handed over is written and raises the first error of the thread (e.g. ``ENOSPC``), naming
    the file.

    Args:
        stage_bytes: bytes of one staging buffer (a multiple of :data:`ALIGN`).
        stages: number of staging buffers (memory: ``stages * stage_bytes``).
    """

    def __init__(self, stage_bytes: int = STAGE_BYTES, stages: int = STAGES) -> None:
        if stage_bytes <= 0 or stage_bytes % ALIGN or stages < 2:
            raise ValueError(f"DirectWriter: stage_bytes = {stage_bytes} (a positive multiple of {ALIGN}), "
                             f"stages = {stages} (at least 2)")
        self.stage_bytes = stage_bytes
        self._free: "queue.Queue[Tuple[mmap.mmap, int]]" = queue.Queue()
        self._buffers: List[mmap.mmap] = []
        for _ in range(stages):
            buf = mmap.mmap(-1, stage_bytes)
            self._buffers.append(buf)
            self._free.put((buf, _address(buf)))
        self._hash: "queue.Queue[Any]" = queue.Queue()
        self._work: "queue.Queue[Any]" = queue.Queue()
        self._error: Optional[BaseException] = None
        self._closed = False
        self._threads = [threading.Thread(target=self._hash_run, name="direct-hash", daemon=True),
                         threading.Thread(target=self._write_run, name="direct-write", daemon=True)]
        for t in self._threads:
            t.start()

    def file(self, fd: int, path: str) -> _Direct:
        """The handle of an open file (``fd``, opened for writing) for :meth:`write_at`; ``path`` is opened a second
        time with ``O_DIRECT`` where the file system takes it."""
        return _Direct(fd, path)

    def take(self) -> Tuple[mmap.mmap, int]:
        """A free staging buffer and its address (waits while all are being written)."""
        self.check()
        return self._free.get()

    def submit(self, f: _Direct, buf: Tuple[mmap.mmap, int], nbytes: int, offset: int, digest: Any = None,
               what: str = "") -> None:
        """Write ``buf[:nbytes]`` (a buffer from :meth:`take`) at ``offset`` of ``f`` (aligned) on the thread, after
        ``digest.update`` with it; the buffer is free again afterwards."""
        self._hash.put((f, memoryview(buf[0])[:nbytes], offset, digest, what, buf))

    def give_back(self, buf: Tuple[mmap.mmap, int]) -> None:
        """Return a buffer from :meth:`take` unused."""
        self._free.put(buf)

    def write_at(self, f: _Direct, offset: int, view: memoryview, what: str = "") -> None:
        """Write ``view`` at ``offset`` of ``f`` on the thread (copied: the caller may free it at once): its whole
        aligned blocks through the staging buffers, its partial end blocks through the page cache. ``what`` (e.g. the
        tensor's name) is set as ``written_for`` on the error of a write of these bytes that fails."""
        view = memoryview(view).cast("B")
        end = offset + len(view)
        first = -(-offset // ALIGN) * ALIGN
        last = end // ALIGN * ALIGN
        if f.dfd is None:
            self.check()
            pwrite_all(f.fd, view, offset)
            return
        if last <= first:  # no whole block: a few KiB, copied and written on the thread
            self._small(f, view, offset, what)
            return
        # The partial end blocks go through the page cache on the writing thread, never on the caller's: a buffered
        # write to a file waits for the file's lock, which a direct write holds until its disk write completes.
        if first > offset:
            self._small(f, view[:first - offset], offset, what)
        if end > last:
            self._small(f, view[last - offset:], last, what)
        src = _address(view) + (first - offset)
        for at in range(first, last, self.stage_bytes):
            n = min(self.stage_bytes, last - at)
            buf = self.take()
            ctypes.memmove(buf[1], src + (at - first), n)
            self.submit(f, buf, n, at, what=what)

    def _small(self, f: _Direct, view: memoryview, offset: int, what: str) -> None:
        """Hand a copy of a few bytes (less than two blocks) to the writing thread, written through the page cache."""
        self.check()
        self._hash.put((f, memoryview(bytes(view)), offset, None, what, None))

    def _hash_run(self) -> None:
        """Hashes each buffer that has a digest, in order, then passes it on to the writing thread: hashing and
        writing overlap (a buffer is hashed while the one before it is written)."""
        while True:
            job = self._hash.get()
            try:
                if job is None:
                    self._work.put(None)
                    return
                digest, data = job[3], job[1]
                if digest is not None and self._error is None:
                    try:
                        digest.update(data)
                    except BaseException as e:  # noqa: BLE001  (raised by check / join)
                        self._error = self._error or e
                self._work.put(job)
            finally:
                self._hash.task_done()

    def _write_run(self) -> None:
        while True:
            job = self._work.get()
            try:
                if job is None:
                    return
                # the bytes, where they go, the staging buffer they are in (None: a copy of a partial block's bytes)
                f, data, offset, _, what, buf = job
                try:
                    if self._error is None:
                        if buf is None:
                            pwrite_all(f.fd, data, offset)
                        else:
                            f.write(data, offset)
                except BaseException as e:  # noqa: BLE001  (raised by check / join)
                    if isinstance(e, OSError):
                        if e.filename is None:
                            e.filename = f.path
                        if what and getattr(e, "written_for", None) is None:
                            e.written_for = what  # type: ignore[attr-defined]  (what the failed bytes belong to)
                    self._error = self._error or e
                finally:
                    if buf is not None:
                        self._free.put(buf)
            finally:
                self._work.task_done()

    def check(self) -> None:
        """Raise the thread's first error, if it had one."""
        if self._error is not None:
            raise self._error

    def wait(self) -> None:
        """Wait until everything handed over is written (or dropped after an error)."""
        self._hash.join()  # every buffer handed on to the writing thread
        self._work.join()

    def join(self) -> None:
        """Wait until everything handed over is written; raise the threads' first error."""
        self.wait()
        self.check()

    def close(self) -> None:
        """Stop the threads once they have written what they hold (errors are raised by :meth:`join`, not here)."""
        if not self._closed:
            self._closed = True
            self._hash.put(None)
            for t in self._threads:
                t.join()


class SequentialFile:
    """A new file written front to back (``write`` / ``tell``, as ``torch.save`` writes a stream): the bytes are
    copied into staging buffers in order, and the thread hashes each full buffer (``digest``, optional) and writes it
    at its aligned offset, directly where the file system takes it; :meth:`finish` writes the last partial buffer
    (its tail through the page cache), fsyncs and closes.

    Args:
        path: the file (created, or truncated).
        writer: the :class:`DirectWriter` whose buffers and thread it uses.
        digest: a ``hashlib`` object updated with every byte, in order.
    """

    def __init__(self, path: str, writer: DirectWriter, digest: Any = None) -> None:
        self.path = path
        self._w = writer
        self._digest = digest
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            self._f = writer.file(fd, path)
        except BaseException:
            os.close(fd)
            raise
        self._buf: Optional[Tuple[mmap.mmap, int]] = None  # the staging buffer being filled, and its address
        self._fill = 0
        self._base = 0  # file offset of the buffer being filled
        self._n = 0

    def write(self, b: Any) -> int:
        view = memoryview(b).cast("B")
        total = len(view)
        if total == 0:
            return 0
        src = _address(view)
        done = 0
        cap = self._w.stage_bytes
        while done < total:
            if self._buf is None:
                self._buf = self._w.take()
                self._fill = 0
            k = min(total - done, cap - self._fill)
            ctypes.memmove(self._buf[1] + self._fill, src + done, k)
            self._fill += k
            done += k
            if self._fill == cap:
                self._w.submit(self._f, self._buf, cap, self._base, self._digest)
                self._base += cap
                self._buf = None
        self._n += total
        return total

    def tell(self) -> int:
        return self._n

    def finish(self) -> None:
        """Write what is left, wait for every write, fsync and close (the digest is then complete)."""
        if self._buf is not None:
            self._w.submit(self._f, self._buf, self._fill, self._base, self._digest)
            self._buf = None
        try:
            self._w.join()
            os.fsync(self._f.fd)
        finally:
            self._close()

    def abandon(self) -> None:
        """Stop without completing the file (its buffers are returned once written; errors are dropped)."""
        if self._buf is not None:
            self._w.give_back(self._buf)
            self._buf = None
        try:
            self._w.wait()
        finally:
            self._close()

    def _close(self) -> None:
        self._f.close_direct()
        if self._f.fd >= 0:
            os.close(self._f.fd)
            self._f.fd = -1
