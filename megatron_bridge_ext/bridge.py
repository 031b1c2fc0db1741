"""The conversion engine: HF checkpoint <-> live Megatron-Core model chunks (TP, PP, virtual PP, EP, expert-TP).

Import (HF -> Megatron): every rank walks its own parameters in the global order, reads from the lazy, memory-mapped
HF source only the rows it keeps, and packs them straight into the parameter with the fused ops. No collective is
needed except the tied-embedding broadcast to the last pipeline stage.

Export (Megatron -> HF): parameters are taken in the global order (identical on every rank) and cut into buckets of
at most ``bucket_bytes`` whose tensors have the same shard holders (the TP or expert-TP ranks of one pipeline stage /
expert-parallel rank, in data-parallel replica 0). Each holder sends its part of a bucket as one flat message straight
to the destination rank (no all-gather, no broadcast to every stage), and the destination unpacks it into HF tensors
in one pass while it receives the next bucket. Buffers are reused across buckets and exports, so memory stays bounded
by the bucket budget (twice on the destination) plus the largest tensor.
"""

from __future__ import annotations

import fnmatch
import logging
import re
import warnings
from dataclasses import dataclass
from typing import Any, Dict, Iterable, Iterator, List, Mapping, NamedTuple, Optional, Sequence, Tuple, Union

import torch
import torch.distributed as dist

from megatron_bridge_ext import ops
from megatron_bridge_ext.mappings import COLUMN, REPLICATED, ROW, ConversionContext, MegatronParamMapping, detect_layout
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
_LAYER_RE = re.compile(r"(?:^|\.)layers\.(\d+)\.")


class MegatronWeightTuple(NamedTuple):
    """A converted Megatron tensor of this rank."""

    param_name: str
    weight: torch.Tensor
    vp_stage: int


class HFWeightTuple(NamedTuple):
    """An HF tensor produced by export."""

    param_name: str
    weight: torch.Tensor


@dataclass(frozen=True)
class WeightConversionTask:
    """One Megatron parameter to convert.

    Attributes:
        param_name: unwrapped local name on the owning rank (the global name where not owned).
        global_param_name: unwrapped global name (layer / expert indices global).
        mapping: the resolved mapping.
        pp_rank: pipeline rank that owns the parameter.
        vp_stage: virtual-pipeline chunk index on the owner (None where not owned).
        megatron_module: owning module (None where not owned).
        param_weight: the parameter or persistent buffer (None where not owned).
    """

    param_name: str
    global_param_name: str
    mapping: MegatronParamMapping
    pp_rank: int
    vp_stage: Optional[int] = None
    megatron_module: Optional[torch.nn.Module] = None
    param_weight: Optional[torch.Tensor] = None


@dataclass(frozen=True)
class _ParamMeta:
    """What every rank knows about a global parameter (exchanged once per model structure)."""

    pp_rank: int
    shape: Tuple[int, ...]
    dtype: torch.dtype
    layout: str
    senders: Tuple[int, ...]  # global rank holding shard i (TP or expert-TP index), in replica zero


@dataclass
class _BucketPlan:
    """One export bucket: its tensors, their shard holders and where each holder's part sits in the message."""

    layout: List[Tuple[WeightConversionTask, _ParamMeta]]
    senders: Tuple[int, ...]
    nbytes: List[int]
    sharded: List[bool]
    local_total: int  # bytes of one holder's shards
    repl_total: int  # bytes of the replicated tensors (sent by holder 0)
    mine: bool  # this rank is a holder
    direct: bool  # the destination holds the whole bucket alone: no message

    @property
    def msg_bytes(self) -> int:
        return self.repl_total + self.local_total * len(self.senders)

    def part_range(self, index: int) -> Tuple[int, int]:
        """Byte range of holder ``index``'s part in the message."""
        lo = 0 if index == 0 else self.repl_total + index * self.local_total
        return lo, self.repl_total + (index + 1) * self.local_total


