"""Conversion tasks: the global parameter order, what every rank knows about each parameter, and the task list.

Every rank sees the same ordered list of global names (``gather_param_names`` over the world: pipeline stages and
expert-parallel ranks hold different parameters) and the same metadata per name (owning stage, shape, dtype, TP
layout, and which rank holds which shard in data-parallel replica zero), exchanged once per model structure.

A task is one Megatron parameter with its mapping, or, for routed experts, one layer's experts of one kind (fc1 or
fc2) with their expert mapping: a *group* whose shard on an (EP, expert-TP) rank is its local experts stacked, so a
layer converts with one op call per rank (import) and one on the destination (export).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import torch
import torch.distributed as dist

from megatron_bridge_ext import ops
from megatron_bridge_ext.mappings import COLUMN, EXPERTS, REPLICATED, ROW, MegatronParamMapping, with_copies
from megatron_bridge_ext.mcore.names import LocalParam, ModelView, local_params
from megatron_bridge_ext.mcore.topology import Topology
from megatron_bridge_ext.mcore.versions import check_opt_in_layouts
from megatron_bridge_ext.registry import MegatronMappingRegistry

__all__ = ["ParamMeta", "WeightConversionTask", "ConversionTasks", "GlobalOrder", "build_tasks"]


@dataclass(frozen=True)
class ParamMeta:
    """What every rank knows about one global parameter or expert group.

    Attributes:
        pp_rank: pipeline rank that owns it.
        shape: shape of one holder's shard (a group: ``[E/ep, *expert shard shape]``).
        dtype: its dtype.
        layout: ``column``, ``row``, ``replicated`` or ``experts``.
        senders: global rank holding shard i (TP or expert-TP index; a group: ``ep_rank * etp + etp_rank``), in
            replica zero.
    """

    pp_rank: int
    shape: Tuple[int, ...]
    dtype: torch.dtype
    layout: str
    senders: Tuple[int, ...]

    @property
    def shard_bytes(self) -> int:
        """Bytes of one holder's shard."""
        return int(torch.Size(self.shape).numel()) * self.dtype.itemsize

    @property
    def sharded(self) -> bool:
        """Every holder sends its own part (else holder 0 sends the one replicated tensor)."""
        return self.layout in (COLUMN, ROW, EXPERTS) and len(self.senders) > 1

    @property
    def gathered_bytes(self) -> int:
        """Bytes of the whole tensor (all shards) on the destination."""
        return self.shard_bytes * (len(self.senders) if self.sharded else 1)


@dataclass(frozen=True)
class WeightConversionTask:
    """One Megatron parameter, or one layer's routed experts of one kind, to convert.

    Attributes:
        param_name: unwrapped local name on the owning rank (the global name where not owned; a group's name).
        global_param_name: global name (layer / expert indices global); for a group, the name with ``*`` for the
            expert index (e.g. ``decoder.layers.3.mlp.experts.local_experts.*.linear_fc1.weight``).
        mapping: the resolved mapping (a group's lists every expert's HF names).
        pp_rank: pipeline rank that owns the parameter.
        vp_stage: virtual-pipeline chunk index on the owner (None where not owned).
        param_weight: the parameter or persistent buffer (None where not owned, and for groups).
        layout: the resolved TP layout.
        members: a group's global parameter names, by global expert index.
        local_weights: a group's parameters on this rank (its local experts, in order).
    """

    param_name: str
    global_param_name: str
    mapping: MegatronParamMapping
    pp_rank: int
    vp_stage: Optional[int] = None
    param_weight: Optional[torch.Tensor] = None
    layout: str = REPLICATED
    members: Tuple[str, ...] = ()
    local_weights: Tuple[torch.Tensor, ...] = field(default=())

    @property
    def is_group(self) -> bool:
        return bool(self.members)

    @property
    def owned(self) -> bool:
        """This rank holds (part of) it."""
        return self.param_weight is not None or bool(self.local_weights)

    @property
    def local_tensors(self) -> Tuple[torch.Tensor, ...]:
        """What this rank holds of it, in message order (a group: its local experts)."""
        if self.param_weight is not None:
            return (self.param_weight,)
        return self.local_weights


LayoutOf = Callable[[LocalParam], str]


