"""A reusable export plan for repeated weight syncs (e.g. RL: the trainer pushes its weights to an inference engine
after every step).

:class:`WeightSyncPlan` is built once from a model: the global order and metadata (one name gather and one metadata
exchange over the world, the only collectives that carry names or metadata), the tasks, the buckets with their
message layout, the conversion context of every task, and the transport's flat buffers (allocated on the first sync,
then reused). Each :meth:`WeightSyncPlan.sync` then only moves bytes: the holders send their part of each bucket, the
destination unpacks it into HF tensors, and each bucket is yielded as a list of ``(hf_name, tensor)`` whose gathered
size stays within the byte budget (a single tensor larger than the budget travels alone).

The plan notices a change of the model's structure by itself: before each sync every rank compares its parameters
(name, shape, dtype, storage) with those the plan was built from, and the ranks agree on the outcome with one
two-integer all-reduce (``check_structure``). New storages (e.g. parameters re-allocated by an optimizer wrapper)
rebuild the tasks locally; new names, shapes or dtypes rebuild the global order with its collectives, on every rank.
"""

from __future__ import annotations

from typing import Any, Iterator, List, Optional, Sequence, Tuple, Union

import torch
import torch.distributed as dist

from megatron_bridge_ext.engine.bridge import DEFAULT_BUCKET_BYTES, MegatronModelBridge
from megatron_bridge_ext.engine.exporting import BucketConverter
from megatron_bridge_ext.engine.peers import Watch, watched
from megatron_bridge_ext.engine.quantize import export_quantization
from megatron_bridge_ext.engine.tasks import build_tasks
from megatron_bridge_ext.engine.transport import BucketPlan, Scratch, Transport, cut_buckets
from megatron_bridge_ext.mcore.names import ModelView, as_chunks
from megatron_bridge_ext.mcore.topology import Topology, comm_device
from megatron_bridge_ext.naming import is_extra_state

__all__ = ["WeightSyncPlan"]

Model = Union[torch.nn.Module, Sequence[torch.nn.Module]]
Bucket = List[Tuple[str, torch.Tensor]]


def _tensors(chunks: Sequence[torch.nn.Module]) -> List[Tuple[str, torch.Tensor]]:
    out = []
    for vp, chunk in enumerate(chunks):
        for name, t in chunk.state_dict(keep_vars=True).items():
            if isinstance(t, torch.Tensor) and not is_extra_state(name):
                out.append((f"{vp}/{name}", t))
    return out


def _fingerprints(chunks: Sequence[torch.nn.Module]) -> Tuple[Any, Any]:
    """(metadata, storage) fingerprints of this rank's parameters: names, shapes, dtypes; and where they live."""
    items = _tensors(chunks)
    meta = tuple((n, tuple(t.shape), t.dtype) for n, t in items)
    storage = tuple((t.data_ptr(), t.device) for _, t in items)
    return meta, storage


