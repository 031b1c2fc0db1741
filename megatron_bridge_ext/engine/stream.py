"""HF checkpoint -> Megatron ``torch_dist`` checkpoint as a stream: no model is built, memory is bounded.

A ``torch_dist`` checkpoint stores each tensor at its global shape, whatever layout wrote it, so the conversion needs
neither a parallel layout nor megatron-core's writer. Per rank (one process, or each rank of a ``torchrun`` /
local world converting a disjoint share of the tensors):

1. the model is built on the meta device (no memory) at TP 1; megatron-core plans the save of it
   (:func:`megatron_bridge_ext.mcore.stream.plan_stream`): keys, global shapes, chunks, ``_extra_state`` objects,
   the common state: exactly what the model path writes;
2. the family's mappings convert each parameter from the memory-mapped HF tensors (the same tasks and ops as a live
   import, at TP 1), and each of its stored chunks goes at once to a writer thread
   (:class:`~megatron_bridge_ext.io.dcp_writer.StreamingDcpWriter`) that holds at most ``buffer_bytes``; the HF
   pages are released after each task. Peak memory: the buffer plus the largest parameter (twice, for a
   parameter whose stored chunks are copies);
3. rank 0 gathers the write results, writes ``.metadata`` (torch's format), ``common.pt`` (megatron-core up to
   0.18), ``metadata.json``, the side files and the checksum manifest (from digests taken while writing), then moves
   the staged directory into place.

A conversion killed at any point leaves only ``iter_.../.partial``; ``resume=True`` keeps the files it completed
(each checked against the size and SHA-256 recorded when it was closed) and converts only the parameters whose items
are not all in them.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pickle
import time
from typing import Any, Dict, List, Mapping, Optional, Sequence, Set, Tuple

import torch
import torch.distributed as dist

from megatron_bridge_ext.engine.importing import RowPieces
from megatron_bridge_ext.io import megatron_checkpoint as ckpt_io
from megatron_bridge_ext.io.checksums import file_digest
from megatron_bridge_ext.io.dcp_writer import (DEFAULT_BUFFER_BYTES, DEFAULT_FILE_BYTES, StreamingDcpWriter,
                                               WrittenFile, write_metadata)
from megatron_bridge_ext.io.protocols import as_source
from megatron_bridge_ext.io.read_ahead import ReadAhead

__all__ = ["stream_hf_to_megatron", "JOURNAL_NAME", "DEFAULT_BUFFER_BYTES"]

#: the record of completed files in a staged (``.partial``) conversion, for ``resume``
JOURNAL_NAME = "stream_journal.pkl"


def _where(index: Any) -> Tuple[str, Optional[Tuple[int, ...]]]:
    """A DCP item's identity: its key and chunk offsets (None for a byte item)."""
    return index.fqn, None if index.offset is None else tuple(int(o) for o in index.offset)


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _world() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def _all_gather(obj: Any) -> List[Any]:
    if _world() == 1:
        return [obj]
    out: List[Any] = [None] * _world()
    dist.all_gather_object(out, obj)
    return out


def _agree_error(error: Optional[str]) -> None:
    """Every rank raises the first rank's error, if any rank has one."""
    errors = [e for e in _all_gather(error) if e]
    if errors:
        raise ValueError(errors[0])


def _journal_path(partial: str, rank: int) -> str:
    return os.path.join(partial, f"{JOURNAL_NAME}.{rank}")