class GlobalOrder:
    """The ordered global names and their metadata, identical on every rank; cached per model structure.

    Args:
        registry: the mapping registry (expert groups are found through it).
        layout_of: the TP layout of a local parameter (mapping layout, else detected from its module).
    """

    def __init__(self, registry: MegatronMappingRegistry, layout_of: LayoutOf) -> None:
        self.registry = registry
        self.layout_of = layout_of
        self._cache: Optional[Tuple[Any, List[str], Dict[str, ParamMeta]]] = None

    def invalidate(self) -> None:
        """Forget the cached order (the next call exchanges names and metadata again)."""
        self._cache = None

    def get(self, chunks: Sequence[torch.nn.Module], topo: Topology,
            entries: Optional[List[LocalParam]] = None) -> Tuple[List[str], Dict[str, ParamMeta]]:
        """(names, metadata per name); collective over the world the first time for a given model structure.

        Names are gathered with ``gather_param_names``; the metadata with one ``all_gather_object``.
        """
        entries = list(local_params(chunks, topo)) if entries is None else entries
        fingerprint = (topo.world, topo.tp_size, topo.pp_size, topo.ep_size, topo.etp_size,
                       tuple((p.global_name, tuple(p.tensor.shape), p.tensor.dtype) for p in entries))
        if self._cache is not None and self._cache[0] == fingerprint:
            return self._cache[1], self._cache[2]
        local_meta = {}
        for p in entries:
            index, count, zero = topo.shard_of(p.global_name)
            if not zero:
                continue  # another replica reports it
            local_meta[p.global_name] = (topo.pp_rank, tuple(p.tensor.shape), str(p.tensor.dtype).replace("torch.", ""),
                                         self.layout_of(p), index, count)
        if topo.world > 1:
            names = ops.gather_param_names([p.global_name for p in entries], dist.group.WORLD)
            gathered: List[Any] = [None] * topo.world
            dist.all_gather_object(gathered, local_meta)
        else:
            names = sorted({p.global_name for p in entries}, key=lambda n: (ops.param_sort_key(n), n))
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
            meta[name] = ParamMeta(pp, tuple(shape), getattr(torch, dtype), layout, tuple(senders[name]))
        self._cache = (fingerprint, names, meta)
        return names, meta


def _group_meta(group: str, members: Sequence[str], meta: Dict[str, ParamMeta], ep_size: int) -> ParamMeta:
    """A layer's experts as one tensor: holder ``ep_rank * etp + etp_rank`` holds its E/ep experts stacked."""
    num = len(members)
    if num % ep_size:
        raise ValueError(f"{group}: {num} experts are not divisible by expert_model_parallel_size = {ep_size}")
    per = num // ep_size
    first = meta[members[0]]
    senders: List[int] = []
    for r in range(ep_size):
        lead = meta[members[r * per]]
        for name in members[r * per:(r + 1) * per]:
            m = meta[name]
            if m.senders != lead.senders or m.shape != first.shape or m.dtype != first.dtype:
                raise RuntimeError(
                    f"{group}: expert {name} ({list(m.shape)} {m.dtype}, holders {m.senders}) differs from "
                    f"{members[r * per]} ({list(lead.shape)} {lead.dtype}, holders {lead.senders}); the experts of "
                    "one expert-parallel rank must match"
                )
        senders.extend(lead.senders)
    return ParamMeta(first.pp_rank, (per, *first.shape), first.dtype, EXPERTS, tuple(senders))


class ConversionTasks(List[WeightConversionTask]):
    """The tasks of one model in the global order (a list), with what they were built for: their metadata
    (``meta``: global name -> :class:`ParamMeta`, expert groups included), the mapping table's HF layout
    (``layout``), the HF copies added to mappings (``copies``: global Megatron name -> HF names, e.g. a stored
    tied output layer) and the model view they were built from (``view``: the walk of the model, its config and
    padded vocabulary, made once). Built once per call and passed down; a call reuses them while all still hold."""

    def __init__(self, tasks: Iterable[WeightConversionTask], meta: Dict[str, ParamMeta], layout: Any,
                 copies: Mapping[str, Sequence[str]], view: ModelView) -> None:
        super().__init__(tasks)
        self.meta = meta
        self.layout = layout
        self.copies = {k: tuple(v) for k, v in copies.items()}
        self.view = view

    def has_copies(self, copies: Mapping[str, Sequence[str]]) -> bool:
        """Whether they were built with exactly these HF copies."""
        return self.copies == {k: tuple(v) for k, v in copies.items()}


