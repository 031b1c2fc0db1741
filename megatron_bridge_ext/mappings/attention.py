"""Attention: HF q/k/v (separate, or one fused ``qkv`` tensor) <-> Megatron's fused ``linear_qkv``, k/v <->
``linear_kv`` (section 1 of the semantics), and norms over a whole q or k projection, split by heads."""

from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch

from megatron_bridge_ext import geometry, ops
from megatron_bridge_ext.mappings.base import COLUMN, MegatronParamMapping, attention_dims, single
from megatron_bridge_ext.mappings.linear import ColumnParallelMapping

__all__ = ["QKVMapping", "KVMapping", "ConcatenatedQKVMapping", "KeyAsValueQKVMapping", "HeadShardedNormMapping"]

Dims = Optional[Tuple[int, int, int]]


def _dims(mapping, ctx) -> Tuple[int, int, int]:
    """(H, G, d) of a mapping: its own ``dims`` where the table gives them (a layer whose attention geometry differs
    from the model config's, e.g. Gemma 4's full-attention layers), else the model config's."""
    dims = getattr(mapping, "dims", None)
    return tuple(dims) if dims is not None else attention_dims(ctx)


def _unpack_shards_into(shards: Sequence[torch.Tensor], heads: int, groups: int, d: int, output_gate: bool,
                        q: Optional[torch.Tensor], k: torch.Tensor, v: torch.Tensor, ctx) -> None:
    """Unpack the TP shards straight into (q, k, v); q is None for the KV-only layout (``heads == 0``).

    A shard holding whole query groups is unpacked into its rows directly. With fewer groups than shards, each group's
    tp / G slices are joined first and the group block unpacked into the group's rows.
    """
    tp = len(shards)
    g = geometry.qkv_geometry("qkv_unpack", heads, groups, d, output_gate, tp_size=tp)
    if groups < tp:
        per = tp // groups
        rows = shards[0].shape[0] * per
        blocks = [torch.cat(list(shards[i * per:(i + 1) * per]), dim=0,
                            out=ctx.empty((rows, *shards[0].shape[1:]), shards[0])) for i in range(groups)]
        shards, tp = blocks, groups
    qr, kr = g.q_rows // tp, g.kv_rows // tp
    for t, shard in enumerate(shards):
        ops.qkv_unpack(shard, num_heads=heads // tp, num_query_groups=groups // tp, head_dim=d,
                       output_gate=output_gate,
                       out=(None if q is None else q.narrow(0, t * qr, qr), k.narrow(0, t * kr, kr),
                            v.narrow(0, t * kr, kr)))


def _hf_rows(ctx, output_gate: bool, dims: Dims = None) -> Tuple[int, int]:
    heads, groups, d = dims if dims is not None else attention_dims(ctx)
    g = geometry.qkv_geometry("qkv", heads, groups, d, output_gate)
    return g.q_rows, g.kv_rows


def _packed_shape(op: str, ctx, output_gate: bool, rest: Sequence[int], heads: Optional[int] = None,
                  dims: Dims = None) -> Tuple[int, ...]:
    """This TP rank's packed ``[G*P/tp, ...]`` (``heads == 0``: the KV-only ``[2*G*d/tp, ...]``)."""
    h, groups, d = dims if dims is not None else attention_dims(ctx)
    g = geometry.qkv_geometry(op, h if heads is None else heads, groups, d, output_gate, tp_size=ctx.tp_size,
                              tp_rank=ctx.tp_rank)
    return (g.shard_rows(ctx.tp_size), *rest)


