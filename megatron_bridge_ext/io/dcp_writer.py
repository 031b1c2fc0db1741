"""Writing the files of a ``torch.distributed.checkpoint`` (DCP) checkpoint one item at a time, in bounded memory.

torch's and megatron-core's writers resolve every item of a plan before the first byte is written (the whole state
dict in memory). :class:`StreamingDcpWriter` takes the items as they are produced: each is handed over with its
tensor (or serialized bytes), queued for the writer threads (two files written at once by default) while at most
``buffer_bytes`` are waiting (an item larger than that waits alone), and written with torch's own item serializer
(``filesystem._write_item``: the bytes torch's ``FileSystemWriter`` and megatron-core's ``FileSystemWriterAsync``
write), so any DCP reader reads them. The files are ``__{rank}_{n}.distcp``, each lane starting a new one every
``file_bytes``; each is written through a few reused staging buffers, hashed
(SHA-256) from them and written past the page cache (:mod:`megatron_bridge_ext.io.direct_io`), and fsynced when
closed, so the checksum manifest needs no second read, and a resumed conversion knows which files are complete.

:func:`write_metadata` writes ``.metadata`` as torch's ``FileSystemWriter.finish`` does (the plan's metadata with the
storage locations of every rank's write results).

Nothing here knows what the items are: :mod:`megatron_bridge_ext.mcore.stream` plans them from megatron-core's own
sharded state dict.
"""

from __future__ import annotations

import hashlib
import inspect
import io
import os
import queue
import threading
from dataclasses import dataclass, field
from typing import Any, Callable, List, Optional, Sequence, Union

import torch

from megatron_bridge_ext.io.direct_io import STAGES, DirectWriter, SequentialFile

__all__ = ["StreamingDcpWriter", "WrittenFile", "write_metadata", "DEFAULT_BUFFER_BYTES", "DEFAULT_FILE_BYTES",
           "DEFAULT_LANES", "with_exact_storage"]

DEFAULT_BUFFER_BYTES = 512 << 20
DEFAULT_FILE_BYTES = 4 << 30

#: files a writer writes at once (megatron-core's writer: ``thread_count`` 2 per rank)
DEFAULT_LANES = 2


@dataclass
class WrittenFile:
    """One complete ``.distcp`` file: its name, size, SHA-256 and the write results of its items."""

    name: str
    size: int
    sha256: str
    results: List[Any] = field(default_factory=list)


class _DcpFile(io.RawIOBase):
    """A ``.distcp`` file being written front to back (``torch.save`` writes to it): ``tell`` counts the bytes (DCP's
    offsets); the bytes go through the writer's staging buffers, hashed (SHA-256) from memory in order and written
    past the page cache where the file system allows (:class:`~megatron_bridge_ext.io.direct_io.SequentialFile`)."""

    def __init__(self, path: str, direct: DirectWriter) -> None:
        super().__init__()
        self._digest = hashlib.sha256()
        self._file = SequentialFile(path, direct, self._digest)

    def writable(self) -> bool:
        return True

    def seekable(self) -> bool:  # torch.save probes it; offsets come from tell()
        return False

    def write(self, b: Any) -> int:
        return self._file.write(b)

    def tell(self) -> int:
        return self._file.tell()

    def finish(self) -> str:
        """Write what is left, fsync, close; the file's SHA-256."""
        self._file.finish()
        return self._digest.hexdigest()

    def abandon(self) -> None:
        self._file.abandon()


