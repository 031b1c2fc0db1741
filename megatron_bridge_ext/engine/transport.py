"""The export transport: tasks in the global order, cut into buckets, moved as one flat message per holder.

A bucket holds consecutive tasks with the same shard holders and at most ``bucket_bytes`` of gathered data. Each
holder sends its part of a bucket (holder 0: the replicated tensors, then its shards; the others: their shards) as
one message straight to the destination rank: no all-gather, no hop, no broadcast to every stage. The destination
receives the next bucket while the current one is handed out (two message buffers, sized once for the largest bucket),
and the buffers are reused across buckets and exports (repeated weight syncs touch them once); its own part is not
copied into the message but handed out as its parameters. With ``everyone`` each bucket is then broadcast from the
destination to every rank. The transport knows nothing of HF names: it hands out, per task, the list of its shards
(views into the message, or the parameter itself on the direct path).

Every message is posted as async work and waited for through a :class:`~megatron_bridge_ext.engine.peers.Watch`:
in short slices, watching the store for a peer's error record, so that no rank stays blocked in a send or a receive
when another rank has failed, died or frozen (see :mod:`megatron_bridge_ext.engine.peers`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist

from megatron_bridge_ext.engine.peers import Watch
from megatron_bridge_ext.engine.tasks import ParamMeta, WeightConversionTask
from megatron_bridge_ext.mcore.topology import Topology, comm_device

__all__ = ["BucketPlan", "ExpertsToLoad", "Transport", "cut_buckets", "shard_storages"]


@dataclass
class BucketPlan:
    """One bucket: its tasks and metadata, their shard holders and where each holder's part sits in the message."""

    layout: List[Tuple[WeightConversionTask, ParamMeta]]
    senders: Tuple[int, ...]
    local_total: int  # bytes of one holder's shards
    repl_total: int  # bytes of the replicated tensors (sent by holder 0)
    mine: bool  # this rank is a holder
    direct: bool  # the destination holds the whole bucket alone, as plain parameters: no message

    @property
    def msg_bytes(self) -> int:
        return self.repl_total + self.local_total * len(self.senders)

    def part_range(self, index: int) -> Tuple[int, int]:
        """Byte range of holder ``index``'s part in the message."""
        lo = 0 if index == 0 else self.repl_total + index * self.local_total
        return lo, self.repl_total + (index + 1) * self.local_total

    @classmethod
    def make(cls, bucket: Sequence[WeightConversionTask], meta: Dict[str, ParamMeta], topo: Topology, dst: int,
             everyone: bool) -> "BucketPlan":
        layout = [(t, meta[t.global_param_name]) for t in bucket]
        senders = layout[0][1].senders  # every task of a bucket has the same shard holders
        mine = topo.rank in senders
        return cls(
            layout=layout, senders=senders, mine=mine,
            local_total=sum(m.shard_bytes for _, m in layout if m.sharded),
            repl_total=sum(m.shard_bytes for _, m in layout if not m.sharded),
            direct=(mine and len(senders) == 1 and senders[0] == dst == topo.rank and not everyone
                    and not any(t.is_group for t, _ in layout)),
        )


def cut_buckets(tasks: Iterable[WeightConversionTask], meta: Dict[str, ParamMeta],
                budget: int) -> List[List[WeightConversionTask]]:
    """Consecutive tasks with the same shard holders whose gathered bytes stay within ``budget``."""
    buckets: List[List[WeightConversionTask]] = []
    current: List[WeightConversionTask] = []
    used = 0
    for task in tasks:
        m = meta[task.global_param_name]
        size = m.gathered_bytes
        if current and (meta[current[0].global_param_name].senders != m.senders or used + size > budget):
            buckets.append(current)
            current, used = [], 0
        current.append(task)
        used += size
    if current:
        buckets.append(current)
    return buckets


def _byte_view(t: torch.Tensor) -> torch.Tensor:
    return t.detach().contiguous().view(-1).view(torch.uint8)


