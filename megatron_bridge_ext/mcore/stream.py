"""The plan of a streamed Megatron checkpoint: what megatron-core's ``dist_checkpointing.save`` would write for a
model, computed from the model's own ``sharded_state_dict`` on the meta device, without any tensor data.

A ``torch_dist`` checkpoint stores every tensor at its global shape (layers stacked, experts stacked, each rank's
shards as chunks at offsets), so its content does not depend on the layout that wrote it. :func:`plan_stream` takes
the chunks of a model built on the meta device (one process, TP 1), runs megatron-core's own save preprocessing
(factories, the common state, the ``_extra_state`` objects of the requested spec) and the planning of its
``torch_dist`` strategy (``MCoreSavePlanner``: the DCP metadata, the write items), exactly as a save of that model
would, and records, for every tensor write item, the parameter it comes from and how its chunk is cut from it
(through the same sharded-tensor factories the save applies). The data of each item is produced later, parameter by
parameter, by the converter (:mod:`megatron_bridge_ext.engine.stream`); the objects (``_extra_state``, megatron-core
0.19's ``common_state``) are small and serialized here.
"""

from __future__ import annotations

import inspect
import io
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import torch

from megatron_bridge_ext.io import megatron_checkpoint as ckpt_io
from megatron_bridge_ext.io.read_ahead import READ_AHEAD_WINDOW, ReadAhead
from megatron_bridge_ext.mcore.cpu_compat import dist_checkpoint_cpu_patches
from megatron_bridge_ext.mcore.names import as_chunks, unwrap_model
from megatron_bridge_ext.mcore.versions import common_state_in_checkpoint_files

__all__ = ["StreamPlan", "TensorItem", "plan_stream", "CheckpointParams"]


@dataclass
class TensorItem:
    """One tensor write item: a chunk of a parameter's sharded tensor.

    Attributes:
        item: the DCP ``WriteItem`` (its index names the stored key and the chunk's global offsets).
        key: the stored tensor key (a ShardedTensor key of megatron-core).
        cut: the parameter's value -> this chunk's data (a factory's piece, the prepended axes added).
        nbytes: the chunk's size in bytes.
        rows: ``(first row, rows)`` where the chunk is those rows of the parameter's value (a piece of a factory
            whose merge concatenates its pieces' rows, e.g. the SwiGLU ``linear_fc1``'s gate and up), else None.
        sizes: the chunk's shape (the prepended axes included).
    """

    item: Any
    key: str
    cut: Callable[[torch.Tensor], torch.Tensor]
    nbytes: int
    rows: Optional[Tuple[int, int]] = None
    sizes: Tuple[int, ...] = ()


@dataclass
class StreamPlan:
    """What to write: the DCP metadata (storage locations filled in when written), the tensor items of every
    parameter (by ``(chunk index, parameter name)``), the byte items with their serialized data, and the common state
    (``common.pt`` up to megatron-core 0.18; inside the DCP files, as a byte item, from 0.19)."""

    metadata: Any
    tensor_items: Dict[Tuple[int, str], List[TensorItem]] = field(default_factory=dict)
    byte_items: List[Tuple[Any, io.BytesIO]] = field(default_factory=list)
    params: Dict[Tuple[int, str], torch.Tensor] = field(default_factory=dict)
    common_pt: Optional[Dict[str, Any]] = None

    @property
    def tensor_bytes(self) -> int:
        return sum(t.nbytes for items in self.tensor_items.values() for t in items)

    def param_bytes(self, key: Tuple[int, str]) -> int:
        return sum(t.nbytes for t in self.tensor_items.get(key, ()))


def _planner() -> Any:
    """megatron-core's save planner, constructed as its ``torch_dist`` strategy constructs it."""
    from megatron.core.dist_checkpointing.strategies.torch import MCoreSavePlanner
    from torch.distributed.checkpoint import DefaultSavePlanner

    kw: Dict[str, Any] = {"dedup_replicated_tensors": False, "flatten_state_dict": False}
    if "flatten_sharded_tensors" in inspect.signature(DefaultSavePlanner.__init__).parameters:
        kw["flatten_sharded_tensors"] = False
    return MCoreSavePlanner(**kw)