class QKVMapping(MegatronParamMapping):
    """HF ``q_proj``/``k_proj``/``v_proj`` <-> Megatron fused ``linear_qkv`` (weights or biases, output gate optional).

    ``dims``: (H, G, d) of the layers this entry names, where they differ from the model config's (a table entry
    for those layer indices, e.g. Gemma 4's full-attention layers); None: the model config's."""

    layout = COLUMN
    reads_quantized = True

    def __init__(self, megatron_param: str, q: str, k: str, v: str, output_gate: bool = False,
                 dims: Dims = None) -> None:
        super().__init__(megatron_param, {"q": q, "k": k, "v": v})
        self.output_gate = output_gate
        self.dims = None if dims is None else tuple(int(x) for x in dims)

    def hf_to_megatron(self, hf, ctx, out=None):
        heads, groups, d = _dims(self, ctx)
        q, k, v = hf["q"], hf["k"], hf["v"]
        block = ops.fp8_blocks(q, k, v)
        if block is not None:  # dequantized straight into this rank's packed rows
            return ops.fp8_qkv_pack(q.weight, q.scale, k.weight, k.scale, v.weight, v.scale, num_heads=heads,
                                    num_query_groups=groups, head_dim=d, block_size=block, tp_size=ctx.tp_size,
                                    tp_rank=ctx.tp_rank, output_gate=self.output_gate, dtype=q.dtype, out=out)
        q, k, v = ops.dequantized([q, k, v])
        return ops.qkv_pack(q, k, v, num_heads=heads, num_query_groups=groups, head_dim=d,
                            tp_size=ctx.tp_size, tp_rank=ctx.tp_rank, output_gate=self.output_gate, out=out)

    def megatron_shape(self, hf, ctx):
        return _packed_shape(self.megatron_param, ctx, self.output_gate, hf["q"][1:], dims=self.dims)

    def hf_shapes(self, shard, num_shards, ctx):
        q_rows, kv_rows = _hf_rows(ctx, self.output_gate, self.dims)
        rest = tuple(shard[1:])
        return {self.hf_param["q"]: (q_rows, *rest), self.hf_param["k"]: (kv_rows, *rest),
                self.hf_param["v"]: (kv_rows, *rest)}

    def megatron_to_hf(self, shards, ctx):
        q_rows, kv_rows = _hf_rows(ctx, self.output_gate, self.dims)
        rest = tuple(shards[0].shape[1:])
        q, k, v = (ctx.empty((rows, *rest), shards[0]) for rows in (q_rows, kv_rows, kv_rows))
        _unpack_shards_into(shards, *_dims(self, ctx), self.output_gate, q, k, v, ctx)
        return {self.hf_param["q"]: q, self.hf_param["k"]: k, self.hf_param["v"]: v}


class KeyAsValueQKVMapping(MegatronParamMapping):
    """HF ``q_proj``/``k_proj`` of an attention whose keys' projection also gives the values (no ``v_proj``; Gemma 4's
    ``attention_k_eq_v`` full-attention layers) <-> Megatron fused ``linear_qkv``.

    Import packs ``k_proj`` as both the key and the value rows (the fused QKV op, as :class:`QKVMapping`), so the
    Megatron layer computes exactly what HF does (the value norm / key norm then apply to their own copies). Export
    unpacks all three and requires the value rows to equal the key rows bit for bit: a Megatron model trained apart
    has its value rows drift from its key rows and no HF equivalent, which is refused by name (no ``v_proj`` is
    written). ``dims`` as :class:`QKVMapping`'s.
    """

    layout = COLUMN

    def __init__(self, megatron_param: str, q: str, k: str, dims: Dims = None) -> None:
        super().__init__(megatron_param, {"q": q, "k": k})
        self.output_gate = False
        self.dims = None if dims is None else tuple(int(x) for x in dims)

    def hf_to_megatron(self, hf, ctx, out=None):
        heads, groups, d = _dims(self, ctx)
        q, k = ops.dequantized([hf["q"], hf["k"]])
        return ops.qkv_pack(q, k, k, num_heads=heads, num_query_groups=groups, head_dim=d, tp_size=ctx.tp_size,
                            tp_rank=ctx.tp_rank, out=out)

    def megatron_shape(self, hf, ctx):
        return _packed_shape(self.megatron_param, ctx, False, hf["q"][1:], dims=self.dims)

    def hf_shapes(self, shard, num_shards, ctx):
        q_rows, kv_rows = _hf_rows(ctx, False, self.dims)
        rest = tuple(shard[1:])
        return {self.hf_param["q"]: (q_rows, *rest), self.hf_param["k"]: (kv_rows, *rest)}

    def megatron_to_hf(self, shards, ctx):
        q_rows, kv_rows = _hf_rows(ctx, False, self.dims)
        rest = tuple(shards[0].shape[1:])
        q, k = (ctx.empty((rows, *rest), shards[0]) for rows in (q_rows, kv_rows))
        v = shards[0].new_empty((kv_rows, *rest))  # checked, never written out
        _unpack_shards_into(shards, *_dims(self, ctx), False, q, k, v, ctx)
        if not torch.equal(k, v):
            diff = (k.float() - v.float()).abs().max().item()
            raise ValueError(f"{self.megatron_param}: the value rows differ from the key rows (max |k - v| = "
                             f"{diff:g}); the HF layer ({self.hf_param['k']}) uses its key projection as values "
                             "(attention_k_eq_v) and has no v_proj, so this Megatron model has no HF equivalent")
        return {self.hf_param["q"]: q, self.hf_param["k"]: k}


