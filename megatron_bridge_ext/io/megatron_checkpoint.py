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
        hf/                                 the HF checkpoint's side files (tokenizer, generation config, chat
                                            template, config.json) when written by ``import``

The model's tensors are under ``model`` (``model0``, ``model1``, ... with a virtual pipeline), as Megatron-LM's
``generate_state_dict`` names them; there is no optimizer or RNG state, and ``args.no_save_optim`` /
``args.no_save_rng`` say so, so Megatron-LM's ``load_checkpoint`` loads only the weights (and starts its optimizer
fresh). The checkpoint is written to ``iter_0000000.partial`` and renamed when complete; an existing checkpoint is
replaced only with ``overwrite=True`` and only after the new one is complete.

This module knows nothing of models: it writes and reads a sharded state dict that :mod:`megatron_bridge_ext.mcore`
builds from the model chunks. Every function taking a sharded state dict is collective over the default group.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
from dataclasses import dataclass
from typing import Any, Callable, Dict, Mapping, Optional, Tuple

import torch.distributed as dist

__all__ = [
    "TRACKER_NAME",
    "CHECKPOINT_VERSION",
    "BRIDGE_KEY",
    "FORMAT_VERSION",
    "MegatronCheckpointInfo",
    "iteration_dir_name",
    "read_tracker",
    "resolve_checkpoint",
    "read_checkpoint_info",
    "save_distributed_checkpoint",
    "load_distributed_checkpoint",
    "first_error",
    "HF_SIDE_DIR",
    "side_files_dir",
    "tensor_metadata",
]

TRACKER_NAME = "latest_checkpointed_iteration.txt"
CHECKPOINT_VERSION = 3.0
#: the key of this package's own entry in the common state
BRIDGE_KEY = "megatron_bridge_ext"
FORMAT_VERSION = 1
#: what Megatron-LM stores with ``save(..., content_metadata=...)`` when there is no distributed optimizer
CONTENT_METADATA = {"singleton_local_shards": False, "chained_optim_avoid_prefix": True}
_METADATA_JSON = "metadata.json"
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
    """
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"Megatron checkpoint directory {path!r} does not exist")
    if _is_distributed(path) and not os.path.isfile(os.path.join(path, TRACKER_NAME)):
        base = os.path.basename(os.path.normpath(path))
        iteration = int(base[len("iter_"):]) if base.startswith("iter_") and base[5:].isdigit() else 0
        return path, iteration
    iteration, release = read_tracker(path)
    sub = os.path.join(path, "release" if release else iteration_dir_name(iteration))
    if not os.path.isdir(sub):
        raise FileNotFoundError(f"{path}: {TRACKER_NAME} names iteration {iteration}, but {sub} does not exist")
    if not _is_distributed(sub):
        raise FileNotFoundError(f"{sub}: no {_METADATA_JSON}; not a distributed (torch_dist) checkpoint")
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
        args: Megatron-LM's ``args`` namespace (None when absent).
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


def _load_common(path: str) -> Dict[str, Any]:
    from megatron.core import dist_checkpointing

    return dist_checkpointing.load_common_state_dict(path)


def read_checkpoint_info(path: str) -> MegatronCheckpointInfo:
    """Open a Megatron checkpoint (root or iteration directory) and read its common state.

    Raises:
        FileNotFoundError: see :func:`resolve_checkpoint`.
        ValueError: a common state without model weights, or a format version this package does not know.
    """
    sub, iteration = resolve_checkpoint(path)
    common = _load_common(sub)
    bridge = common.get(BRIDGE_KEY) or {}
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


def tensor_metadata(path: str) -> Dict[str, Any]:
    """Global shape and dtype of every tensor in the checkpoint (ShardedTensor keys; no data read)."""
    from megatron.core import dist_checkpointing

    sub, _ = resolve_checkpoint(path)
    return {k: v for k, v in dist_checkpointing.load_tensors_metadata(sub).items()}


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _agree(flag: Optional[str]) -> Optional[str]:
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

    Returns:
        The iteration directory.

    Raises:
        FileExistsError: the iteration directory exists and ``overwrite`` is False (on every rank).
        RuntimeError: ``psutil`` is missing (megatron-core's writer needs it).
    """
    import importlib.util

    from megatron.core import dist_checkpointing

    root = os.fspath(root)
    final = os.path.join(root, iteration_dir_name(iteration))
    partial = final + ".partial"
    error = None
    if _rank() == 0:
        if importlib.util.find_spec("psutil") is None:
            error = ("megatron-core's distributed-checkpoint writer needs psutil (it does not declare it): "
                     "pip install psutil")
        elif os.path.exists(final) and not overwrite:
            error = f"{final} exists; pass overwrite=True (--overwrite) to replace it"
        elif os.path.exists(root) and not os.path.isdir(root):
            error = f"{root} exists and is not a directory"
        else:
            os.makedirs(root, exist_ok=True)
            if os.path.exists(partial):  # an interrupted earlier write of ours: never a complete checkpoint
                shutil.rmtree(partial)
            os.makedirs(partial)  # megatron-core's writer needs the directory to exist
    error = _agree(error)
    if error is not None:
        raise (FileExistsError if "exists" in error else RuntimeError)(error)
    state: Dict[str, Any] = dict(sharded_state_dict)
    state.update({"checkpoint_version": CHECKPOINT_VERSION, "iteration": int(iteration)})
    state.update(dict(common or {}))
    dist_checkpointing.save(state, partial, content_metadata=dict(CONTENT_METADATA))
    if dist.is_initialized():
        dist.barrier()
    if side_files is not None:
        error = None
        if _rank() == 0:
            try:
                _copy_side_files(side_files, os.path.join(partial, HF_SIDE_DIR))
            except OSError as e:  # every rank raises it; the .partial directory is never a complete checkpoint
                error = f"copying the HF side files of {side_files} into {partial}: {e}"
        error = _agree(error)
        if error is not None:
            raise OSError(error)
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


