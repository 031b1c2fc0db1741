"""A streaming, sharded HF safetensors writer: :class:`SafeTensorsWriter` plans the shards up front from the expected
keys, accepts tensors in any order, writes each tensor to its place in its shard's temporary file as it arrives,
finishes a shard the moment its last tensor arrives and writes ``model.safetensors.index.json`` last, from what was
actually written.

By default the checkpoint is written into a staging directory beside the output directory and swapped in whole by
:meth:`SafeTensorsWriter.close` (:class:`~megatron_bridge_ext.io.staging.StagedCheckpoint`): a failed export, at any
point, leaves the output directory as it was.
"""

from __future__ import annotations

import errno
import json
import math
import os
import shutil
import warnings
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import torch

from megatron_bridge_ext.io import staging
from megatron_bridge_ext.io.direct_io import DirectWriter, direct_io_enabled, pwrite_all, start_writeback
from megatron_bridge_ext.io.read_ahead import CallQueue
from megatron_bridge_ext.io.staging import StagedCheckpoint, no_space_error
from megatron_bridge_ext.io.safetensors import (
    ITEMSIZE,
    SAFE_WEIGHTS_INDEX_NAME,
    SAFE_WEIGHTS_NAME,
    SHARD_RE,
    TORCH_TO_SAFETENSORS,
    ShapeLike,
    file_layout,
    shard_name,
    tensor_bytes,
    write_safetensors,
)

__all__ = ["SafeTensorsWriter", "save_hf_tensors"]


class _Flusher:
    """Starts the write-back of written ranges ``(fd, offset, nbytes)`` on a thread of its own, started with the first
    range (with ``O_DIRECT`` taken there is none): ``sync_file_range`` blocks while the disk's request queue is full,
    so called by the writer it would hold the conversion to the disk's write speed tensor by tensor; handed to this
    thread, the writer only copies into the page cache and goes on. ``join`` before an fsync or a close of a file
    whose ranges were handed over."""

    def __init__(self) -> None:
        self._queue: Optional[CallQueue] = None

    def put(self, job: Tuple[int, int, int]) -> None:
        if self._queue is None:
            self._queue = CallQueue(lambda r: start_writeback(*r), "writeback")
        self._queue.put(job)

    def join(self) -> None:
        if self._queue is not None:
            self._queue.join()

    def close(self) -> None:
        queue, self._queue = self._queue, None
        if queue is not None:
            queue.close()


class _OpenShard:
    """A shard being written in place: header first, each tensor at its planned offset as soon as it arrives. When
    the shard will be fsynced, its tensors go past the page cache through ``direct``'s staging buffers where the file
    system allows (:mod:`megatron_bridge_ext.io.direct_io`), else through the page cache with their write-back started
    at once by ``flusher``'s thread."""

    def __init__(self, tmp: str, specs, metadata: Mapping[str, str], fsync: bool = True,
                 flusher: Optional[_Flusher] = None, direct: Optional[DirectWriter] = None) -> None:
        head, self.offsets, self.data_bytes = file_layout(specs, metadata)
        self.fsync = fsync
        self.flusher = flusher
        self.tmp = tmp
        self.data_start = len(head)
        self.remaining = set(self.offsets)
        self.fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        self.direct = direct
        self.handle = None
        try:
            os.ftruncate(self.fd, self.data_start + self.data_bytes)
            os.pwrite(self.fd, head, 0)
            if direct is not None and fsync:
                self.handle = direct.file(self.fd, tmp)
        except BaseException:
            os.close(self.fd)
            raise

    def write(self, name: str, tensor: torch.Tensor) -> int:
        """Writes ``tensor`` at its place (copied: the caller may free it at once); returns its bytes."""
        start, end = self.offsets[name]
        if end > start:
            data = tensor_bytes(tensor)
            at = self.data_start + start
            if self.handle is not None and self.handle.dfd is not None:
                self.direct.write_at(self.handle, at, data, what=f"tensor {name!r}")
            else:
                pwrite_all(self.fd, data, at)
                if self.fsync and start_writeback is not None:
                    if self.flusher is not None:
                        self.flusher.put((self.fd, at, end - start))
                    else:
                        start_writeback(self.fd, at, end - start)
        self.remaining.discard(name)
        return end - start

    def sync(self) -> None:
        """Wait until every byte handed in is in the file (raises a failed write's error)."""
        if self.handle is not None:
            self.direct.join()
        if self.flusher is not None:
            self.flusher.join()  # no range of this descriptor is left to start once it is closed

    def finish(self, final: str) -> None:
        self.sync()
        if self.fsync:
            os.fsync(self.fd)
        self._close_fds()
        os.replace(self.tmp, final)

    def _close_fds(self) -> None:
        if self.handle is not None:
            self.handle.close_direct()
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def discard(self) -> None:
        if self.fd >= 0:
            try:
                self.sync()
            except OSError:
                pass  # the shard is being thrown away; the error that led here is raised by the caller
            self._close_fds()
        if os.path.exists(self.tmp):
            os.remove(self.tmp)