class KVMapping(MegatronParamMapping):
    """HF ``k_proj``/``v_proj`` <-> Megatron ``linear_kv`` (per group ``[k_g; v_g]``)."""

    layout = COLUMN

    def __init__(self, megatron_param: str, k: str, v: str) -> None:
        super().__init__(megatron_param, {"k": k, "v": v})

    def hf_to_megatron(self, hf, ctx, out=None):
        _, groups, d = attention_dims(ctx)
        return ops.kv_pack(hf["k"], hf["v"], num_query_groups=groups, head_dim=d, tp_size=ctx.tp_size,
                           tp_rank=ctx.tp_rank, out=out)

    def megatron_shape(self, hf, ctx):
        return _packed_shape(self.megatron_param, ctx, False, hf["k"][1:], heads=0)

    def hf_shapes(self, shard, num_shards, ctx):
        _, groups, d = attention_dims(ctx)
        rest = tuple(shard[1:])
        return {self.hf_param["k"]: (groups * d, *rest), self.hf_param["v"]: (groups * d, *rest)}

    def megatron_to_hf(self, shards, ctx):
        _, groups, d = attention_dims(ctx)
        rest = tuple(shards[0].shape[1:])
        k = ctx.empty((groups * d, *rest), shards[0])
        v = ctx.empty((groups * d, *rest), shards[0])
        _unpack_shards_into(shards, 0, groups, d, False, None, k, v, ctx)
        return {self.hf_param["k"]: k, self.hf_param["v"]: v}


class ConcatenatedQKVMapping(MegatronParamMapping):
    """One HF tensor with ``[q; k; v]`` rows (e.g. Phi-3's ``qkv_proj``) <-> Megatron fused ``linear_qkv``."""

    layout = COLUMN

    def __init__(self, megatron_param: str, hf_param: str, output_gate: bool = False) -> None:
        super().__init__(megatron_param, hf_param)
        self.output_gate = output_gate

    def hf_to_megatron(self, hf, ctx, out=None):
        heads, groups, d = attention_dims(ctx)
        return ops.qkv_pack_fused(single(hf, self), num_heads=heads, num_query_groups=groups, head_dim=d,
                                  tp_size=ctx.tp_size, tp_rank=ctx.tp_rank, output_gate=self.output_gate, out=out)

    def megatron_shape(self, hf, ctx):
        return _packed_shape(self.megatron_param, ctx, self.output_gate, single(hf, self)[1:])

    def hf_shapes(self, shard, num_shards, ctx):
        q_rows, kv_rows = _hf_rows(ctx, self.output_gate)
        return {self.hf_param: (q_rows + 2 * kv_rows, *shard[1:])}

    def megatron_to_hf(self, shards, ctx):
        q_rows, kv_rows = _hf_rows(ctx, self.output_gate)
        fused = ctx.empty((q_rows + 2 * kv_rows, *shards[0].shape[1:]), shards[0])
        q, k, v = fused.narrow(0, 0, q_rows), fused.narrow(0, q_rows, kv_rows), fused.narrow(0, q_rows + kv_rows,
                                                                                              kv_rows)
        _unpack_shards_into(shards, *attention_dims(ctx), self.output_gate, q, k, v, ctx)  # one pass, straight into the fused tensor
        return {self.hf_param: fused}


