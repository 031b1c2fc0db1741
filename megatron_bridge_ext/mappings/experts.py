"""Routed experts: a whole layer's experts convert with one fused op call per rank (section 4 of the semantics).

An expert mapping is registered with the expert index as the LAST wildcard of its Megatron name, e.g.
``decoder.layers.*.mlp.experts.local_experts.*.linear_fc1.weight`` (sequential experts) or
``decoder.layers.*.mlp.experts.linear_fc1.weight*`` (grouped-GEMM names). The registry resolves a parameter name to
the layer's group (the expert index left as ``*``); the engine collects every expert of the layer into one task and
calls :meth:`ExpertMapping.for_experts` with the model's expert count, which expands the HF names:

- one HF tensor per expert: the HF names carry the expert index as their last wildcard
  (``model.layers.*.mlp.experts.*.gate_proj.weight``), roles ``gate``/``up`` (fc1) or ``down`` (fc2); non-gated
  experts (NemotronH) have one fc1 role, ``up`` (:class:`ExpertUpMapping`);
- fused HF tensors: one name per layer, without an expert wildcard (``model.layers.*.mlp.experts.gate_up_proj``
  ``[E, 2F, D]`` or ``[E, D, 2F]`` with ``transposed``; ``down_proj`` ``[E, D, F]`` or ``[E, F, D]``), roles
  ``gate_up`` (fc1) or ``down`` (fc2).

On import, ``hf`` holds per role the E global expert tensors (lazy views) or the fused tensor, ``out`` the E/ep local
expert parameters of this rank: one ``expert_pack_*`` call reads only the experts and rows the rank keeps. On export,
``shards`` are the ep*etp holders' stacked local experts (index ``ep_rank * etp + etp_rank``, each
``[E/ep, ...]``; the destination's own holder may come as the list of its expert parameters), unpacked by one
``expert_unpack_*`` call into the HF tensors; without expert-TP, per-expert HF tensors are views of the shards (gate
and up the row halves of fc1), with nothing to copy.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch

from megatron_bridge_ext import geometry, ops
from megatron_bridge_ext.mappings.base import EXPERTS, MegatronParamMapping

__all__ = ["ExpertMapping", "ExpertFC1Mapping", "ExpertFC2Mapping", "ExpertUpMapping"]

ExpertNames = Union[str, List[str]]


class ExpertMapping(MegatronParamMapping):
    """Base of the routed-expert mappings (a layer's experts as one task).

    Subclasses implement the two conversions and the shape contract (``megatron_shape``: one local expert's
    parameter; ``hf_shapes``: from the stacked ``[E/ep, ...]`` shard of one holder).
    """

    layout = EXPERTS
    grouped = True
    reads_quantized = True
    #: roles whose HF tensor is fused over experts (one tensor ``[E, ...]`` per layer)
    fused_roles: Sequence[str] = ()

    def __init__(self, megatron_param: str, hf_param: Dict[str, str], *, transposed: bool = False) -> None:
        super().__init__(megatron_param, hf_param)
        self.transposed = transposed
        #: global expert index of the parameter this mapping was resolved for (set by the registry)
        self.expert: Optional[int] = None
        self.num_experts: Optional[int] = None

    @property
    def fused(self) -> bool:
        """Whether the HF side stores all experts of the layer in one tensor per role."""
        return any(role in self.fused_roles for role in self.hf_param)

    def for_experts(self, num_experts: int) -> "ExpertMapping":
        """A copy whose ``hf_param`` lists, per role, the E per-expert HF names (or keeps the fused name)."""
        if num_experts < 1:
            raise ValueError(f"{self!r}: num_experts must be >= 1, got {num_experts}")
        clone = self.with_names(self.megatron_param, {
            role: name if role in self.fused_roles else [_fill_expert(name, e, self) for e in range(num_experts)]
            for role, name in self.hf_param.items()
        })
        clone.num_experts = num_experts
        return clone

    @property
    def hf_names(self) -> List[str]:
        """HF names in export order: expert by expert, the roles of each expert together (fused: one per role)."""
        values = list(self.hf_param.values())
        if all(isinstance(v, str) for v in values):
            return values
        return [name for names in zip(*values) for name in names]

    def _expert_views(self, hf: Dict[str, object], role: str) -> List[torch.Tensor]:
        value = hf[role]
        if isinstance(value, torch.Tensor):
            return list(value.unbind(0))
        return list(value)  # type: ignore[arg-type]


def _stacked(shards: Sequence) -> List[torch.Tensor]:
    """Each holder's local experts as one ``[E_local, ...]`` tensor (the destination's own holder comes as the list of
    its expert parameters, which is stacked here where an op needs one tensor)."""
    return [torch.stack(list(s), 0) if isinstance(s, (list, tuple)) else s for s in shards]


def _per_expert(shards: Sequence) -> Optional[Tuple[int, List]]:
    """``(E_local, shards)`` when every local expert of every holder is a contiguous tensor, else None."""
    if not all(w.is_contiguous() for s in shards for w in (s if isinstance(s, (list, tuple)) else s.unbind(0))):
        return None
    first = shards[0]
    return (len(first) if isinstance(first, (list, tuple)) else first.shape[0]), list(shards)


def _fill_expert(pattern: str, expert: int, mapping: MegatronParamMapping) -> str:
    if "*" not in pattern:
        raise ValueError(f"{mapping!r}: HF name {pattern!r} carries no expert wildcard to expand")
    head, _, tail = pattern.rpartition("*")
    return f"{head}{expert}{tail}"


class ExpertFC1Mapping(ExpertMapping):
    """Routed experts' gated ``linear_fc1`` (gate/up packed per expert, sharded over expert-TP).

    Args:
        megatron_param: Megatron name with the expert index as its last wildcard.
        gate, up: per-expert HF names (expert index as their last wildcard); or
        gate_up: one fused HF tensor per layer (``[E, 2F, D]``; ``[E, D, 2F]`` with ``transposed``).
        interleaved: in a fused tensor, even rows are gate and odd rows up.
    """

    fused_roles = ("gate_up",)

    def __init__(self, megatron_param: str, *, gate: Optional[str] = None, up: Optional[str] = None,
                 gate_up: Optional[str] = None, interleaved: bool = False, transposed: bool = False) -> None:
        if (gate_up is None) == (gate is None or up is None):
            raise ValueError(f"ExpertFC1Mapping({megatron_param!r}): give gate= and up=, or gate_up=")
        super().__init__(megatron_param, {"gate_up": gate_up} if gate_up is not None else {"gate": gate, "up": up},
                         transposed=transposed)
        self.interleaved = interleaved

    def _gate_up(self, hf):
        if self.fused:
            return ops.expert_fc1_views(hf["gate_up"], interleaved=self.interleaved, transposed=self.transposed)
        return self._expert_views(hf, "gate"), self._expert_views(hf, "up")

    def megatron_shape(self, hf, ctx) -> Tuple[int, ...]:
        """Shape of one local expert's ``linear_fc1`` on this rank for HF tensors of these shapes."""
        if self.fused:
            fused = hf["gate_up"]
            num, gate = fused[0], geometry.gate_up_half_shape(self.megatron_param, fused[1:], self.transposed)
        else:
            num, gate = len(hf["gate"]), hf["gate"][0]
        return geometry.expert_fc1_shard_shape(self.megatron_param, num, tuple(gate), ctx.ep_size, ctx.ep_rank,
                                               ctx.tp_size, ctx.tp_rank)[1:]

    def hf_shapes(self, shard, num_shards, ctx):
        half = geometry.expert_fc1_expert_shape(self.megatron_param, shard, ctx.ep_size, ctx.tp_size)
        num_experts = shard[0] * ctx.ep_size
        if self.fused:
            return {self.hf_param["gate_up"]: (num_experts, *geometry.fused_gate_up_shape(half, self.transposed))}
        return {name: half for pair in zip(self.hf_param["gate"], self.hf_param["up"]) for name in pair}

    def hf_to_megatron(self, hf, ctx, out=None):
        split = dict(ep_size=ctx.ep_size, ep_rank=ctx.ep_rank, etp_size=ctx.tp_size, etp_rank=ctx.tp_rank)
        if self.fused:
            gu = hf["gate_up"]
            if isinstance(gu, ops.QuantizedWeight) and gu.method == "mxfp4" and self.transposed:
                # GPT-OSS: the blocks are stored [E, 2F, D/32, 16], the transpose of the [E, D, 2F] parameter
                return ops.mxfp4_expert_pack_fc1(gu.weight, gu.scale, interleaved=self.interleaved, dtype=gu.dtype,
                                                 out=out, **split)
        else:
            gate, up = list(hf["gate"]), list(hf["up"])
            block = ops.fp8_blocks(*gate, *up)
            if block is not None:  # only this rank's experts and rows are dequantized
                return ops.fp8_expert_pack_fc1([g.weight for g in gate], [g.scale for g in gate],
                                               [u.weight for u in up], [u.scale for u in up], block_size=block,
                                               dtype=gate[0].dtype, out=out, **split)
        gate, up = self._gate_up(ops.dequantized(hf))
        return ops.expert_pack_fc1(gate, up, out=out, **split)

    def megatron_to_hf(self, shards, ctx):
        per_expert = _per_expert(shards) if ctx.tp_size == 1 and not self.fused else None
        if per_expert is not None:
            # no expert-TP: expert e's gate and up are the two row halves of its local parameter (holder e // E_local),
            # contiguous views: nothing to copy (the engine clones views of Megatron memory when asked for copies)
            local, holders = per_expert
            views: Dict[str, torch.Tensor] = {}
            for e, (gn, un) in enumerate(zip(self.hf_param["gate"], self.hf_param["up"])):
                w = holders[e // local][e % local]
                half = w.shape[0] // 2
                views[gn], views[un] = w.narrow(0, 0, half), w.narrow(0, half, half)
            return views
        shards = _stacked(shards)
        s = shards[0]
        num_experts = s.shape[0] * ctx.ep_size
        f = s.shape[1] // 2 * ctx.tp_size
        rest = tuple(s.shape[2:])
        if self.fused:
            shape = (num_experts, *rest, 2 * f) if self.transposed and rest else (num_experts, 2 * f, *rest)
            fused = ctx.empty(shape, s)
            out = self._gate_up({"gate_up": fused})
            ops.expert_unpack_fc1(shards, ep_size=ctx.ep_size, etp_size=ctx.tp_size, out=out)
            return {self.hf_param["gate_up"]: fused}
        gate, up = ctx.empty((num_experts, f, *rest), s), ctx.empty((num_experts, f, *rest), s)
        ops.expert_unpack_fc1(shards, ep_size=ctx.ep_size, etp_size=ctx.tp_size, out=(list(gate), list(up)))
        out: Dict[str, torch.Tensor] = {}
        for e, (gn, un) in enumerate(zip(self.hf_param["gate"], self.hf_param["up"])):
            out[gn], out[un] = gate[e], up[e]
        return out


class ExpertFC2Mapping(ExpertMapping):
    """Routed experts' ``linear_fc2`` (columns sharded over expert-TP; 1-D biases replicated).

    Args:
        megatron_param: Megatron name with the expert index as its last wildcard.
        down: per-expert HF name (expert index as its last wildcard), or one fused HF tensor per layer with
            ``fused=True`` (``[E, D, F]``; ``[E, F, D]`` with ``transposed``).
    """

    fused_roles = ("down_fused",)

    def __init__(self, megatron_param: str, down: str, *, fused: bool = False, transposed: bool = False) -> None:
        super().__init__(megatron_param, {"down_fused" if fused else "down": down}, transposed=transposed)

    def _down(self, hf):
        if self.fused:
            return ops.expert_fc2_views(hf["down_fused"], transposed=self.transposed)
        return self._expert_views(hf, "down")

    def megatron_shape(self, hf, ctx) -> Tuple[int, ...]:
        """Shape of one local expert's ``linear_fc2`` on this rank for HF tensors of these shapes."""
        if self.fused:
            fused = hf["down_fused"]
            num, down = fused[0], tuple(fused[1:])
            if self.transposed and len(down) == 2:
                down = down[::-1]
        else:
            num, down = len(hf["down"]), tuple(hf["down"][0])
        return geometry.expert_fc2_shard_shape(self.megatron_param, num, down, ctx.ep_size, ctx.ep_rank,
                                               ctx.tp_size, ctx.tp_rank)[1:]

    def hf_shapes(self, shard, num_shards, ctx):
        down = geometry.expert_fc2_expert_shape(self.megatron_param, shard, ctx.ep_size, ctx.tp_size)
        if self.fused:
            if self.transposed and len(down) == 2:
                down = down[::-1]
            return {self.hf_param["down_fused"]: (shard[0] * ctx.ep_size, *down)}
        return {name: down for name in self.hf_param["down"]}

    def hf_to_megatron(self, hf, ctx, out=None):
        split = dict(ep_size=ctx.ep_size, ep_rank=ctx.ep_rank, etp_size=ctx.tp_size, etp_rank=ctx.tp_rank)
        if self.fused:
            d = hf["down_fused"]
            if isinstance(d, ops.QuantizedWeight) and d.method == "mxfp4" and self.transposed:
                # GPT-OSS: the blocks are stored [E, D, F/32, 16], the transpose of the [E, F, D] parameter
                return ops.mxfp4_expert_pack_fc2(d.weight, d.scale, dtype=d.dtype, out=out, **split)
        else:
            down = list(hf["down"])
            block = ops.fp8_blocks(*down)
            if block is not None:
                return ops.fp8_expert_pack_fc2([x.weight for x in down], [x.scale for x in down], block_size=block,
                                               dtype=down[0].dtype, out=out, **split)
        return ops.expert_pack_fc2(self._down(ops.dequantized(hf)), out=out, **split)

    def megatron_to_hf(self, shards, ctx):
        per_expert = _per_expert(shards) if ctx.tp_size == 1 and not self.fused else None
        if per_expert is not None:  # no expert-TP: expert e's down is its local parameter (holder e // E_local)
            local, holders = per_expert
            return {name: holders[e // local][e % local] for e, name in enumerate(self.hf_param["down"])}
        shards = _stacked(shards)
        s = shards[0]
        num_experts = s.shape[0] * ctx.ep_size
        expert_shape = (s.shape[1], s.shape[2] * ctx.tp_size) if s.dim() == 3 else (s.shape[1],)
        if self.fused:
            if self.transposed and len(expert_shape) == 2:
                expert_shape = expert_shape[::-1]
            fused = ctx.empty((num_experts, *expert_shape), s)
            ops.expert_unpack_fc2(shards, ep_size=ctx.ep_size, etp_size=ctx.tp_size,
                                  out=self._down({"down_fused": fused}))
            return {self.hf_param["down_fused"]: fused}
        down = ctx.empty((num_experts, *expert_shape), s)
        ops.expert_unpack_fc2(shards, ep_size=ctx.ep_size, etp_size=ctx.tp_size, out=list(down))
        return {name: down[e] for e, name in enumerate(self.hf_param["down"])}


class ExpertUpMapping(ExpertMapping):
    """Routed experts' non-gated ``linear_fc1`` (``gated_linear_unit=False``: NemotronH's squared-ReLU experts): one
    HF ``up_proj`` ``[F, D]`` per expert, whose rows are sharded over expert-TP (``[F/etp, D]`` per local expert).

    A row split of ``[F, D]`` is the column split of its transpose ``[D, F]``: the packing is
    ``expert_pack_fc2`` / ``expert_unpack_fc2`` on transposed views of both sides (the ops take strided views and
    copy transposed pairs tile by tile), one call per rank for the whole layer.

    Args:
        megatron_param: Megatron name with the expert index as its last wildcard.
        up: per-expert HF name (expert index as its last wildcard).
    """

    def __init__(self, megatron_param: str, up: str) -> None:
        super().__init__(megatron_param, {"up": up})

    def _check_2d(self, shape: Sequence[int]) -> None:
        if len(shape) != 2:
            raise ValueError(f"{self.megatron_param}: non-gated expert up_proj {self.hf_param['up']} has shape "
                             f"{list(shape)}, expected [F, D] (a weight; biases are not converted here)")

    def megatron_shape(self, hf, ctx) -> Tuple[int, ...]:
        """Shape of one local expert's ``linear_fc1`` ``[F/etp, D]`` on this rank for HF tensors of these shapes."""
        num, up = len(hf["up"]), tuple(hf["up"][0])
        self._check_2d(up)
        _, d, f = geometry.expert_fc2_shard_shape(self.megatron_param, num, up[::-1], ctx.ep_size, ctx.ep_rank,
                                                  ctx.tp_size, ctx.tp_rank)
        return (f, d)

    def hf_shapes(self, shard, num_shards, ctx):
        self._check_2d(shard[1:])
        up = (shard[1] * ctx.tp_size, shard[2])
        return {name: up for name in self.hf_param["up"]}

    def hf_to_megatron(self, hf, ctx, out=None):
        up = self._expert_views(ops.dequantized(hf), "up")
        self._check_2d(tuple(up[0].shape))
        if out is None:
            f, d = self.megatron_shape({"up": [tuple(u.shape) for u in up]}, ctx)
            out = up[0].new_empty((len(up) // ctx.ep_size, f, d))
        dst = out.transpose(1, 2) if isinstance(out, torch.Tensor) else [o.t() for o in out]
        ops.expert_pack_fc2([u.t() for u in up], ep_size=ctx.ep_size, ep_rank=ctx.ep_rank, etp_size=ctx.tp_size,
                            etp_rank=ctx.tp_rank, out=dst)
        return out

    def megatron_to_hf(self, shards, ctx):
        per_expert = _per_expert(shards) if ctx.tp_size == 1 else None
        if per_expert is not None:  # no expert-TP: expert e's up is its local parameter (holder e // E_local)
            local, holders = per_expert
            return {name: holders[e // local][e % local] for e, name in enumerate(self.hf_param["up"])}
        shards = _stacked(shards)
        s = shards[0]
        self._check_2d(tuple(s.shape[1:]))
        up = ctx.empty((s.shape[0] * ctx.ep_size, s.shape[1] * ctx.tp_size, s.shape[2]), s)
        ops.expert_unpack_fc2([x.transpose(1, 2) for x in shards], ep_size=ctx.ep_size, etp_size=ctx.tp_size,
                              out=[u.t() for u in up])
        return {name: up[e] for e, name in enumerate(self.hf_param["up"])}
