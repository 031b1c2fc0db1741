"""The conversion engine's entry points: HF checkpoint <-> live Megatron-Core model chunks (TP, PP, virtual PP, EP,
expert-TP).

Import (HF -> Megatron): every rank walks its own tasks in the global order (:mod:`.tasks`), reads from the lazy,
memory-mapped HF source only the rows it keeps, and packs them straight into the parameters with the fused ops (a
layer's routed experts with one call). No collective is needed except the tied-embedding broadcast to the last
pipeline stage.

Export (Megatron -> HF): the tasks are cut into buckets and moved to the destination by the transport
(:mod:`.transport`); the destination turns each task's shards into HF tensors in one pass.

A model family subclasses :class:`MegatronModelBridge` (see :mod:`megatron_bridge_ext.models`) with its config
translation in both directions and its mapping table.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import logging
import warnings
from typing import (
    Any,
    Dict,
    Hashable,
    Iterable,
    Iterator,
    List,
    Mapping,
    NamedTuple,
    Optional,
    Sequence,
    Tuple,
    Union,
)

import torch
import torch.distributed as dist

from megatron_bridge_ext import ops
from megatron_bridge_ext.engine.checks import (
    KNOWN_NON_WEIGHTS,
    ROTARY_INV_FREQ,
    check_config_against_tensors,
    check_dtype_class,
    check_raw_config,
    check_rotary_inv_freq,
    conversion_error,
    dtype_class,
    unused_hf_tensors,
)
from megatron_bridge_ext.engine.peers import Watch, current_watch, watched
from megatron_bridge_ext.engine.quantize import FP8Export
from megatron_bridge_ext.engine.tasks import GlobalOrder, ParamMeta, WeightConversionTask, build_tasks
from megatron_bridge_ext.engine.transport import (BucketPlan, ExpertsToLoad, Scratch, Transport, cut_buckets,
                                                  shard_storages)
from megatron_bridge_ext.mappings import EXPERTS, ConversionContext
from megatron_bridge_ext.mcore.embeddings import TIED_EMBEDDING, broadcast_tied_embeddings, is_tied
from megatron_bridge_ext.mcore.layout import detect_layout
from megatron_bridge_ext.mcore.names import LocalParam, as_chunks, model_config, padded_vocab_size_of
from megatron_bridge_ext.mcore.topology import Topology, is_routed_expert
from megatron_bridge_ext.registry import MegatronMappingRegistry

logger = logging.getLogger(__name__)

__all__ = [
    "MegatronModelBridge",
    "WeightConversionTask",
    "MegatronWeightTuple",
    "HFWeightTuple",
    "DEFAULT_BUCKET_BYTES",
]

DEFAULT_BUCKET_BYTES = 256 * 1024 * 1024
Model = Union[torch.nn.Module, Sequence[torch.nn.Module]]


class MegatronWeightTuple(NamedTuple):
    """A converted Megatron tensor of this rank."""

    param_name: str
    weight: torch.Tensor
    vp_stage: int


class HFWeightTuple(NamedTuple):
    """An HF tensor produced by export."""

    param_name: str
    weight: torch.Tensor


def progress(items: Iterable[Any], description: str, show: bool, total: Optional[int] = None) -> Iterator[Any]:
    """``items`` with a rich progress bar on global rank 0 when ``show`` (``total`` for iterators)."""
    rank0 = not dist.is_initialized() or dist.get_rank() == 0
    total = len(items) if total is None else total  # type: ignore[arg-type]
    if not show or not rank0 or not total:
        yield from items
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                  transient=True) as bar:
        tid = bar.add_task(description, total=total)
        for item in items:
            yield item
            bar.advance(tid)


class MegatronModelBridge:
    """Orchestrates HF <-> Megatron conversion for one architecture.

    Subclasses (one per model family, see :mod:`megatron_bridge_ext.models`) provide the config translation both ways
    (:meth:`hf_config_to_megatron_kwargs`, :meth:`megatron_to_hf_config`) and :meth:`mapping_registry`, and register
    themselves with :meth:`register_bridge`.
    """

    #: HF tensor names that exist only in some checkpoints and are produced on export only when the source has them.
    tied_output_hf_name: str = "lm_head.weight"
    #: the HF architecture (``config.architectures[0]``) and ``model_type`` this bridge writes on export; the
    #: architecture defaults to the name the bridge is registered under
    hf_architecture: Optional[str] = None
    hf_model_type: Optional[str] = None
    #: the HF tensor layout :meth:`mapping_registry` builds for until a source checkpoint says otherwise (see
    #: :meth:`detect_hf_layout`); None for families with one layout
    default_hf_layout: Optional[Hashable] = None
    #: config.json fields the family cannot do without, checked as written (before transformers fills in defaults)
    required_hf_fields: Tuple[str, ...] = ("hidden_size", "num_attention_heads", "num_hidden_layers", "vocab_size",
                                           "intermediate_size")
    #: fnmatch patterns of HF tensors an import may leave unused by default: buffers, not weights
    known_non_weights: Tuple[str, ...] = KNOWN_NON_WEIGHTS

    def __init__(self) -> None:
        self._registry: Optional[MegatronMappingRegistry] = None
        self._order: Optional[GlobalOrder] = None
        self._transport = Transport()
        self._scratch = Scratch()  # HF tensors of exports with copy=False (one task at a time)
        self.show_progress = True
        #: the HF tensor layout of the mapping table in use (set from the source checkpoint's keys)
        self.hf_layout: Optional[Hashable] = self.default_hf_layout
        #: seconds a collective wait may make no progress before the awaited rank is declared frozen (None:
        #: ``$MEGATRON_BRIDGE_PEER_TIMEOUT``, else 600); see :mod:`megatron_bridge_ext.engine.peers`
        self.peer_timeout: Optional[float] = None

    def watch(self, name: str) -> Watch:
        """The failure watch of a collective operation (the running one when nested)."""
        return current_watch() or Watch(name, self.peer_timeout)

    def release_buffers(self) -> None:
        """Free the export buffers kept between exports (at most two messages, one send buffer and the scratch
        memory of the largest task)."""
        self._transport.release()
        self._scratch.release()

    # ----------------------------------------------------------------------------------------------------------------
    # What a model family provides
    # ----------------------------------------------------------------------------------------------------------------

    def hf_config_to_megatron_kwargs(self, hf_config: Any) -> Dict[str, Any]:
        """``GPTConfig`` fields for an HF config (object or dict); families compose them from the pieces of
        ``models.hf_config`` (and ``models.moe`` / ``models.mtp``)."""
        raise NotImplementedError(f"{type(self).__name__} must implement hf_config_to_megatron_kwargs")

    def transformer_config(self, hf_config: Any, **overrides: Any):
        """Megatron ``GPTConfig`` for an HF config; ``overrides`` (any TransformerConfig field) are applied last.

        Raises:
            ValueError: settings megatron-core cannot express (named), unknown override names, or sizes the
                parallel layout cannot split.
        """
        from megatron_bridge_ext.mcore.config import build_gpt_config

        return build_gpt_config(self.hf_config_to_megatron_kwargs(hf_config), overrides)

    def megatron_to_hf_config(self, config: Any) -> Dict[str, Any]:
        """The HF ``config.json`` (as a dict) of a Megatron ``GPTConfig``: here its ``architectures`` and
        ``model_type``; families add the fields they compose from the reverses of their ``models.hf_config`` pieces."""
        if self.hf_architecture is None or self.hf_model_type is None:
            raise NotImplementedError(f"{type(self).__name__} sets no hf_architecture / hf_model_type")
        return {"architectures": [self.hf_architecture], "model_type": self.hf_model_type}

    def mapping_registry(self) -> MegatronMappingRegistry:
        """The parameter mappings of this architecture (for ``self.hf_layout`` where the family has several)."""
        raise NotImplementedError(f"{type(self).__name__} must implement mapping_registry")

    def detect_hf_layout(self, hf_state: Mapping[str, torch.Tensor], hf_config: Any) -> Optional[Hashable]:
        """Which of the architecture's HF tensor layouts a checkpoint uses (e.g. one tensor per expert or fused
        expert tensors), read from its keys (and the shapes of its lazy tensors); families with several layouts
        override it. The default: ``default_hf_layout``.

        Raises:
            ValueError: a checkpoint that mixes layouts, naming a tensor of each.
        """
        return self.default_hf_layout

    def hf_layout_for_model(self, config: Any) -> Optional[Hashable]:
        """The HF tensor layout in which to convert a Megatron model of ``config`` (its TransformerConfig): by
        default the current one. Families whose layout also depends on the model (DeepSeek-V3's
        multi-token-prediction layers: converted when the model has them) adjust it; the engine asks before it
        builds the conversion tasks, so an export without a source writes what the model holds.
        """
        return self.hf_layout

    def use_hf_layout_for_model(self, megatron_model: Model) -> bool:
        """Build the mapping table for the layout :meth:`hf_layout_for_model` gives for this model.

        Returns:
            True when the table changed (the cached global order is dropped; tasks built before are stale).
        """
        return self._use_layout(self.hf_layout_for_model(model_config(as_chunks(megatron_model))))

    def _use_layout(self, layout: Optional[Hashable]) -> bool:
        if layout == self.hf_layout:
            return False
        self.hf_layout = layout
        self._registry = None
        self._order = None
        return True

    def use_hf_layout_of(self, hf_state: Optional[Mapping[str, torch.Tensor]], hf_config: Any) -> bool:
        """Build the mapping table for the layout of a source checkpoint (no source: keep the current one).

        Returns:
            True when the table changed (the cached global order is dropped; tasks built before are stale).
        """
        if hf_state is None:
            return False
        return self._use_layout(self.detect_hf_layout(hf_state, hf_config))

    def check_hf_config(self, raw_config: Mapping[str, Any], where: str) -> None:
        """The raw ``config.json`` (as written, before transformers fills in defaults) has every field in
        :attr:`required_hf_fields`, as a positive integer.

        Raises:
            ValueError: naming ``where`` (the file), the family and the missing or bad fields.
        """
        check_raw_config(raw_config, self.required_hf_fields, type(self).__name__, where)

    def check_hf_checkpoint(self, hf_pretrained: Any) -> None:
        """The checkpoint's config agrees with its tensors (headers only): layer count, vocabulary rows, heads x
        head_dim, experts per layer. The mapping table is chosen for the checkpoint's layout first.

        Raises:
            ValueError: naming both sides (the config field and value, the tensor, its file and shape).
        """
        self.use_hf_layout_of(hf_pretrained.state, hf_pretrained.config)
        kwargs = self.hf_config_to_megatron_kwargs(hf_pretrained.config)
        where = getattr(hf_pretrained, "config_path", None) or getattr(hf_pretrained, "path", "HF checkpoint")
        check_config_against_tensors(kwargs, self.registry, hf_pretrained.state, where)

    def maybe_modify_loaded_hf_weight(
        self, hf_param: Union[str, Dict[str, Any]], hf_state: Mapping[str, torch.Tensor]
    ) -> Union[torch.Tensor, Dict[str, Any]]:
        """Read the HF tensor(s) of a mapping; override to rename, dequantise, ... (tensors are lazy views).

        A role may name a list of tensors (a layer's experts, one per expert): it reads as a list.
        """
        if isinstance(hf_param, str):
            return hf_state[hf_param]
        return {role: hf_state[name] if isinstance(name, str) else [hf_state[n] for n in name]
                for role, name in hf_param.items()}

    def maybe_modify_converted_hf_weight(
        self, task: WeightConversionTask, converted: Dict[str, torch.Tensor]
    ) -> Dict[str, torch.Tensor]:
        """Post-process the HF tensors of one exported task; by default unchanged."""
        return converted

    @classmethod
    def register_bridge(cls, *, source: Union[type, str], target: type):
        """Class decorator registering a bridge for an HF architecture (class or class name) and a Megatron class."""
        from megatron_bridge_ext.dispatch import register_bridge

        return register_bridge(source=source, target=target)

    # ----------------------------------------------------------------------------------------------------------------
    # Names and tasks
    # ----------------------------------------------------------------------------------------------------------------

    @property
    def registry(self) -> MegatronMappingRegistry:
        if self._registry is None:
            self._registry = self.mapping_registry()
        return self._registry

    @property
    def global_order(self) -> GlobalOrder:
        """The cached global order and metadata (rebuilt automatically when the model structure changes)."""
        if self._order is None:
            self._order = GlobalOrder(self.registry, self._layout_of)
        return self._order

    def _layout_of(self, p: LocalParam) -> str:
        mapping = self.registry.megatron_to_hf_lookup(p.global_name)
        if mapping is not None and mapping.layout is not None:
            return mapping.layout
        return detect_layout(p.module, p.tensor, p.global_name)

    def build_conversion_tasks(self, hf_keys: Optional[Iterable[str]], megatron_model: Model
                               ) -> List[WeightConversionTask]:
        """Tasks for every global parameter in the global order; owned ones carry the local tensor(s).

        Args:
            hf_keys: the HF checkpoint's keys (checked for every mapping's HF names), or None to skip the check.
            megatron_model: this rank's model chunk or list of virtual-pipeline chunks.

        Raises:
            ValueError: naming every Megatron parameter without a mapping, or every HF key a mapping needs that the
                checkpoint lacks.
        """
        return self._tasks(hf_keys, as_chunks(megatron_model))[0]

    def _tasks(self, hf_keys, chunks):
        self.use_hf_layout_for_model(chunks)
        return build_tasks(chunks, Topology.current(), self.global_order, hf_keys, type(self).__name__)

    def _context(self, task: WeightConversionTask, topo: Topology, hf_config: Any, chunks) -> ConversionContext:
        index, count, _ = topo.shard_of(task.members[0] if task.is_group else task.global_param_name)
        model_cfg = model_config(chunks)
        hf_vocab = getattr(hf_config, "vocab_size", None)
        if hf_vocab is None:  # no HF config: the unpadded vocabulary the Megatron config carries
            hf_vocab = getattr(model_cfg, "vocab_size", None)
        return ConversionContext(
            tp_size=count,
            tp_rank=index,
            ep_size=topo.ep_size if is_routed_expert(task.global_param_name) else 1,
            ep_rank=topo.ep_rank if is_routed_expert(task.global_param_name) else 0,
            config=model_cfg,
            hf_vocab_size=hf_vocab,
            padded_vocab_size=padded_vocab_size_of(chunks),
            layout=task.layout,
        )

    def _export_context(self, task: WeightConversionTask, meta: ParamMeta, num_shards: int, topo: Topology,
                        hf_config: Any, chunks) -> ConversionContext:
        """The context of unpacking a task's gathered shards: a dense task's shard count is its TP size (1 for a
        replicated tensor); an expert group keeps the expert-parallel sizes."""
        ctx = self._context(task, topo, hf_config, chunks)
        ctx.tp_rank = 0
        if meta.layout != EXPERTS:
            ctx.tp_size = num_shards
        return ctx

    # ----------------------------------------------------------------------------------------------------------------
    # Import: HF -> Megatron
    # ----------------------------------------------------------------------------------------------------------------

    def _read_hf(self, task: WeightConversionTask, state: Any, ctx: ConversionContext
                 ) -> Tuple[Any, ConversionContext]:
        """The HF tensor(s) of a task and the context to convert them in.

        From a source that dequantizes on read (an FP8 / MXFP4 release): a mapping with a fused path for quantized
        weights (``reads_quantized``) gets them as stored (:class:`~megatron_bridge_ext.ops.QuantizedWeight`) and its
        op dequantizes only the rows the rank keeps; other mappings get them dequantized. A layer's experts are read
        only for the global experts ``ctx`` selects (this rank's, or this run's), with a context of one
        expert-parallel rank that takes them all: the same parameters, without dequantizing the other ranks'
        experts. Reads of other sources are views of the files, which cost nothing until used.
        """
        mapping = task.mapping
        if not _dequantizes(state, mapping.hf_names):
            return self.maybe_modify_loaded_hf_weight(mapping.hf_param, state), ctx
        as_stored = bool(getattr(mapping, "reads_quantized", False))
        num = getattr(mapping, "num_experts", None)
        if not task.is_group or not num or ctx.ep_size <= 1 or num % ctx.ep_size:
            return self.maybe_modify_loaded_hf_weight(mapping.hf_param, _QuantizedReads(state, as_stored)), ctx
        per = num // ctx.ep_size
        lo, hi = ctx.ep_rank * per, (ctx.ep_rank + 1) * per
        names = {role: name if isinstance(name, str) else name[lo:hi] for role, name in mapping.hf_param.items()}
        fused = [name for name in names.values() if isinstance(name, str)]
        hf = self.maybe_modify_loaded_hf_weight(names, _QuantizedReads(state, as_stored, fused, lo, hi))
        return hf, dataclasses.replace(ctx, ep_size=1, ep_rank=0)

    @staticmethod
    def _expected_shape(task: WeightConversionTask, hf: Any, ctx: ConversionContext):
        """The shape (a group: of each local expert) the mapping gives for these HF tensors: the geometry module for
        expert groups, the fake kernels (meta tensors) otherwise."""
        if task.is_group:
            return task.mapping.expert_shard_shape(hf, ctx)
        meta_in = {k: torch.empty(v.shape, dtype=v.dtype, device="meta") for k, v in hf.items()} if isinstance(
            hf, dict) else torch.empty(hf.shape, dtype=hf.dtype, device="meta")
        return tuple(task.mapping.hf_to_megatron(meta_in, ctx).shape)

    def _convert_one(self, task: WeightConversionTask, hf_state, ctx: ConversionContext, allowed: Sequence[str]):
        """Converts one owned task straight into its parameter(s); None when an allowed mismatch skipped it.

        Raises:
            ValueError: a shape mismatch or a dtype class that cannot be right (both sides named).
            The error of a mapping or an op, with the HF name(s), the Megatron name and the file in front.
        """
        names = task.mapping.hf_names
        where = f"HF {_short(names)} in {_files_of(hf_state, names)} -> Megatron {task.global_param_name}"
        try:
            hf, ctx = self._read_hf(task, hf_state, ctx)
            targets = task.local_tensors
            got = self._expected_shape(task, hf, ctx)
        except Exception as e:
            raise conversion_error(e, where) from e
        want = tuple(targets[0].shape)
        if got != want:
            if any(fnmatch.fnmatch(task.mapping.megatron_param, p) or fnmatch.fnmatch(task.param_name, p)
                   for p in allowed):
                warnings.warn(f"shape mismatch for {task.global_param_name} allowed by allowed_mismatched_params: "
                              f"Megatron {want}, converted {got}; parameter left unchanged")
                return None
            raise ValueError(
                f"shape mismatch for Megatron parameter {task.global_param_name}: expected {want}, converted "
                f"HF tensor(s) {task.mapping.hf_param} give {got} ({type(task.mapping).__name__}, "
                f"tp={ctx.tp_size}{f', ep={ctx.ep_size}' if task.is_group else ''}; "
                f"file(s) {_files_of(hf_state, names)})"
            )
        check_dtype_class(names, [t.dtype for t in _all_tensors(hf)], targets[0].dtype, task.global_param_name,
                          lambda n: _files_of(hf_state, [n]))
        try:
            return self._pack(task, hf, ctx, targets)
        except Exception as e:
            raise conversion_error(e, where) from e

    def _pack(self, task: WeightConversionTask, hf: Any, ctx: ConversionContext, targets) -> Any:
        first = _first_tensor(hf)
        datas = [t.data for t in targets]
        if task.is_group:
            if all(d.dtype == first.dtype and d.device == first.device for d in datas):
                return task.mapping.hf_to_megatron(hf, ctx, out=datas)  # one op call for the layer's local experts
            for d, s in zip(datas, task.mapping.hf_to_megatron(hf, ctx).unbind(0)):
                d.copy_(s)
            return datas
        data = datas[0]
        if type(data).__name__ == "DTensor":
            full = task.mapping.hf_to_megatron(hf, ctx)
            local = data.to_local()
            ops.copy_into_dtensor(full.to(device=local.device, dtype=local.dtype), data)
            return data
        if first.dtype == data.dtype and first.device == data.device and data.is_contiguous():
            return task.mapping.hf_to_megatron(hf, ctx, out=data)
        # another dtype or device (e.g. CPU checkpoint -> GPU parameter): pack this rank's shard where the HF
        # tensors live (reading only its rows), then one copy into the parameter
        data.copy_(task.mapping.hf_to_megatron(hf, ctx))
        return data

    def _check_unused(self, state: Any, tasks: Sequence[WeightConversionTask], chunks,
                      allowed: Optional[Sequence[str]], hf_config: Any = None) -> None:
        """Every HF tensor is consumed by a task, or allowed by a pattern; else the import fails naming them. With the
        default patterns, a stored ``rotary_emb.inv_freq`` must hold what the config's rope settings give."""
        consumed = {n for t in tasks for n in t.mapping.hf_names}
        if is_tied(chunks):
            consumed.add(self.tied_output_hf_name)  # HF's copy of the tied embedding; export reproduces it
        patterns = self.known_non_weights if allowed is None else tuple(allowed)
        if allowed is None and hf_config is not None and ROTARY_INV_FREQ in patterns:
            stored = [k for k in state.keys() if k not in consumed and fnmatch.fnmatchcase(k, ROTARY_INV_FREQ)]
            check_rotary_inv_freq(state, stored, hf_config, lambda n: _files_of(state, [n]))
        unused = unused_hf_tensors(state.keys(), consumed, patterns)
        if unused:
            shown = [f"{n} ({_files_of(state, [n])})" for n in unused[:20]]
            raise ValueError(
                f"{type(self).__name__}: {len(unused)} HF tensor(s) of {getattr(state, 'path', 'the checkpoint')} "
                f"are used by no mapping of this model: {shown}{' ...' if len(unused) > 20 else ''}. Importing would "
                f"silently drop them; pass allowed_unused_hf_params=[patterns] to allow them (allowed now: "
                f"{list(patterns)})"
            )

    def load_weights_hf_to_megatron(
        self,
        hf_pretrained: Any,
        megatron_model: Model,
        allowed_mismatched_params: Optional[Sequence[str]] = None,
        show_progress: Optional[bool] = None,
        allowed_unused_hf_params: Optional[Sequence[str]] = None,
    ) -> List[torch.nn.Module]:
        """Load HF weights into this rank's Megatron chunk(s), each rank reading only what it keeps.

        Args:
            hf_pretrained: an object with ``.state`` (lazy HF tensors: ``keys()``, ``[name]``) and ``.config``.
            megatron_model: model chunk or list of virtual-pipeline chunks.
            allowed_mismatched_params: fnmatch globs of Megatron names whose shape mismatch is skipped with a warning.
            show_progress: rich progress bar on rank 0 (default: ``self.show_progress``).
            allowed_unused_hf_params: fnmatch globs of HF tensors the model may leave unused (default:
                :attr:`known_non_weights`, e.g. ``*.rotary_emb.inv_freq``); any other unused tensor fails the import.

        Returns:
            The list of chunks.

        Raises:
            ValueError: missing or unused HF tensors, unmapped parameters, shape mismatches (both shapes named),
                dtype classes that cannot be right.
        """
        chunks = as_chunks(megatron_model)
        state = hf_pretrained.state
        with self.watch("import") as watch:
            watch.barrier("import: start")  # every rank is here before the collective name exchange
            watch.set_phase("import: conversion tasks")
            self.use_hf_layout_of(state, hf_pretrained.config)
            tasks, _ = self._tasks(state.keys(), chunks)
            self._check_unused(state, tasks, chunks, allowed_unused_hf_params, hf_pretrained.config)
            topo = Topology.current()
            allowed = list(allowed_mismatched_params or [])
            owned = [t for t in tasks if t.owned]
            release = getattr(state, "release", None)
            show = self.show_progress if show_progress is None else show_progress
            with torch.no_grad():
                for task in progress(owned, "Loading HF weights", show):
                    watch.set_phase(f"import: {task.global_param_name}")
                    watch.check()  # a peer's failure stops this rank within a slice
                    ctx = self._context(task, topo, hf_pretrained.config, chunks)
                    self._convert_one(task, state, ctx, allowed)
                    if release is not None:
                        release(task.mapping.hf_names)
                watch.barrier("import: converted")  # every rank converted before the tied-embedding broadcast
                watch.set_phase("import: tied embeddings")
                broadcast_tied_embeddings(chunks)
        return chunks

    def stream_weights_hf_to_megatron(
        self,
        hf_pretrained: Any,
        megatron_model: Model,
        conversion_tasks: Optional[List[WeightConversionTask]] = None,
        allowed_unused_hf_params: Optional[Sequence[str]] = None,
        select: Optional[Any] = None,
        max_group_bytes: Optional[int] = None,
    ) -> Iterator[MegatronWeightTuple]:
        """Generator variant: yields this rank's converted tensors (fresh tensors; the model is not modified).

        ``select(task)`` (optional) picks the owned tasks to convert (the unused-tensor check still covers them all);
        the HF tensors of each converted task are released from memory once it is done (where the source can).
        ``max_group_bytes`` (optional): a layer's local experts are converted in runs of at most that many bytes
        (whole experts, a divisor of the local count) instead of in one op call, so that memory holds one run."""
        chunks = as_chunks(megatron_model)
        state = hf_pretrained.state
        changed = self.use_hf_layout_of(state, hf_pretrained.config)
        tasks = conversion_tasks if conversion_tasks is not None and not changed else self._tasks(state.keys(),
                                                                                                   chunks)[0]
        self._check_unused(state, tasks, chunks, allowed_unused_hf_params, hf_pretrained.config)
        topo = Topology.current()
        release = getattr(state, "release", None)
        local_names = {}
        if any(t.is_group for t in tasks):
            from megatron_bridge_ext.mcore.names import local_params

            local_names = {p.global_name: p.local_name for p in local_params(chunks, topo)}
        with torch.no_grad():
            for task in tasks:
                if not task.owned or (select is not None and not select(task)):
                    continue
                ctx = self._context(task, topo, hf_pretrained.config, chunks)
                names = task.mapping.hf_names
                mine = [n for n in task.members if n in local_names] if task.is_group else []
                runs = _expert_runs(task, ctx, max_group_bytes) if task.is_group else 1
                for run in range(runs):
                    run_ctx = ctx
                    if runs > 1:  # whole experts in runs: the mapping's expert-parallel split picks each run
                        run_ctx = dataclasses.replace(ctx, ep_size=ctx.ep_size * runs,
                                                      ep_rank=ctx.ep_rank * runs + run)
                    try:
                        hf, run_ctx = self._read_hf(task, state, run_ctx)
                        check_dtype_class(names, [t.dtype for t in _all_tensors(hf)], task.local_tensors[0].dtype,
                                          task.global_param_name, lambda n: _files_of(state, [n]))
                        converted = task.mapping.hf_to_megatron(hf, run_ctx)
                    except Exception as e:
                        if getattr(e, "bridge_context", False):
                            raise
                        raise conversion_error(e, f"HF {_short(names)} in {_files_of(state, names)} -> Megatron "
                                                  f"{task.global_param_name}") from e
                    if not task.is_group:
                        yield MegatronWeightTuple(task.param_name, converted, task.vp_stage)
                    else:
                        per = len(mine) // runs
                        for name, tensor in zip(mine[run * per:(run + 1) * per], converted.unbind(0)):
                            yield MegatronWeightTuple(local_names[name], tensor, task.vp_stage)
                    del converted, hf
                    if release is not None:
                        release(names)

    # ----------------------------------------------------------------------------------------------------------------
    # Export: Megatron -> HF
    # ----------------------------------------------------------------------------------------------------------------

    def hf_tensor_specs(self, megatron_model: Model, hf_config: Any = None,
                        conversion_tasks: Optional[List[WeightConversionTask]] = None) -> Dict[str, Any]:
        """HF name -> (shape, dtype) of every tensor export yields, in the order it yields them, computed from the
        Megatron side alone (the mappings run on meta tensors): no HF checkpoint is needed. A tied output layer is
        not listed (HF ties it to the embedding). Collective the first time for a model structure (global order).
        """
        chunks = as_chunks(megatron_model)
        topo = Topology.current()
        tasks, meta = self._tasks(None, chunks)
        if conversion_tasks is not None:
            tasks = conversion_tasks
        specs: Dict[str, Any] = {}
        for task in tasks:
            m = meta[task.global_param_name]
            shards = [torch.empty(m.shape, dtype=m.dtype, device="meta")] * (len(m.senders) if m.sharded else 1)
            ctx = self._export_context(task, m, len(shards), topo, hf_config, chunks)
            for name, tensor in task.mapping.megatron_to_hf(shards, ctx).items():
                specs[name] = (tuple(tensor.shape), tensor.dtype)
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
            conversion_tasks: pre-built tasks (from :meth:`build_conversion_tasks`).
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
        topo = Topology.current()
        config = hf_config if hf_config is not None else getattr(hf_pretrained, "config", None)
        state = getattr(hf_pretrained, "state", None)
        hf_keys = set(state.keys()) if state is not None else None
        if bucket_bytes <= 0:
            raise ValueError(f"bucket_bytes must be positive, got {bucket_bytes}")
        everyone = dst == "all"
        if not everyone and not (0 <= int(dst) < topo.world):
            raise ValueError(f"dst must be a global rank in [0, {topo.world}) or 'all', got {dst!r}")
        dst_rank = 0 if everyone else int(dst)
        watch.barrier(f"{watch.name}: start")  # every rank is here before the collective name exchange
        changed = self.use_hf_layout_of(state, config)  # tasks built for another layout are rebuilt
        if state is None and self.hf_layout is not None:
            describe = getattr(self.hf_layout, "describe", None)
            logger.info("%s: exporting without an HF source in the HF tensor layout %s", type(self).__name__,
                        describe() if callable(describe) else repr(self.hf_layout))
        tasks, meta = self._tasks(None, chunks)
        if conversion_tasks is not None and not changed:
            tasks = conversion_tasks
        tied_copy = is_tied(chunks) and hf_keys is not None and self.tied_output_hf_name in hf_keys
        plans = [BucketPlan.make(b, meta, topo, dst_rank, everyone) for b in cut_buckets(tasks, meta, bucket_bytes)]
        show = self.show_progress if show_progress is None else show_progress
        stream = self._transport.stream(plans, topo, dst_rank, everyone, watch=watch, materialize=materialize)
        for plan, views in progress(stream, "Exporting HF weights", show, total=len(plans)):
            if views is None:  # not a receiving rank: this bucket was sent (or had nothing of ours)
                continue
            for (task, m), shards in zip(plan.layout, views):
                ctx = self._export_context(task, m, len(shards), topo, config, chunks)
                for mapping, run in _export_runs(task, shards, ctx, bucket_bytes):
                    if not copy:  # the consumer uses each tensor at once: the HF tensors go to reused memory
                        self._scratch.reset()
                        ctx.alloc = self._scratch.alloc
                    try:
                        converted = mapping.megatron_to_hf(run, ctx)
                        converted = self.maybe_modify_converted_hf_weight(task, converted)
                        items = [(name, _to_hf_dtype(name, t, state)) for name, t in converted.items()]
                        if quantization is not None:
                            items = [q for name, t in items for q in quantization.convert(name, t, ctx.alloc)]
                    except Exception as e:
                        raise conversion_error(e, f"export of Megatron {task.global_param_name} -> HF "
                                                  f"{_short(task.mapping.hf_names)} ({type(task.mapping).__name__})"
                                               ) from e
                    storages = shard_storages(run)
                    for name, tensor in items:
                        if cpu and tensor.device.type != "cpu":
                            tensor = tensor.cpu()
                        if copy and tensor.untyped_storage().data_ptr() in storages:
                            tensor = tensor.clone()
                        yield HFWeightTuple(name, tensor)
                        if tied_copy and task.global_param_name.endswith(TIED_EMBEDDING):  # kept: never quantized
                            yield HFWeightTuple(self.tied_output_hf_name, tensor.clone() if copy else tensor)
                    del converted, items, run


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