def with_exact_storage(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` as a contiguous CPU tensor whose storage is exactly its bytes (``torch.save`` writes a tensor's
    whole storage): a contiguous view (e.g. of a memory-mapped file) gets a storage that is the slice of its own
    storage it covers, without copying; a non-contiguous one is copied."""
    t = tensor.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    if not t.is_contiguous():
        return t.clone(memory_format=torch.contiguous_format)
    nbytes = t.numel() * t.element_size()
    storage = t.untyped_storage()
    if t.storage_offset() == 0 and storage.nbytes() == nbytes:
        return t
    start = t.storage_offset() * t.element_size()
    exact = storage[start:start + nbytes]
    return torch.empty(0, dtype=t.dtype).set_(exact, 0, t.shape, t.stride())


def _item_writer() -> Callable[..., Any]:
    """torch's DCP item serializer with the arguments this torch version takes."""
    from torch.distributed.checkpoint import filesystem as fs

    params = inspect.signature(fs._write_item).parameters
    pre: List[Any] = []
    if "transforms" in params:
        pre.append(fs._StorageWriterTransforms())
    kw = {}
    if "serialization_format" in params:
        kw["serialization_format"] = fs.SerializationFormat.TORCH_SAVE

    def write(stream: Any, data: Any, item: Any, storage_key: str) -> Any:
        return fs._write_item(*pre, stream, data, item, storage_key, **kw)

    return write


class StreamingDcpWriter:
    """Writes DCP items to ``directory/__{rank}_{n}.distcp`` on background threads, at most ``buffer_bytes`` queued.

    ``lanes`` files are written at once (as megatron-core's writer writes ``thread_count`` files per rank), each by a
    thread of its own with its own staging buffers, hashing thread and writing thread: each item goes to the lane with
    the fewest bytes waiting, so the serializing (torch's CRC-32 of every byte) and the hashing (SHA-256) of one lane
    run beside the other's.

    Args:
        directory: the checkpoint directory (exists).
        rank: this writer's rank (the file names' first number).
        buffer_bytes: bytes of items that may wait for the writer threads (an item larger than that waits alone).
        file_bytes: a lane starts a new file once its current one holds this many bytes.
        first_file: the number of the first file (a resumed conversion continues after the files it kept); lane
            ``l``'s ``k``-th file is number ``first_file + l + k * lanes``.
        lanes: files written at once (>= 1).
        on_file: called with each completed :class:`WrittenFile` (e.g. to record progress), one call at a time.
        on_bytes: called with the byte count of each item written (progress), from the writer threads.
        on_written: called with each tensor once it is written (e.g. to drop the pages of a memory-mapped source it
            was written from), from the writer threads.
    """

    def __init__(self, directory: str, rank: int = 0, *, buffer_bytes: int = DEFAULT_BUFFER_BYTES,
                 file_bytes: int = DEFAULT_FILE_BYTES, first_file: int = 0, lanes: int = DEFAULT_LANES,
                 on_file: Optional[Callable[[WrittenFile], None]] = None,
                 on_bytes: Optional[Callable[[int], None]] = None,
                 on_written: Optional[Callable[[torch.Tensor], None]] = None) -> None:
        if buffer_bytes < 1 or file_bytes < 1 or lanes < 1:
            raise ValueError(f"buffer_bytes ({buffer_bytes}), file_bytes ({file_bytes}) and lanes ({lanes}) must be "
                             ">= 1")
        self.directory, self.rank = directory, rank
        self.buffer_bytes, self.file_bytes = buffer_bytes, file_bytes
        self._first_file, self._lanes = first_file, lanes
        self._on_file, self._on_bytes, self._on_written = on_file, on_bytes, on_written
        self._write_item = _item_writer()
        self._queues: List["queue.Queue[Any]"] = [queue.Queue() for _ in range(lanes)]
        self._lane_queued = [0] * lanes
        self._cond = threading.Condition()
        self._file_lock = threading.Lock()
        self._queued = 0
        self._error: Optional[BaseException] = None
        self._files: List[WrittenFile] = []
        self._closed = False
        self._threads = [threading.Thread(target=self._run, args=(lane,), name=f"dcp-writer-{rank}.{lane}",
                                          daemon=True) for lane in range(lanes)]
        for t in self._threads:
            t.start()

    @property
    def files(self) -> List[WrittenFile]:
        """The files completed so far."""
        with self._file_lock:
            return list(self._files)

    def put(self, item: Any, data: Union[torch.Tensor, io.BytesIO]) -> None:
        """Queue one write item (a DCP ``WriteItem``) with its data: a tensor of the item's chunk shape, or the
        serialized bytes of a byte item. Blocks while the queue holds ``buffer_bytes``; raises a writer thread's
        error, if one failed."""
        if self._closed:
            raise RuntimeError("StreamingDcpWriter.put after close")
        if isinstance(data, torch.Tensor):
            data = with_exact_storage(data)
            nbytes = data.numel() * data.element_size()
        else:
            nbytes = len(data.getbuffer())
        with self._cond:
            while self._error is None and self._queued > 0 and self._queued + nbytes > self.buffer_bytes:
                self._cond.wait()
            self._raise()
            self._queued += nbytes
            lane = min(range(self._lanes), key=lambda i: self._lane_queued[i])
            self._lane_queued[lane] += nbytes
        self._queues[lane].put((item, data, nbytes))

    def wait_room(self, nbytes: int) -> None:
        """Block until ``nbytes`` more fit in the buffer (or nothing is queued): called before producing a tensor of
        that size, so that memory holds the buffer plus one tensor, not a large tensor queued and the next one made."""
        with self._cond:
            while self._error is None and self._queued > 0 and self._queued + nbytes > self.buffer_bytes:
                self._cond.wait()
            self._raise()

    def close(self) -> List[WrittenFile]:
        """Write what is queued, complete (fsync) each lane's last file and stop the threads; returns every file
        written.

        Raises:
            OSError (or a writer's own error): a write failed; files completed before it are kept.
        """
        if not self._closed:
            self._closed = True
            for q in self._queues:
                q.put(None)
            for t in self._threads:
                t.join()
        self._raise()
        return self.files

    def abort(self) -> None:
        """Stop without completing the current files (after an error elsewhere)."""
        if not self._closed:
            self._closed = True
            with self._cond:
                if self._error is None:
                    self._error = RuntimeError("aborted")
                self._cond.notify_all()
            for q in self._queues:
                q.put(None)
            for t in self._threads:
                t.join()

    def _raise(self) -> None:
        if self._error is not None and str(self._error) != "aborted":
            raise self._error

    def _run(self, lane: int) -> None:
        direct = DirectWriter(stages=max(4, STAGES // len(self._queues)))  # the same staging memory, whatever the lanes
        current: Optional[_DcpFile] = None
        name = ""
        results: List[Any] = []
        made = 0
        try:
            while True:
                entry = self._queues[lane].get()
                if entry is None or self._error is not None:
                    break
                item, data, nbytes = entry
                del entry  # the tensor must not outlive its write (the queue's tuple would keep it until the next)
                if current is None:
                    name = f"__{self.rank}_{self._first_file + lane + made * self._lanes}.distcp"
                    made += 1
                    current = _DcpFile(os.path.join(self.directory, name), direct)
                    results = []
                results.append(self._write_item(current, data, item, name))
                if self._on_written is not None and isinstance(data, torch.Tensor):
                    self._on_written(data)
                del data
                with self._cond:
                    self._queued -= nbytes
                    self._lane_queued[lane] -= nbytes
                    self._cond.notify_all()
                if self._on_bytes is not None:
                    self._on_bytes(nbytes)
                if current.tell() >= self.file_bytes:
                    self._complete(current, name, results)
                    current = None
            if current is not None and self._error is None:
                self._complete(current, name, results)
                current = None
        except BaseException as e:  # noqa: BLE001  (re-raised on the producer's thread)
            with self._cond:
                if self._error is None or str(self._error) == "aborted":
                    self._error = e
                self._cond.notify_all()
        finally:
            if current is not None:
                current.abandon()
            direct.close()
            with self._cond:
                self._cond.notify_all()

    def _complete(self, f: _DcpFile, name: str, results: List[Any]) -> None:
        size = f.tell()
        digest = f.finish()
        done = WrittenFile(name, size, digest, results)
        with self._file_lock:
            self._files.append(done)
            if self._on_file is not None:
                self._on_file(done)


def write_metadata(directory: str, metadata: Any, results: Sequence[Any]) -> None:
    """Write ``directory/.metadata``: the plan's ``metadata`` with the storage location of every write result, as
    torch's ``FileSystemWriter.finish`` writes it (the DCP version, the storage data, a ``StorageMeta`` naming the
    directory as a string and a fresh save id; pickled, fsynced, renamed into place)."""
    import pickle
    import uuid

    from torch.distributed.checkpoint import filesystem as fs
    from torch.distributed.checkpoint.metadata import StorageMeta

    if hasattr(fs, "CURRENT_DCP_VERSION"):
        metadata.version = fs.CURRENT_DCP_VERSION
    metadata.storage_data = {r.index: r.storage_data for r in results}
    metadata.storage_meta = StorageMeta(checkpoint_id=os.fspath(directory), save_id=str(uuid.uuid4()))
    path = os.path.join(directory, ".metadata")
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        pickle.dump(metadata, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
