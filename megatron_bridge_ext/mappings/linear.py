"""Plain tensor-parallel layouts: replicated, column-parallel (dim 0, with vocabulary padding), row-parallel (dim 1),
Auto (the layout the engine resolved from the model), and one parameter that the HF checkpoint also stores as
copies."""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence

import torch

from megatron_bridge_ext import geometry, ops
from megatron_bridge_ext.mappings.base import (COLUMN, REPLICATED, ROW, ConversionContext, MegatronParamMapping, single,
                                               write)
from megatron_bridge_ext.naming import is_vocab

__all__ = ["ReplicatedMapping", "ColumnParallelMapping", "RowParallelMapping", "AutoMapping", "CopiesMapping",
           "with_copies", "is_vocab"]


class ReplicatedMapping(MegatronParamMapping):
    """Every TP rank holds the full tensor (norms, routers, row-parallel biases)."""

    layout = REPLICATED
    reads_quantized = True

    def hf_to_megatron(self, hf, ctx, out=None):
        hf = single(hf, self)
        if isinstance(hf, ops.QuantizedWeight):
            if out is not None and ops.fp8_blocks(hf) is not None:
                return ops.fp8_block_dequant(hf.weight, hf.scale, block_size=hf.block_size, out=out)
            hf = hf.dequantize()
        return write(hf, out) if out is not None else hf.contiguous()

    def megatron_to_hf(self, shards, ctx):
        return {self.hf_param: shards[0]}

    def megatron_shape(self, hf, ctx):
        return tuple(single(hf, self))

    def hf_shapes(self, shard, num_shards, ctx):
        return {self.hf_param: tuple(shard)}