def _expert_runs(task: WeightConversionTask, ctx: ConversionContext, max_bytes: Optional[int]) -> int:
    """In how many runs to convert a layer's local experts so that each run holds at most ``max_bytes`` (the
    smallest divisor of the local expert count that does; 1 without a limit)."""
    local = len(task.local_tensors)
    if not max_bytes or local <= 1:
        return 1
    total = sum(t.numel() * t.element_size() for t in task.local_tensors)
    for runs in range(1, local + 1):
        if local % runs == 0 and total / runs <= max_bytes:
            return runs
    return local


def _dequantizes(state: Any, names: Sequence[str]) -> bool:
    """Whether reading any of ``names`` makes a new tensor (a block-quantized source dequantizing it) rather than a
    view of the file: then only the experts a rank (or run) converts are read."""
    is_quantized = getattr(state, "is_quantized", None)
    return is_quantized is not None and any(is_quantized(n) for n in names)


class _QuantizedReads(Mapping):
    """``state`` (a block-quantized source) as a mapping reads it: its quantized weights as stored
    (:class:`~megatron_bridge_ext.ops.QuantizedWeight`, for a mapping with a fused op: ``as_stored``) or dequantized,
    and each fused (all-experts) tensor in ``fused`` cut to global experts ``[lo, hi)``, so that only those are
    dequantized."""

    def __init__(self, state: Any, as_stored: bool, fused: Sequence[str] = (), lo: int = 0, hi: int = 0) -> None:
        self.state, self.as_stored, self.fused, self.lo, self.hi = state, as_stored, set(fused), lo, hi

    def __getitem__(self, key: str) -> Any:
        stored = self.as_stored and self.state.is_quantized(key)
        if key in self.fused:
            if stored:
                return self.state.quantized(key).experts(self.lo, self.hi)
            return self.state.experts(key, self.lo, self.hi)
        return self.state.quantized(key) if stored else self.state[key]

    def __iter__(self):
        return iter(self.state)

    def __len__(self) -> int:
        return len(self.state)


