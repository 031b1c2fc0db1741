"""The export loop (Megatron -> HF), mixed into :class:`~megatron_bridge_ext.engine.bridge.MegatronModelBridge`, and
the one consumer of exported buckets (:class:`BucketConverter`), which the export, the HF save and the weight sync
(:class:`~megatron_bridge_ext.engine.sync.WeightSyncPlan`) all use.

The tasks are cut into buckets and moved to the destination by the transport (:mod:`.transport`); the destination
turns each task's shards into HF tensors in one pass (:meth:`BucketConverter.convert`): the family's post-processing
hook, the source's dtypes restored, an optional block quantization, errors naming both sides.
"""

from __future__ import annotations

import logging
from typing import Any, Dict, Iterator, List, NamedTuple, Optional, Sequence, Tuple, Union

import torch

from megatron_bridge_ext.engine.checks import conversion_error, dtype_class, short_names
from megatron_bridge_ext.engine.peers import Watch, watched
from megatron_bridge_ext.engine.progress import progress
from megatron_bridge_ext.engine.quantize import FP8Export
from megatron_bridge_ext.engine.tasks import ParamMeta, WeightConversionTask
from megatron_bridge_ext.engine.transport import BucketPlan, ExpertsToLoad, Scratch, cut_buckets, shard_storages
from megatron_bridge_ext.io.protocols import TensorSource, as_source
from megatron_bridge_ext.mappings import ConversionContext
from megatron_bridge_ext.mcore.names import ModelView, as_chunks
from megatron_bridge_ext.mcore.topology import Topology

__all__ = ["ExportLoop", "BucketConverter", "HFWeightTuple", "DEFAULT_BUCKET_BYTES", "hf_specs_of"]

DEFAULT_BUCKET_BYTES = 256 * 1024 * 1024
Model = Union[torch.nn.Module, Sequence[torch.nn.Module]]
HFItem = Tuple[str, torch.Tensor]
logger = logging.getLogger(__name__)


class HFWeightTuple(NamedTuple):
    """An HF tensor produced by export."""

    param_name: str
    weight: torch.Tensor


def hf_specs_of(task: WeightConversionTask, meta: ParamMeta, ctx: ConversionContext) -> Dict[str, Any]:
    """HF name -> (shape, dtype) of what a task exports, from the Megatron metadata alone (the mapping's shape
    contract; the mappings keep the dtype), in the order it yields them."""
    shapes = task.mapping.hf_shapes(tuple(meta.shape), len(meta.senders) if meta.sharded else 1, ctx)
    return {name: (tuple(shape), meta.dtype) for name, shape in shapes.items()}


class BucketConverter:
    """Turns the shards of a bucket's tasks (as the transport delivers them) into HF tensors: the one export
    consumer.

    Args:
        bridge: the family's bridge (contexts, the post-processing hook).
        view: this rank's model, seen once (its topology is the one the buckets were planned for).
        hf_config: the HF config (vocabulary size), or None.
        state: the HF source whose dtypes are restored, or None.
        copy: every tensor is a fresh tensor. False: a tensor that needs no conversion may be a view of the
            parameter or of the message buffer, and converted tensors go to ``scratch`` (reused memory).
        hold: with ``copy=False``, how long a tensor stays valid: ``"item"`` until the next one is requested (a
            writer), ``"bucket"`` until the next bucket (the weight sync yields whole buckets).
        cpu: move the HF tensors to the CPU.
        quantization: an FP8 export (each linear weight followed by its scale).
        max_run_bytes: a layer's experts still to be read (the streamed export) are read in runs of at most that
            many bytes.
    """

    def __init__(self, bridge: Any, view: ModelView, hf_config: Any = None,
                 state: Optional[TensorSource] = None, *, copy: bool = True, hold: str = "item", cpu: bool = False,
                 quantization: Optional[FP8Export] = None, scratch: Optional[Scratch] = None,
                 max_run_bytes: int = DEFAULT_BUCKET_BYTES) -> None:
        if hold not in ("item", "bucket"):
            raise ValueError(f"hold must be 'item' or 'bucket', got {hold!r}")
        self.bridge, self.view, self.hf_config = bridge, view, hf_config
        self.state = state
        self.copy, self.hold, self.cpu = copy, hold, cpu
        self.quantization = quantization
        self.scratch = scratch if scratch is not None else Scratch()
        self.max_run_bytes = max_run_bytes

    def context(self, task: WeightConversionTask, meta: ParamMeta, num_shards: Optional[int] = None
                ) -> ConversionContext:
        """The context of unpacking a task's gathered shards (in the converter's memory when ``copy`` is off)."""
        shards = num_shards if num_shards is not None else (len(meta.senders) if meta.sharded else 1)
        ctx = self.bridge._export_context(task, meta, shards, self.view, self.hf_config)
        if not self.copy:
            ctx.alloc = self.scratch.alloc
        return ctx

    def specs(self, plan: BucketPlan, contexts: Optional[Sequence[ConversionContext]] = None) -> List[str]:
        """The HF names a bucket yields, in order, without moving data (scales after their weights)."""
        names: List[str] = []
        for i, (task, m) in enumerate(plan.layout):
            if self.quantization is None:
                names.extend(task.mapping.hf_names)
            else:
                ctx = contexts[i] if contexts is not None else self.context(task, m)
                names.extend(self.quantization.expand_specs(hf_specs_of(task, m, ctx)))
        return names

    def convert(self, plan: BucketPlan, views: Sequence[Any],
                contexts: Optional[Sequence[ConversionContext]] = None) -> Iterator[HFItem]:
        """``(hf_name, tensor)`` of every task of one bucket, in the global order.

        Raises:
            The error of a mapping, an op, a dtype restore or a quantization, with the Megatron name and the HF
            names in front.
        """
        if not self.copy and self.hold == "bucket":
            self.scratch.reset()  # the previous bucket's tensors are no longer in use
        for i, ((task, m), shards) in enumerate(zip(plan.layout, views)):
            ctx = contexts[i] if contexts is not None else self.context(task, m, len(shards))
            for mapping, run in _export_runs(task, shards, ctx, self.max_run_bytes):
                if not self.copy and self.hold == "item":
                    self.scratch.reset()  # the consumer used the previous tensors at once
                try:
                    converted = self.bridge.maybe_modify_converted_hf_weight(task, mapping.megatron_to_hf(run, ctx))
                    items = [(name, _to_hf_dtype(name, t, self.state)) for name, t in converted.items()]
                    if self.quantization is not None:
                        items = [q for name, t in items for q in self.quantization.convert(name, t, ctx.alloc)]
                except Exception as e:
                    raise conversion_error(e, f"export of Megatron {task.global_param_name} -> HF "
                                              f"{short_names(task.mapping.hf_names)} ({type(task.mapping).__name__})"
                                           ) from e
                storages = shard_storages(run) if self.copy else ()
                for name, tensor in items:
                    if self.cpu and tensor.device.type != "cpu":
                        tensor = tensor.cpu()
                    if self.copy and tensor.untyped_storage().data_ptr() in storages:
                        tensor = tensor.clone()
                    yield name, tensor
                del converted, items, run