def _pack_part(out: torch.Tensor, plan: BucketPlan, index: int) -> torch.Tensor:
    """Holder ``index``'s part of a bucket's message into ``out``: (holder 0 only) the replicated tensors, then its
    shards (a group's shard: its local experts one after the other)."""
    at = 0
    for want_sharded in ((False, True) if index == 0 else (True,)):
        for task, m in plan.layout:
            if m.sharded != want_sharded:
                continue
            for tensor in task.local_tensors:
                n = tensor.numel() * tensor.element_size()
                out[at:at + n].copy_(_byte_view(tensor))
                at += n
    return out


def _own_views_ok(plan: BucketPlan) -> bool:
    """Whether the destination's own part of a bucket can be handed out as its parameters themselves (plain tensors,
    contiguous, in the dtype the message would carry) instead of being copied into the message."""
    return all(type(t).__name__ != "DTensor" and t.is_contiguous() and t.dtype == m.dtype
               for task, m in plan.layout for t in task.local_tensors)


def _own_shard(task: WeightConversionTask, m: ParamMeta):
    """The destination's own shard of a task: its parameter (a list of its local experts for a layer's experts)."""
    tensors = [t.detach() for t in task.local_tensors]
    return tensors if task.is_group else tensors[0].view(m.shape)


def _split_message(msg: torch.Tensor, plan: BucketPlan, own: Optional[int] = None) -> List[list]:
    """Per task, the list of per-shard tensors: views into the message, except holder ``own``'s (the destination's
    own part, not copied into the message), which are its parameters."""
    out = []
    at_sharded, at_repl = 0, 0
    holders, local_total = len(plan.senders), plan.local_total
    for task, m in plan.layout:
        n = m.shard_bytes
        if m.sharded:
            base = plan.repl_total + at_sharded
            out.append([_own_shard(task, m) if r == own else
                        msg[base + r * local_total: base + r * local_total + n].view(m.dtype).view(m.shape)
                        for r in range(holders)])
            at_sharded += n
        else:
            out.append([_own_shard(task, m) if own == 0 else msg[at_repl: at_repl + n].view(m.dtype).view(m.shape)])
            at_repl += n
    return out


def shard_storages(shards: Sequence) -> set:
    """Data pointers of the storages behind a task's shards (a shard may be a list of local expert tensors)."""
    flat = [t for s in shards for t in (s if isinstance(s, (list, tuple)) else (s,))]
    return {t.untyped_storage().data_ptr() for t in flat}