class WeightSyncPlan:
    """Export plan of one model, reused across syncs.

    Args:
        bridge: the model family's bridge (``AutoBridge(...).model_bridge``).
        model: this rank's chunk(s); every rank of the world builds the plan (collective the first time).
        bucket_bytes: byte budget of one bucket (gathered Megatron bytes; the HF tensors of a bucket are at most as
            large, the padded vocabulary being trimmed).
        dst: the global rank that receives the tensors, or ``"all"``: every rank receives every bucket.
        hf_config: the HF config (the unpadded vocabulary); default: the one the model's config carries.
        copy: yield fresh tensors (default). With False a tensor that needs no conversion is a view of the parameter or
            of the reused message buffer, and a converted one lives in a scratch buffer reused bucket after bucket
            (sized once, at the largest bucket): every tensor of a bucket is valid until the next bucket is
            requested.
        check_structure: agree over the world before each sync whether any rank's parameters changed (one
            all-reduce of two integers); without it a change on one rank only is not noticed by the others.
        quantization: ``"fp8"``: each 2-D linear weight is yielded in FP8 followed by its ``<name>_scale_inv``
            (float32, per ``quantization_block_size`` block), quantized on the receiving rank where the bucket
            arrived; the other tensors as without it (see :mod:`megatron_bridge_ext.engine.quantize`: the same
            tensors as ``save_hf_pretrained(..., quantization="fp8")`` writes). ``quantization_rule``:
            ``"transformers"`` (default) or ``"deepseek"``.

    Raises:
        ValueError: a bad ``bucket_bytes``, ``dst`` or quantization setting (named).

    Example::

        plan = WeightSyncPlan(bridge.model_bridge, chunks, bucket_bytes=512 << 20, dst="all")
        for step in range(steps):
            train_step()
            for bucket in plan.sync():             # every rank iterates
                engine.load_weights(bucket)       # [(hf_name, tensor), ...]
    """

    def __init__(self, bridge: MegatronModelBridge, model: Model, *, bucket_bytes: int = DEFAULT_BUCKET_BYTES,
                 dst: Union[int, str] = 0, hf_config: Any = None, copy: bool = True,
                 check_structure: bool = True, quantization: Optional[str] = None,
                 quantization_rule: Optional[str] = None,
                 quantization_block_size: Optional[Sequence[int]] = None) -> None:
        self.quantization = export_quantization(quantization, quantization_rule, quantization_block_size,
                                                where="WeightSyncPlan")
        if bucket_bytes <= 0:
            raise ValueError(f"WeightSyncPlan: bucket_bytes must be positive, got {bucket_bytes}")
        self.bridge = bridge
        self.chunks = as_chunks(model)
        self.bucket_bytes = int(bucket_bytes)
        self.everyone = dst == "all"
        self.hf_config = hf_config
        self.copy = copy
        self.check_structure = check_structure
        self.builds = 0  #: how many times the plan was built (1 + rebuilds after structure changes)
        self.global_builds = 0  #: how many of them exchanged names and metadata over the world
        self._transport = Transport()
        self._scratch = Scratch()  # the converted HF tensors of one bucket at a time (copy=False)
        self._dst_arg = dst
        self._build(global_order=True)

    # ---- building ---------------------------------------------------------------------------------------------------

    def _build(self, *, global_order: bool) -> None:
        watch = self.bridge.watch("weight sync plan")
        with watch:
            if global_order:
                watch.barrier("weight sync plan: start")  # every rank is here before the name exchange
            self._build_watched(global_order)

    def _build_watched(self, global_order: bool) -> None:
        topo = Topology.current()
        everyone = self.everyone
        dst = 0 if everyone else int(self._dst_arg)
        if not 0 <= dst < topo.world:
            raise ValueError(f"WeightSyncPlan: dst must be a global rank in [0, {topo.world}) or 'all', got "
                             f"{self._dst_arg!r}")
        self.bridge.use_hf_layout_for_model(self.chunks)  # the table for what the model holds (e.g. MTP layers)
        if global_order:
            self.bridge.global_order.invalidate()  # names and metadata exchanged afresh (collective)
            self.global_builds += 1
        view = ModelView(self.chunks, topo)  # the one walk of the model for this build
        tasks, meta = build_tasks(view, self.bridge.global_order, None, type(self.bridge).__name__)
        plans = [BucketPlan.make(b, meta, topo, dst, everyone) for b in cut_buckets(tasks, meta, self.bucket_bytes)]
        receiving = everyone or topo.rank == dst
        # the one export consumer (as the export's and the save's), holding each bucket until the next one
        converter = BucketConverter(self.bridge, view, self.hf_config, copy=self.copy, hold="bucket",
                                    quantization=self.quantization, scratch=self._scratch,
                                    max_run_bytes=self.bucket_bytes)
        contexts = [[converter.context(task, m) for task, m in plan.layout] if receiving else None
                    for plan in plans]
        self._converter = converter
        self._topo, self._dst, self._plans, self._contexts = topo, dst, plans, contexts
        self._receiving = receiving
        self._fingerprint = _fingerprints(self.chunks)
        self.builds += 1

    def _refresh(self, watch: Watch) -> None:
        """Rebuild when this rank's (or, with ``check_structure``, any rank's) parameters changed."""
        meta, storage = _fingerprints(self.chunks)
        meta_changed = meta != self._fingerprint[0]
        storage_changed = storage != self._fingerprint[1]
        if self.check_structure and self._topo.world > 1:
            watch.set_phase("weight sync: structure check")
            flags = torch.tensor([int(meta_changed), int(storage_changed)], dtype=torch.int64, device=comm_device())
            watch.wait([(dist.all_reduce(flags, op=dist.ReduceOp.MAX, async_op=True), None)], "the structure check")
            meta_changed, storage_changed = bool(flags[0]), bool(flags[1])
        if meta_changed:
            self._build(global_order=True)
        elif storage_changed:
            self._build(global_order=False)  # same names and metadata: the cached global order, no collective

    def rebuild(self) -> None:
        """Rebuild the plan from scratch (collective: every rank calls it)."""
        self._build(global_order=True)

    # ---- syncing ----------------------------------------------------------------------------------------------------

    @property
    def num_buckets(self) -> int:
        return len(self._plans)

    def hf_names(self) -> List[Optional[List[str]]]:
        """Per bucket, the HF names it yields (known on receiving ranks without moving data; None elsewhere). With a
        quantization the scales' names follow their weights' (the HF shapes come from the mappings run on meta
        tensors)."""
        return [self._converter.specs(plan, contexts) if self._receiving else None
                for plan, contexts in zip(self._plans, self._contexts)]

    def sync(self) -> Iterator[Bucket]:
        """One sync: yields each bucket's ``[(hf_name, tensor), ...]`` on the receiving rank(s), nothing elsewhere.

        Every rank must exhaust the iterator (it drives the transfers). A failure on one rank (an error, a closed
        iterator, a dead process) makes every rank's sync fail, naming it (:mod:`megatron_bridge_ext.engine.peers`).
        """
        watch = self.bridge.watch("weight sync")
        yield from watched(watch, self._sync(watch), "weight sync")

    def _sync(self, watch: Watch) -> Iterator[Bucket]:
        self._refresh(watch)
        watch.set_phase("weight sync")
        stream = self._transport.stream(self._plans, self._topo, self._dst, self.everyone, watch=watch)
        with torch.no_grad():
            for index, (plan, views) in enumerate(stream):
                if views is None:
                    continue
                yield list(self._converter.convert(plan, views, self._contexts[index]))

    def release(self) -> None:
        """Free the flat message buffers and the scratch buffer (they are allocated again by the next sync)."""
        self._transport.release()
        self._scratch.release()