class _Journal:
    """The files a rank completed, appended as each is fsynced: ``(fingerprint, WrittenFile)`` records."""

    def __init__(self, path: str, fingerprint: str) -> None:
        self.path, self.fingerprint = path, fingerprint

    def add(self, f: WrittenFile) -> None:
        with open(self.path, "ab") as out:
            pickle.dump((self.fingerprint, f), out)
            out.flush()
            os.fsync(out.fileno())

    def read(self, partial: str) -> Tuple[List[WrittenFile], List[str]]:
        """The recorded files that are intact (size and SHA-256 as recorded), and the problems found."""
        if not os.path.isfile(self.path):
            return [], []
        kept, problems = [], []
        with open(self.path, "rb") as f:
            while True:
                try:
                    fp, wf = _RestrictedJournal(f).load()
                except EOFError:
                    break
                except Exception as e:  # noqa: BLE001  (a torn last record: the file it names is redone)
                    problems.append(f"journal record unreadable ({e})")
                    break
                if fp != self.fingerprint:
                    problems.append(f"{wf.name}: written for another conversion (source or settings changed)")
                    continue
                path = os.path.join(partial, wf.name)
                if not os.path.isfile(path) or os.path.getsize(path) != wf.size:
                    problems.append(f"{wf.name}: missing or of another size")
                    continue
                if file_digest(path) != wf.sha256:
                    problems.append(f"{wf.name}: content differs from what was written")
                    continue
                kept.append(wf)
        return kept, problems


class _RestrictedJournal(pickle.Unpickler):
    """Reads the journal's own records only (DCP write results and this module's file record)."""

    _ALLOWED = {
        ("megatron_bridge_ext.io.dcp_writer", "WrittenFile"),
        ("torch.distributed.checkpoint.storage", "WriteResult"),
        ("torch.distributed.checkpoint.metadata", "MetadataIndex"),
        ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
        ("torch", "Size"),
        ("builtins", "tuple"),
        ("builtins", "list"),
    }

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"stream journal: refusing {module}.{name}")
        return super().find_class(module, name)


def _fingerprint(hf_dir: str, settings: Mapping[str, Any]) -> str:
    """Identifies a conversion: the HF files (names, sizes, modification times) and the settings."""
    import hashlib

    h = hashlib.sha256(json.dumps(dict(settings), sort_keys=True, default=str).encode())
    for name in sorted(os.listdir(hf_dir)):
        path = os.path.join(hf_dir, name)
        if os.path.isfile(path):
            st = os.stat(path)
            h.update(f"{name}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def _progress(total: int, show: bool):
    """A rich byte progress bar (bytes, rate, time left) on rank 0, or None."""
    if not show or _rank() != 0 or total <= 0:
        return None
    from rich.progress import (BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn,
                               TransferSpeedColumn)

    bar = Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                   TimeRemainingColumn(), transient=True)
    bar.start()
    tid = bar.add_task("Converting + writing" + (f" (rank 0 of {_world()})" if _world() > 1 else ""), total=total)
    return bar, tid


def _hf_read_ahead(source: Any, names: Sequence[Sequence[str]], window: int) -> ReadAhead:
    """The HF tensors of the tasks (``names``, in conversion order) read ahead of the conversion
    (:class:`~megatron_bridge_ext.io.read_ahead.ReadAhead`); nothing for a source without ``read_ahead`` (not
    backed by files)."""
    ask, size = getattr(source, "read_ahead", None), getattr(source, "nbytes", None)
    if ask is None or size is None:
        return ReadAhead(lambda items: None, [], window)
    return ReadAhead(ask, [[(k, size(k)) for k in keys if k in source] for keys in names], window)


def _share(tasks: Sequence[Any], plan: Any, by_id: Mapping[int, Tuple[int, str]], world: int
           ) -> Dict[int, int]:
    """Task index -> rank: each task to the least loaded rank so far, largest tasks first (deterministic)."""
    sizes = []
    for i, task in enumerate(tasks):
        keys = {by_id.get(id(t)) for t in task.local_tensors} - {None}
        sizes.append((sum(plan.param_bytes(k) for k in keys), i))
    load = [0] * world
    load[0] = sum(len(b.getbuffer()) for _, b in plan.byte_items)  # rank 0 writes the objects
    owner = {}
    for size, i in sorted(sizes, key=lambda x: (-x[0], x[1])):
        r = min(range(world), key=lambda k: (load[k], k))
        owner[i] = r
        load[r] += size
    return owner