def _shape_cut(sizes: Sequence[int], piece: Callable[[torch.Tensor], torch.Tensor]
               ) -> Callable[[torch.Tensor], torch.Tensor]:
    shape = tuple(int(s) for s in sizes)

    def cut(value: torch.Tensor) -> torch.Tensor:
        return piece(value).reshape(shape)

    return cut


def _factory_piece(factory: Any, where: Tuple[str, Tuple[int, ...]]) -> Callable[[torch.Tensor], torch.Tensor]:
    """The piece of ``factory``'s build (on the real value) whose key and global offset are ``where``."""
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    def piece(value: torch.Tensor) -> torch.Tensor:
        built = factory.build_fn(factory.key, value, factory.replica_id, factory.flattened_range)
        for t in nested_values(built if isinstance(built, (dict, list)) else [built]):
            if isinstance(t, ShardedTensor) and (t.key, tuple(t.global_offset)) == where:
                return t.data
        raise ValueError(f"stream plan: the sharded-tensor factory of {factory.key} built no piece at global offset "
                         f"{where[1]} from the converted value")

    return piece


def plan_stream(chunks: Sequence[torch.nn.Module], *, spec: str, common: Mapping[str, Any],
                iteration: int = 0) -> StreamPlan:
    """The plan of the checkpoint ``save_megatron_checkpoint(chunks, ...)`` would write, for chunks built on the meta
    device in a one-process (or data-parallel only) megatron parallel state.

    Args:
        chunks: the model chunks (parameters on the meta device).
        spec: ``"te"`` or ``"local"`` (see :func:`~megatron_bridge_ext.mcore.checkpoint.sharded_model_state`).
        common: the common entries (``args``, this package's entry), as for ``save_distributed_checkpoint``.
        iteration: the iteration stored in the common state.

    Raises:
        ValueError: a stored tensor that is no parameter of the chunks (named): it could not be produced.
    """
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedObject, ShardedTensor, ShardedTensorFactory
    from megatron.core.dist_checkpointing.state_dict_utils import save_preprocess
    from megatron.core.dist_checkpointing.strategies.torch import (
        _replace_state_dict_keys_with_sharded_keys,
        mcore_to_pyt_state_dict,
    )
    from torch.distributed.checkpoint.planner import WriteItemType

    from megatron_bridge_ext.mcore.checkpoint import sharded_model_state

    dist_checkpoint_cpu_patches()
    chunks = as_chunks(chunks)
    by_id: Dict[int, Tuple[int, str]] = {}
    params: Dict[Tuple[int, str], torch.Tensor] = {}
    for i, chunk in enumerate(chunks):
        for name, p in unwrap_model(chunk).named_parameters():
            by_id[id(p)] = (i, name)
            params[(i, name)] = p
        for name, b in unwrap_model(chunk).named_buffers():
            by_id.setdefault(id(b), (i, name))
            params.setdefault((i, name), b)

    state = sharded_model_state(chunks, spec)
    # the plan is that of a one-process save on every rank (each rank then writes a share of its items): every item
    # is the main replica, as on rank 0 of the data-parallel group
    for item in nested_values(state):
        if isinstance(item, (ShardedTensor, ShardedTensorFactory, ShardedObject)):
            item.replica_id = 0
    # where each stored chunk comes from: (key, global offset) -> (parameter, piece of it)
    sources: Dict[Tuple[str, Tuple[int, ...]], Tuple[Tuple[int, str], Callable[[torch.Tensor], torch.Tensor]]] = {}
    row_ranges: Dict[Tuple[str, Tuple[int, ...]], Tuple[int, int]] = {}
    probes: Dict[Any, Optional[List[int]]] = {}
    for item in nested_values(state):
        if isinstance(item, (ShardedTensor, ShardedTensorFactory)):
            owner = by_id.get(id(item.data))
            if owner is None:
                raise ValueError(f"stream plan: the stored tensor {item.key} is no parameter or buffer of the model "
                                 f"({type(item.data).__name__} of shape {tuple(item.data.shape)}); it cannot be "
                                 "converted from the HF tensors")
            if isinstance(item, ShardedTensor):
                sources[(item.key, tuple(item.global_offset))] = (owner, lambda v: v)
            else:
                built = item.build()
                for t in nested_values(built):
                    if isinstance(t, ShardedTensor):
                        where = (t.key, tuple(t.global_offset))
                        sources[where] = (owner, _factory_piece(item, where))
                # a merge that concatenates the pieces' rows: its build cuts the value into those rows
                stored = SimpleNamespace(tensors={t.key: SimpleNamespace(dtype=t.data.dtype)
                                                  for t in nested_values(built) if isinstance(t, ShardedTensor)})
                for t, start, n in _concatenated_rows(item, built, stored, probes) or ():
                    row_ranges[(t.key, tuple(t.global_offset))] = (start, n)

    full: Dict[str, Any] = dict(state)
    full.update({"checkpoint_version": ckpt_io.CHECKPOINT_VERSION, "iteration": int(iteration)})
    full.update(dict(common))
    full["content_metadata"] = dict(ckpt_io.CONTENT_METADATA)
    sharded, common_sd = save_preprocess(full, validate_access_integrity=False)
    plan = StreamPlan(metadata=None, params=params)
    if common_state_in_checkpoint_files():
        sharded["common_state"] = ShardedObject(key="common_state", data=common_sd, global_shape=(1,),
                                                global_offset=(0,), replica_id=0)
    else:
        plan.common_pt = common_sd
    flat, _, _ = _replace_state_dict_keys_with_sharded_keys(sharded, True)
    pyt = mcore_to_pyt_state_dict(flat, False)

    planner = _planner()
    planner.set_up_planner(pyt, is_coordinator=True)
    local = planner.create_local_plan()
    _, metadata = planner.create_global_plan([local])
    metadata.all_local_plans = [local]
    central = planner.finish_plan(planner.create_decentralized_global_plan(local))
    plan.metadata = metadata

    for w in central.items:
        if w.type == WriteItemType.BYTE_IO:
            data = planner.resolve_data(w)
            plan.byte_items.append((w, data if isinstance(data, io.BytesIO) else io.BytesIO(bytes(data))))
            continue
        fqn, offsets = w.index.fqn, tuple(int(o) for o in w.index.offset)
        source = sources.get((fqn, offsets))
        if source is None:
            raise ValueError(f"stream plan: megatron-core's save plan writes {fqn} at offsets {offsets}, which no "
                             "parameter of the model provides")
        owner, piece = source
        sizes = tuple(int(s) for s in w.tensor_data.chunk.sizes)
        dtype = w.tensor_data.properties.dtype
        nbytes = int(torch.Size(sizes).numel()) * torch.empty((), dtype=dtype).element_size()
        plan.tensor_items.setdefault(owner, []).append(TensorItem(w, fqn, _shape_cut(sizes, piece), nbytes,
                                                                  row_ranges.get((fqn, offsets)), sizes))
    return plan


