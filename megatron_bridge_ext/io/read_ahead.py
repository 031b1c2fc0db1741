"""Reading ahead of a conversion: the disk reads what the next parameters need while the current one converts.

A streamed conversion reads its source in an order it knows in advance (the conversion tasks, the buckets of an
export). :class:`ReadAhead` walks that order a window ahead of the conversion and, on a thread of its own, asks the
kernel to read those byte ranges into the page cache (``POSIX_FADV_WILLNEED``: it starts the reads and returns), so
that the conversion's own reads find the data in memory instead of waiting for the disk, and the reads of the source
overlap the writes of the output. Nothing is mapped or copied into the process: its memory does not grow. A hint
only: where the kernel does not read ahead (or the call fails) the conversion reads the data itself, as before.
"""

from __future__ import annotations

import bisect
import os
import queue
import threading
from typing import Any, Callable, Dict, List, Optional, Sequence, Set, Tuple

__all__ = ["ReadAhead", "CallQueue", "WillNeedFiles", "will_need", "READ_AHEAD_WINDOW"]

#: bytes read ahead of the conversion by default (page cache, not this process's memory)
READ_AHEAD_WINDOW = 512 << 20

#: the bytes of one ``POSIX_FADV_WILLNEED`` request (Linux reads no more per call than the larger of the device's
#: read-ahead and its largest request, often 128 KiB to 8 MiB)
PIECE = 1 << 20


def will_need(fd: int, start: int, nbytes: int) -> None:
    """Ask the kernel to start reading ``[start, start + nbytes)`` of ``fd`` into the page cache (no wait)."""
    if not hasattr(os, "posix_fadvise"):
        return
    end = start + nbytes
    for at in range(start, end, PIECE):
        os.posix_fadvise(fd, at, min(PIECE, end - at), os.POSIX_FADV_WILLNEED)


class ReadAhead:
    """Asks for the items of the positions after the current one, up to ``window`` bytes past it, each item once, in
    order, on a thread of its own.

    Args:
        ask: called on the thread with a list of items (e.g. tensor names, or ``(path, start, nbytes)`` ranges);
            its ``OSError`` is ignored (a hint only).
        units: per position (in conversion order), its ``(item, nbytes)`` pairs; an item already listed at an
            earlier position is not asked for again.
        window: bytes asked for past the current position.
    """

    def __init__(self, ask: Callable[[List[Any]], Any], units: Sequence[Sequence[Tuple[Any, int]]],
                 window: int) -> None:
        self._ask = ask
        self._items: List[Tuple[int, Any]] = []
        self._before = [0]  # bytes of the items before each one
        seen: Set[Any] = set()
        for pos, pairs in enumerate(units):
            for item, nbytes in pairs:
                if item not in seen:
                    seen.add(item)
                    self._items.append((pos, item))
                    self._before.append(self._before[-1] + int(nbytes))
        self._positions = [p for p, _ in self._items]
        self._window = max(1, int(window))
        self._next = 0  # the first item not asked for yet
        # a hint only: where asking fails, the conversion reads the data itself either way
        self._calls: Optional[CallQueue] = CallQueue(ask, "read-ahead", ignore=OSError) if self._items else None

    def at(self, pos: int) -> None:
        """Position ``pos`` converts now: ask for its items not asked for yet and for the next ones, up to
        ``window`` bytes past it."""
        if self._calls is None or self._calls.closing:
            return
        past = bisect.bisect_right(self._positions, pos)  # the first item of a later position
        batch = []
        while self._next < len(self._items):
            p, item = self._items[self._next]
            if p > pos and self._before[self._next] - self._before[past] >= self._window:
                break
            if p >= pos:
                batch.append(item)
            self._next += 1
        if batch:
            self._calls.put(batch)
        if self._next == len(self._items):  # everything asked for: the thread ends once it has asked
            self.close(wait=False)

    def wait(self) -> None:
        """Until every item handed to the thread has been asked for (tests)."""
        if self._calls is not None:
            self._calls.join()

    def close(self, wait: bool = True) -> None:
        """Stop the thread (it finishes what it was handed first)."""
        if self._calls is not None:
            self._calls.close(wait)


class CallQueue:
    """``fn(item)`` for each item :meth:`put`, in order, on a thread of its own (``name``); exceptions of the types in
    ``ignore`` are dropped (a hint that failed), any other ends nothing either but is kept for :meth:`close` to raise.
    :meth:`join` waits until everything put so far has been handled."""

    def __init__(self, fn: Callable[[Any], Any], name: str, ignore: Any = ()) -> None:
        self._fn, self._ignore = fn, ignore
        self._queue: "queue.Queue[Any]" = queue.Queue()
        self._stop = object()
        self.closing = False
        self._error: Optional[BaseException] = None
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            try:
                if item is self._stop:
                    return
                self._fn(item)
            except self._ignore:
                pass
            except BaseException as e:  # noqa: BLE001  (raised by close)
                self._error = self._error or e
            finally:
                self._queue.task_done()

    def put(self, item: Any) -> None:
        self._queue.put(item)

    def join(self) -> None:
        self._queue.join()

    def close(self, wait: bool = True) -> None:
        """End the thread once it has handled what was put; with ``wait``, wait for it and raise its error (a
        second call only waits)."""
        if not self.closing:
            self.closing = True
            self._queue.put(self._stop)
        if wait:
            self._thread.join()
            if self._error is not None:
                raise self._error


class WillNeedFiles:
    """Read-only descriptors of a source's files for :func:`will_need`, opened on first use, usable from any thread;
    :meth:`close` waits while one is in use and ends the asking (a closed source asks for nothing)."""

    def __init__(self) -> None:
        self._fds: Dict[str, int] = {}
        self._lock = threading.Lock()
        self._closed = False

    def will_need(self, path: str, start: int, nbytes: int) -> bool:
        """Ask for ``[start, start + nbytes)`` of ``path``; False once closed."""
        with self._lock:
            if self._closed:
                return False
            fd = self._fds.get(path)
            if fd is None:
                fd = self._fds[path] = os.open(path, os.O_RDONLY)
            will_need(fd, start, nbytes)
            return True

    def close(self) -> None:
        with self._lock:
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()
            self._closed = True