class Scratch:
    """Reused memory for the HF tensors of one task at a time (an export whose consumer uses each tensor at once).

    :meth:`alloc` hands out views of one buffer; :meth:`reset` (before the next task) makes them free again. A task
    that needs more than the buffer holds gets extra tensors for that task, and the buffer grows to that task's size
    at the next reset, so over an export it is touched once, at the size of the largest task.
    """

    _ALIGN = 64

    def __init__(self) -> None:
        self._buf: Optional[torch.Tensor] = None
        self._used = 0
        self._need = 0
        self._extra: List[torch.Tensor] = []

    def reset(self) -> None:
        if self._extra:
            self._extra.clear()
            device = self._buf.device if self._buf is not None else torch.device("cpu")
            self._buf = torch.empty(self._need, dtype=torch.uint8, device=device)
        self._used = 0
        self._need = 0

    def alloc(self, shape: Tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        nbytes = int(torch.Size(shape).numel()) * dtype.itemsize
        start = -(-self._used // self._ALIGN) * self._ALIGN
        self._need = start + nbytes
        if self._buf is not None and self._buf.device != torch.device(device):
            self._buf = None
        if self._buf is None or start + nbytes > self._buf.numel():
            extra = torch.empty(shape, dtype=dtype, device=device)
            self._extra.append(extra)
            self._used = self._need
            return extra
        self._used = start + nbytes
        return self._buf[start:start + nbytes].view(dtype).view(shape)

    def release(self) -> None:
        self._buf = None
        self._extra.clear()
        self._used = self._need = 0


class ExpertsToLoad:
    """A layer's expert parameters not read yet (a one-rank export of a model on the meta device): the consumer reads
    ``load(lo, hi)`` for experts ``[lo, hi)`` a run at a time, so that memory holds one run, not the layer."""

    def __init__(self, materialize: Any, tensors: Sequence[torch.Tensor]) -> None:
        self.materialize, self.tensors = materialize, list(tensors)
        self._loaded: Sequence[torch.Tensor] = ()

    def __len__(self) -> int:  # one holder: the one rank
        return 1

    def load(self, lo: int = 0, hi: Optional[int] = None) -> List[torch.Tensor]:
        """Experts ``[lo, hi)``; the run read before is done with (its pages, if mapped, are given back)."""
        self.unload()
        self._loaded = self.tensors[lo:hi]
        return self.materialize.load(self._loaded)

    def unload(self) -> None:
        loaded, self._loaded = self._loaded, ()
        if loaded and hasattr(self.materialize, "unload"):
            self.materialize.unload(loaded)

    def runs(self, max_bytes: int) -> List[Tuple[int, int]]:
        """Consecutive ``[lo, hi)`` of whole experts of at most ``max_bytes`` each (at least one expert)."""
        out, lo, size = [], 0, 0
        for i, t in enumerate(self.tensors):
            n = t.numel() * t.element_size()
            if i > lo and size + n > max_bytes:
                out.append((lo, i))
                lo, size = i, 0
            size += n
        if lo < len(self.tensors):
            out.append((lo, len(self.tensors)))
        return out


class Transport:
    """Moves buckets of parameters to a destination rank (or to every rank), reusing its flat buffers."""

    def __init__(self) -> None:
        self._buffers: Dict[str, torch.Tensor] = {}

    def release(self) -> None:
        """Free the flat buffers kept between exports (at most two messages and one send buffer)."""
        self._buffers.clear()

    def _buffer(self, kind: str, nbytes: int, device: torch.device) -> torch.Tensor:
        buf = self._buffers.get(kind)
        if buf is None or buf.numel() < nbytes or buf.device != device:
            self._buffers.pop(kind, None)
            buf = torch.empty(max(nbytes, 1), dtype=torch.uint8, device=device)
            self._buffers[kind] = buf
        return buf[:nbytes]

    def stream(
        self,
        plans: Sequence[BucketPlan],
        topo: Topology,
        dst: int,
        everyone: bool,
        watch: Optional[Watch] = None,
        materialize: Any = None,
    ) -> Iterator[Tuple[BucketPlan, Optional[List[List[torch.Tensor]]]]]:
        """Drive every bucket's transfer; yields ``(plan, shards per task)`` per bucket, with None for the shards on
        ranks that do not receive.

        Every rank must exhaust the iterator (it drives the point-to-point messages and broadcasts). The shard views
        are valid until the next item is requested. Waits go through ``watch`` (a peer's failure, death or freeze
        ends them with a :class:`~megatron_bridge_ext.engine.peers.PeerFailure`); after a failure the buffers are
        released (a receive may still be pending into them).

        ``materialize`` (optional; one-rank exports of a model whose parameters live on the meta device) has
        ``load(parameters) -> values``: each bucket's values are read just before it is handed out, in place of the
        parameters, and dropped once the consumer asks for the next bucket; a layer's experts come as an
        :class:`ExpertsToLoad`, which the consumer reads a run of experts at a time. If it also has
        ``expect(parameters)`` / ``stop_read_ahead()``, it is told the order of the loads first (to read ahead of
        them) and stopped at the end.
        """
        watch = watch if watch is not None else Watch("export")
        expect = getattr(materialize, "expect", None)
        if expect is not None:  # the order of the loads: the source reads ahead of them
            expect([t for plan in plans for task, _ in plan.layout for t in task.local_tensors])
        try:
            yield from self._stream(plans, topo, dst, everyone, watch, materialize)
        except BaseException:
            self.release()
            raise
        finally:
            if expect is not None:
                materialize.stop_read_ahead()

    def _stream(self, plans, topo, dst, everyone, watch, materialize=None):
        device = comm_device()  # NCCL moves CUDA buffers, gloo CPU ones
        # bucket index -> (message, [(receive request, source rank)])
        pending: Dict[int, Tuple[torch.Tensor, List[Tuple[object, int]]]] = {}
        receiving = everyone or topo.rank == dst
        n = len(plans)

        def post_receive(i: int) -> Tuple[torch.Tensor, List[Tuple[object, int]], Optional[int]]:
            """On the destination: post one receive per other holder (double-buffered); its own part is handed out
            as its parameters (copied into the message only when the message is broadcast on, or a parameter is not
            contiguous in the message's dtype). Returns the message, the receives and the index of the own part
            left out of the message (or None)."""
            plan = plans[i]
            msg = self._buffer(f"msg{i % 2}", plan.msg_bytes, device)
            requests = []
            own = None
            for t, src in enumerate(plan.senders):
                lo, hi = plan.part_range(t)
                if src == topo.rank:
                    if not everyone and _own_views_ok(plan):
                        own = t
                    else:
                        _pack_part(msg[lo:hi], plan, t)
                elif hi > lo:
                    part = msg[lo:hi]
                    requests.append((watch.post(lambda: dist.irecv(part, src=src), src,
                                                f"posting the receive of bucket {i + 1} of {n}"), src))
            return msg, requests, own

        # both message buffers at the size of the largest bucket up front: a buffer that grew bucket by bucket would
        # be allocated (and its fresh pages touched) again at each growth
        sizes = [p.msg_bytes for p in plans if not p.direct]
        if receiving and sizes:
            for k in range(min(2, len(sizes))):
                self._buffer(f"msg{k}", max(sizes), device)

        for i, plan in enumerate(plans):
            watch.set_phase(f"{watch.name}: bucket {i + 1} of {n}")
            watch.check()
            if materialize is not None:  # one rank, parameters on the meta device: read this bucket's values now
                if topo.world != 1:
                    raise ValueError("Transport.stream: parameters loaded bucket by bucket need a one-rank export")
                views = []
                for task, m in plan.layout:
                    if task.is_group:  # a layer's experts: read by the consumer, in runs (ExpertsToLoad)
                        views.append(ExpertsToLoad(materialize, task.local_tensors))
                        continue
                    views.append([materialize.load(task.local_tensors)[0].view(m.shape)])
                yield plan, views
                views.clear()  # the consumer's reference too: nothing of this bucket is held while the next is read
                if hasattr(materialize, "unload"):  # the bucket's values, if views of maps: their pages go back
                    materialize.unload([t for task, _ in plan.layout for t in task.local_tensors])
                continue
            if plan.direct:  # the destination owns the whole bucket: hand out the parameters themselves
                yield plan, [[task.param_weight.detach()] for task, _ in plan.layout]
                continue
            msg, own = None, None
            if plan.mine and topo.rank != dst:
                t = plan.senders.index(topo.rank)
                lo, hi = plan.part_range(t)
                if hi > lo:
                    part = _pack_part(self._buffer("send", hi - lo, device), plan, t)
                    what = f"sending {hi - lo} bytes of bucket {i + 1} of {n} to rank {dst}"
                    watch.wait([(watch.post(lambda: dist.isend(part, dst=dst), dst, what), dst)], what)
            if topo.rank == dst:
                msg, requests, own = pending.pop(i) if i in pending else post_receive(i)
                watch.wait(requests, f"receiving bucket {i + 1} of {n} from rank(s) "
                                     f"{sorted({src for _, src in requests})}")
                # receive the next bucket while this one is handed out
                if not everyone and i + 1 < len(plans) and not plans[i + 1].direct:
                    pending[i + 1] = post_receive(i + 1)
            if everyone and topo.world > 1:
                if msg is None:
                    msg = self._buffer("msg0", plan.msg_bytes, device)
                what = f"broadcast of bucket {i + 1} of {n} from rank {dst}"
                peer = None if topo.rank == dst else dst
                work = watch.post(lambda: dist.broadcast(msg, src=dst, async_op=True), peer, what)
                watch.wait([(work, peer)], what)
            yield plan, _split_message(msg, plan, own) if receiving else None