def _concatenated_rows(factory: Any, pieces: Any, ckpt: Any,
                       probes: Dict[Any, Optional[List[int]]]) -> Optional[List[Tuple[Any, int, int]]]:
    """``[(piece, first row, rows)]`` when the factory's merge puts its pieces (sharded tensors of one stored dtype,
    in ``nested_values`` order) one after the other along the first axis, unchanged (megatron-core's SwiGLU
    ``linear_fc1``: ``[gate; up]``; its split ``in_proj`` sections); else None (the merge runs as megatron-core runs
    it). Checked by running the merge itself on stand-ins filled with each piece's number (expanded scalars), once per
    merge function, closure values and shapes."""
    from megatron.core.dist_checkpointing.dict_utils import dict_list_map_outplace, nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    flat = list(nested_values(pieces))
    if not flat or not all(isinstance(p, ShardedTensor) for p in flat):
        return None
    shapes = [tuple(p.local_shape) for p in flat]
    target = tuple(factory.data.shape)
    if any(len(s) != len(target) or s[1:] != target[1:] for s in shapes) or sum(s[0] for s in shapes) != target[0]:
        return None
    if len({ckpt.tensors[p.key].dtype for p in flat if p.key in ckpt.tensors}) != 1:
        return None
    fn = factory.merge_fn
    code = getattr(fn, "__code__", None)
    if code is None:
        return None
    cells = tuple(c.cell_contents if isinstance(c.cell_contents, (int, float, str, bool, tuple, type(None)))
                  else id(c.cell_contents) for c in (fn.__closure__ or ()))
    key = (code, cells, tuple(shapes), target)
    if key not in probes:
        probes[key] = None
        marks = {id(p): torch.full((), float(i + 1)).expand(p.local_shape) for i, p in enumerate(flat)}
        try:
            merged = fn(dict_list_map_outplace(lambda x: marks[id(x)] if isinstance(x, ShardedTensor) else x,
                                               pieces))
        except Exception:  # noqa: BLE001  (a merge that needs real data: it runs as it is)
            merged = None
        if isinstance(merged, torch.Tensor) and tuple(merged.shape) == target:
            starts, row = [], 0
            for i, s in enumerate(shapes):
                if not bool((merged.narrow(0, row, s[0]) == float(i + 1)).all()):
                    break
                starts.append(row)
                row += s[0]
            else:
                probes[key] = starts
    starts = probes[key]
    if starts is None:
        return None
    return [(p, start, s[0]) for p, start, s in zip(flat, starts, shapes)]