class ExportLoop:
    """Megatron -> HF: :meth:`stream_weights_megatron_to_hf` and :meth:`hf_tensor_specs`."""

    def hf_tensor_specs(self, megatron_model: Model, hf_config: Any = None,
                        conversion_tasks: Optional[List[WeightConversionTask]] = None) -> Dict[str, Any]:
        """HF name -> (shape, dtype) of every tensor export yields, in the order it yields them, computed from the
        Megatron side alone (the mappings run on meta tensors): no HF checkpoint is needed. A tied output layer is
        listed when the tasks were built with the source's copy of it (``build_conversion_tasks(...,
        stored_keys=)``). Collective the first time for a model structure (global order).
        """
        chunks = as_chunks(megatron_model)
        tasks = self._reuse_tasks(conversion_tasks, chunks)
        converter = BucketConverter(self, tasks.view, hf_config)
        specs: Dict[str, Any] = {}
        for task in tasks:
            m = tasks.meta[task.global_param_name]
            specs.update(hf_specs_of(task, m, converter.context(task, m)))
        return specs

    def stream_weights_megatron_to_hf(
        self,
        megatron_model: Model,
        hf_pretrained: Any = None,
        *,
        bucket_bytes: int = DEFAULT_BUCKET_BYTES,
        dst: Union[int, str] = 0,
        show_progress: Optional[bool] = None,
        hf_config: Any = None,
        conversion_tasks: Optional[List[WeightConversionTask]] = None,
        copy: bool = True,
        cpu: bool = True,
        materialize: Any = None,
        quantization: Optional[FP8Export] = None,
    ) -> Iterator[HFWeightTuple]:
        """Stream the model as HF tensors, in the global order.

        Every rank must iterate the generator (it drives the collectives); tensors are yielded on ``dst`` (a global
        rank, default 0) or on every rank when ``dst == "all"``.

        Args:
            megatron_model: this rank's chunk(s).
            hf_pretrained: the HF source (``.config``, ``.state``): its dtypes are restored and its optional keys
                (a tied ``lm_head.weight``) reproduced. May be None when ``hf_config`` is given.
            bucket_bytes: byte budget of one flat message.
            dst: destination global rank, or ``"all"``.
            show_progress: rich progress on rank 0.
            conversion_tasks: pre-built tasks (from :meth:`build_conversion_tasks`, used when they were built for
                this source's layout and copies).
            copy: every yielded tensor is a fresh tensor (default). With False, a tensor that needs no conversion is
                yielded as a view of the parameter or of the reused message buffer, valid only until the next item is
                requested: for consumers that use each tensor at once (e.g. a writer), saving an allocation and a copy.
            cpu: move the HF tensors to the CPU (when the model lives on a GPU); False keeps them on the device.
            materialize: for a one-rank model whose parameters are on the meta device, what loads each bucket's
                parameters just before it is converted and releases them after (see ``Transport.stream``).
            quantization: write the linear weights block-quantized (from
                :func:`megatron_bridge_ext.engine.quantize.export_quantization`): each is yielded in FP8 followed by
                its ``weight_scale_inv``, quantized where the HF tensor was made (before the move to the CPU).
        """
        watch = self.watch("export")
        yield from watched(watch, self._stream_to_hf(watch, megatron_model, hf_pretrained, bucket_bytes, dst,
                                                     show_progress, hf_config, conversion_tasks, copy, cpu,
                                                     materialize, quantization), "export")

    def _stream_to_hf(self, watch: Watch, megatron_model, hf_pretrained, bucket_bytes, dst, show_progress, hf_config,
                      conversion_tasks, copy, cpu, materialize=None, quantization=None) -> Iterator[HFWeightTuple]:
        chunks = as_chunks(megatron_model)
        topo = Topology.current()  # checked against dst before the collective name exchange
        config = hf_config if hf_config is not None else getattr(hf_pretrained, "config", None)
        state = as_source(getattr(hf_pretrained, "state", None))
        if bucket_bytes <= 0:
            raise ValueError(f"bucket_bytes must be positive, got {bucket_bytes}")
        everyone = dst == "all"
        if not everyone and not (0 <= int(dst) < topo.world):
            raise ValueError(f"dst must be a global rank in [0, {topo.world}) or 'all', got {dst!r}")
        dst_rank = 0 if everyone else int(dst)
        watch.barrier(f"{watch.name}: start")  # every rank is here before the collective name exchange
        self.use_hf_layout_of(state, config)  # tasks built for another layout are rebuilt
        if state is None and self.hf_layout is not None:
            describe = getattr(self.hf_layout, "describe", None)
            logger.info("%s: exporting without an HF source in the HF tensor layout %s", type(self).__name__,
                        describe() if callable(describe) else repr(self.hf_layout))
        tasks = self._reuse_tasks(conversion_tasks, chunks, None if state is None else state.keys())
        plans = [BucketPlan.make(b, tasks.meta, topo, dst_rank, everyone)
                 for b in cut_buckets(tasks, tasks.meta, bucket_bytes)]
        show = self.show_progress if show_progress is None else show_progress
        converter = BucketConverter(self, tasks.view, config, state, copy=copy, hold="item", cpu=cpu,
                                    quantization=quantization, scratch=self._scratch, max_run_bytes=bucket_bytes)
        stream = self._transport.stream(plans, topo, dst_rank, everyone, watch=watch, materialize=materialize)
        for plan, views in progress(stream, "Exporting HF weights", show, total=len(plans)):
            if views is None:  # not a receiving rank: this bucket was sent (or had nothing of ours)
                continue
            for name, tensor in converter.convert(plan, views):
                yield HFWeightTuple(name, tensor)
            # nothing of this bucket is held while the next one is made (the streamed export reads it then)
            name = tensor = views = None


