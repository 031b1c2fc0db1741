"""Gated MLP: HF gate/up (two tensors, or one ``gate_up_proj``, stacked, row-interleaved or transposed) <-> Megatron's
``linear_fc1`` where TP rank t holds ``[gate_t; up_t]`` (section 2 of the semantics)."""

from __future__ import annotations

from typing import Sequence, Tuple

import torch

from megatron_bridge_ext import geometry, ops
from megatron_bridge_ext.mappings.base import COLUMN, MegatronParamMapping, single

__all__ = ["GatedMLPMapping", "FusedGatedMLPMapping"]


def _unpack_shards_into(shards: Sequence[torch.Tensor], gate: torch.Tensor, up: torch.Tensor) -> None:
    """Shard t is ``[gate_t; up_t]``: unpack it straight into its rows of gate and up."""
    half = shards[0].shape[0] // 2
    for t, shard in enumerate(shards):
        ops.gate_up_unpack(shard, tp_size=1, out=(gate.narrow(0, t * half, half), up.narrow(0, t * half, half)))


def _hf_shape(shards: Sequence[torch.Tensor]) -> Tuple[int, ...]:
    return (shards[0].shape[0] // 2 * len(shards), *shards[0].shape[1:])


class GatedMLPMapping(MegatronParamMapping):
    """HF ``gate_proj``/``up_proj`` <-> Megatron gated ``linear_fc1`` (TP rank t holds ``[gate_t; up_t]``)."""

    layout = COLUMN
    reads_quantized = True

    def __init__(self, megatron_param: str, gate: str, up: str) -> None:
        super().__init__(megatron_param, {"gate": gate, "up": up})

    def hf_to_megatron(self, hf, ctx, out=None):
        gate, up = hf["gate"], hf["up"]
        block = ops.fp8_blocks(gate, up)
        if block is not None:  # dequantized straight into this rank's [gate_t; up_t]
            return ops.fp8_gate_up_pack(gate.weight, gate.scale, up.weight, up.scale, block_size=block,
                                        tp_size=ctx.tp_size, tp_rank=ctx.tp_rank, dtype=gate.dtype, out=out)
        gate, up = ops.dequantized(gate), ops.dequantized(up)
        return ops.gate_up_pack(gate, up, tp_size=ctx.tp_size, tp_rank=ctx.tp_rank, out=out)

    def hf_to_megatron_rows(self, hf, ctx):
        """At TP 1, ``[gate; up]`` is the two HF tensors one after the other: they are the rows."""
        gate, up = hf["gate"], hf["up"]
        if ctx.tp_size != 1 or not all(isinstance(t, torch.Tensor) for t in (gate, up)) or \
                gate.shape != up.shape or gate.dtype != up.dtype or gate.dim() < 1:
            return None
        return [gate, up]

    def megatron_shape(self, hf, ctx):
        gate = hf["gate"]
        return (geometry.gate_up_shard_rows(self.megatron_param, gate[0], ctx.tp_size, ctx.tp_rank), *gate[1:])

    def hf_shapes(self, shard, num_shards, ctx):
        half = (shard[0] // 2 * num_shards, *shard[1:])
        return {self.hf_param["gate"]: half, self.hf_param["up"]: half}

    def megatron_to_hf(self, shards, ctx):
        if len(shards) == 1 and shards[0].is_contiguous():
            # one shard [gate; up]: both HF tensors are contiguous views of it, nothing to copy (the engine clones
            # views of Megatron memory when the caller asked for copies)
            half = shards[0].shape[0] // 2
            return {self.hf_param["gate"]: shards[0].narrow(0, 0, half),
                    self.hf_param["up"]: shards[0].narrow(0, half, half)}
        shape = _hf_shape(shards)
        gate, up = ctx.empty(shape, shards[0]), ctx.empty(shape, shards[0])
        _unpack_shards_into(shards, gate, up)
        return {self.hf_param["gate"]: gate, self.hf_param["up"]: up}


class FusedGatedMLPMapping(MegatronParamMapping):
    """One HF tensor holding gate and up (e.g. Phi-3's ``gate_up_proj``) <-> Megatron gated ``linear_fc1``.

    Args:
        interleaved: even rows are gate, odd rows up (otherwise the first F rows are gate).
        transposed: the HF tensor is stored ``[in, out]``.
    """

    layout = COLUMN

    def __init__(self, megatron_param: str, hf_param: str, *, interleaved: bool = False,
                 transposed: bool = False) -> None:
        super().__init__(megatron_param, hf_param)
        self.interleaved = interleaved
        self.transposed = transposed

    def hf_to_megatron(self, hf, ctx, out=None):
        return ops.gate_up_pack_fused(single(hf, self), tp_size=ctx.tp_size, tp_rank=ctx.tp_rank,
                                      interleaved=self.interleaved, transposed=self.transposed, out=out)

    def megatron_shape(self, hf, ctx):
        half = geometry.gate_up_half_shape(self.megatron_param, single(hf, self), self.transposed)
        return (geometry.gate_up_shard_rows(self.megatron_param, half[0], ctx.tp_size, ctx.tp_rank), *half[1:])

    def hf_shapes(self, shard, num_shards, ctx):
        return {self.hf_param: geometry.fused_gate_up_shape((shard[0] // 2 * num_shards, *shard[1:]),
                                                            self.transposed)}

    def megatron_to_hf(self, shards, ctx):
        fused = ctx.empty(geometry.fused_gate_up_shape(_hf_shape(shards), self.transposed), shards[0])
        gate, up = ops.gate_up_views(fused, interleaved=self.interleaved, transposed=self.transposed)
        _unpack_shards_into(shards, gate, up)  # one pass, straight into the fused tensor's views
        return {self.hf_param: fused}