def _first_tensor(hf: Any) -> torch.Tensor:
    value = next(iter(hf.values())) if isinstance(hf, dict) else hf
    if isinstance(value, (list, tuple)):
        value = value[0]
    return value


def _all_tensors(hf: Any) -> List[torch.Tensor]:
    values = list(hf.values()) if isinstance(hf, dict) else [hf]
    out: List[torch.Tensor] = []
    for v in values:
        out.extend(v if isinstance(v, (list, tuple)) else [v])
    return out


def _short(names: Sequence[str], limit: int = 4) -> str:
    names = list(names)
    return ", ".join(names[:limit]) + (f" ... ({len(names)} tensors)" if len(names) > limit else "")


def _files_of(state: Any, names: Sequence[str]) -> str:
    """The file(s) holding HF tensors ``names`` (their base names when they share a directory)."""
    file_of = getattr(state, "file_of", None)
    if file_of is None:
        return "the HF state"
    files = []
    for n in names:
        try:
            f = file_of(n)
        except Exception:
            continue
        if f not in files:
            files.append(f)
    return ", ".join(files) if files else "the HF checkpoint"


def _to_hf_dtype(name: str, tensor: torch.Tensor, state: Any) -> torch.Tensor:
    if state is None or name not in state:
        return tensor
    want = state.dtype(name) if hasattr(state, "dtype") else state[name].dtype
    if tensor.dtype == want:
        return tensor
    if dtype_class(tensor.dtype) != dtype_class(want):
        raise ValueError(f"export of HF tensor {name}: the model gives {tensor.dtype} ({dtype_class(tensor.dtype)}) "
                         f"but the source checkpoint holds it as {want} ({dtype_class(want)}); refusing to cast "
                         "between dtype classes")
    return tensor.to(want)
