"""Parameter mappings: how one Megatron parameter relates to one or more HF tensors.

A mapping names its Megatron parameter and its HF tensor(s); names may hold wildcards (``*`` digits, ``**`` anything)
that the registry resolves. Packing maths lives in :mod:`megatron_bridge_ext.ops`; mappings decide what to read and
where it goes:

- ``hf_to_megatron(hf, ctx, out)`` produces this rank's Megatron tensor from (lazy, possibly memory-mapped) HF tensors,
  writing straight into ``out`` (the parameter) when given, and reading only the rows this rank keeps.
- ``megatron_to_hf(shards, ctx)`` turns the tensors of every TP rank (index = TP rank; one tensor for replicated
  parameters) back into HF tensors in one pass.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Sequence, Union

import torch

from megatron_bridge_ext import ops

HFParam = Union[str, Dict[str, str]]
HFWeights = Union[torch.Tensor, Dict[str, torch.Tensor]]

__all__ = [
    "ConversionContext",
    "MegatronParamMapping",
    "DirectMapping",
    "ReplicatedMapping",
    "ColumnParallelMapping",
    "RowParallelMapping",
    "AutoMapping",
    "QKVMapping",
    "KVMapping",
    "ConcatenatedQKVMapping",
    "GatedMLPMapping",
    "register_module_layout",
    "detect_layout",
]

COLUMN, ROW, REPLICATED = "column", "row", "replicated"


@dataclass
class ConversionContext:
    """Where a conversion runs: this rank's tensor-parallel position, the model config and the owning module.

    Attributes:
        tp_size, tp_rank: tensor-parallel size and rank of this parameter's group.
        config: the Megatron TransformerConfig (heads, groups, kv_channels, ...).
        module: the Megatron module owning the parameter (None on ranks that do not own it).
        param: the parameter (None when not owned).
        hf_vocab_size: HF vocabulary size, for trimming the padded vocabulary on export.
        padded_vocab_size: Megatron's padded vocabulary size, for zero-padding on import.
        layout: resolved TP layout (``column``, ``row``, ``replicated``) for Auto mappings.
    """

    tp_size: int = 1
    tp_rank: int = 0
    config: Any = None
    module: Optional[torch.nn.Module] = None
    param: Optional[torch.Tensor] = None
    hf_vocab_size: Optional[int] = None
    padded_vocab_size: Optional[int] = None
    layout: Optional[str] = None
    extra: Dict[str, Any] = field(default_factory=dict)


class MegatronParamMapping:
    """Base class of all mappings.

    Args:
        megatron_param: Megatron parameter name (pattern), e.g. ``decoder.layers.*.mlp.linear_fc2.weight``.
        hf_param: one HF name (pattern) or a dict of role -> HF name (e.g. ``{"q": ..., "k": ..., "v": ...}``).
    """

    #: TP layout of the Megatron parameter; None means "ask detect_layout" (Auto).
    layout: Optional[str] = REPLICATED

    def __init__(self, megatron_param: str, hf_param: HFParam) -> None:
        self.megatron_param = megatron_param
        self.hf_param: HFParam = dict(hf_param) if isinstance(hf_param, Mapping) else hf_param

    def with_names(self, megatron_param: str, hf_param: HFParam) -> "MegatronParamMapping":
        """A copy of this mapping with other (e.g. wildcard-resolved) names."""
        clone = copy.copy(self)
        clone.megatron_param = megatron_param
        clone.hf_param = dict(hf_param) if isinstance(hf_param, Mapping) else hf_param
        return clone

    @property
    def hf_names(self) -> List[str]:
        """Every HF tensor name this mapping reads or writes."""
        return list(self.hf_param.values()) if isinstance(self.hf_param, dict) else [self.hf_param]

    def resolved_layout(self, ctx: ConversionContext) -> str:
        """The TP layout used on this rank."""
        return self.layout or ctx.layout or REPLICATED

    def hf_to_megatron(
        self, hf: HFWeights, ctx: ConversionContext, out: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        """This rank's Megatron tensor from the HF tensor(s); written into ``out`` when given."""
        raise NotImplementedError(f"{type(self).__name__} does not implement hf_to_megatron")

    def megatron_to_hf(self, shards: Sequence[torch.Tensor], ctx: ConversionContext) -> Dict[str, torch.Tensor]:
        """HF tensors from the tensors of every TP rank (one tensor for a replicated parameter)."""
        raise NotImplementedError(f"{type(self).__name__} does not implement megatron_to_hf")

    def __repr__(self) -> str:
        return f"{type(self).__name__}(megatron_param={self.megatron_param!r}, hf_param={self.hf_param!r})"


