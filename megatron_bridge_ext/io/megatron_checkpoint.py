"""Megatron distributed checkpoints on disk, in Megatron-LM's layout (megatron-core ``dist_checkpointing``,
``torch_dist`` format)::

    OUT/
      latest_checkpointed_iteration.txt     "0": the iteration Megatron-LM's --load reads
      iter_0000000/
        metadata.json                       {"sharded_backend": "torch_dist", ...}: marks a distributed checkpoint
        .metadata, __R_I.distcp             the sharded tensors (torch.distributed.checkpoint files, one per rank
                                            and writer thread), resharded on load to any TP / PP / EP layout
        common.pt                           the common state (rank 0): checkpoint_version 3.0, iteration, args
                                            (Megatron-LM argument names; no_save_optim / no_save_rng set), and
                                            "megatron_bridge_ext": architecture, model config, HF config.json
                                            (megatron-core 0.19 stores it inside the .distcp files instead)
        integrity.json                      SHA-256 of every file above, in megatron-core's verify_integrity format
        hf/                                 the HF checkpoint's side files (tokenizer, generation config, chat
                                            template, config.json) when written by ``import``

The model's tensors are under ``model`` (``model0``, ``model1``, ... with a virtual pipeline), as Megatron-LM's
``generate_state_dict`` names them; there is no optimizer or RNG state, and ``args.no_save_optim`` /
``args.no_save_rng`` say so, so Megatron-LM's ``load_checkpoint`` loads only the weights (and starts its optimizer
fresh). The checkpoint is written to ``iter_0000000.partial`` and renamed when complete; an existing checkpoint is
replaced only with ``overwrite=True`` and only after the new one is complete.

This module knows nothing of models: it writes and reads a sharded state dict that :mod:`megatron_bridge_ext.mcore`
builds from the model chunks. Writing goes through megatron-core's ``dist_checkpointing.save``; every read goes
through :mod:`megatron_bridge_ext.io.dcp_reader`, which runs nothing from the files and checks their structure first
(neither megatron-core's loader nor torch.distributed.checkpoint's reader opens a file of the checkpoint), so a
checkpoint written by either installed megatron-core version reads under the other. Every function taking a sharded
state dict is collective over the default group.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
import torch.distributed as dist

from megatron_bridge_ext.io import checksums
from megatron_bridge_ext.io.dcp_reader import (COMMON_STATE_KEY, CONFIG_NAME, TensorEntry, TorchDistCheckpoint,
                                               read_backend)

__all__ = [
    "TRACKER_NAME",
    "CHECKPOINT_VERSION",
    "BRIDGE_KEY",
    "FORMAT_VERSION",
    "MegatronCheckpointInfo",
    "iteration_dir_name",
    "read_tracker",
    "resolve_checkpoint",
    "open_checkpoint",
    "read_checkpoint_info",
    "save_distributed_checkpoint",
    "begin_partial",
    "complete_partial",
    "load_distributed_checkpoint",
    "first_error",
    "HF_SIDE_DIR",
    "side_files_dir",
    "tensor_metadata",
    "check_checksums",
    "ChecksumCheck",
    "has_checksums",
    "write_checksums",
]

TRACKER_NAME = "latest_checkpointed_iteration.txt"
CHECKPOINT_VERSION = 3.0
#: the key of this package's own entry in the common state
BRIDGE_KEY = "megatron_bridge_ext"
FORMAT_VERSION = 1
#: what Megatron-LM stores with ``save(..., content_metadata=...)`` when there is no distributed optimizer
CONTENT_METADATA = {"singleton_local_shards": False, "chained_optim_avoid_prefix": True}
_METADATA_JSON = CONFIG_NAME
#: the sub-directory of an iteration directory that keeps the HF checkpoint's side files (tokenizer, ...)
HF_SIDE_DIR = "hf"


def iteration_dir_name(iteration: int) -> str:
    """Megatron-LM's directory of an iteration (``iter_0000000``)."""
    if iteration < 0:
        raise ValueError(f"iteration must be >= 0, got {iteration}")
    return f"iter_{iteration:07d}"