@dataclass
class _Topology:
    tp_size: int = 1
    tp_rank: int = 0
    pp_size: int = 1
    pp_rank: int = 0
    replica_zero: bool = True  # data-parallel (and context-parallel) rank 0: takes part in export
    ep_size: int = 1
    ep_rank: int = 0
    etp_size: int = 1
    etp_rank: int = 0
    expert_replica_zero: bool = True  # expert-data-parallel rank 0: takes part in the export of expert tensors
    rank: int = 0
    world: int = 1

    def shard_of(self, global_name: str) -> Tuple[int, int, bool]:
        """(shard index, shard count, replica zero) of a parameter: expert tensors follow expert-TP, others TP."""
        if _is_expert(global_name):
            return self.etp_rank, self.etp_size, self.expert_replica_zero
        return self.tp_rank, self.tp_size, self.replica_zero

    @classmethod
    def current(cls) -> "_Topology":
        if not dist.is_available() or not dist.is_initialized():
            return cls()
        from megatron.core import parallel_state as ps

        if not ps.model_parallel_is_initialized():
            if dist.get_world_size() > 1:
                raise RuntimeError(
                    "megatron parallel_state is not initialised in a multi-rank job: call "
                    "megatron.core.parallel_state.initialize_model_parallel(...) before converting"
                )
            return cls(rank=dist.get_rank(), world=1)
        return cls(
            tp_size=ps.get_tensor_model_parallel_world_size(),
            tp_rank=ps.get_tensor_model_parallel_rank(),
            pp_size=ps.get_pipeline_model_parallel_world_size(),
            pp_rank=ps.get_pipeline_model_parallel_rank(),
            replica_zero=ps.get_data_parallel_rank(with_context_parallel=True) == 0,
            ep_size=ps.get_expert_model_parallel_world_size(),
            ep_rank=ps.get_expert_model_parallel_rank(),
            etp_size=ps.get_expert_tensor_parallel_world_size(),
            etp_rank=ps.get_expert_tensor_parallel_rank(),
            expert_replica_zero=ps.get_expert_data_parallel_rank() == 0,
            rank=dist.get_rank(),
            world=dist.get_world_size(),
        )


def _is_expert(name: str) -> bool:
    """Routed-expert tensors (sharded over EP and expert-TP); shared experts are dense."""
    return ".mlp.experts." in name


def _unwrap_name(name: str) -> str:
    if not isinstance(name, str):
        raise ValueError(f"parameter name must be a string, got {type(name).__name__}")
    name = name.replace("._checkpoint_wrapped_module.", ".")
    while name.startswith("module."):
        name = name[len("module."):]
    return name


def _unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    while hasattr(model, "module") and isinstance(getattr(model, "module"), torch.nn.Module):
        model = model.module
    return model


def _local_tensors(chunk: torch.nn.Module) -> Dict[str, torch.Tensor]:
    """Parameters and persistent buffers of a chunk by unwrapped local name (``_extra_state`` skipped)."""
    out: Dict[str, torch.Tensor] = {}
    for name, value in chunk.state_dict(keep_vars=True).items():
        if "_extra_state" in name or not isinstance(value, torch.Tensor):
            continue
        out[_unwrap_name(name)] = value
    return out


def _module_of(chunk: torch.nn.Module, name: str) -> Optional[torch.nn.Module]:
    path = _unwrap_name(name).rsplit(".", 1)[0] if "." in name else ""
    module = _unwrap_model(chunk)
    for part in path.split(".") if path else []:
        if not hasattr(module, part):
            return None
        module = getattr(module, part)
    return module


def _layer_index_map(chunk: torch.nn.Module) -> Dict[int, int]:
    """Local layer index -> global layer index (``layer_number - 1``) of a chunk's decoder layers."""
    model = _unwrap_model(chunk)
    layers = getattr(getattr(model, "decoder", None), "layers", None)
    if layers is None:
        return {}
    return {i: int(getattr(layer, "layer_number", i + 1)) - 1 for i, layer in enumerate(layers)}


def _byte_view(t: torch.Tensor) -> torch.Tensor:
    return t.detach().contiguous().view(-1).view(torch.uint8)


def _comm_device() -> torch.device:
    """Where collective buffers live: the current CUDA device for NCCL, else the CPU."""
    if dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