def _copy_side_files(src: str, dst: str) -> None:
    from megatron_bridge_ext.io.hf_checkpoint import copy_side_files

    os.makedirs(dst, exist_ok=True)
    copy_side_files(src, dst)


def side_files_dir(path: str) -> Optional[str]:
    """The directory of the HF side files kept beside a checkpoint's tensors (``iter_.../hf``), or None."""
    sub, _ = resolve_checkpoint(path)
    where = os.path.join(sub, HF_SIDE_DIR)
    return where if os.path.isdir(where) else None


def load_distributed_checkpoint(sharded_state_dict: Dict[str, Any], path: str, *,
                                unrequested_ok: Optional[Callable[[str], bool]] = None) -> Dict[str, Any]:
    """Load a sharded state dict (this rank's slices, resharded from whatever layout the checkpoint was written at)
    from a checkpoint root or iteration directory (collective). Every requested tensor must be in the checkpoint,
    and every key of the checkpoint must be requested by some rank unless ``unrequested_ok(key)`` allows it.

    Returns:
        The loaded state dict (tensors in place of the ShardedTensors), with the common state merged in.

    Raises:
        FileNotFoundError: see :func:`resolve_checkpoint`.
        ValueError: requested tensors missing from the checkpoint, or checkpoint keys nothing requests (named), or
            shapes that disagree.
    """
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.validation import StrictHandling

    sub, _ = resolve_checkpoint(path)
    try:
        # megatron-core's names: "missing" = in the checkpoint but requested by no rank, "unexpected" = requested
        # by this rank but not in the checkpoint (dropped from the request before loading)
        loaded, missing, unexpected = dist_checkpointing.load(sharded_state_dict, sub,
                                                              strict=StrictHandling.RETURN_ALL)
    except Exception as e:  # megatron's CheckpointingException and torch DCP errors: name the checkpoint
        raise ValueError(f"loading the Megatron checkpoint {sub} failed: {e}") from e
    lacking = sorted(unexpected)
    unused = sorted(k for k in missing if not (unrequested_ok and unrequested_ok(k)))
    error = None
    if lacking:
        error = (f"{sub}: the checkpoint lacks {len(lacking)} tensor(s) the model needs: {lacking[:20]}"
                 f"{' ...' if len(lacking) > 20 else ''}")
    elif unused:
        error = (f"{sub}: the checkpoint holds {len(unused)} tensor(s) the model does not have: {unused[:20]}"
                 f"{' ...' if len(unused) > 20 else ''}")
    error = first_error(error)
    if error is not None:
        raise ValueError(error)
    return loaded


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