def read_tracker(root: str) -> Tuple[int, bool]:
    """``(iteration, release)`` from ``root/latest_checkpointed_iteration.txt``, read as Megatron-LM's
    ``read_metadata`` does (an integer, or ``release``).

    Raises:
        FileNotFoundError: no tracker file (naming the path).
        ValueError: a tracker that is neither an integer >= 0 nor ``release``.
    """
    path = os.path.join(root, TRACKER_NAME)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{root}: no {TRACKER_NAME}; not a Megatron checkpoint directory")
    with open(path, "r", encoding="utf-8") as f:
        text = f.read().strip()
    if text == "release":
        return 0, True
    try:
        iteration = int(text)
    except ValueError:
        raise ValueError(f"{path}: expected an iteration number or 'release', found {text!r}") from None
    if iteration < 0:
        raise ValueError(f"{path}: iteration {iteration} is negative")
    return iteration, False


def _is_distributed(path: str) -> bool:
    return os.path.isfile(os.path.join(path, _METADATA_JSON))


def resolve_checkpoint(path: str) -> Tuple[str, int]:
    """The directory holding the distributed checkpoint, and its iteration, for ``path``: a checkpoint root (its
    tracker names the iteration) or an ``iter_*`` / ``release`` directory itself.

    Raises:
        FileNotFoundError: naming what is missing (the directory, the tracker, the iteration directory, or
            ``metadata.json``: a Megatron checkpoint in another format).
        ValueError: a tracker that is not an iteration number, or a ``metadata.json`` of another backend.
    """
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"Megatron checkpoint directory {path!r} does not exist")
    if _is_distributed(path) and not os.path.isfile(os.path.join(path, TRACKER_NAME)):
        read_backend(path)
        base = os.path.basename(os.path.normpath(path))
        iteration = int(base[len("iter_"):]) if base.startswith("iter_") and base[5:].isdigit() else 0
        return path, iteration
    iteration, release = read_tracker(path)
    sub = os.path.join(path, "release" if release else iteration_dir_name(iteration))
    if not os.path.isdir(sub):
        raise FileNotFoundError(f"{path}: {TRACKER_NAME} names iteration {iteration}, but {sub} does not exist")
    read_backend(sub)  # a torch_dist checkpoint, or an error naming what it is
    return sub, iteration


@dataclass
class MegatronCheckpointInfo:
    """What a checkpoint says about itself (read from its common state; no tensor is read).

    Attributes:
        path: the directory with the distributed checkpoint (``.../iter_0000000``).
        iteration: its iteration.
        checkpoint_version: Megatron-LM's checkpoint version (3.0).
        model_keys: ``["model"]`` or ``["model0", "model1", ...]`` (virtual pipeline).
        architecture: the HF architecture its bridge converts (None for a checkpoint not written by this package).
        model_config: the stored ``GPTConfig`` fields (see ``mcore.config.config_to_dict``), or None.
        parallel: the layout it was written at (tp, pp, vpp, ep, etp, world).
        hf_config: the HF ``config.json`` of the source checkpoint, when one was given.
        args: Megatron-LM's ``args`` namespace (None when absent); megatron-core's own classes in it (its enums,
            e.g. ``attention_backend``) are :class:`~megatron_bridge_ext.io.dcp_reader.StoredObject` records.
    """

    path: str
    iteration: int
    checkpoint_version: Optional[float]
    model_keys: list
    architecture: Optional[str]
    model_config: Optional[Dict[str, Any]]
    parallel: Dict[str, Any]
    hf_config: Optional[Dict[str, Any]]
    args: Optional[argparse.Namespace]


def open_checkpoint(path: str, map_chunks: bool = False) -> TorchDistCheckpoint:
    """The checkpoint at ``path`` (root or iteration directory) opened with the restricted reader: its metadata read
    without running anything and its structure checked (see :mod:`megatron_bridge_ext.io.dcp_reader`);
    ``map_chunks``: whole chunks are read as views of the files' maps (see :class:`TorchDistCheckpoint`).

    Raises:
        FileNotFoundError: see :func:`resolve_checkpoint`.
        ValueError: every structural fault and every refused class (``CheckpointFormatError``), naming the file
            and the key.
    """
    sub, _ = resolve_checkpoint(path)
    return TorchDistCheckpoint(sub, map_chunks=map_chunks)