class ColumnParallelMapping(MegatronParamMapping):
    """Split dim 0 into ``tp`` chunks (QKV/fc1 without packing, embeddings, output layer).

    Vocabulary tensors (``word_embeddings`` / ``output_layer``) are padded with zero rows on import when Megatron's
    padded vocabulary is larger than HF's, and trimmed back to ``ctx.hf_vocab_size`` on export.
    """

    layout = COLUMN
    reads_quantized = True

    def hf_to_megatron(self, hf, ctx, out=None):
        hf = single(hf, self)
        if isinstance(hf, ops.QuantizedWeight):
            if ops.fp8_blocks(hf) is None or hf.dim() != 2 or is_vocab(self.megatron_param):
                return self.hf_to_megatron(hf.dequantize(), ctx, out)
            geometry.check_divisible(self.megatron_param, f"HF tensor {self.hf_param} rows", hf.shape[0],
                                     "tensor_model_parallel_size", ctx.tp_size)
            return ops.fp8_block_dequant(hf.weight, hf.scale, block_size=hf.block_size, dtype=hf.dtype,
                                         tp_size=ctx.tp_size, tp_rank=ctx.tp_rank, tp_dim=0, out=out)
        rows = self._rows(tuple(hf.shape), ctx)
        local_rows = rows // ctx.tp_size
        if out is None and ctx.tp_size == 1 and rows == hf.shape[0] and hf.is_contiguous():
            return hf  # the whole tensor, unpadded: nothing to copy (a caller with a destination passes ``out``)
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

    def _rows(self, shape, ctx) -> int:
        """The rows split over TP: the HF tensor's, or Megatron's padded vocabulary."""
        if len(shape) == 0:
            raise ValueError(f"{self.megatron_param}: column-parallel tensor {self.hf_param} is a scalar")
        rows = shape[0]
        if is_vocab(self.megatron_param) and ctx.padded_vocab_size is not None:
            rows = max(rows, ctx.padded_vocab_size)
        if rows % ctx.tp_size:
            raise ValueError(
                f"{self.megatron_param}: HF tensor {self.hf_param} has {rows} rows, not divisible by "
                f"tensor_model_parallel_size = {ctx.tp_size}"
            )
        return rows

    def _hf_rows(self, rows: int, ctx) -> int:
        """The HF rows of gathered Megatron rows (the padded vocabulary trimmed)."""
        if is_vocab(self.megatron_param) and ctx.hf_vocab_size is not None:
            return min(rows, ctx.hf_vocab_size)
        return rows

    def megatron_shape(self, hf, ctx):
        shape = tuple(single(hf, self))
        return (self._rows(shape, ctx) // ctx.tp_size, *shape[1:])

    def hf_shapes(self, shard, num_shards, ctx):
        return {self.hf_param: (self._hf_rows(shard[0] * num_shards, ctx), *shard[1:])}

    def megatron_to_hf(self, shards, ctx):
        rows = self._hf_rows(sum(s.shape[0] for s in shards), ctx)
        if len(shards) == 1 and rows == shards[0].shape[0]:
            return {self.hf_param: shards[0]}
        full = ctx.empty((rows, *shards[0].shape[1:]), shards[0])
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
    reads_quantized = True

    def hf_to_megatron(self, hf, ctx, out=None):
        hf = single(hf, self)
        if isinstance(hf, ops.QuantizedWeight):
            if ops.fp8_blocks(hf) is None or hf.dim() != 2:
                return self.hf_to_megatron(hf.dequantize(), ctx, out)
            geometry.check_divisible(self.megatron_param, f"HF tensor {self.hf_param} columns", hf.shape[1],
                                     "tensor_model_parallel_size", ctx.tp_size)
            return ops.fp8_block_dequant(hf.weight, hf.scale, block_size=hf.block_size, dtype=hf.dtype,
                                         tp_size=ctx.tp_size, tp_rank=ctx.tp_rank, tp_dim=1, out=out)
        if hf.dim() < 2:
            return write(hf, out) if out is not None else hf.contiguous()
        shape = self.megatron_shape(tuple(hf.shape), ctx)  # checks the split
        if out is None and ctx.tp_size == 1 and hf.is_contiguous():
            return hf  # the whole tensor: nothing to copy (a caller with a destination passes ``out``)
        if out is None:
            out = hf.new_empty(shape)
        return ops.shard_copy(hf, out, mesh_shape=[ctx.tp_size], mesh_coord=[ctx.tp_rank], shard_dims=[1])

    def megatron_shape(self, hf, ctx):
        shape = tuple(single(hf, self))
        if len(shape) < 2:
            return shape
        if shape[1] % ctx.tp_size:
            raise ValueError(
                f"{self.megatron_param}: HF tensor {self.hf_param} has {shape[1]} columns, not divisible by "
                f"tensor_model_parallel_size = {ctx.tp_size}"
            )
        return (shape[0], shape[1] // ctx.tp_size, *shape[2:])

    def hf_shapes(self, shard, num_shards, ctx):
        if len(shard) < 2 or num_shards == 1:
            return {self.hf_param: tuple(shard)}
        return {self.hf_param: (shard[0], shard[1] * num_shards, *shard[2:])}

    def megatron_to_hf(self, shards, ctx):
        if shards[0].dim() < 2 or len(shards) == 1:
            return {self.hf_param: shards[0]}
        shape = (shards[0].shape[0], sum(s.shape[1] for s in shards), *shards[0].shape[2:])
        return {self.hf_param: torch.cat(list(shards), dim=1, out=ctx.empty(shape, shards[0]))}


class AutoMapping(MegatronParamMapping):
    """Column, row or replicated, as the engine resolved from the owning Megatron module (``ctx.layout``)."""

    layout = None
    _impl: Dict[str, type] = {COLUMN: ColumnParallelMapping, ROW: RowParallelMapping, REPLICATED: ReplicatedMapping}
    reads_quantized = all(impl.reads_quantized for impl in _impl.values())  # each delegate has a fused path

    def _delegate(self, ctx: ConversionContext) -> MegatronParamMapping:
        impl: Optional[type] = self._impl.get(ctx.layout)  # type: ignore[arg-type]
        if impl is None:
            raise ValueError(f"{self!r}: the context carries no resolved layout (ctx.layout = {ctx.layout!r}; "
                             f"expected one of {sorted(self._impl)})")
        return impl(self.megatron_param, self.hf_param)

    def hf_to_megatron(self, hf, ctx, out=None):
        return self._delegate(ctx).hf_to_megatron(hf, ctx, out)

    def megatron_to_hf(self, shards, ctx):
        return self._delegate(ctx).megatron_to_hf(shards, ctx)

    def megatron_shape(self, hf, ctx):
        return self._delegate(ctx).megatron_shape(hf, ctx)

    def hf_shapes(self, shard, num_shards, ctx):
        return self._delegate(ctx).hf_shapes(shard, num_shards, ctx)


class CopiesMapping(MegatronParamMapping):
    """One Megatron parameter (Auto layout) whose HF tensor the checkpoint also stores under other names: DeepSeek-V3
    and GLM-4.5 keep copies of the embedding and the output head in each multi-token-prediction layer
    (``model.layers.N.embed_tokens`` / ``shared_head.head``), which megatron-core shares with the main model.

    Import converts the main tensor and requires every copy to be equal to it on the rows this rank keeps (together
    the ranks compare every row); export writes the main tensor and one copy of it under each other name.

    Args:
        megatron_param: the Megatron parameter.
        main: its HF tensor.
        copies: HF names of the copies.

    Raises:
        ValueError: (import) a copy that differs from the main tensor, naming both.
    """

    layout = None

    def __init__(self, megatron_param: str, main: str, copies: Sequence[str]) -> None:
        if not copies:
            raise ValueError(f"CopiesMapping({megatron_param!r}): no copies of {main!r} given")
        super().__init__(megatron_param, {"main": main, **{f"copy{i}": c for i, c in enumerate(copies)}})

    def _main(self) -> AutoMapping:
        return AutoMapping(self.megatron_param, self.hf_param["main"])

    def hf_to_megatron(self, hf, ctx, out=None):
        if not isinstance(hf, dict):
            raise ValueError(f"{self!r} expects its HF tensors by role, got one tensor")
        main = self._main()
        result = main.hf_to_megatron(hf["main"], ctx, out)
        for role, name in self.hf_param.items():
            if role == "main":
                continue
            copy = hf[role]
            same = copy.shape == hf["main"].shape and copy.dtype == hf["main"].dtype
            if same and result.device.type != "meta":
                same = torch.equal(main.hf_to_megatron(copy, ctx), result)  # this rank's rows of the copy
            if not same:
                rows = f" in the rows of tensor-parallel rank {ctx.tp_rank} of {ctx.tp_size}" if ctx.tp_size > 1 else ""
                raise ValueError(
                    f"{self.megatron_param}: HF tensor {name} ({list(copy.shape)} {copy.dtype}) is stored as a copy "
                    f"of {self.hf_param['main']} ({list(hf['main'].shape)} {hf['main'].dtype}) but differs from it"
                    f"{rows}; Megatron holds one tensor for both, so converting would lose one of them"
                )
        return result

    def megatron_shape(self, hf, ctx):
        if not isinstance(hf, dict):
            raise ValueError(f"{self!r} expects its HF tensors by role, got one tensor")
        return self._main().megatron_shape(hf["main"], ctx)

    def hf_shapes(self, shard, num_shards, ctx):
        shape = self._main().hf_shapes(shard, num_shards, ctx)[self.hf_param["main"]]
        return {name: shape for name in self.hf_param.values()}

    @property
    def copies(self) -> List[str]:
        """The HF names of the copies, in the order export writes them."""
        return [name for role, name in self.hf_param.items() if role != "main"]

    def megatron_to_hf(self, shards, ctx):
        name = self.hf_param["main"]
        tensor = self._main().megatron_to_hf(shards, ctx)[name]
        out: Dict[str, torch.Tensor] = {name: tensor}
        for role, copy in self.hf_param.items():
            if role != "main":
                out[copy] = ctx.empty(tensor.shape, tensor).copy_(tensor)
        return out


def with_copies(mapping: MegatronParamMapping, copies: Sequence[str]) -> CopiesMapping:
    """``mapping`` (one HF tensor, Auto layout, or a :class:`CopiesMapping`) with more HF names holding copies of its
    tensor: the tied output layer a checkpoint stores (``lm_head.weight``, a copy of the embedding that
    megatron-core keeps once).

    Raises:
        ValueError: a mapping of several HF tensors or of a fixed layout, which cannot have copies.
    """
    if isinstance(mapping, CopiesMapping):
        return CopiesMapping(mapping.megatron_param, mapping.hf_param["main"], mapping.copies + list(copies))
    if type(mapping) is not AutoMapping or not isinstance(mapping.hf_param, str):
        raise ValueError(f"{mapping!r} cannot hold copies {list(copies)}: only a one-tensor AutoMapping or a "
                         "CopiesMapping can")
    return CopiesMapping(mapping.megatron_param, mapping.hf_param, copies)