class CheckpointParams:
    """The parameters of meta-device chunks (one process, TP 1) read from an open ``torch_dist`` checkpoint on
    demand: :meth:`load` returns the given parameters' stored values (the slices of the stored tensors megatron-core
    would load into them, through the sharded-tensor factories' merges, cast to the parameters' dtype); the model's
    parameters stay on the meta device. The streamed export hands it to ``save_hf_pretrained(materialize=...)``, which
    reads one bucket at a time.

    Checks, before anything is read: the checkpoint holds every tensor the model needs with the model's global shapes
    (vocabulary rows: the model is built with the stored padding) and floating-point dtypes, and no tensor the model
    does not know (each named).

    Args:
        chunks: meta-device chunks of the checkpoint's model.
        ckpt: the open checkpoint (:class:`~megatron_bridge_ext.io.dcp_reader.TorchDistCheckpoint`).
        described_by: where the chunks' config came from, for messages.
    """

    def __init__(self, chunks: Sequence[torch.nn.Module], ckpt: Any, described_by: str = "the model config") -> None:
        from megatron.core.dist_checkpointing.dict_utils import dict_list_map_outplace, nested_values
        from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory

        from megatron_bridge_ext.mcore.checkpoint import (_check_stored, _not_a_weight, checkpoint_spec,
                                                          sharded_model_state)

        self.ckpt = ckpt
        self.bytes_read = 0
        chunks = as_chunks(chunks)
        spec = checkpoint_spec(chunks, ckpt.path, stored_keys=ckpt.tensors)
        state = sharded_model_state(chunks, spec, extra_state=False)
        items = [t for t in nested_values(state) if isinstance(t, (ShardedTensor, ShardedTensorFactory))]
        # stored key -> item: a factory's pieces under their own keys (megatron-core 0.19's gated delta-net stores
        # in_proj / conv1d per section, its Mamba mixer in_proj.weight as in_proj.weight.z / .x / .B / .C / .dt)
        built = {id(t): t.build() for t in items if isinstance(t, ShardedTensorFactory)}  # each factory's pieces
        requested: Dict[str, Any] = {}
        for t in items:
            pieces = [t] if isinstance(t, ShardedTensor) else [
                v for v in nested_values(built[id(t)]) if isinstance(v, ShardedTensor)]
            requested.update({v.key: v for v in pieces})
        _check_stored(requested, ckpt.tensors, ckpt.path, described_by)
        missing = sorted(set(requested) - set(ckpt.tensors))
        if missing:
            raise ValueError(f"{ckpt.path}: the checkpoint lacks {len(missing)} tensor(s) {described_by} needs: "
                             f"{missing[:20]}{' ...' if len(missing) > 20 else ''}")
        unknown = sorted(k for k in ckpt.tensors if k not in requested and not _not_a_weight(k))
        if unknown:
            raise ValueError(f"{ckpt.path}: the checkpoint holds {len(unknown)} tensor(s) the model of "
                             f"{described_by} does not have: {unknown[:20]}{' ...' if len(unknown) > 20 else ''}")
        self._read: Dict[int, Callable[[], torch.Tensor]] = {}
        self._chunks: Dict[int, List[Any]] = {}  # parameter -> the stored chunks its read covers
        self._position: Dict[int, int] = {}
        self._ahead: Optional[ReadAhead] = None

        def slice_of(t: Any, param: Any) -> Callable[..., torch.Tensor]:
            key, offsets = t.key, tuple(t.global_offset)
            sizes = (1,) * t.prepend_axis_num + tuple(t.local_shape)
            shape = tuple(t.local_shape)
            self._chunks.setdefault(id(param), []).extend(ckpt.tensors[key].overlapping(offsets, sizes))

            def read(out: Optional[torch.Tensor] = None) -> torch.Tensor:
                value = self.ckpt.read_slice(key, offsets, sizes, out=None if out is None else out.view(sizes))
                value = value.view(shape)
                self.bytes_read += value.numel() * value.element_size()
                return value

            return read

        probes: Dict[Any, Optional[List[int]]] = {}
        for t in items:
            if isinstance(t, ShardedTensor):
                self._read[id(t.data)] = slice_of(t, t.data)
                continue
            factory = t
            pieces = built[id(factory)]
            rows = _concatenated_rows(factory, pieces, ckpt, probes)
            if rows is not None:
                # the merge is a concatenation of the pieces' rows: each piece is read straight into its rows
                parts = [(slice_of(p, factory.data), start, n) for p, start, n in rows]
                dtype = ckpt.tensors[rows[0][0].key].dtype
                shape = tuple(factory.data.shape)

                def into_rows(parts: Any = parts, dtype: Any = dtype, shape: Any = shape) -> torch.Tensor:
                    out = torch.empty(shape, dtype=dtype)
                    for read, start, n in parts:
                        read(out.narrow(0, start, n))
                    return out

                self._read[id(factory.data)] = into_rows
                continue

            reads = {id(x): slice_of(x, factory.data) for x in nested_values(pieces) if isinstance(x, ShardedTensor)}

            def merged(factory: Any = factory, pieces: Any = pieces, reads: Any = reads) -> torch.Tensor:
                loaded = dict_list_map_outplace(
                    lambda x: reads[id(x)]() if isinstance(x, ShardedTensor) else x, pieces)
                return factory.merge_fn(loaded)

            self._read[id(factory.data)] = merged

    def expect(self, order: Sequence[torch.Tensor], window: int = READ_AHEAD_WINDOW) -> None:
        """The parameters in the order :meth:`load` will be asked for them: from now on each load first has the
        stored chunks of the next parameters, up to ``window`` bytes, read ahead
        (:class:`~megatron_bridge_ext.io.read_ahead.ReadAhead`). Ends any earlier read-ahead."""
        self.stop_read_ahead()
        self._position = {}
        for i, t in enumerate(order):
            self._position.setdefault(id(t), i)
        units = [[(c, c.length) for c in self._chunks.get(id(t), ())] for t in order]
        self._ahead = ReadAhead(self.ckpt.read_ahead, units, window)

    def stop_read_ahead(self) -> None:
        ahead, self._ahead = self._ahead, None
        if ahead is not None:
            ahead.close()

    def unload(self, tensors: Sequence[torch.Tensor]) -> None:
        """The caller is done with the values :meth:`load` gave for these parameters: where they are views of the
        checkpoint's maps (``map_chunks``), their pages are given back (nothing to do otherwise)."""
        self.ckpt.unmap([c for t in tensors for c in self._chunks.get(id(t), ())])

    def load(self, tensors: Sequence[torch.Tensor]) -> List[torch.Tensor]:
        """The stored values of these parameters, in the parameters' dtypes: fresh tensors, or (a checkpoint opened
        with ``map_chunks``) views of its maps, valid until :meth:`unload`."""
        if self._ahead is not None and tensors:
            pos = self._position.get(id(tensors[0]))
            if pos is not None:
                self._ahead.at(pos)
        out = []
        for t in tensors:
            read = self._read.get(id(t))
            if read is None:
                raise ValueError(f"streamed export: a parameter of shape {tuple(t.shape)} is stored under no key of "
                                 f"{self.ckpt.path}")
            value = read()
            if tuple(value.shape) != tuple(t.shape):
                raise ValueError(f"streamed export: the stored value has shape {tuple(value.shape)}, the parameter "
                                 f"{tuple(t.shape)}")
            out.append(value if value.dtype == t.dtype else value.to(t.dtype))
        return out