def read_checkpoint_info(path: str) -> MegatronCheckpointInfo:
    """Open a Megatron checkpoint (root or iteration directory) and read its common state (``common.pt``, or the
    ``common_state`` object megatron-core 0.19 stores in the ``.distcp`` files), checking the structure of the whole
    checkpoint on the way (no tensor is read).

    Raises:
        FileNotFoundError: see :func:`resolve_checkpoint`.
        ValueError: a structural fault or a refused class (named), or a format version this package does not know.
    """
    sub, iteration = resolve_checkpoint(path)
    with TorchDistCheckpoint(sub) as ckpt:
        common = ckpt.common_state()
    bridge = common.get(BRIDGE_KEY) or {}
    if not isinstance(bridge, dict):
        raise ValueError(f"{sub}: the common state's {BRIDGE_KEY!r} entry is a {type(bridge).__name__}, not a dict")
    if bridge and int(bridge.get("format_version", 0)) > FORMAT_VERSION:
        raise ValueError(f"{sub}: written by a newer megatron_bridge_ext (format {bridge.get('format_version')}, "
                         f"this one reads up to {FORMAT_VERSION})")
    model_keys = list(bridge.get("model_keys") or [])
    if not model_keys:  # a checkpoint of Megatron-LM itself: one key per virtual pipeline chunk
        vpp = getattr(common.get("args"), "virtual_pipeline_model_parallel_size", None) or 1
        model_keys = ["model"] if vpp == 1 else [f"model{i}" for i in range(vpp)]
    return MegatronCheckpointInfo(
        path=sub, iteration=int(common.get("iteration", iteration)),
        checkpoint_version=common.get("checkpoint_version"), model_keys=model_keys,
        architecture=bridge.get("architecture"), model_config=bridge.get("model_config"),
        parallel=dict(bridge.get("parallel") or {}), hf_config=bridge.get("hf_config"), args=common.get("args"),
    )