def stream_hf_to_megatron(
    bridge: Any,
    hf_dir: str,
    out_dir: str,
    *,
    max_seq_len: Optional[int] = None,
    spec: str = "te",
    dtype: Optional[torch.dtype] = None,
    layout: Optional[Mapping[str, Any]] = None,
    buffer_bytes: int = DEFAULT_BUFFER_BYTES,
    file_bytes: int = DEFAULT_FILE_BYTES,
    overwrite: bool = False,
    resume: bool = False,
    iteration: int = 0,
    show: bool = False,
    allowed_unused_hf_params: Optional[Sequence[str]] = None,
) -> Dict[str, Any]:
    """Convert the HF checkpoint ``hf_dir`` into the Megatron checkpoint ``out_dir`` (``out_dir/iter_...``) as a
    stream (collective over the default process group; one process without one).

    Args:
        bridge: the ``AutoBridge`` of the HF checkpoint (its model bridge, HF config and lazy tensors).
        hf_dir: the HF checkpoint (config.json + safetensors).
        max_seq_len: the model's maximum sequence length (for the stored config).
        out_dir: the checkpoint root to write.
        spec: ``"te"`` or ``"local"``: whose keys and ``_extra_state`` objects to write.
        dtype: the stored parameter dtype (default: the HF config's).
        layout: the layout recorded in Megatron-LM's ``args`` (``tp``, ``pp``, ``vpp``, ``ep``, ``etp``; default all
            1): its TP size sets the padded vocabulary (``make_vocab_size_divisible_by * tp``, as Megatron-LM pads);
            the tensors are the same for any layout.
        buffer_bytes: bytes of converted chunks that may wait for the disk (plus the parameter being converted).
        file_bytes: bytes per ``.distcp`` file (the unit a resumed conversion keeps).
        overwrite: replace an existing checkpoint of that iteration once the new one is complete.
        resume: continue a killed conversion of the same source and settings from its completed files.
        iteration: the iteration directory and stored iteration.
        show: progress bar on rank 0.
        allowed_unused_hf_params: globs of HF tensors the model may leave unused (see ``load_hf_weights``).

    Returns:
        ``{"path", "tensors", "bytes", "written_bytes", "kept_files", "convert_s", "total_s", "dtype", "ranks"}``.

    Raises:
        FileExistsError: the checkpoint exists and ``overwrite`` is False.
        ValueError: what a model-path import raises (unmapped or unused tensors, shapes), naming the tensor.
    """
    from megatron_bridge_ext.io.safetensors import CONFIG_NAME
    from megatron_bridge_ext.mcore.checkpoint import checkpoint_common
    from megatron_bridge_ext.mcore.config import default_vocab_divisor
    from megatron_bridge_ext.mcore.model_builder import build_model_chunks, destroy_parallel, init_parallel
    from megatron_bridge_ext.mcore.stream import plan_stream
    from megatron_bridge_ext.mcore.topology import layout_world_size

    start = time.perf_counter()
    layout = {"tp": 1, "pp": 1, "vpp": None, "ep": 1, "etp": None, **dict(layout or {})}
    rank, world = _rank(), _world()
    if not dist.is_initialized():
        raise ValueError("stream_hf_to_megatron: torch.distributed is not initialised (a one-process gloo group "
                         "will do; the CLI sets it up)")
    init_parallel(1, 1)
    try:
        with open(os.path.join(hf_dir, CONFIG_NAME), "r", encoding="utf-8") as f:
            hf_config = json.load(f)
        overrides = {} if dtype is None else {"params_dtype": dtype}
        config = bridge.transformer_config(**overrides)
        vocab = bridge.hf_config.vocab_size
        divisor = config.make_vocab_size_divisible_by or default_vocab_divisor(vocab)
        tp = int(layout["tp"] or 1)
        # the model is built at TP 1 with the rows Megatron-LM pads to at the recorded TP size
        build_config = dataclasses.replace(config, make_vocab_size_divisible_by=divisor * tp)
        with torch.device("meta"):
            chunks = build_model_chunks(build_config, vocab, max_seq_len)
        vpp = layout.get("vpp")
        pp, ep, etp = int(layout["pp"] or 1), int(layout["ep"] or 1), layout.get("etp")
        parallel = {"tp": tp, "pp": pp, "vpp": vpp if vpp and vpp > 1 else None, "ep": ep, "etp": etp or tp,
                    "world": layout_world_size(tp, pp, ep, etp), "chunks": vpp if vpp and vpp > 1 else 1}
        common = checkpoint_common(config, parallel, out_dir, architecture=bridge.hf_config.architectures[0],
                                   hf_config=hf_config, iteration=iteration, spec=spec, side_files=hf_dir)
        plan = plan_stream(chunks, spec=spec, common=common, iteration=iteration)

        final, partial = ckpt_io.begin_partial(out_dir, iteration, overwrite=overwrite, resume=resume)
        settings = {"spec": spec, "dtype": str(config.params_dtype), "layout": parallel, "iteration": iteration,
                    "file_bytes": file_bytes, "world": world}
        journal = _Journal(_journal_path(partial, rank), _fingerprint(hf_dir, settings))
        kept: List[WrittenFile] = []
        problems: List[str] = []
        if resume:
            kept, problems = journal.read(partial)
        # this rank's files that are not kept (an interrupted file, one that changed) go before anything is written
        names = {f.name for f in kept}
        for name in os.listdir(partial):
            if name.startswith(f"__{rank}_") and name.endswith(".distcp") and name not in names:
                os.remove(os.path.join(partial, name))
        if not resume and os.path.exists(journal.path):
            os.remove(journal.path)
        elif resume:  # the journal lists exactly the kept files from now on
            tmp = journal.path + ".tmp"
            if os.path.exists(tmp):
                os.remove(tmp)
            for f in kept:
                _Journal(tmp, journal.fingerprint).add(f)
            if os.path.exists(tmp):
                os.replace(tmp, journal.path)
            elif os.path.exists(journal.path):
                os.remove(journal.path)
        done_items = {_where(r.index) for f in kept for r in f.results}

        model_bridge = bridge.model_bridge
        hf = bridge.hf_pretrained
        model_bridge.use_hf_layout_of(hf.state, hf.config)
        tasks = model_bridge.build_conversion_tasks(hf.state.keys(), chunks)
        by_id = {id(p): k for k, p in plan.params.items()}
        owner = _share(tasks, plan, by_id, world)
        mine_ids = {id(t) for i, t in enumerate(tasks) if owner[i] == rank}

        def remaining(task: Any) -> bool:
            if id(task) not in mine_ids:
                return False
            keys = {by_id.get(id(t)) for t in task.local_tensors} - {None}
            return any(_where(ti.item.index) not in done_items
                       for k in keys for ti in plan.tensor_items.get(k, ()))

        order = [t for t in tasks if remaining(t)]
        position = {id(t): i for i, t in enumerate(order)}

        def next_task(task: Any) -> bool:
            """Whether to convert ``task`` now; if so, first wait until the writer has room for what it makes (one
            run of experts for a layer's experts), the disk already reading what comes after it."""
            if not remaining(task):
                return False
            ahead.at(position[id(task)])
            keys = {by_id.get(id(t)) for t in task.local_tensors} - {None}
            size = sum(plan.param_bytes(k) for k in keys)
            writer.wait_room(min(size, max(1, buffer_bytes // 2)) if task.is_group else size)
            return True

        todo_bytes = sum(plan.param_bytes(k) for i, t in enumerate(tasks) if id(t) in mine_ids and remaining(t)
                         for k in {by_id.get(id(x)) for x in t.local_tensors} - {None})
        bar = _progress(todo_bytes, show)
        on_bytes = None if bar is None else (lambda n: bar[0].advance(bar[1], n))
        first_file = 1 + max([int(f.name.split("_")[-1].split(".")[0]) for f in kept] + [-1])
        writer = StreamingDcpWriter(partial, rank, buffer_bytes=buffer_bytes, file_bytes=file_bytes,
                                    first_file=first_file, on_file=journal.add, on_bytes=on_bytes,
                                    on_written=as_source(hf.state).release_tensor)
        written: Set[Tuple[str, Tuple[int, ...]]] = set()
        converted_bytes = 0
        ahead = _hf_read_ahead(as_source(hf.state), [t.mapping.hf_names for t in order], max(1, buffer_bytes // 2))
        try:
            if rank == 0:
                for item, data in plan.byte_items:
                    where = _where(item.index)
                    if where not in done_items:
                        writer.put(item, data)
            for name, tensor, vp_stage in model_bridge.stream_weights_hf_to_megatron(
                    hf, chunks, conversion_tasks=tasks, allowed_unused_hf_params=allowed_unused_hf_params,
                    select=next_task, max_group_bytes=max(1, buffer_bytes // 2), row_pieces=True):
                key = (int(vp_stage or 0), name)
                target = plan.params.get(key)
                if target is None:
                    raise ValueError(f"stream import: the mappings produced Megatron {name}, which the model does not "
                                     "have")
                if tuple(tensor.shape) != tuple(target.shape):
                    raise ValueError(f"shape mismatch for Megatron parameter {name}: expected "
                                     f"{tuple(target.shape)}, the converted HF tensor(s) give {tuple(tensor.shape)}")
                value = tensor if tensor.dtype == target.dtype else tensor.to(target.dtype)
                for ti in plan.tensor_items.get(key, ()):
                    where = _where(ti.item.index)
                    if where in done_items:
                        continue
                    if isinstance(value, RowPieces):
                        # rows of the HF tensors written as they are (gate / up at TP 1): no concatenation
                        data = value.rows(*ti.rows).reshape(ti.sizes) if ti.rows else ti.cut(value.tensor())
                    else:
                        data = ti.cut(value)
                    writer.put(ti.item, data)
                    written.add(where)
                    converted_bytes += ti.nbytes
                del tensor, value
            files = writer.close()
        except BaseException:
            writer.abort()
            raise
        finally:
            ahead.close()
            if bar is not None:
                bar[0].stop()
        convert_s = time.perf_counter() - start

        # every planned item is written exactly once, by some rank, now or before the resume
        mine = [r for f in kept + files for r in f.results]
        gathered = _all_gather((mine, [(f.name, f.sha256) for f in kept + files], sorted(written)))
        error = None
        if rank == 0:
            results = [r for part in gathered for r in part[0]]
            have = {_where(r.index) for r in results}
            planned = {_where(w.index) for w, _ in plan.byte_items}
            planned |= {_where(ti.item.index)
                        for items in plan.tensor_items.values() for ti in items}
            missing = sorted(planned - have)
            if missing:
                error = (f"stream import: {len(missing)} stored chunk(s) were produced by no mapping: "
                         f"{[m[0] for m in missing[:10]]}{' ...' if len(missing) > 10 else ''}; the checkpoint in "
                         f"{partial} is incomplete and was not moved into place")
            elif len(results) != len(have):
                error = "stream import: a stored chunk was written twice (internal error); not moved into place"
            else:
                write_metadata(partial, plan.metadata, results)
                if plan.common_pt is not None:
                    _save_fsynced(plan.common_pt, os.path.join(partial, "common.pt"))
                from megatron.core.dist_checkpointing.core import CheckpointingConfig, save_config

                save_config(CheckpointingConfig("torch_dist", 1), partial)
        _agree_error(error)
        digests = {name: digest for part in gathered for name, digest in part[1]}
        if rank == 0:
            for j in range(world):
                p = _journal_path(partial, j)
                if os.path.exists(p):
                    os.remove(p)
        if dist.is_initialized():
            dist.barrier()
        path = ckpt_io.complete_partial(partial, out_dir, iteration, side_files=hf_dir, digests=digests,
                                        carried=bridge.model_bridge.carried_hf_params)
        src = hf.state
        return {"path": path, "tensors": len(src), "bytes": src.total_size, "written_bytes": converted_bytes,
                "kept_files": len(kept), "resume_problems": problems, "convert_s": convert_s,
                "total_s": time.perf_counter() - start, "dtype": str(config.params_dtype).replace("torch.", ""),
                "ranks": world}
    finally:
        destroy_parallel()


def _save_fsynced(obj: Any, path: str) -> None:
    with open(path, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