class SafeTensorsWriter:
    """Streams tensors into a sharded HF safetensors checkpoint.

    Shards are planned up front, so every tensor's place in its file is known: a tensor is written there (into the
    shard's temporary file) as soon as it arrives, and nothing is kept in memory; a shard is fsynced and renamed to its
    final name as soon as its last tensor arrived. The index is written last.

    Args:
        out_dir: output directory (created if needed).
        expected: name -> (shape, dtype) of every tensor to write, in the order to write them; shards are planned
            from it up front (consecutive keys, at most ``max_shard_bytes`` of data each unless one tensor is larger).
        max_shard_bytes: shard size limit in bytes.
        strict: on :meth:`close`, fail (naming the keys) if any expected tensor never arrived.
        metadata: ``__metadata__`` of every shard (default ``{"format": "pt"}``).
        overwrite: replace a checkpoint already in ``out_dir`` (its weights of any format are not kept; other files
            are); when False, weights already there are an error.
        fsync: flush each shard to disk before renaming it to its final name (a crash then never leaves a final
            name over incomplete data); False leaves the flush to the OS (faster on slow disks).
        atomic: write into a staging directory beside ``out_dir`` and swap it in on :meth:`close`, so that an
            existing checkpoint is never destroyed before the new one is complete (default). False writes straight
            into ``out_dir`` (for a directory that is itself a staging directory), removing stale checkpoint files
            first.
        protect: directories ``out_dir`` must not replace (the source checkpoint; ``atomic`` only).
        check_space: before writing anything, fail when the file system lacks the bytes the checkpoint needs.

    Attributes:
        work_dir: where the files are being written (the staging directory, or ``out_dir``).

    Raises:
        ValueError: empty ``expected``, an unsupported dtype or a bad ``max_shard_bytes``; ``out_dir`` is protected.
        FileExistsError: existing checkpoint files and ``overwrite=False``.
        OSError: ``ENOSPC`` naming the path, the bytes needed and the bytes free.
    """

    def __init__(
        self,
        out_dir: Union[str, os.PathLike],
        expected: Mapping[str, Tuple[ShapeLike, torch.dtype]],
        *,
        max_shard_bytes: int = 5 * 1024**3,
        strict: bool = True,
        metadata: Optional[Mapping[str, str]] = None,
        overwrite: bool = True,
        fsync: bool = True,
        atomic: bool = True,
        protect: Sequence[Union[str, os.PathLike]] = (),
        check_space: bool = True,
    ) -> None:
        if max_shard_bytes <= 0:
            raise ValueError(f"max_shard_bytes must be positive, got {max_shard_bytes}")
        if not expected:
            raise ValueError("SafeTensorsWriter: no expected tensors")
        self.out_dir = os.fspath(out_dir)
        self.strict = strict
        self.fsync = fsync
        self.metadata = dict(metadata) if metadata is not None else {"format": "pt"}
        self._expected: Dict[str, Tuple[Tuple[int, ...], torch.dtype]] = {}
        for name, spec in expected.items():
            try:
                shape, dtype = spec
            except (TypeError, ValueError):
                raise ValueError(f"expected[{name!r}] = {spec!r}: want (shape, dtype)") from None
            if dtype not in TORCH_TO_SAFETENSORS:
                raise ValueError(f"expected[{name!r}]: dtype {dtype} has no safetensors equivalent")
            self._expected[name] = (tuple(int(s) for s in shape), dtype)

        # Plan: consecutive keys, greedily packed under the limit.
        plan: List[List[str]] = [[]]
        size = 0
        for name, (shape, dtype) in self._expected.items():
            n = math.prod(shape) * ITEMSIZE[dtype]
            if plan[-1] and size + n > max_shard_bytes:
                plan.append([])
                size = 0
            plan[-1].append(name)
            size += n
        self._plan = plan
        self._shard_of: Dict[str, int] = {n: i for i, names in enumerate(plan) for n in names}
        self._file_names = [shard_name(i, len(plan)) for i in range(len(plan))]
        self._open: Dict[int, _OpenShard] = {}  # shards with at least one tensor written, not yet finished
        self._flusher: Optional[_Flusher] = None  # made with the first shard that is fsynced
        self._direct: Optional[DirectWriter] = None  # its staging buffers and thread, likewise
        self._received: set = set()
        self._shard_done = [False] * len(plan)
        self._weight_map: Dict[str, str] = {}
        self._written_files: List[str] = []
        self._total_size = 0
        self._closed = False

        self._planned_bytes = sum(math.prod(shape) * ITEMSIZE[dtype] for shape, dtype in self._expected.values())
        self._planned_bytes += sum(len(file_layout([(n, *self._expected[n]) for n in names], self.metadata)[0])
                                   for names in plan)
        self._bytes_written = 0
        self._staged: Optional[StagedCheckpoint] = None
        if atomic:
            self._staged = StagedCheckpoint(self.out_dir, protect=protect, overwrite=overwrite)
            self.work_dir = self._staged.path
        else:
            self.work_dir = self.out_dir
            os.makedirs(self.out_dir, exist_ok=True)
            stale = [
                f
                for f in os.listdir(self.out_dir)
                if f in (SAFE_WEIGHTS_NAME, SAFE_WEIGHTS_INDEX_NAME) or SHARD_RE.match(f)
            ]
            if stale and not overwrite:
                raise FileExistsError(f"{self.out_dir} already holds checkpoint files: {sorted(stale)}")
            # The index goes first, so that an interrupted clean-up never leaves an index pointing at a mix of files.
            for f in sorted(stale, key=lambda f: f != SAFE_WEIGHTS_INDEX_NAME):
                os.remove(os.path.join(self.out_dir, f))
        if check_space:
            try:
                free = shutil.disk_usage(self.work_dir).free
            except OSError:
                free = None
            if free is not None and free < self._planned_bytes:
                self.abort()
                raise OSError(errno.ENOSPC, f"no space left for the HF checkpoint in {self.work_dir}: it needs "
                                            f"{self._planned_bytes:,} bytes, the file system has {free:,} free "
                                            "(nothing was written; the existing checkpoint, if any, is untouched)")

    # ---- introspection --------------------------------------------------------------------------------------------

    @property
    def num_shards(self) -> int:
        """Number of planned shards."""
        return len(self._plan)

    @property
    def shard_plan(self) -> Dict[str, List[str]]:
        """Planned file name -> keys it will hold."""
        return {f: list(names) for f, names in zip(self._file_names, self._plan)}

    @property
    def written_files(self) -> List[str]:
        """Paths of the shards written so far."""
        return list(self._written_files)

    @property
    def total_size(self) -> int:
        """Bytes of tensor data written so far."""
        return self._total_size

    def missing(self) -> List[str]:
        """Expected keys that have not arrived, in expected order."""
        return [n for n in self._expected if n not in self._received]

    # ---- writing --------------------------------------------------------------------------------------------------

    def add(self, name: str, tensor: torch.Tensor) -> Optional[str]:
        """Hands in one tensor; writes its shard if this was the shard's last missing tensor.

        Returns:
            the path of the shard written by this call, or None.

        Raises:
            ValueError: unexpected or duplicated key, shape/dtype different from the expected one, or a closed writer.
        """
        if self._closed:
            raise ValueError(f"SafeTensorsWriter({self.out_dir!r}) is closed; cannot add {name!r}")
        if name not in self._expected:
            raise ValueError(f"unexpected tensor {name!r}: not among the {len(self._expected)} expected keys")
        if name in self._received:
            raise ValueError(f"tensor {name!r} was already added")
        if not isinstance(tensor, torch.Tensor):
            raise ValueError(f"tensor {name!r}: got {type(tensor).__name__}, expected a torch.Tensor")
        shape, dtype = self._expected[name]
        if tuple(tensor.shape) != shape or tensor.dtype != dtype:
            raise ValueError(
                f"tensor {name!r}: got shape {tuple(tensor.shape)} {tensor.dtype}, expected {shape} {dtype}"
            )
        shard = self._shard_of[name]
        try:
            open_shard = self._open.get(shard)
            if open_shard is None:
                tmp = os.path.join(self.work_dir, f".{self._file_names[shard]}.tmp-{os.getpid()}")
                specs = [(n, *self._expected[n]) for n in self._plan[shard]]
                if self.fsync and start_writeback is not None and self._flusher is None:
                    self._flusher = _Flusher()
                if self.fsync and direct_io_enabled() and self._direct is None:
                    self._direct = DirectWriter()
                open_shard = self._open[shard] = _OpenShard(tmp, specs, self.metadata, self.fsync, self._flusher,
                                                            self._direct)
            self._bytes_written += open_shard.write(name, tensor)  # straight to its place: nothing is buffered
            self._received.add(name)
            if not open_shard.remaining:
                return self._finish_shard(shard)
        except OSError as e:
            # a write handed to the writing thread fails later: the error names the bytes' own tensor and shard
            failed = next((s for s, o in self._open.items() if o.tmp == e.filename), shard)
            what = getattr(e, "written_for", None) or f"tensor {name!r}"
            self.abort()
            if e.errno in (errno.ENOSPC, errno.EDQUOT):
                raise no_space_error(e, os.path.join(self.out_dir, self._file_names[failed]),
                                     self._planned_bytes - self._bytes_written, what) from None
            raise
        except BaseException:
            self.abort()
            raise
        return None

    def _finish_shard(self, shard: int) -> str:
        open_shard = self._open.pop(shard)
        final = os.path.join(self.work_dir, self._file_names[shard])
        try:
            open_shard.finish(final)
        except BaseException:
            open_shard.discard()
            raise
        self._shard_done[shard] = True
        self._total_size += open_shard.data_bytes
        for n in self._plan[shard]:
            self._weight_map[n] = self._file_names[shard]
        self._written_files.append(final)
        staging._crash_point("shard_done")
        return final

    def _compact_shard(self, shard: int) -> None:
        """Non-strict close of a shard that misses tensors: rewrite it with only what arrived."""
        open_shard = self._open.pop(shard)
        names = [n for n in self._plan[shard] if n in self._received]
        open_shard.sync()
        with open(open_shard.tmp, "rb") as f:
            blob = f.read()
        tensors = []
        for n in names:
            start, end = open_shard.offsets[n]
            shape, dtype = self._expected[n]
            raw = bytearray(blob[open_shard.data_start + start: open_shard.data_start + end])
            t = torch.frombuffer(raw, dtype=dtype) if raw else torch.empty(0, dtype=dtype)
            tensors.append((n, t.view(shape)))
        final = os.path.join(self.work_dir, self._file_names[shard])
        tmp = open_shard.tmp + ".compact"
        try:
            nbytes = write_safetensors(tmp, tensors, self.metadata, fsync=self.fsync)
            os.replace(tmp, final)
        finally:
            open_shard.discard()
            if os.path.exists(tmp):
                os.remove(tmp)
        self._shard_done[shard] = True
        self._total_size += nbytes
        for n in names:
            self._weight_map[n] = self._file_names[shard]
        self._written_files.append(final)

    def close(self) -> Dict[str, Any]:
        """Finishes the checkpoint: writes the index (several shards) last, from what was written, then (atomic)
        swaps the staging directory in as the output directory.

        Returns:
            ``{"files": [...], "total_size": bytes, "missing": [...], "index": path or None}``, plus (atomic) the
            swap's ``replaced`` (old weight files not kept), ``carried`` (old files kept) and ``cleaned``
            (leftovers of killed saves removed).

        Raises:
            ValueError: strict mode and some expected keys never arrived (all named); then no index is written, the
                incomplete shards are never written and the output directory is left as it was.
        """
        if self._closed:
            raise ValueError(f"SafeTensorsWriter({self.out_dir!r}) is already closed")
        self._closed = True
        try:
            summary = self._close()
        except BaseException:
            self._discard_open()
            if self._staged is not None:
                self._staged.abort()
            raise
        finally:
            self._stop_flusher()
        return summary

    def _stop_flusher(self) -> None:
        flusher, self._flusher = self._flusher, None
        direct, self._direct = self._direct, None
        try:
            if flusher is not None:
                flusher.close()
        finally:
            if direct is not None:
                direct.close()

    def _close(self) -> Dict[str, Any]:
        missing = self.missing()
        if missing and self.strict:
            raise ValueError(
                f"HF export to {self.out_dir} is incomplete: {len(missing)} of {len(self._expected)} expected "
                f"tensors never arrived: {missing}; no index was written"
                + ("; the output directory is left as it was" if self._staged is not None else "")
            )
        if missing:
            warnings.warn(
                f"HF export to {self.out_dir}: {len(missing)} expected tensors never arrived and are not saved: "
                f"{missing}",
                stacklevel=3,
            )
            for shard in sorted(self._open):
                self._compact_shard(shard)
        index_name = None
        if len(self._plan) > 1 and self._weight_map:
            weight_map = {n: self._weight_map[n] for n in self._expected if n in self._weight_map}
            index = {"metadata": {"total_size": self._total_size}, "weight_map": weight_map}
            index_name = SAFE_WEIGHTS_INDEX_NAME
            index_path = os.path.join(self.work_dir, SAFE_WEIGHTS_INDEX_NAME)
            tmp = index_path + f".tmp-{os.getpid()}"
            staging._crash_point("before_index")
            try:
                with open(tmp, "w", encoding="utf-8") as f:
                    json.dump(index, f, indent=2)
                    f.write("\n")
                    f.flush()
                    if self.fsync:
                        os.fsync(f.fileno())
                os.replace(tmp, index_path)
            except OSError as e:
                if os.path.exists(tmp):
                    os.remove(tmp)
                if e.errno in (errno.ENOSPC, errno.EDQUOT):
                    raise no_space_error(e, os.path.join(self.out_dir, SAFE_WEIGHTS_INDEX_NAME),
                                         len(json.dumps(index, indent=2)) + 1, "the index") from None
                raise
            staging._crash_point("after_index")
        summary: Dict[str, Any] = {"missing": missing, "total_size": self._total_size}
        if self._staged is not None:
            summary.update(self._staged.commit())
        summary["files"] = [os.path.join(self.out_dir, os.path.basename(f)) for f in self._written_files]
        summary["index"] = None if index_name is None else os.path.join(self.out_dir, index_name)
        return summary

    def abort(self) -> None:
        """Stops without finishing: pending tensors are dropped, no index is written, and (atomic) the staging
        directory is removed: the output directory is left as it was."""
        self._closed = True
        self._discard_open()
        self._stop_flusher()
        if self._staged is not None:
            self._staged.abort()

    def _discard_open(self) -> None:
        """Removes every unfinished shard's temporary file."""
        for open_shard in self._open.values():
            open_shard.discard()
        self._open.clear()

    def __enter__(self) -> "SafeTensorsWriter":
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is not None:
            self.abort()
        elif not self._closed:
            self.close()

    def __repr__(self) -> str:
        return (
            f"SafeTensorsWriter({self.out_dir!r}, {len(self._expected)} tensors in {len(self._plan)} shard(s), "
            f"{len(self._received)} received, {len(self._written_files)} shard(s) written)"
        )