def _single(hf: HFWeights, mapping: MegatronParamMapping) -> torch.Tensor:
    if isinstance(hf, dict):
        raise ValueError(f"{mapping!r} expects one HF tensor, got {sorted(hf)}")
    return hf


def _write(result: torch.Tensor, out: Optional[torch.Tensor]) -> torch.Tensor:
    if out is None:
        return result
    out.copy_(result)
    return out


def _is_vocab(name: str) -> bool:
    return name.endswith("word_embeddings.weight") or name.endswith("output_layer.weight")


# --------------------------------------------------------------------------------------------------------------------
# Plain layouts
# --------------------------------------------------------------------------------------------------------------------


class ReplicatedMapping(MegatronParamMapping):
    """Every TP rank holds the full tensor (norms, routers, row-parallel biases)."""

    layout = REPLICATED

    def hf_to_megatron(self, hf, ctx, out=None):
        return _write(_single(hf, self), out) if out is not None else _single(hf, self).contiguous()

    def megatron_to_hf(self, shards, ctx):
        return {self.hf_param: shards[0]}


class DirectMapping(ReplicatedMapping):
    """One-to-one copy with no tensor parallelism."""


class ColumnParallelMapping(MegatronParamMapping):
    """Split dim 0 into ``tp`` chunks (QKV/fc1 without packing, embeddings, output layer).

    Vocabulary tensors (``word_embeddings`` / ``output_layer``) are padded with zero rows on import when Megatron's
    padded vocabulary is larger than HF's, and trimmed back to ``ctx.hf_vocab_size`` on export.
    """

    layout = COLUMN

    def hf_to_megatron(self, hf, ctx, out=None):
        hf = _single(hf, self)
        if hf.dim() == 0:
            raise ValueError(f"{self.megatron_param}: column-parallel tensor {self.hf_param} is a scalar")
        rows = hf.shape[0]
        if _is_vocab(self.megatron_param) and ctx.padded_vocab_size is not None:
            rows = max(rows, ctx.padded_vocab_size)
        if rows % ctx.tp_size:
            raise ValueError(
                f"{self.megatron_param}: HF tensor {self.hf_param} has {rows} rows, not divisible by "
                f"tensor_model_parallel_size = {ctx.tp_size}"
            )
        local_rows = rows // ctx.tp_size
        if out is None:
            out = hf.new_empty((local_rows, *hf.shape[1:]))
        if rows == hf.shape[0]:
            return ops.shard_copy(hf, out, mesh_shape=[ctx.tp_size], mesh_coord=[ctx.tp_rank], shard_dims=[0])
        # padded vocabulary: rows [start, start + local_rows) of the zero-padded tensor
        start = ctx.tp_rank * local_rows
        valid = max(0, min(hf.shape[0] - start, local_rows))
        if valid:
            out.narrow(0, 0, valid).copy_(hf.narrow(0, start, valid))
        if valid < local_rows:
            out.narrow(0, valid, local_rows - valid).zero_()
        return out

    def megatron_to_hf(self, shards, ctx):
        rows = sum(s.shape[0] for s in shards)
        if _is_vocab(self.megatron_param) and ctx.hf_vocab_size is not None:
            rows = min(rows, ctx.hf_vocab_size)
        full = shards[0].new_empty((rows, *shards[0].shape[1:]))
        at = 0
        for s in shards:
            n = min(s.shape[0], rows - at)
            if n <= 0:
                break
            full.narrow(0, at, n).copy_(s.narrow(0, 0, n))
            at += n
        return {self.hf_param: full}


class RowParallelMapping(MegatronParamMapping):
    """Split dim 1 into ``tp`` chunks (``linear_proj``, ``linear_fc2``); a 1-D bias is replicated."""

    layout = ROW

    def hf_to_megatron(self, hf, ctx, out=None):
        hf = _single(hf, self)
        if hf.dim() < 2:
            return _write(hf, out) if out is not None else hf.contiguous()
        if hf.shape[1] % ctx.tp_size:
            raise ValueError(
                f"{self.megatron_param}: HF tensor {self.hf_param} has {hf.shape[1]} columns, not divisible by "
                f"tensor_model_parallel_size = {ctx.tp_size}"
            )
        cols = hf.shape[1] // ctx.tp_size
        if out is None:
            out = hf.new_empty((hf.shape[0], cols, *hf.shape[2:]))
        return ops.shard_copy(hf, out, mesh_shape=[ctx.tp_size], mesh_coord=[ctx.tp_rank], shard_dims=[1])

    def megatron_to_hf(self, shards, ctx):
        if shards[0].dim() < 2 or len(shards) == 1:
            return {self.hf_param: shards[0]}
        return {self.hf_param: torch.cat(list(shards), dim=1)}