def build_tasks(
    view: ModelView,
    order: GlobalOrder,
    hf_keys: Optional[Iterable[str]],
    bridge_name: str,
    copies: Optional[Mapping[str, Sequence[str]]] = None,
) -> Tuple[List[WeightConversionTask], Dict[str, ParamMeta]]:
    """Tasks for every global parameter in the global order (experts grouped per layer) and their metadata.

    ``copies`` (global Megatron name -> HF names): the HF checkpoint also stores the tensor of that parameter under
    these names (a tied output layer's ``lm_head.weight``); its mapping becomes a
    :class:`~megatron_bridge_ext.mappings.CopiesMapping` that checks them on import and writes them on export.

    Raises:
        ValueError: naming every Megatron parameter without a mapping, or every HF key a mapping needs that the
            checkpoint lacks; a layout setting of the model this package does not convert
            (``mcore.versions.check_opt_in_layouts``; on every rank, before any collective).
    """
    chunks, topo = view.chunks, view.topo
    check_opt_in_layouts(view.config, f"{bridge_name}: the Megatron model")
    entries = view.params
    names, meta = order.get(chunks, topo, entries)
    owned = {p.global_name: p for p in entries}
    keys = None if hf_keys is None else (hf_keys if isinstance(hf_keys, (set, frozenset, dict)) else set(hf_keys))
    cfg = view.config
    registry = order.registry

    # routed experts: one task per (layer, kind), members in global expert order
    groups: Dict[str, List[Tuple[int, str]]] = {}
    resolved: Dict[str, Optional[MegatronParamMapping]] = {}
    unmapped = []
    for name in names:
        mapping = registry.megatron_to_hf_lookup(name)
        resolved[name] = mapping
        if mapping is None:
            unmapped.append(name)
        elif mapping.grouped:
            groups.setdefault(mapping.megatron_param, []).append((mapping.expert, name))  # type: ignore[attr-defined]
    if unmapped:
        raise ValueError(
            f"{bridge_name}: no mapping for {len(unmapped)} Megatron parameter(s): {unmapped[:20]}"
            f"{' ...' if len(unmapped) > 20 else ''}"
        )
    num_experts = getattr(cfg, "num_moe_experts", None)
    full_meta = dict(meta)
    tasks: List[WeightConversionTask] = []
    missing: List[str] = []
    done_groups = set()
    for name in names:
        mapping = resolved[name]
        assert mapping is not None
        if mapping.grouped:
            group = mapping.megatron_param
            if group in done_groups:
                continue
            done_groups.add(group)
            members = [n for _, n in sorted(groups[group])]
            if num_experts is not None and len(members) != num_experts:
                raise ValueError(f"{bridge_name}: {group} has {len(members)} experts in the model, the config says "
                                 f"num_moe_experts = {num_experts}")
            mapping = mapping.for_experts(len(members))  # type: ignore[attr-defined]
            gmeta = _group_meta(group, members, meta, topo.ep_size)
            full_meta[group] = gmeta
            local = [owned[n] for n in members if n in owned]
            task = WeightConversionTask(group, group, mapping, gmeta.pp_rank,
                                        local[0].vp_stage if local else None, None, EXPERTS, tuple(members),
                                        tuple(p.tensor for p in local))
        else:
            m = meta[name]
            if copies and name in copies:
                mapping = with_copies(mapping, copies[name])
            if name in owned:
                p = owned[name]
                task = WeightConversionTask(p.local_name, name, mapping, m.pp_rank, p.vp_stage, p.tensor, m.layout)
            else:
                task = WeightConversionTask(name, name, mapping, m.pp_rank, layout=m.layout)
        if keys is not None:
            missing.extend(f"{k} (for {task.global_param_name})" for k in task.mapping.hf_names if k not in keys)
        tasks.append(task)
    if missing:
        raise ValueError(
            f"{bridge_name}: the HF checkpoint lacks {len(missing)} tensor(s) the model needs: "
            f"{missing[:20]}{' ...' if len(missing) > 20 else ''}"
        )
    return tasks, full_meta