def save_hf_tensors(
    out_dir: Union[str, os.PathLike],
    named_tensors: Iterable[Tuple[str, torch.Tensor]],
    expected: Mapping[str, Tuple[ShapeLike, torch.dtype]],
    *,
    max_shard_bytes: int = 5 * 1024**3,
    strict: bool = True,
    metadata: Optional[Mapping[str, str]] = None,
    show_progress: bool = False,
    fsync: bool = True,
    atomic: bool = True,
) -> Dict[str, Any]:
    """Writes ``(name, tensor)`` pairs, in any order, to a sharded safetensors checkpoint.

    Args:
        out_dir: output directory.
        named_tensors: the tensors; consumed lazily, each shard written as soon as it is complete.
        expected: name -> (shape, dtype), in the order to write (see :class:`SafeTensorsWriter`).
        max_shard_bytes: shard size limit.
        strict: fail, naming them, if expected keys never arrive.
        metadata: shard ``__metadata__``.
        show_progress: a progress bar over the tensors.
        fsync: flush each shard to disk before it gets its final name (see :class:`SafeTensorsWriter`).
        atomic: write beside ``out_dir`` and swap in when complete (see :class:`SafeTensorsWriter`).

    Returns:
        the summary of :meth:`SafeTensorsWriter.close`.
    """
    with SafeTensorsWriter(
        out_dir, expected, max_shard_bytes=max_shard_bytes, strict=strict, metadata=metadata, fsync=fsync,
        atomic=atomic,
    ) as writer:
        if show_progress:
            from rich.progress import Progress

            with Progress(transient=True) as progress:
                task = progress.add_task("saving HF tensors", total=len(expected))
                for name, tensor in named_tensors:
                    writer.add(name, tensor)
                    tensor = None  # written: not held while the next one is made
                    progress.advance(task)
        else:
            for name, tensor in named_tensors:
                writer.add(name, tensor)
                tensor = None  # written: not held while the next one is made
        return writer.close()