# Layout detection for AutoMapping: by the parameter's Megatron TP attributes, then by the owning module's class.
_LAYOUT_BY_CLASS: Dict[str, str] = {
    "ColumnParallelLinear": COLUMN,
    "VocabParallelEmbedding": COLUMN,
    "TEColumnParallelLinear": COLUMN,
    "TELayerNormColumnParallelLinear": COLUMN,
    "TEColumnParallelGroupedLinear": COLUMN,
    "RowParallelLinear": ROW,
    "TERowParallelLinear": ROW,
    "TERowParallelGroupedLinear": ROW,
}


def register_module_layout(module_class: Union[type, str], layout: str) -> None:
    """Declare the TP layout (``column``, ``row`` or ``replicated``) of a module class's weights for AutoMapping."""
    if layout not in (COLUMN, ROW, REPLICATED):
        raise ValueError(f"register_module_layout: layout must be column, row or replicated, got {layout!r}")
    _LAYOUT_BY_CLASS[module_class if isinstance(module_class, str) else module_class.__name__] = layout


def detect_layout(module: Optional[torch.nn.Module], param: Optional[torch.Tensor], param_name: str) -> str:
    """TP layout of a parameter: its ``tensor_model_parallel``/``partition_dim`` attributes, else its module's class.

    Row-parallel biases and ``layer_norm_*`` parameters of fused TE modules are replicated.
    """
    leaf = param_name.rsplit(".", 1)[-1]
    if param is not None and getattr(param, "tensor_model_parallel", False):
        return COLUMN if getattr(param, "partition_dim", 0) == 0 else ROW
    if param is not None and hasattr(param, "tensor_model_parallel"):
        return REPLICATED
    if leaf.startswith("layer_norm"):
        return REPLICATED
    if module is not None:
        for cls in type(module).__mro__:
            layout = _LAYOUT_BY_CLASS.get(cls.__name__)
            if layout is not None:
                if layout == ROW and not leaf.startswith("weight"):
                    return REPLICATED
                return layout
    return REPLICATED


class AutoMapping(MegatronParamMapping):
    """Layout detected from the owning module (see :func:`detect_layout`), then column/row/replicated behaviour."""

    layout = None
    _impl = {COLUMN: ColumnParallelMapping, ROW: RowParallelMapping, REPLICATED: ReplicatedMapping}

    def _delegate(self, ctx: ConversionContext) -> MegatronParamMapping:
        layout = ctx.layout or detect_layout(ctx.module, ctx.param, self.megatron_param)
        return self._impl[layout](self.megatron_param, self.hf_param)

    def hf_to_megatron(self, hf, ctx, out=None):
        return self._delegate(ctx).hf_to_megatron(hf, ctx, out)

    def megatron_to_hf(self, shards, ctx):
        return self._delegate(ctx).megatron_to_hf(shards, ctx)


# --------------------------------------------------------------------------------------------------------------------
# Attention
# --------------------------------------------------------------------------------------------------------------------


def _attention_dims(ctx: ConversionContext):
    cfg = ctx.config
    heads = cfg.num_attention_heads
    groups = cfg.num_query_groups or heads
    head_dim = cfg.kv_channels or cfg.hidden_size // heads
    return heads, groups, head_dim


class QKVMapping(MegatronParamMapping):
    """HF ``q_proj``/``k_proj``/``v_proj`` <-> Megatron fused ``linear_qkv`` (weights or biases, output gate optional)."""

    layout = COLUMN

    def __init__(self, megatron_param: str, q: str, k: str, v: str, output_gate: bool = False) -> None:
        super().__init__(megatron_param, {"q": q, "k": k, "v": v})
        self.output_gate = output_gate

    def hf_to_megatron(self, hf, ctx, out=None):
        heads, groups, d = _attention_dims(ctx)
        return ops.qkv_pack(hf["q"], hf["k"], hf["v"], num_heads=heads, num_query_groups=groups, head_dim=d,
                            tp_size=ctx.tp_size, tp_rank=ctx.tp_rank, output_gate=self.output_gate, out=out)

    def megatron_to_hf(self, shards, ctx):
        heads, groups, d = _attention_dims(ctx)
        tp = len(shards)
        rest = tuple(shards[0].shape[1:])
        q_rows = heads * d * (2 if self.output_gate else 1)
        q = shards[0].new_empty((q_rows, *rest))
        k = shards[0].new_empty((groups * d, *rest))
        v = shards[0].new_empty((groups * d, *rest))
        qr, kr = q_rows // tp, groups * d // tp
        for t, shard in enumerate(shards):  # each shard is a whole set of groups: unpack it in place
            ops.qkv_unpack(shard, num_heads=heads // tp, num_query_groups=groups // tp, head_dim=d,
                           output_gate=self.output_gate,
                           out=(q.narrow(0, t * qr, qr), k.narrow(0, t * kr, kr), v.narrow(0, t * kr, kr)))
        return {self.hf_param["q"]: q, self.hf_param["k"]: k, self.hf_param["v"]: v}