class HeadShardedNormMapping(ColumnParallelMapping):
    """A norm weight over a whole query or key projection (HF OLMo 2 ``q_norm`` ``[H*d]`` / ``k_norm`` ``[G*d]``) <->
    TP rank t's slice of it, the weights of its heads (``[H/tp*d]`` / ``[G/tp*d]``, rows in HF head order as
    megatron's query / key heads are): a column split checked against the heads, so a split that would cut a head
    or give a rank the wrong heads is refused.

    Args:
        megatron_param, hf_param: the names.
        heads: ``"q"`` (``num_attention_heads``) or ``"k"`` (``num_query_groups``).

    Raises:
        ValueError: an HF tensor that is not ``heads * head_dim`` long, or heads that the TP size does not divide
            (fewer key heads than TP ranks: megatron replicates each key head over tp / G ranks), named.
    """

    def __init__(self, megatron_param: str, hf_param: str, heads: str = "q") -> None:
        if heads not in ("q", "k"):
            raise ValueError(f"HeadShardedNormMapping({megatron_param!r}): heads must be 'q' or 'k', got {heads!r}")
        super().__init__(megatron_param, hf_param)
        self.heads = heads

    def _heads(self, ctx) -> Tuple[int, int]:
        """(head count, head_dim), checked against the TP size."""
        h, g, d = attention_dims(ctx)
        n, field = (h, "num_attention_heads") if self.heads == "q" else (g, "num_query_groups")
        if n % ctx.tp_size:
            raise ValueError(f"{self.megatron_param}: {field} = {n} is not a multiple of tensor_model_parallel_size = "
                             f"{ctx.tp_size}: the norm over the whole {self.heads} projection ({self.hf_param}) needs "
                             "whole heads on each TP rank")
        return n, d

    def _check_rows(self, shape, ctx) -> None:
        n, d = self._heads(ctx)
        if tuple(shape) != (n * d,):
            raise ValueError(f"{self.megatron_param}: HF tensor {self.hf_param} has shape {list(shape)}, expected "
                             f"[{n * d}] ({'num_attention_heads' if self.heads == 'q' else 'num_query_groups'} {n} "
                             f"x head_dim {d})")

    def hf_to_megatron(self, hf, ctx, out=None):
        self._check_rows(tuple(single(hf, self).shape), ctx)
        return super().hf_to_megatron(hf, ctx, out)

    def megatron_shape(self, hf, ctx):
        self._check_rows(tuple(single(hf, self)), ctx)
        return super().megatron_shape(hf, ctx)

    def hf_shapes(self, shard, num_shards, ctx):
        n, d = self._heads(ctx)
        return {self.hf_param: (n * d,)}

    def megatron_to_hf(self, shards, ctx):
        n, d = self._heads(ctx)
        rows = sum(s.shape[0] for s in shards)
        if rows != n * d:
            raise ValueError(f"{self.megatron_param}: {len(shards)} shard(s) hold {rows} rows, expected {n * d} "
                             f"({self.heads} heads {n} x head_dim {d})")
        return super().megatron_to_hf(shards, ctx)
