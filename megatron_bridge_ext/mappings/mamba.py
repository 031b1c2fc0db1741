"""Mamba-2 mixer layouts: HF tensors whose rows are several components laid end to end <-> megatron-core's
``MambaMixer``, which splits each component over the TP ranks on its own and concatenates the rank's pieces.

- ``in_proj.weight`` ``[z; x; B; C; dt]`` (``d_inner``, ``d_inner``, ``G*N``, ``G*N``, ``nheads`` rows; ``d_inner =
  nheads * head_dim``, G groups of state size N): TP rank t holds ``[z_t; x_t; B_t; C_t; dt_t]``, each the t-th of
  tp equal row blocks of its component (megatron's ``in_proj.weight.partition_sizes``);
- ``conv1d.weight`` ``[conv_dim, 1, k]`` / ``conv1d.bias`` over the ``[x; B; C]`` channels: rank t holds
  ``[x_t; B_t; C_t]`` (megatron's ``conv1d_weight`` / ``conv1d_bias``, HF ``nn.Conv1d``'s ``[C, 1, k]`` as is).

The per-head parameters (``A_log``, ``D``, ``dt_bias``), the gated norm weight (``d_inner``: whole groups per rank)
and ``out_proj`` (row-parallel) are plain column / row splits (``mappings.linear``). Sizes come from the model config
in the context: ``mamba_num_heads``, ``mamba_head_dim``, ``mamba_num_groups``, ``mamba_state_dim``.
"""

from __future__ import annotations

from typing import Dict, List, Sequence, Tuple

import torch

from megatron_bridge_ext import ops
from megatron_bridge_ext.mappings.base import COLUMN, ConversionContext, MegatronParamMapping, single

__all__ = ["IN_PROJ_PARTS", "CONV_PARTS", "mamba_part_rows", "MambaSplitMapping"]

#: the components of the mixer's fused input projection and of its convolution, in row order
IN_PROJ_PARTS = ("z", "x", "B", "C", "dt")
CONV_PARTS = ("x", "B", "C")


def mamba_part_rows(op: str, config, parts: Sequence[str]) -> List[Tuple[str, int]]:
    """``(component, rows)`` of ``parts`` for a Mamba config (``z`` / ``x``: ``nheads * head_dim``; ``B`` / ``C``:
    ``groups * state``; ``dt``: ``nheads``).

    Raises:
        ValueError: a config without the Mamba sizes, naming ``op`` and the missing field.
    """
    if config is None:
        raise ValueError(f"{op}: Mamba mappings need ctx.config (mamba_num_heads, mamba_head_dim, mamba_num_groups, "
                         "mamba_state_dim)")
    sizes = {}
    for field in ("mamba_num_heads", "mamba_head_dim", "mamba_num_groups", "mamba_state_dim"):
        value = getattr(config, field, None)
        if not value:
            raise ValueError(f"{op}: the model config has {field}={value!r}; a Mamba layer needs it set")
        sizes[field] = int(value)
    d_inner = sizes["mamba_num_heads"] * sizes["mamba_head_dim"]
    gn = sizes["mamba_num_groups"] * sizes["mamba_state_dim"]
    rows = {"z": d_inner, "x": d_inner, "B": gn, "C": gn, "dt": sizes["mamba_num_heads"]}
    return [(p, rows[p]) for p in parts]


def _local_rows(op: str, hf_name: str, parts: List[Tuple[str, int]], shape: Sequence[int], tp: int) -> List[int]:
    """Each component's rows on one TP rank, after checking the HF tensor's rows and the split."""
    total = sum(r for _, r in parts)
    if shape[0] != total:
        raise ValueError(f"{op}: HF tensor {hf_name} has {shape[0]} rows, expected {total} = "
                         + " + ".join(f"{p} {r}" for p, r in parts))
    for p, r in parts:
        if r % tp:
            raise ValueError(f"{op}: component {p} of {hf_name} has {r} rows, not divisible by "
                             f"tensor_model_parallel_size = {tp}")
    return [r // tp for _, r in parts]


class MambaSplitMapping(MegatronParamMapping):
    """One HF tensor of components laid end to end <-> megatron's per-component TP split (rank t holds the t-th
    block of every component, in order).

    Args:
        megatron_param, hf_param: the names.
        parts: the components, in row order (:data:`IN_PROJ_PARTS` or :data:`CONV_PARTS`).
    """

    layout = COLUMN

    def __init__(self, megatron_param: str, hf_param: str, parts: Sequence[str]) -> None:
        super().__init__(megatron_param, hf_param)
        self.parts = tuple(parts)

    def _rows(self, shape: Sequence[int], ctx: ConversionContext) -> List[int]:
        parts = mamba_part_rows(self.megatron_param, ctx.config, self.parts)
        return _local_rows(self.megatron_param, str(self.hf_param), parts, shape, ctx.tp_size)

    def hf_to_megatron(self, hf, ctx, out=None):
        hf = single(hf, self)
        local = self._rows(tuple(hf.shape), ctx)
        if out is None:
            out = hf.new_empty((sum(local), *hf.shape[1:]))
        src = dst = 0
        for rows in local:
            full = rows * ctx.tp_size
            ops.shard_copy(hf.narrow(0, src, full), out.narrow(0, dst, rows), mesh_shape=[ctx.tp_size],
                           mesh_coord=[ctx.tp_rank], shard_dims=[0])
            src, dst = src + full, dst + rows
        return out

    def megatron_shape(self, hf, ctx):
        shape = single(hf, self)
        return (sum(self._rows(shape, ctx)), *shape[1:])

    def hf_shapes(self, shard, num_shards, ctx):
        return {self.hf_param: (shard[0] * num_shards, *shard[1:])}

    def megatron_to_hf(self, shards: Sequence[torch.Tensor], ctx) -> Dict[str, torch.Tensor]:
        tp = len(shards)
        full_shape = (shards[0].shape[0] * tp, *shards[0].shape[1:])
        local = self._rows(full_shape, ConversionContext(tp_size=tp, config=ctx.config))
        out = ctx.empty(full_shape, shards[0])
        src = dst = 0
        for rows in local:
            for t, shard in enumerate(shards):
                out.narrow(0, dst + t * rows, rows).copy_(shard.narrow(0, src, rows))
            src, dst = src + rows, dst + rows * tp
        return {self.hf_param: out}