def _export_runs(task: WeightConversionTask, shards: Any, ctx: ConversionContext, max_bytes: int
                 ) -> Iterator[Tuple[Any, Any]]:
    """``(mapping, shards)`` to unpack for one task: the task's own, or, for a layer's experts still to be read
    (:class:`~megatron_bridge_ext.engine.transport.ExpertsToLoad`, the streamed export), runs of whole experts of at
    most ``max_bytes`` each, read one after the other with a copy of the mapping naming the run's HF tensors. HF
    tensors fused over the experts (one ``[E, ...]`` tensor per role) are made from all of them at once."""
    if not isinstance(shards, ExpertsToLoad):
        yield task.mapping, shards
        return
    mapping = task.mapping
    if getattr(mapping, "fused", False) or ctx.ep_size != 1 or ctx.tp_size != 1:
        yield mapping, [shards.load()]
        return
    for lo, hi in shards.runs(max_bytes):
        names = {role: list(name[lo:hi]) for role, name in mapping.hf_param.items()}
        sub = mapping.with_names(mapping.megatron_param, names)
        sub.num_experts = hi - lo
        yield sub, [shards.load(lo, hi)]


def _to_hf_dtype(name: str, tensor: torch.Tensor, state: Optional[TensorSource]) -> torch.Tensor:
    if state is None or name not in state:
        return tensor
    want = state.dtype(name)
    if tensor.dtype == want:
        return tensor
    if dtype_class(tensor.dtype) != dtype_class(want):
        raise ValueError(f"export of HF tensor {name}: the model gives {tensor.dtype} ({dtype_class(tensor.dtype)}) "
                         f"but the source checkpoint holds it as {want} ({dtype_class(want)}); refusing to cast "
                         "between dtype classes")
    return tensor.to(want)