class MegatronModelBridge:
    """Orchestrates HF <-> Megatron conversion for one architecture.

    Subclasses (one per model family, see :mod:`megatron_bridge_ext.models`) provide
    :meth:`transformer_config` and :meth:`mapping_registry`, and are registered with :meth:`register_bridge`.
    """

    #: HF tensor names that exist only in some checkpoints and are produced on export only when the source has them.
    tied_output_hf_name: str = "lm_head.weight"

    def __init__(self) -> None:
        self._registry: Optional[MegatronMappingRegistry] = None
        self._names_cache: Optional[Tuple[Any, List[str], Dict[str, _ParamMeta]]] = None
        self._export_buffers: Dict[str, torch.Tensor] = {}
        self.show_progress = True

    def release_buffers(self) -> None:
        """Free the flat export buffers kept between exports (at most ``bucket_bytes`` times (tp + 1))."""
        self._export_buffers.clear()

    # ----------------------------------------------------------------------------------------------------------------
    # What a model family provides
    # ----------------------------------------------------------------------------------------------------------------

    def transformer_config(self, hf_config: Any, **overrides: Any):
        """Megatron TransformerConfig for an HF config."""
        raise NotImplementedError(f"{type(self).__name__} must implement transformer_config")

    def mapping_registry(self) -> MegatronMappingRegistry:
        """The parameter mappings of this architecture."""
        raise NotImplementedError(f"{type(self).__name__} must implement mapping_registry")

    def maybe_modify_loaded_hf_weight(
        self, hf_param: Union[str, Dict[str, str]], hf_state: Mapping[str, torch.Tensor]
    ) -> Union[torch.Tensor, Dict[str, torch.Tensor]]:
        """Read the HF tensor(s) of a mapping; override to rename, dequantise, ... (tensors are lazy views)."""
        if isinstance(hf_param, str):
            return hf_state[hf_param]
        return {role: hf_state[name] for role, name in hf_param.items()}

    def maybe_modify_converted_hf_weight(
        self, task: WeightConversionTask, converted: Dict[str, torch.Tensor]
    ) -> Dict[str, torch.Tensor]:
        """Post-process the HF tensors of one exported parameter; by default unchanged."""
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

    @staticmethod
    def _chunks(model: Union[torch.nn.Module, Sequence[torch.nn.Module]]) -> List[torch.nn.Module]:
        return list(model) if isinstance(model, (list, tuple)) else [model]

    @staticmethod
    def _tied(chunks: Sequence[torch.nn.Module]) -> bool:
        m = _unwrap_model(chunks[0])
        cfg = getattr(m, "config", None)
        return bool(getattr(m, "share_embeddings_and_output_weights", getattr(cfg, "share_embeddings_and_output_weights", False)))

    def _local_entries(self, chunks: Sequence[torch.nn.Module], topo: _Topology):
        """(vp_stage, local_name, global_name, tensor, chunk) for every local parameter / persistent buffer."""
        cfg = getattr(_unwrap_model(chunks[0]), "config", None)
        num_experts = getattr(cfg, "num_moe_experts", None) or 0
        expert_offset = (num_experts // topo.ep_size) * topo.ep_rank if topo.ep_size > 1 and num_experts else 0
        tied = self._tied(chunks)
        for vp, chunk in enumerate(chunks):
            index_map = _layer_index_map(chunk)
            for local, tensor in _local_tensors(chunk).items():
                layer_offset = 0
                m = _LAYER_RE.search(local)
                if m is not None and topo.pp_size > 1:
                    li = int(m.group(1))
                    layer_offset = index_map.get(li, li) - li
                global_name = ops.local_to_global_name(local, layer_offset, expert_offset) if (
                    layer_offset or expert_offset) else local
                if tied and "output_layer" in global_name:
                    continue
                yield vp, local, global_name, tensor, chunk

    def _global_order(self, chunks: Sequence[torch.nn.Module], topo: _Topology) -> Tuple[List[str], Dict[str, _ParamMeta]]:
        """Every rank's identical ordered list of global names and their metadata (cached per model structure).

        Names are gathered over the whole world (pipeline stages and expert-parallel ranks hold different ones) with
        ``gather_param_names``; the metadata (shape, dtype, layout and which rank holds which TP / expert-TP shard in
        replica zero) with one ``all_gather_object``. Both run once per model structure.
        """
        entries = list(self._local_entries(chunks, topo))
        fingerprint = (topo.world, topo.tp_size, topo.pp_size, topo.ep_size, topo.etp_size, tuple(
            (g, tuple(t.shape), t.dtype) for _, _, g, t, _ in entries))
        if self._names_cache is not None and self._names_cache[0] == fingerprint:
            return self._names_cache[1], self._names_cache[2]
        local_meta = {}
        for _, local, global_name, tensor, chunk in entries:
            index, count, zero = topo.shard_of(global_name)
            if not zero:
                continue  # another replica reports it
            layout = self._layout_of(global_name, _module_of(chunk, local), tensor)
            local_meta[global_name] = (topo.pp_rank, tuple(tensor.shape), str(tensor.dtype).replace("torch.", ""),
                                       layout, index, count)
        if topo.world > 1:
            names = ops.gather_param_names([g for _, _, g, _, _ in entries], dist.group.WORLD)
            gathered: List[Any] = [None] * topo.world
            dist.all_gather_object(gathered, local_meta)
        else:
            names = sorted({g for _, _, g, _, _ in entries}, key=lambda n: (ops.param_sort_key(n), n))
            gathered = [local_meta]
        first: Dict[str, Any] = {}
        senders: Dict[str, List[int]] = {}
        for rank, part in enumerate(gathered):
            for name, (pp, shape, dtype, layout, index, count) in part.items():
                first.setdefault(name, (pp, shape, dtype, layout))
                slots = senders.setdefault(name, [-1] * count)
                if slots[index] == -1:
                    slots[index] = rank
        meta = {}
        for name in names:
            if name not in first or -1 in senders[name]:
                raise RuntimeError(f"parameter {name}: no rank of data-parallel replica 0 holds every shard of it "
                                   f"(shard holders {senders.get(name)})")
            pp, shape, dtype, layout = first[name]
            meta[name] = _ParamMeta(pp, tuple(shape), getattr(torch, dtype), layout, tuple(senders[name]))
        self._names_cache = (fingerprint, names, meta)
        return names, meta

    def _layout_of(self, global_name: str, module: Optional[torch.nn.Module], tensor: torch.Tensor) -> str:
        mapping = self.registry.megatron_to_hf_lookup(global_name)
        if mapping is None:
            return REPLICATED
        return mapping.layout or detect_layout(module, tensor, global_name)

    def build_conversion_tasks(
        self, hf_keys: Optional[Iterable[str]], megatron_model: Union[torch.nn.Module, Sequence[torch.nn.Module]]
    ) -> List[WeightConversionTask]:
        """Tasks for every global parameter in the global order; owned ones carry the local module and tensor.

        Args:
            hf_keys: the HF checkpoint's keys (checked for every mapping's HF names), or None to skip the check.
            megatron_model: this rank's model chunk or list of virtual-pipeline chunks.

        Raises:
            ValueError: naming every Megatron parameter without a mapping, or every HF key a mapping needs that the
                checkpoint lacks.
        """
        chunks = self._chunks(megatron_model)
        topo = _Topology.current()
        names, meta = self._global_order(chunks, topo)
        owned = {g: (vp, local, tensor, chunk) for vp, local, g, tensor, chunk in self._local_entries(chunks, topo)}
        keys = None if hf_keys is None else (hf_keys if isinstance(hf_keys, (set, frozenset, dict)) else set(hf_keys))
        tasks, unmapped, missing = [], [], []
        for name in names:
            mapping = self.registry.megatron_to_hf_lookup(name)
            if mapping is None:
                unmapped.append(name)
                continue
            if keys is not None:
                missing.extend(f"{k} (for {name})" for k in mapping.hf_names if k not in keys)
            if name in owned:
                vp, local, tensor, chunk = owned[name]
                tasks.append(WeightConversionTask(local, name, mapping, meta[name].pp_rank, vp, _module_of(chunk, local),
                                                  tensor))
            else:
                tasks.append(WeightConversionTask(name, name, mapping, meta[name].pp_rank))
        if unmapped:
            raise ValueError(
                f"{type(self).__name__}: no mapping for {len(unmapped)} Megatron parameter(s): {unmapped[:20]}"
                f"{' ...' if len(unmapped) > 20 else ''}"
            )
        if missing:
            raise ValueError(
                f"{type(self).__name__}: the HF checkpoint lacks {len(missing)} tensor(s) the model needs: "
                f"{missing[:20]}{' ...' if len(missing) > 20 else ''}"
            )
        return tasks

    # ----------------------------------------------------------------------------------------------------------------
    # Import: HF -> Megatron
    # ----------------------------------------------------------------------------------------------------------------

    def _context(self, task: WeightConversionTask, topo: _Topology, hf_config: Any, chunks) -> ConversionContext:
        model = _unwrap_model(chunks[0])
        layout = None
        if task.mapping.layout is None:
            layout = detect_layout(task.megatron_module, task.param_weight, task.global_param_name)
        index, count, _ = topo.shard_of(task.global_param_name)
        return ConversionContext(
            tp_size=count,
            tp_rank=index,
            config=getattr(model, "config", None),
            module=task.megatron_module,
            param=task.param_weight,
            hf_vocab_size=getattr(hf_config, "vocab_size", None),
            padded_vocab_size=getattr(model, "vocab_size", None),
            layout=layout,
        )

    def _progress(self, items: Sequence[Any], description: str, show: Optional[bool]):
        show = self.show_progress if show is None else show
        rank0 = not dist.is_initialized() or dist.get_rank() == 0
        if not show or not rank0 or not items:
            yield from items
            return
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                      transient=True) as progress:
            tid = progress.add_task(description, total=len(items))
            for item in items:
                yield item
                progress.advance(tid)

    def _convert_one(self, task: WeightConversionTask, hf_state, ctx: ConversionContext, allowed: Sequence[str]):
        """(tensor or None when skipped, target) for one owned task; writes into the parameter when possible."""
        hf = self.maybe_modify_loaded_hf_weight(task.mapping.hf_param, hf_state)
        target = task.param_weight
        is_dtensor = type(target.data).__name__ == "DTensor"
        want_shape = tuple(target.shape)
        meta_in = {k: torch.empty(v.shape, dtype=v.dtype, device="meta") for k, v in hf.items()} if isinstance(
            hf, dict) else torch.empty(hf.shape, dtype=hf.dtype, device="meta")
        got_shape = tuple(task.mapping.hf_to_megatron(meta_in, ctx).shape)
        if got_shape != want_shape:
            if any(fnmatch.fnmatch(task.mapping.megatron_param, p) or fnmatch.fnmatch(task.param_name, p)
                   for p in allowed):
                warnings.warn(f"shape mismatch for {task.global_param_name} allowed by allowed_mismatched_params: "
                              f"Megatron {want_shape}, converted {got_shape}; parameter left unchanged")
                return None
            raise ValueError(
                f"shape mismatch for Megatron parameter {task.global_param_name}: expected {want_shape}, converted "
                f"HF tensor(s) {task.mapping.hf_param} give {got_shape} ({type(task.mapping).__name__}, "
                f"tp={ctx.tp_size})"
            )
        first = next(iter(hf.values())) if isinstance(hf, dict) else hf
        data = target.data
        if is_dtensor:
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

    def load_weights_hf_to_megatron(
        self,
        hf_pretrained: Any,
        megatron_model: Union[torch.nn.Module, Sequence[torch.nn.Module]],
        allowed_mismatched_params: Optional[Sequence[str]] = None,
        show_progress: Optional[bool] = None,
    ) -> List[torch.nn.Module]:
        """Load HF weights into this rank's Megatron chunk(s), each rank reading only what it keeps.

        Args:
            hf_pretrained: an object with ``.state`` (lazy HF tensors: ``keys()``, ``[name]``) and ``.config``.
            megatron_model: model chunk or list of virtual-pipeline chunks.
            allowed_mismatched_params: fnmatch globs of Megatron names whose shape mismatch is skipped with a warning.
            show_progress: rich progress bar on rank 0 (default: ``self.show_progress``).

        Returns:
            The list of chunks.

        Raises:
            ValueError: missing HF tensors, unmapped parameters, shape mismatches (both shapes named).
        """
        chunks = self._chunks(megatron_model)
        state = hf_pretrained.state
        tasks = self.build_conversion_tasks(state.keys(), chunks)
        topo = _Topology.current()
        allowed = list(allowed_mismatched_params or [])
        owned = [t for t in tasks if t.param_weight is not None]
        release = getattr(state, "release", None)
        with torch.no_grad():
            for task in self._progress(owned, "Loading HF weights", show_progress):
                ctx = self._context(task, topo, hf_pretrained.config, chunks)
                self._convert_one(task, state, ctx, allowed)
                if release is not None:
                    release(task.mapping.hf_names)
            self._broadcast_tied_embeddings(chunks)
        return chunks

    def stream_weights_hf_to_megatron(
        self,
        hf_pretrained: Any,
        megatron_model: Union[torch.nn.Module, Sequence[torch.nn.Module]],
        conversion_tasks: Optional[List[WeightConversionTask]] = None,
    ) -> Iterator[MegatronWeightTuple]:
        """Generator variant: yields this rank's converted tensors (fresh tensors; the model is not modified)."""
        chunks = self._chunks(megatron_model)
        state = hf_pretrained.state
        tasks = conversion_tasks if conversion_tasks is not None else self.build_conversion_tasks(state.keys(), chunks)
        topo = _Topology.current()
        with torch.no_grad():
            for task in tasks:
                if task.param_weight is None:
                    continue
                ctx = self._context(task, topo, hf_pretrained.config, chunks)
                hf = self.maybe_modify_loaded_hf_weight(task.mapping.hf_param, state)
                yield MegatronWeightTuple(task.param_name, task.mapping.hf_to_megatron(hf, ctx), task.vp_stage)

    def _broadcast_tied_embeddings(self, chunks: Sequence[torch.nn.Module]) -> None:
        """With tied embeddings and PP > 1, fill the last stage's output layer from the first stage's embedding."""
        if not self._tied(chunks) or not dist.is_initialized():
            return
        from megatron.core import parallel_state as ps

        if not ps.model_parallel_is_initialized() or ps.get_pipeline_model_parallel_world_size() == 1:
            return
        first = ps.is_pipeline_first_stage(ignore_virtual=True)
        last = ps.is_pipeline_last_stage(ignore_virtual=True)
        if not (first or last):
            return
        group = ps.get_embedding_group()
        ranks = dist.get_process_group_ranks(group)
        if dist.get_rank() not in ranks:
            return
        emb = out = None
        for chunk in chunks:
            m = _unwrap_model(chunk)
            if getattr(m, "pre_process", False) and hasattr(m, "embedding"):
                emb = m.embedding.word_embeddings.weight
            if getattr(m, "post_process", False) and getattr(m, "output_layer", None) is not None:
                out = m.output_layer.weight
        buf = emb.data if first else torch.empty_like(out.data)
        dist.broadcast(buf, src=ranks[0], group=group)
        if last and out is not None and (emb is None or out.data_ptr() != emb.data_ptr()):
            out.data.copy_(buf)

    # ----------------------------------------------------------------------------------------------------------------
    # Export: Megatron -> HF
    # ----------------------------------------------------------------------------------------------------------------

    def stream_weights_megatron_to_hf(
        self,
        megatron_model: Union[torch.nn.Module, Sequence[torch.nn.Module]],
        hf_pretrained: Any = None,
        *,
        bucket_bytes: int = DEFAULT_BUCKET_BYTES,
        dst: Union[int, str] = 0,
        show_progress: Optional[bool] = None,
        hf_config: Any = None,
        conversion_tasks: Optional[List[WeightConversionTask]] = None,
        copy: bool = True,
        cpu: bool = True,
    ) -> Iterator[HFWeightTuple]:
        """Stream the model as HF tensors, in the global order.

        Every rank must iterate the generator (it drives the collectives); tensors are yielded on ``dst`` (a global
        rank, default 0) or on every rank when ``dst == "all"``.

        Args:
            megatron_model: this rank's chunk(s).
            hf_pretrained: the HF source (``.config``, ``.state``): its dtypes are restored and its optional keys
                (a tied ``lm_head.weight``) reproduced. May be None when ``hf_config`` is given.
            bucket_bytes: byte budget of one flat collective.
            dst: destination global rank, or ``"all"``.
            show_progress: rich progress on rank 0.
            conversion_tasks: pre-built tasks (from :meth:`build_conversion_tasks`).
            copy: every yielded tensor is a fresh tensor (default). With False, a tensor that needs no conversion is
                yielded as a view of the parameter or of the reused message buffer, valid only until the next item is
                requested: for consumers that use each tensor at once (e.g. a writer), saving an allocation and a copy.
            cpu: move the HF tensors to the CPU (when the model lives on a GPU); False keeps them on the device.
        """
        chunks = self._chunks(megatron_model)
        topo = _Topology.current()
        config = hf_config if hf_config is not None else getattr(hf_pretrained, "config", None)
        state = getattr(hf_pretrained, "state", None)
        hf_keys = set(state.keys()) if state is not None else None
        tasks = conversion_tasks if conversion_tasks is not None else self.build_conversion_tasks(None, chunks)
        _, meta = self._global_order(chunks, topo)
        if bucket_bytes <= 0:
            raise ValueError(f"bucket_bytes must be positive, got {bucket_bytes}")
        everyone = dst == "all"
        if not everyone and not (0 <= int(dst) < topo.world):
            raise ValueError(f"dst must be a global rank in [0, {topo.world}) or 'all', got {dst!r}")
        dst_rank = 0 if everyone else int(dst)
        receiving = everyone or topo.rank == dst_rank
        model_cfg = getattr(_unwrap_model(chunks[0]), "config", None)
        tied = self._tied(chunks)

        buckets = self._buckets(tasks, meta, bucket_bytes)
        buffers = self._export_buffers  # kept across buckets and exports (repeated weight syncs): touched once
        device = _comm_device()  # NCCL moves CUDA buffers, gloo CPU ones

        def buffer(kind: str, nbytes: int) -> torch.Tensor:
            buf = buffers.get(kind)
            if buf is None or buf.numel() < nbytes or buf.device != device:
                buffers.pop(kind, None)
                buf = torch.empty(max(nbytes, 1), dtype=torch.uint8, device=device)
                buffers[kind] = buf
            return buf[:nbytes]

        plans = [self._bucket_plan(bucket, meta, topo, dst_rank, everyone) for bucket in buckets]
        pending: Dict[int, Tuple[torch.Tensor, List[Any]]] = {}  # bucket index -> (message, receive requests)

        def post_receive(i: int) -> Tuple[torch.Tensor, List[Any]]:
            """On the destination: place its own part and post one receive per other holder (double-buffered)."""
            plan = plans[i]
            msg = buffer(f"msg{i % 2}", plan.msg_bytes)
            requests = []
            for t, src in enumerate(plan.senders):
                lo, hi = plan.part_range(t)
                if src == topo.rank:
                    self._pack_part(msg[lo:hi], plan, t)
                elif hi > lo:
                    requests.append(dist.irecv(msg[lo:hi], src=src))
            return msg, requests

        for i, bucket in enumerate(self._progress(buckets, "Exporting HF weights", show_progress)):
            plan = plans[i]
            layout = plan.layout
            if plan.direct:
                # the destination owns the whole bucket: convert straight from the parameters
                views = [[task.param_weight.detach()] for task, _ in layout]
            else:
                # message layout on the destination: [replicated | shard 0 | shard 1 | ...]; each holder sends its
                # part straight to the destination (no all-gather, no hop, no broadcast to every stage)
                msg = None
                if plan.mine and topo.rank != dst_rank:
                    t = plan.senders.index(topo.rank)
                    lo, hi = plan.part_range(t)
                    if hi > lo:
                        dist.send(self._pack_part(buffer("send", hi - lo), plan, t), dst=dst_rank)
                if topo.rank == dst_rank:
                    msg, requests = pending.pop(i) if i in pending else post_receive(i)
                    for req in requests:
                        req.wait()
                    # receive the next bucket while this one is converted
                    if not everyone and i + 1 < len(plans) and not plans[i + 1].direct:
                        pending[i + 1] = post_receive(i + 1)
                if everyone and topo.world > 1:
                    if msg is None:
                        msg = buffer("msg0", plan.msg_bytes)
                    dist.broadcast(msg, src=dst_rank)
                if not receiving:
                    continue
                views = self._split_message(msg, plan)
            # unpack into HF tensors (fresh tensors: the message buffer and the parameters are never handed out)
            for (task, m), shards in zip(layout, views):
                ctx = ConversionContext(tp_size=len(shards), tp_rank=0, config=model_cfg,
                                        hf_vocab_size=getattr(config, "vocab_size", None), layout=m.layout)
                converted = task.mapping.megatron_to_hf(shards, ctx)
                converted = self.maybe_modify_converted_hf_weight(task, converted)
                storages = {s.untyped_storage().data_ptr() for s in shards}
                for name, tensor in converted.items():
                    tensor = self._to_hf_dtype(name, tensor, state)
                    if cpu and tensor.device.type != "cpu":
                        tensor = tensor.cpu()
                    if copy and tensor.untyped_storage().data_ptr() in storages:
                        tensor = tensor.clone()
                    yield HFWeightTuple(name, tensor)
                    if tied and task.global_param_name.endswith("embedding.word_embeddings.weight") and \
                            hf_keys is not None and self.tied_output_hf_name in hf_keys:
                        yield HFWeightTuple(self.tied_output_hf_name, tensor.clone() if copy else tensor)

    @staticmethod
    def _bucket_plan(bucket, meta, topo: _Topology, dst_rank: int, everyone: bool) -> "_BucketPlan":
        layout = [(t, meta[t.global_param_name]) for t in bucket]
        senders = layout[0][1].senders  # every tensor of a bucket has the same shard holders
        nbytes = [int(torch.Size(m.shape).numel()) * m.dtype.itemsize for _, m in layout]
        sharded = [m.layout in (COLUMN, ROW) and len(senders) > 1 for _, m in layout]
        mine = topo.rank in senders
        return _BucketPlan(
            layout=layout, senders=senders, nbytes=nbytes, sharded=sharded, mine=mine,
            local_total=sum(n for n, s in zip(nbytes, sharded) if s),
            repl_total=sum(n for n, s in zip(nbytes, sharded) if not s),
            direct=mine and len(senders) == 1 and senders[0] == dst_rank == topo.rank and not everyone,
        )

    @staticmethod
    def _pack_part(out: torch.Tensor, plan: "_BucketPlan", index: int) -> torch.Tensor:
        """Holder ``index``'s part of a bucket's message into ``out``: (holder 0 only) the replicated tensors, then
        its shards."""
        at = 0
        if index == 0:
            for (task, _), size, s in zip(plan.layout, plan.nbytes, plan.sharded):
                if not s:
                    out[at:at + size].copy_(_byte_view(task.param_weight))
                    at += size
        for (task, _), size, s in zip(plan.layout, plan.nbytes, plan.sharded):
            if s:
                out[at:at + size].copy_(_byte_view(task.param_weight))
                at += size
        return out

    @staticmethod
    def _to_hf_dtype(name: str, tensor: torch.Tensor, state: Any) -> torch.Tensor:
        if state is None or name not in state:
            return tensor
        want = state.dtype(name) if hasattr(state, "dtype") else state[name].dtype
        return tensor if tensor.dtype == want else tensor.to(want)

    @staticmethod
    def _split_message(msg: torch.Tensor, plan: "_BucketPlan") -> List[List[torch.Tensor]]:
        """Per task, the list of per-shard tensors (views into the message)."""
        out = []
        at_sharded, at_repl = 0, 0
        tp, local_total = len(plan.senders), plan.local_total
        for (task, m), n, s in zip(plan.layout, plan.nbytes, plan.sharded):
            if s:
                base = plan.repl_total + at_sharded
                out.append([msg[base + r * local_total: base + r * local_total + n].view(m.dtype).view(m.shape)
                            for r in range(tp)])
                at_sharded += n
            else:
                out.append([msg[at_repl: at_repl + n].view(m.dtype).view(m.shape)])
                at_repl += n
        return out

    @staticmethod
    def _buckets(tasks, meta, budget: int) -> List[List[WeightConversionTask]]:
        """Consecutive tasks with the same shard holders whose gathered bytes stay within ``budget``."""
        buckets: List[List[WeightConversionTask]] = []
        current: List[WeightConversionTask] = []
        used = 0
        for task in tasks:
            m = meta[task.global_param_name]
            size = int(torch.Size(m.shape).numel()) * m.dtype.itemsize * (
                len(m.senders) if m.layout in (COLUMN, ROW) else 1)
            if current and (meta[current[0].global_param_name].senders != m.senders or used + size > budget):
                buckets.append(current)
                current, used = [], 0
            current.append(task)
            used += size
        if current:
            buckets.append(current)
        return buckets