def tensor_metadata(path: str) -> Dict[str, TensorEntry]:
    """Global shape (``.shape``), dtype and stored chunks of every tensor in the checkpoint, by ShardedTensor key
    (no tensor data read)."""
    with open_checkpoint(path) as ckpt:
        return dict(ckpt.tensors)


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _agree(flag: Any) -> Any:
    """Rank 0's value on every rank (an error message decided on rank 0, so that every rank raises it)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return flag
    box = [flag]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _write_text(path: str, text: str) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save_distributed_checkpoint(
    sharded_state_dict: Dict[str, Any],
    root: str,
    *,
    iteration: int = 0,
    common: Optional[Mapping[str, Any]] = None,
    overwrite: bool = False,
    side_files: Optional[str] = None,
    carried: Sequence[str] = (),
) -> str:
    """Write a sharded state dict as ``root/iter_{iteration:07d}`` and point the tracker at it (collective).

    Args:
        sharded_state_dict: ``{"model": ...}`` or ``{"model0": ..., "model1": ...}`` of ShardedTensors (every rank
            its own).
        root: the checkpoint root (created if missing).
        iteration: the iteration number.
        common: further common entries (``args``, this package's metadata), written by rank 0 to ``common.pt``.
        overwrite: replace an existing checkpoint of that iteration (after the new one is complete).
        side_files: an HF checkpoint directory whose files other than weights (tokenizer, generation config, chat
            template, config.json) rank 0 copies into ``iter_.../hf/`` (:data:`HF_SIDE_DIR`) before the iteration
            directory is renamed into place.
        carried: fnmatch patterns of the source tensors kept there too, unchanged (:func:`complete_partial`).

    The checkpoint gets a checksum manifest (``integrity.json``, megatron-core's ``verify_integrity`` format) of every
    file written, hashed by all ranks, before it is renamed into place.

    Returns:
        The iteration directory.

    Raises:
        FileExistsError: the iteration directory exists and ``overwrite`` is False (on every rank).
        RuntimeError: ``psutil`` is missing (megatron-core's writer needs it).
    """
    import importlib.util

    from megatron.core import dist_checkpointing

    need = None
    if importlib.util.find_spec("psutil") is None:
        need = ("megatron-core's distributed-checkpoint writer needs psutil (it does not declare it): "
                "pip install psutil")
    final, partial = begin_partial(root, iteration, overwrite=overwrite, requirement_error=need)
    state: Dict[str, Any] = dict(sharded_state_dict)
    state.update({"checkpoint_version": CHECKPOINT_VERSION, "iteration": int(iteration)})
    state.update(dict(common or {}))
    dist_checkpointing.save(state, partial, content_metadata=dict(CONTENT_METADATA))
    if dist.is_initialized():
        dist.barrier()
    complete_partial(partial, root, iteration, side_files=side_files, carried=carried)
    return final


def begin_partial(root: str, iteration: int, *, overwrite: bool, resume: bool = False,
                  requirement_error: Optional[str] = None) -> Tuple[str, str]:
    """Check that ``root/iter_{iteration}`` may be written and make its staging directory ``....partial``
    (collective: rank 0 decides, every rank raises the same error). An existing staging directory is the rest of an
    interrupted write, never a complete checkpoint: it is removed, or kept with ``resume``.

    Returns:
        ``(final, partial)`` directories.

    Raises:
        FileExistsError: the iteration directory exists and ``overwrite`` is False.
        RuntimeError: ``requirement_error`` (a missing dependency the caller found) or ``root`` is not a directory.
    """
    root = os.fspath(root)
    final = os.path.join(root, iteration_dir_name(iteration))
    partial = final + ".partial"
    error = None
    if _rank() == 0:
        if requirement_error is not None:
            error = requirement_error
        elif os.path.exists(final) and not overwrite:
            error = f"{final} exists; pass overwrite=True (--overwrite) to replace it"
        elif os.path.exists(root) and not os.path.isdir(root):
            error = f"{root} exists and is not a directory"
        else:
            os.makedirs(root, exist_ok=True)
            if os.path.exists(partial) and not resume:  # an interrupted earlier write of ours
                shutil.rmtree(partial)
            os.makedirs(partial, exist_ok=True)  # megatron-core's writer needs the directory to exist
    error = _agree(error)
    if error is not None:
        raise (FileExistsError if "exists" in error else RuntimeError)(error)
    return final, partial


def complete_partial(partial: str, root: str, iteration: int, *, side_files: Optional[str] = None,
                     digests: Optional[Mapping[str, str]] = None, carried: Sequence[str] = ()) -> str:
    """Finish a staged checkpoint (collective): copy the HF side files into ``partial/hf`` (and the source's tensors
    matching the fnmatch patterns ``carried`` into ``partial/hf/carried.safetensors``), write the checksum manifest
    (``digests`` of files already hashed while written are not read again), then move it into place as
    ``root/iter_{iteration}`` (an existing one is replaced only now) and point the tracker at it.

    Returns:
        The iteration directory.
    """
    final = os.path.join(os.fspath(root), iteration_dir_name(iteration))
    if side_files is not None:
        error = None
        if _rank() == 0:
            try:
                _copy_side_files(side_files, os.path.join(partial, HF_SIDE_DIR), carried)
            except OSError as e:  # every rank raises it; the .partial directory is never a complete checkpoint
                error = f"copying the HF side files of {side_files} into {partial}: {e}"
        error = _agree(error)
        if error is not None:
            raise OSError(error)
    write_checksums(partial, known=digests)
    if _rank() == 0:
        old = final + ".old"
        if os.path.exists(final):
            if os.path.exists(old):
                shutil.rmtree(old)
            os.replace(final, old)
        os.replace(partial, final)
        _write_text(os.path.join(root, TRACKER_NAME), f"{iteration}\n")
        if os.path.exists(old):
            shutil.rmtree(old)
    if dist.is_initialized():
        dist.barrier()
    return final


def _hash_share(directory: str, names: List[str], collective: bool = True,
                threads: Optional[int] = None) -> Dict[str, Optional[str]]:
    """Digests of ``names`` in ``directory``, largest first; ``collective``: the files dealt out to the ranks by size,
    and every rank gets them all."""
    world = dist.get_world_size() if collective and dist.is_initialized() else 1
    rank = _rank() if world > 1 else 0
    by_size = sorted(names, key=lambda n: -os.path.getsize(os.path.join(directory, n))
                     if os.path.isfile(os.path.join(directory, n)) else 0)
    threads = threads or max(1, (os.cpu_count() or 1) // world)
    mine = checksums.digests(directory, by_size[rank::world], threads=threads)
    if world == 1:
        return mine
    parts: List[Any] = [None] * world
    dist.all_gather_object(parts, mine)
    return {k: v for part in parts for k, v in part.items()}


def write_checksums(directory: str, known: Optional[Mapping[str, str]] = None) -> str:
    """Write ``directory/integrity.json`` for every file in it (collective: the ranks hash a share each, rank 0
    writes); returns its path. ``known``: digests of files hashed while they were written (not read again)."""
    known = dict(known or {})
    names = checksums.manifest_files(directory) if _rank() == 0 else None
    names = _agree(names)
    digests = _hash_share(directory, [n for n in names if n not in known])
    digests.update({n: d for n, d in known.items() if n in names})
    path = os.path.join(directory, checksums.MANIFEST_NAME)
    error = None
    if _rank() == 0:
        missing = [n for n, d in digests.items() if d is None]
        if missing:
            error = f"{directory}: cannot read {missing} to checksum them"
        else:
            try:
                checksums.write_manifest(directory, digests)  # type: ignore[arg-type]
            except (OSError, ValueError) as e:
                error = f"{directory}: writing {checksums.MANIFEST_NAME} failed: {e}"
    error = _agree(error)  # every rank raises the same error, or none does
    if error is not None:
        raise OSError(error)
    return path


def has_checksums(path: str) -> bool:
    """The checkpoint has a checksum manifest (``integrity.json``)."""
    sub, _ = resolve_checkpoint(path)
    return os.path.isfile(os.path.join(sub, checksums.MANIFEST_NAME))


def check_checksums(path: str, *, required: bool, collective: bool = True,
                    threads: Optional[int] = None) -> Optional[int]:
    """Check a checkpoint's files against its manifest (``collective``: the ranks hash a share each, and all raise
    the same error; else this process hashes every file, ``threads`` files at a time, default a thread per core).
    Returns the number of files checked, or None when there is no manifest and ``required`` is False.

    Raises:
        FileNotFoundError: no manifest and ``required``.
        checksums.IntegrityError: naming each file that changed, is missing, or was added after the manifest.
    """
    sub, _ = resolve_checkpoint(path)
    manifest = checksums.read_manifest(sub)
    if manifest is None:
        if required:
            raise FileNotFoundError(f"{sub}: no {checksums.MANIFEST_NAME}; the checkpoint was written without a "
                                    "checksum manifest, so --checksums cannot check it")
        return None
    problems = checksums.compare(manifest, _hash_share(sub, sorted(manifest), collective, threads),
                                 checksums.present_files(sub, manifest))
    if problems:
        raise checksums.IntegrityError(f"{sub}: {len(problems)} file(s) differ from its {checksums.MANIFEST_NAME}: "
                                       + "; ".join(problems), problems)
    return len(manifest)


class ChecksumCheck:
    """:func:`check_checksums` of one process on a thread of its own (one file at a time), started at once: the
    streamed export reads and converts the checkpoint meanwhile, and asks for the :meth:`result` before it swaps its
    output in. The check's sequential reads bring the files into the page cache, so the conversion's reads of the
    same bytes mostly find them there: each byte is read from the disk once.

    Raises (from :meth:`result`): what :func:`check_checksums` raises.
    """

    def __init__(self, path: str) -> None:
        import threading

        self.path = path
        self.seconds = 0.0
        self._checked: Optional[int] = None
        self._error: Optional[BaseException] = None
        self._thread = threading.Thread(target=self._run, name="checksum-check", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        import time

        start = time.perf_counter()
        try:  # one thread: the conversion has the other cores
            self._checked = check_checksums(self.path, required=False, collective=False, threads=1)
        except BaseException as e:  # noqa: BLE001  (raised by result)
            self._error = e
        finally:
            self.seconds = time.perf_counter() - start

    def result(self) -> Optional[int]:
        """The number of files checked (None: no manifest), once the check is done.

        Raises:
            checksums.IntegrityError: naming each file that changed, is missing, or was added after the manifest.
        """
        self._thread.join()
        if self._error is not None:
            raise self._error
        return self._checked


def _copy_side_files(src: str, dst: str, carried: Sequence[str] = ()) -> None:
    from megatron_bridge_ext.io.hf_checkpoint import copy_side_files, write_carried

    os.makedirs(dst, exist_ok=True)
    copy_side_files(src, dst)
    if carried:
        write_carried(src, dst, carried)


def side_files_dir(path: str) -> Optional[str]:
    """The directory of the HF side files kept beside a checkpoint's tensors (``iter_.../hf``), or None."""
    sub, _ = resolve_checkpoint(path)
    where = os.path.join(sub, HF_SIDE_DIR)
    return where if os.path.isdir(where) else None


def load_distributed_checkpoint(sharded_state_dict: Dict[str, Any], path: Union[str, TorchDistCheckpoint], *,
                                unrequested_ok: Optional[Callable[[str], bool]] = None) -> Dict[str, Any]:
    """Load a sharded state dict (this rank's slices, resharded from whatever layout the checkpoint was written at)
    from a checkpoint root or iteration directory, through the restricted reader (collective only to agree on the
    keys and the error: each rank reads the chunks its slices overlap). Every requested tensor and sharded object
    must be in the checkpoint, and every key of the checkpoint must be requested by some rank unless
    ``unrequested_ok(key)`` allows it (the key without a sharded object's ``/shard_...`` suffix).

    As megatron-core's ``dist_checkpointing.load`` does: factories are applied (and their results merged back),
    non-persistent entries kept, each ShardedTensor filled in place (its ``data``, a view of the parameter) from its
    global slice — for one marked ``allow_shape_mismatch`` (the padded vocabulary rows) from the part the checkpoint
    holds, the rest zero — and each ShardedObject replaced by its stored value; the common state is the base of the
    result.

    Returns:
        The loaded state dict (tensors in place of the ShardedTensors), with the common state merged in.

    Raises:
        FileNotFoundError: see :func:`resolve_checkpoint`.
        ValueError: requested tensors or objects missing from the checkpoint, or checkpoint keys nothing requests
            (named), global shapes that disagree (both named), any structural fault or refused class of the
            checkpoint (file and key named). Every rank raises the same error.
    """
    from megatron.core.dist_checkpointing.dict_utils import dict_list_map_inplace, merge, nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedObject, ShardedTensor, apply_factory_merges
    from megatron.core.dist_checkpointing.state_dict_utils import load_preprocess
    from megatron.core.dist_checkpointing.utils import extract_sharded_base

    with (contextlib.nullcontext(path) if isinstance(path, TorchDistCheckpoint) else open_checkpoint(path)) as ckpt:
        common = ckpt.common_state()
        sharded, nonpersistent, factories = load_preprocess(sharded_state_dict)
        merge(common, nonpersistent)
        sharded, _ = extract_sharded_base(sharded)
        missing: List[str] = []
        requests: List[Any] = []

        def collect(x: Any) -> Any:
            if isinstance(x, ShardedTensor):
                if x.key in ckpt.tensors:
                    requests.append(x)
                else:
                    missing.append(x.key)
            elif isinstance(x, ShardedObject):
                if x.unique_key not in ckpt.objects:
                    missing.append(x.unique_key)
            else:
                raise TypeError(f"{ckpt.path}: cannot load a {type(x).__name__} of the sharded state dict")
            return x

        dict_list_map_inplace(collect, sharded)
        asked = {x.key for x in nested_values(sharded)}
        if dist.is_initialized() and dist.get_world_size() > 1:
            everyone: List[Any] = [None] * dist.get_world_size()
            dist.all_gather_object(everyone, asked)
            asked = set().union(*everyone)
        stored = set(ckpt.tensors) | {o.key for o in ckpt.objects.values()}
        stored.discard(COMMON_STATE_KEY)  # the common state, read above
        unused = sorted(k for k in stored - asked if not (unrequested_ok and unrequested_ok(k)))
        error = None
        if missing:
            names = sorted(set(missing))
            error = (f"{ckpt.path}: the checkpoint lacks {len(names)} tensor(s) or object(s) the model needs: "
                     f"{names[:20]}{' ...' if len(names) > 20 else ''}")
        elif unused:
            error = (f"{ckpt.path}: the checkpoint holds {len(unused)} tensor(s) or object(s) the model does not "
                     f"have: {unused[:20]}{' ...' if len(unused) > 20 else ''}")
        error = first_error(error)
        if error is not None:
            raise ValueError(error)
        objects: Dict[str, Any] = {}
        with torch.no_grad():  # in the order of the bytes on disk: each file read front to back
            for where, sh in sorted(_places(ckpt, requests, sharded, ShardedObject), key=lambda p: p[0]):
                if isinstance(sh, ShardedObject):
                    objects[sh.unique_key] = ckpt.read_object(sh.unique_key)
                else:
                    _fill_sharded_tensor(ckpt, sh)
        dict_list_map_inplace(lambda x: x.data if isinstance(x, ShardedTensor) else objects[x.unique_key],
                              sharded)
    merge(common, sharded)
    return apply_factory_merges(common, factories)


def _places(ckpt: TorchDistCheckpoint, requests: List[Any], sharded: Any, object_type: type) -> List[Any]:
    """``((file, offset), item)`` for each requested ShardedTensor (its first overlapping chunk) and each distinct
    ShardedObject in ``sharded``: the order to read them in."""
    from megatron.core.dist_checkpointing.dict_utils import nested_values

    out = []
    for sh in requests:
        sizes = (1,) * sh.prepend_axis_num + tuple(sh.local_shape)
        chunks = ckpt.tensors[sh.key].overlapping(tuple(sh.global_offset), sizes)
        out.append((min(((c.file, c.offset) for c in chunks), default=("", 0)), sh))
    seen = set()
    for x in nested_values(sharded):
        if isinstance(x, object_type) and x.unique_key not in seen:
            seen.add(x.unique_key)
            entry = ckpt.objects[x.unique_key]
            out.append(((entry.file, entry.offset), x))
    return out


def _fill_sharded_tensor(ckpt: TorchDistCheckpoint, sh: Any) -> torch.Tensor:
    """``sh.data`` filled from its global slice of the checkpoint (megatron-core ShardedTensor semantics: the
    ``prepend_axis_num`` leading axes of ``global_offset`` / ``global_shape`` are the stacked ones, of size 1 here)."""
    entry = ckpt.tensors[sh.key]
    if getattr(sh, "flattened_range", None) is not None:
        raise ValueError(f"{ckpt.path}: {sh.key} is requested as a flattened range (a distributed-optimizer layout); "
                         "this loader reads model weights")
    if sh.data is None:
        sh.init_data("cpu")
    want, stored = tuple(sh.global_shape), entry.shape
    offsets = tuple(int(o) for o in sh.global_offset)
    sizes = (1,) * sh.prepend_axis_num + tuple(sh.data.shape)
    if len(offsets) != len(want) or len(sizes) != len(want):
        raise ValueError(f"{ckpt.path}: {sh.key}: a request at offsets {list(offsets)} for data of shape "
                         f"{list(sh.data.shape)} does not fit the global shape {list(want)}")
    target = sh.data[(None,) * sh.prepend_axis_num] if sh.prepend_axis_num else sh.data
    if want == stored:
        ckpt.read_slice(sh.key, offsets, sizes, out=target)
        return sh.data
    if not sh.allow_shape_mismatch or len(want) != len(stored):
        raise ValueError(f"{ckpt.path}: {sh.key} is stored with global shape {list(stored)}, the model expects "
                         f"{list(want)}")
    # the padded vocabulary rows: what the checkpoint holds of this slice, zeros beyond it
    sh.data.zero_()
    hi = tuple(min(o + n, m) for o, n, m in zip(offsets, sizes, stored))
    if all(h > o for o, h in zip(offsets, hi)):
        part = tuple(h - o for o, h in zip(offsets, hi))
        ckpt.read_slice(sh.key, offsets, part, out=target[tuple(slice(0, n) for n in part)])
    return sh.data


def first_error(error: Optional[str]) -> Optional[str]:
    """The first rank's error on every rank (``unexpected`` keys are per rank: every rank must raise alike)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return error
    errors: list = [None] * dist.get_world_size()
    dist.all_gather_object(errors, error)
    return next((e for e in errors if e is not None), None)


def describe(info: MegatronCheckpointInfo) -> str:
    """One line about a checkpoint, for messages."""
    p = info.parallel
    layout = ", ".join(f"{k}={v}" for k, v in p.items() if v not in (None, 1) or k in ("tp", "pp"))
    return (f"{info.path} (iteration {info.iteration}, {info.architecture or 'unknown architecture'}"
            f"{', written at ' + layout if layout else ''})")


def json_safe(obj: Any) -> Any:
    """``obj`` with tuples as lists and anything else JSON cannot hold as its string (for config dicts)."""
    return json.loads(json.dumps(obj, default=str))