class KVMapping(MegatronParamMapping):
    """HF ``k_proj``/``v_proj`` <-> Megatron ``linear_kv`` (per group ``[k_g; v_g]``)."""

    layout = COLUMN

    def __init__(self, megatron_param: str, k: str, v: str) -> None:
        super().__init__(megatron_param, {"k": k, "v": v})

    def hf_to_megatron(self, hf, ctx, out=None):
        _, groups, d = _attention_dims(ctx)
        return ops.kv_pack(hf["k"], hf["v"], num_query_groups=groups, head_dim=d, tp_size=ctx.tp_size,
                           tp_rank=ctx.tp_rank, out=out)

    def megatron_to_hf(self, shards, ctx):
        _, groups, d = _attention_dims(ctx)
        tp = len(shards)
        rest = tuple(shards[0].shape[1:])
        k = shards[0].new_empty((groups * d, *rest))
        v = shards[0].new_empty((groups * d, *rest))
        kr = groups * d // tp
        for t, shard in enumerate(shards):
            ops.qkv_unpack(shard, num_heads=0, num_query_groups=groups // tp, head_dim=d,
                           out=(None, k.narrow(0, t * kr, kr), v.narrow(0, t * kr, kr)))
        return {self.hf_param["k"]: k, self.hf_param["v"]: v}


class ConcatenatedQKVMapping(MegatronParamMapping):
    """One HF tensor with ``[q; k; v]`` rows <-> Megatron fused ``linear_qkv``."""

    layout = COLUMN

    def __init__(self, megatron_param: str, hf_param: str, output_gate: bool = False) -> None:
        super().__init__(megatron_param, hf_param)
        self.output_gate = output_gate

    def hf_to_megatron(self, hf, ctx, out=None):
        heads, groups, d = _attention_dims(ctx)
        return ops.qkv_pack_fused(_single(hf, self), num_heads=heads, num_query_groups=groups, head_dim=d,
                                  tp_size=ctx.tp_size, tp_rank=ctx.tp_rank, output_gate=self.output_gate, out=out)

    def megatron_to_hf(self, shards, ctx):
        heads, groups, d = _attention_dims(ctx)
        split = QKVMapping(self.megatron_param, "q", "k", "v", self.output_gate).megatron_to_hf(shards, ctx)
        return {self.hf_param: torch.cat([split["q"], split["k"], split["v"]], dim=0)}


# --------------------------------------------------------------------------------------------------------------------
# MLP
# --------------------------------------------------------------------------------------------------------------------


class GatedMLPMapping(MegatronParamMapping):
    """HF ``gate_proj``/``up_proj`` <-> Megatron gated ``linear_fc1`` (TP rank t holds ``[gate_t; up_t]``)."""

    layout = COLUMN

    def __init__(self, megatron_param: str, gate: str, up: str) -> None:
        super().__init__(megatron_param, {"gate": gate, "up": up})

    def hf_to_megatron(self, hf, ctx, out=None):
        return ops.gate_up_pack(hf["gate"], hf["up"], tp_size=ctx.tp_size, tp_rank=ctx.tp_rank, out=out)

    def megatron_to_hf(self, shards, ctx):
        half = shards[0].shape[0] // 2
        rest = tuple(shards[0].shape[1:])
        gate = shards[0].new_empty((half * len(shards), *rest))
        up = shards[0].new_empty((half * len(shards), *rest))
        for t, shard in enumerate(shards):
            ops.gate_up_unpack(shard, tp_size=1, out=(gate.narrow(0, t * half, half), up.narrow(0, t * half, half)))
        return {self.hf_param["gate"]: gate, self.hf_param["up"]: up}
