"""Typed wrappers around ``torch.ops.bridge.*`` and their fake (meta) kernels.

Every op moves bytes: inputs may be non-contiguous views (slices of memory-mapped safetensors, transposed or
row-strided views) of any dtype, and the result is bit-identical to the layout described in
``conversion_semantics.md``. Layout variants (a single HF ``qkv`` tensor, row-interleaved or transposed gate/up,
fused expert tensors) are expressed as zero-copy views handed to the same kernels. The block-quantized ops (FP8 with
per-block scales, MXFP4; their section below) convert values on the way, in the same layouts.

Weights are 2-D ``[rows, cols]`` and biases 1-D ``[rows]``; "rows" below always means dim 0 of the HF tensor as
Megatron stores it (output features).
"""

from __future__ import annotations

import dataclasses

from typing import Any, List, Optional, Sequence, Tuple, Union

import torch

from megatron_bridge_ext import geometry

__all__ = [
    "QuantizedWeight",
    "dequantized",
    "fp8_blocks",
    "qkv_pack",
    "qkv_pack_fused",
    "kv_pack",
    "qkv_unpack",
    "qkv_unpack_fused",
    "kv_unpack",
    "gate_up_pack",
    "gate_up_pack_fused",
    "gate_up_unpack",
    "gate_up_unpack_fused",
    "gate_up_views",
    "expert_pack_fc1",
    "expert_pack_fc2",
    "expert_unpack_fc1",
    "expert_unpack_fc2",
    "expert_fc1_views",
    "expert_fc2_views",
    "shard_copy",
    "copy_into_dtensor",
    "flat_range_copy",
    "gather_param_names",
    "param_sort_key",
    "local_to_global_name",
    "fp8_block_dequant",
    "mxfp4_dequant",
    "fp8_block_quant",
    "fp8_qkv_pack",
    "fp8_qkv_unpack",
    "fp8_gate_up_pack",
    "fp8_gate_up_unpack",
    "fp8_expert_pack_fc1",
    "fp8_expert_pack_fc2",
    "fp8_expert_unpack_fc1",
    "fp8_expert_unpack_fc2",
    "mxfp4_expert_pack_fc1",
    "mxfp4_expert_pack_fc2",
    "DEFAULT_BLOCK_SIZE",
]

_ops = torch.ops.bridge

TensorOrList = Union[torch.Tensor, Sequence[torch.Tensor]]


# --------------------------------------------------------------------------------------------------------------------
# Fused QKV
# --------------------------------------------------------------------------------------------------------------------


def qkv_pack(
    q: Optional[torch.Tensor],
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    num_heads: int,
    num_query_groups: int,
    head_dim: int,
    tp_size: int = 1,
    tp_rank: int = 0,
    output_gate: bool = False,
    out: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Pack HF q/k/v into TP rank ``tp_rank``'s shard of Megatron's fused ``linear_qkv``.

    Only the rows of that shard are read. With ``out`` the shard is written in place (e.g. straight into the
    Megatron parameter) and ``out`` is returned.

    Args:
        q: ``[H*d, D]`` weight or ``[H*d]`` bias; ``[2*H*d, ...]`` with ``output_gate`` (per head ``[q_h; z_h]``);
            ``None`` for a KV-only layout (then ``num_heads`` must be 0).
        k, v: ``[G*d, D]`` or ``[G*d]``.
        num_heads, num_query_groups, head_dim: H, G and d.
        tp_size, tp_rank: tensor-parallel size and this rank; G must be divisible by ``tp_size``.
        output_gate: gated attention layout (group block ``[q; z; k; v]``).
        out: optional destination of the shard's shape.

    Returns:
        The shard, ``[(H*(1+gate) + 2G)*d / tp, ...]``.

    Raises:
        RuntimeError: on inconsistent shapes, dtypes, devices, or ``tp_rank >= tp_size``; the message names the values.
    """
    if out is None:
        return _ops.qkv_pack.default(q, k, v, num_heads, num_query_groups, head_dim, tp_size, tp_rank, output_gate)
    _ops.qkv_pack_out.default(q, k, v, num_heads, num_query_groups, head_dim, tp_size, tp_rank, output_gate, out)
    return out


def _split_fused_qkv(
    qkv: torch.Tensor, num_heads: int, num_query_groups: int, head_dim: int, output_gate: bool
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = geometry.qkv_geometry("qkv_fused", num_heads, num_query_groups, head_dim, output_gate)
    if qkv.dim() < 1 or qkv.shape[0] != g.q_rows + 2 * g.kv_rows:
        raise ValueError(
            f"fused HF qkv has shape {tuple(qkv.shape)}, expected {g.q_rows + 2 * g.kv_rows} rows "
            f"(H={num_heads}, G={num_query_groups}, d={head_dim}, output_gate={output_gate})"
        )
    return qkv.narrow(0, 0, g.q_rows), qkv.narrow(0, g.q_rows, g.kv_rows), qkv.narrow(0, g.q_rows + g.kv_rows, g.kv_rows)


def qkv_pack_fused(
    qkv: torch.Tensor,
    *,
    num_heads: int,
    num_query_groups: int,
    head_dim: int,
    tp_size: int = 1,
    tp_rank: int = 0,
    output_gate: bool = False,
    out: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Like :func:`qkv_pack` for one HF tensor holding ``[q; k; v]`` rows (split at ``[H*d, G*d, G*d]``)."""
    q, k, v = _split_fused_qkv(qkv, num_heads, num_query_groups, head_dim, output_gate)
    return qkv_pack(
        q, k, v, num_heads=num_heads, num_query_groups=num_query_groups, head_dim=head_dim,
        tp_size=tp_size, tp_rank=tp_rank, output_gate=output_gate, out=out,
    )


def kv_pack(
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    num_query_groups: int,
    head_dim: int,
    tp_size: int = 1,
    tp_rank: int = 0,
    out: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Pack HF k/v into TP rank ``tp_rank``'s shard of Megatron's ``linear_kv`` (per group ``[k_g; v_g]``)."""
    return qkv_pack(
        None, k, v, num_heads=0, num_query_groups=num_query_groups, head_dim=head_dim,
        tp_size=tp_size, tp_rank=tp_rank, out=out,
    )


def qkv_unpack(
    packed: torch.Tensor,
    *,
    num_heads: int,
    num_query_groups: int,
    head_dim: int,
    output_gate: bool = False,
    out: Optional[Tuple[Optional[torch.Tensor], torch.Tensor, torch.Tensor]] = None,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Split a full packed ``linear_qkv`` (all TP shards concatenated on dim 0) back into HF q, k, v.

    Args:
        packed: ``[(H*(1+gate) + 2G)*d, ...]``.
        num_heads, num_query_groups, head_dim, output_gate: as in :func:`qkv_pack`.
        out: optional ``(q, k, v)`` destinations, possibly strided views (``q`` may be None when ``num_heads`` is 0).

    Returns:
        ``(q, k, v)``; q has 0 rows for a KV-only layout.
    """
    if out is None:
        return _ops.qkv_unpack.default(packed, num_heads, num_query_groups, head_dim, output_gate)
    q, k, v = out
    _ops.qkv_unpack_out.default(packed, num_heads, num_query_groups, head_dim, output_gate, q, k, v)
    return q, k, v


def qkv_unpack_fused(
    packed: torch.Tensor, *, num_heads: int, num_query_groups: int, head_dim: int, output_gate: bool = False
) -> torch.Tensor:
    """Inverse of :func:`qkv_pack_fused`: one HF tensor with ``[q; k; v]`` rows, written in one pass."""
    fused = packed.new_empty(packed.shape)
    qkv_unpack(
        packed, num_heads=num_heads, num_query_groups=num_query_groups, head_dim=head_dim, output_gate=output_gate,
        out=_split_fused_qkv(fused, num_heads, num_query_groups, head_dim, output_gate),
    )
    return fused


def kv_unpack(packed: torch.Tensor, *, num_query_groups: int, head_dim: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Inverse of :func:`kv_pack` on the full (gathered) ``linear_kv``."""
    _, k, v = qkv_unpack(packed, num_heads=0, num_query_groups=num_query_groups, head_dim=head_dim)
    return k, v


# --------------------------------------------------------------------------------------------------------------------
# Gated MLP (gate / up)
# --------------------------------------------------------------------------------------------------------------------


def gate_up_views(
    gate_up: torch.Tensor, *, interleaved: bool = False, transposed: bool = False
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Zero-copy ``(gate, up)`` views of one HF tensor holding both.

    Args:
        gate_up: ``[2F, D]`` (``[D, 2F]`` when ``transposed``) or a ``[2F]`` bias.
        interleaved: even rows are gate, odd rows up; otherwise the first F rows are gate.
        transposed: the HF tensor is stored ``[in, out]``.
    """
    x = gate_up.transpose(0, 1) if transposed and gate_up.dim() == 2 else gate_up
    if x.shape[0] % 2:
        raise ValueError(f"gate_up tensor of shape {tuple(gate_up.shape)} has an odd number of gate+up rows")
    if interleaved:
        return x[0::2], x[1::2]
    f = x.shape[0] // 2
    return x.narrow(0, 0, f), x.narrow(0, f, f)


def gate_up_pack(
    gate: torch.Tensor,
    up: torch.Tensor,
    *,
    tp_size: int = 1,
    tp_rank: int = 0,
    out: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """TP rank ``tp_rank``'s ``[gate_t; up_t]`` (2F/tp rows) of Megatron's gated ``linear_fc1``.

    Args:
        gate, up: ``[F, D]`` or ``[F]``, any strides. F must be divisible by ``tp_size``.
        out: optional destination ``[2F/tp, ...]``.
    """
    if out is None:
        return _ops.gate_up_pack.default(gate, up, tp_size, tp_rank)
    _ops.gate_up_pack_out.default(gate, up, tp_size, tp_rank, out)
    return out


def gate_up_pack_fused(
    gate_up: torch.Tensor,
    *,
    tp_size: int = 1,
    tp_rank: int = 0,
    interleaved: bool = False,
    transposed: bool = False,
    out: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """:func:`gate_up_pack` from one HF tensor (see :func:`gate_up_views` for the layouts)."""
    gate, up = gate_up_views(gate_up, interleaved=interleaved, transposed=transposed)
    return gate_up_pack(gate, up, tp_size=tp_size, tp_rank=tp_rank, out=out)


def gate_up_unpack(
    packed: torch.Tensor, *, tp_size: int = 1, out: Optional[Tuple[torch.Tensor, torch.Tensor]] = None
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Split the gathered ``[g0; u0; g1; u1; ...]`` (tp shards of 2f rows) back into HF ``(gate, up)``."""
    if out is None:
        return _ops.gate_up_unpack.default(packed, tp_size)
    gate, up = out
    _ops.gate_up_unpack_out.default(packed, tp_size, gate, up)
    return gate, up


def gate_up_unpack_fused(
    packed: torch.Tensor, *, tp_size: int = 1, interleaved: bool = False, transposed: bool = False
) -> torch.Tensor:
    """Inverse of :func:`gate_up_pack_fused` on the gathered tensor: one HF gate_up tensor in the given layout."""
    shape = list(packed.shape)
    if transposed and packed.dim() == 2:
        shape = [shape[1], shape[0]]
    fused = packed.new_empty(shape)
    gate_up_unpack(packed, tp_size=tp_size, out=gate_up_views(fused, interleaved=interleaved, transposed=transposed))
    return fused


# --------------------------------------------------------------------------------------------------------------------
# Experts
# --------------------------------------------------------------------------------------------------------------------


def expert_fc1_views(
    gate_up: torch.Tensor, *, interleaved: bool = False, transposed: bool = False
) -> Tuple[List[torch.Tensor], List[torch.Tensor]]:
    """Per-expert ``(gate, up)`` views of a fused HF ``gate_up_proj`` ``[E, 2F, D]`` (``[E, D, 2F]`` if transposed)."""
    if gate_up.dim() not in (2, 3):
        raise ValueError(f"fused expert gate_up has shape {tuple(gate_up.shape)}, expected [E, 2F, D] or [E, 2F]")
    pairs = [gate_up_views(gate_up[e], interleaved=interleaved, transposed=transposed) for e in range(gate_up.shape[0])]
    return [g for g, _ in pairs], [u for _, u in pairs]


def expert_fc2_views(down: torch.Tensor, *, transposed: bool = False) -> List[torch.Tensor]:
    """Per-expert ``[D, F]`` views of a fused HF ``down_proj`` ``[E, D, F]`` (``[E, F, D]`` if transposed)."""
    if down.dim() not in (2, 3):
        raise ValueError(f"fused expert down_proj has shape {tuple(down.shape)}, expected [E, D, F] or [E, D]")
    return [down[e].transpose(0, 1) if transposed and down.dim() == 3 else down[e] for e in range(down.shape[0])]


def _as_list(x: TensorOrList, op: str = "", name: str = "") -> List[torch.Tensor]:
    xs = list(x.unbind(0)) if isinstance(x, torch.Tensor) else list(x)
    if not xs and op:  # the dispatcher cannot route an op whose only tensors are empty lists: say what is wrong
        raise ValueError(f"{op}: {name} is an empty list (expected one tensor per expert or shard)")
    return xs


def expert_pack_fc1(
    gate: TensorOrList,
    up: TensorOrList,
    *,
    ep_size: int = 1,
    ep_rank: int = 0,
    etp_size: int = 1,
    etp_rank: int = 0,
    out: Optional[TensorOrList] = None,
) -> TensorOrList:
    """This (EP, ETP) rank's stacked ``linear_fc1`` ``[E/ep, 2F/etp(, D)]`` from E global per-expert gate/up tensors.

    Local expert e is global expert ``e + ep_rank * E/ep``; within it rows are ``[gate_t; up_t]`` for ETP rank t.
    ``gate``/``up`` are sequences of E tensors (or stacked ``[E, F, ...]`` tensors); for a fused HF tensor use
    :func:`expert_fc1_views`. Only the experts and rows this rank keeps are read.

    Args:
        out: a stacked ``[E/ep, 2F/etp, ...]`` destination, or a list of E/ep per-local-expert destinations
            ``[2F/etp, ...]`` (e.g. the parameters of Megatron's sequential experts), filled in one pass.
    """
    gate, up = _as_list(gate, "expert_pack_fc1", "gate"), _as_list(up, "expert_pack_fc1", "up")
    if out is None:
        return _ops.expert_pack_fc1.default(gate, up, ep_size, ep_rank, etp_size, etp_rank)
    if isinstance(out, torch.Tensor):
        _ops.expert_pack_fc1_out.default(gate, up, ep_size, ep_rank, etp_size, etp_rank, out)
    else:
        _ops.expert_pack_fc1_out.list(gate, up, ep_size, ep_rank, etp_size, etp_rank, list(out))
    return out


def expert_pack_fc2(
    down: TensorOrList,
    *,
    ep_size: int = 1,
    ep_rank: int = 0,
    etp_size: int = 1,
    etp_rank: int = 0,
    out: Optional[TensorOrList] = None,
) -> TensorOrList:
    """This rank's stacked ``linear_fc2`` ``[E/ep, D, F/etp]`` (columns sharded) from E per-expert ``[D, F]``.

    1-D inputs (row-parallel biases ``[D]``) are replicated across ETP ranks: the result is ``[E/ep, D]``.
    ``out`` is a stacked destination or a list of E/ep per-local-expert destinations, as in :func:`expert_pack_fc1`.
    """
    down = _as_list(down, "expert_pack_fc2", "down")
    if out is None:
        return _ops.expert_pack_fc2.default(down, ep_size, ep_rank, etp_size, etp_rank)
    if isinstance(out, torch.Tensor):
        _ops.expert_pack_fc2_out.default(down, ep_size, ep_rank, etp_size, etp_rank, out)
    else:
        _ops.expert_pack_fc2_out.list(down, ep_size, ep_rank, etp_size, etp_rank, list(out))
    return out


def expert_unpack_fc1(
    shards: Sequence[torch.Tensor],
    *,
    ep_size: int = 1,
    etp_size: int = 1,
    out: Optional[Tuple[Sequence[torch.Tensor], Sequence[torch.Tensor]]] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Gathered ``linear_fc1`` shards -> HF ``(gate, up)`` stacked ``[E, F(, D)]``.

    Args:
        shards: ep*etp tensors, index ``ep_rank * etp_size + etp_rank``, each ``[E/ep, 2F/etp(, D)]`` (views into
            one gathered buffer are fine).
        out: optional E-long sequences of per-expert destinations (e.g. :func:`expert_fc1_views` of a fused tensor).
    """
    shards = _as_list(shards, "expert_unpack_fc1", "shards")
    if out is None:
        return _ops.expert_unpack_fc1.default(shards, ep_size, etp_size)
    gate, up = out
    _ops.expert_unpack_fc1_out.default(shards, ep_size, etp_size, list(gate), list(up))
    return gate, up


def expert_unpack_fc2(
    shards: Sequence[torch.Tensor],
    *,
    ep_size: int = 1,
    etp_size: int = 1,
    out: Optional[Sequence[torch.Tensor]] = None,
) -> torch.Tensor:
    """Gathered ``linear_fc2`` shards (each ``[E/ep, D, F/etp]``) -> HF down stacked ``[E, D, F]``.

    With ``out`` (E per-expert destinations, e.g. :func:`expert_fc2_views` of a fused tensor) returns ``out``.
    """
    shards = _as_list(shards, "expert_unpack_fc2", "shards")
    if out is None:
        return _ops.expert_unpack_fc2.default(shards, ep_size, etp_size)
    _ops.expert_unpack_fc2_out.default(shards, ep_size, etp_size, list(out))
    return out


# --------------------------------------------------------------------------------------------------------------------
# DTensor / flat-range copies
# --------------------------------------------------------------------------------------------------------------------


def shard_copy(
    src: torch.Tensor,
    dst: torch.Tensor,
    *,
    mesh_shape: Sequence[int],
    mesh_coord: Sequence[int],
    shard_dims: Sequence[int],
) -> torch.Tensor:
    """Copy the shard of the full tensor ``src`` owned by ``mesh_coord`` into ``dst`` (no communication).

    Args:
        src: the full (global) tensor.
        dst: the local shard to fill.
        mesh_shape, mesh_coord: the device mesh and this rank's coordinate in it.
        shard_dims: per mesh dim, the tensor dim it shards (torch.chunk semantics, applied in mesh-dim order) or -1
            for Replicate.

    Returns:
        ``dst``.
    """
    _ops.shard_copy.default(src, dst, list(mesh_shape), list(mesh_coord), list(shard_dims))
    return dst


def copy_into_dtensor(src: torch.Tensor, dtensor: "torch.distributed.tensor.DTensor") -> None:
    """Fill ``dtensor``'s local shard from the full tensor ``src``; equal to ``distribute_tensor(src, ...)``.

    Raises:
        ValueError: for placements other than Shard and Replicate, or a global shape different from ``src``'s.
    """
    from torch.distributed.tensor import Replicate, Shard

    if tuple(src.shape) != tuple(dtensor.shape):
        raise ValueError(f"copy_into_dtensor: source shape {tuple(src.shape)} != DTensor shape {tuple(dtensor.shape)}")
    mesh = dtensor.device_mesh
    coord = mesh.get_coordinate()
    if coord is None:  # this rank is not part of the mesh: it holds nothing
        return
    shard_dims = []
    for i, p in enumerate(dtensor.placements):
        if type(p) is Shard:
            shard_dims.append(p.dim if p.dim >= 0 else p.dim + src.dim())
        elif isinstance(p, Replicate):
            shard_dims.append(-1)
        else:
            raise ValueError(f"copy_into_dtensor: unsupported placement {p!r} on mesh dim {i} (Shard/Replicate only)")
    shard_copy(src, dtensor.to_local(), mesh_shape=list(mesh.shape), mesh_coord=list(coord), shard_dims=shard_dims)


def flat_range_copy(src: torch.Tensor, dst: torch.Tensor, start: int) -> torch.Tensor:
    """``dst`` <- elements ``[start, start + dst.numel())`` of ``src`` flattened row-major; returns ``dst``."""
    _ops.flat_range_copy.default(src, dst, start)
    return dst


# --------------------------------------------------------------------------------------------------------------------
# Parameter names
# --------------------------------------------------------------------------------------------------------------------


def gather_param_names(names: Sequence[str], group: Optional["torch.distributed.ProcessGroup"] = None) -> List[str]:
    """All-gather parameter names over ``group`` (default: WORLD), de-duplicate and sort by ``(key, name)``.

    Every rank of the group gets the same list in the same order. Works on gloo and NCCL groups (NCCL stages the
    bytes on the current CUDA device).
    """
    import torch.distributed as dist

    if group is None:
        group = dist.group.WORLD
    device = None
    if dist.get_backend(group) == "nccl":
        device = torch.device("cuda", torch.cuda.current_device())
    return list(_ops.gather_param_names.default(list(names), group.group_name, device))


def param_sort_key(name: str) -> Tuple[int, int]:
    """``(layer, expert)`` of a global parameter name, -1 where absent (the reference ordering key; the rule:
    :func:`megatron_bridge_ext.naming.sort_key`)."""
    return tuple(_ops.param_sort_key.default(name))


def local_to_global_name(name: str, layer_offset: int = 0, expert_offset: int = 0) -> str:
    """Rewrite a local Megatron name to its global name (first layer index + offset, expert index + offset; the rule:
    :func:`megatron_bridge_ext.naming.local_to_global`)."""
    return _ops.local_to_global_name.default(name, layer_offset, expert_offset)


# --------------------------------------------------------------------------------------------------------------------
# Block-quantized weights: FP8 (per-block weight_scale_inv) and MXFP4 (GPT-OSS *_blocks / *_scales)
#
# Dequantization reads only the rows / columns the rank keeps and writes them in the layout of the matching
# byte-moving op (a TP slice, qkv_pack, gate_up_pack, expert_pack_fc1/fc2): element (r, c) of an FP8 weight is
# fp32(w[r, c]) * fp32(scale_inv[r // bn, c // bk]) rounded once to ``dtype`` (DeepSeek-V3's weight_dequant,
# transformers' Fp8Dequantize); of an MXFP4 weight e2m1(nibble) * 2^(scale - 127) (transformers'
# convert_moe_packed_tensors, before its transpose). Quantization is fused with the unpack layouts: per block of each
# HF weight, with ``rule="deepseek"`` scale = max(amax, 1e-4) / 448 and q = fp8(w / scale) (DeepSeek-V3's act_quant
# formula; an all-zero block gets scale 1e-4/448 and zeros), with ``rule="transformers"`` f = (1 / amax) * 448 (1 for
# an all-zero block), q = fp8(clamp(w * f, -448, 448)), scale = 1 / f (transformers 5.24's Fp8Quantize); 448 is
# float8_e4m3fn's max (57344 for e5m2). Blocks at the bottom / right edge are partial when the block size does not
# divide the weight (their amax is over the elements they hold).
#
# Errors (RuntimeError from the kernels, ValueError from these wrappers) name the tensor and the values: a missing
# scale, a scale of the wrong shape or dtype, NaN / Inf scales (checked before anything is written), a weight block
# holding NaN / Inf on quantization (raised after the pass: the other blocks' outputs may have been written).
# --------------------------------------------------------------------------------------------------------------------

#: DeepSeek-V3's (and transformers' default) ``weight_block_size``
DEFAULT_BLOCK_SIZE = (128, 128)


@dataclasses.dataclass(frozen=True)
class QuantizedWeight:
    """A block-quantized HF weight as stored, handed to a mapping so that the fused op of its layout dequantizes only
    what the rank keeps (``fp8_*_pack``, ``mxfp4_expert_pack_*``, a TP slice of ``fp8_block_dequant``).

    ``method``: ``"fp8"`` (``weight`` FP8 ``[..., N, K]``, ``scale`` its ``weight_scale_inv`` grid, ``block_size``) or
    ``"mxfp4"`` (``weight`` the ``*_blocks`` ``[..., N, K/32, 16]``, ``scale`` the ``*_scales``; the HF parameter is
    the dequantized ``[..., K, N]``). ``shape`` / ``dtype``: those of the HF parameter it stands for (what
    :meth:`dequantize` returns), so that shape checks treat it as that tensor.
    """

    weight: torch.Tensor
    scale: torch.Tensor
    method: str
    block_size: Tuple[int, int]
    dtype: torch.dtype
    shape: Tuple[int, ...]

    @property
    def device(self) -> torch.device:
        return self.weight.device

    def dim(self) -> int:
        return len(self.shape)

    def dequantize(self) -> torch.Tensor:
        """The HF parameter, dequantized (a new tensor; MXFP4: a transposed view of one)."""
        if self.method == "fp8":
            return fp8_block_dequant(self.weight, self.scale, block_size=self.block_size, dtype=self.dtype)
        return mxfp4_dequant(self.weight, self.scale, dtype=self.dtype).transpose(-1, -2)

    def experts(self, lo: int, hi: int) -> "QuantizedWeight":
        """Experts ``[lo, hi)`` of a weight stacked over a layer's experts (first dim)."""
        return dataclasses.replace(self, weight=self.weight.narrow(0, lo, hi - lo),
                                   scale=self.scale.narrow(0, lo, hi - lo), shape=(hi - lo, *self.shape[1:]))


def dequantized(value: Any) -> Any:
    """``value`` (a tensor, a :class:`QuantizedWeight`, or a dict / list of them) with every quantized weight
    dequantized: what a mapping without a fused path for quantized weights reads."""
    if isinstance(value, QuantizedWeight):
        return value.dequantize()
    if isinstance(value, dict):
        return {k: dequantized(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [dequantized(v) for v in value]
    return value


def fp8_blocks(*values: Any) -> Optional[Tuple[int, int]]:
    """The common block size when every value is an FP8 :class:`QuantizedWeight` of one block size, else None."""
    if not values or not all(isinstance(v, QuantizedWeight) and v.method == "fp8" for v in values):
        return None
    blocks = {tuple(v.block_size) for v in values}
    return tuple(blocks.pop()) if len(blocks) == 1 else None  # type: ignore[return-value]


def _need_scale(op: str, name: str, w, s) -> None:
    if w is not None and s is None:
        raise ValueError(f"{op}: {name}_scale_inv is missing: the block-quantized {name} cannot be read without its "
                         "scales (the checkpoint's `<name>_scale_inv` / `weight_scale_inv`)")
    if w is None and s is not None:
        raise ValueError(f"{op}: {name}_scale_inv is given without {name}")


def fp8_block_dequant(
    weight: torch.Tensor,
    scale_inv: Optional[torch.Tensor],
    *,
    block_size: Sequence[int] = DEFAULT_BLOCK_SIZE,
    dtype: torch.dtype = torch.bfloat16,
    tp_size: int = 1,
    tp_rank: int = 0,
    tp_dim: int = 0,
    out: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Dequantize an FP8 weight ``[..., N, K]`` (float8_e4m3fn / e5m2) with its ``scale_inv`` ``[..., ceil(N/bn),
    ceil(K/bk)]`` (float32, bfloat16, float16 or float8_e8m0fnu) into ``dtype``.

    With ``tp_size > 1`` only TP rank ``tp_rank``'s slice is read and returned: rows (``tp_dim=0``, a column-parallel
    linear) or columns (``tp_dim=1``, a row-parallel linear). ``out`` receives it in place (its dtype wins).
    """
    _need_scale("fp8_block_dequant", "weight", weight, scale_inv)
    if out is None:
        return _ops.fp8_block_dequant.default(weight, scale_inv, list(block_size), dtype, tp_size, tp_rank, tp_dim)
    _ops.fp8_block_dequant_out.default(weight, scale_inv, list(block_size), tp_size, tp_rank, tp_dim, out)
    return out


def mxfp4_dequant(
    blocks: torch.Tensor,
    scales: Optional[torch.Tensor],
    *,
    dtype: torch.dtype = torch.bfloat16,
    tp_size: int = 1,
    tp_rank: int = 0,
    tp_dim: int = 0,
    out: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Dequantize MXFP4 ``blocks`` ``[..., N, K/32, 16]`` (uint8, two E2M1 values a byte, low nibble first) with
    ``scales`` ``[..., N, K/32]`` (uint8 E8M0) into ``[..., N, K]`` of ``dtype`` (optionally one TP slice, as
    :func:`fp8_block_dequant`). Equal to transformers' ``convert_moe_packed_tensors`` before its final transpose."""
    if scales is None:
        raise ValueError("mxfp4_dequant: scales are missing: MXFP4 *_blocks cannot be read without their *_scales")
    if out is None:
        return _ops.mxfp4_dequant.default(blocks, scales, dtype, tp_size, tp_rank, tp_dim)
    _ops.mxfp4_dequant_out.default(blocks, scales, tp_size, tp_rank, tp_dim, out)
    return out


def fp8_block_quant(
    weight: torch.Tensor,
    *,
    block_size: Sequence[int] = DEFAULT_BLOCK_SIZE,
    dtype: torch.dtype = torch.float8_e4m3fn,
    rule: str = "deepseek",
    out: Optional[Tuple[torch.Tensor, torch.Tensor]] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Quantize ``weight`` ``[..., N, K]`` (bfloat16 / float16 / float32) per ``block_size`` block: returns
    ``(fp8 weight, scale_inv float32 [..., ceil(N/bn), ceil(K/bk)])`` (``rule``: see the section comment)."""
    if out is None:
        return _ops.fp8_block_quant.default(weight, list(block_size), dtype, rule)
    q, s = out
    _ops.fp8_block_quant_out.default(weight, list(block_size), rule, q, s)
    return q, s


def fp8_qkv_pack(
    q: Optional[torch.Tensor],
    q_scale_inv: Optional[torch.Tensor],
    k: torch.Tensor,
    k_scale_inv: Optional[torch.Tensor],
    v: torch.Tensor,
    v_scale_inv: Optional[torch.Tensor],
    *,
    num_heads: int,
    num_query_groups: int,
    head_dim: int,
    block_size: Sequence[int] = DEFAULT_BLOCK_SIZE,
    tp_size: int = 1,
    tp_rank: int = 0,
    output_gate: bool = False,
    dtype: torch.dtype = torch.bfloat16,
    out: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """:func:`qkv_pack` of FP8 q, k, v (each with its ``*_scale_inv``): TP rank ``tp_rank``'s fused ``linear_qkv``
    shard, dequantized; only that shard's rows are read."""
    op = "fp8_qkv_pack"
    _need_scale(op, "q", q, q_scale_inv)
    _need_scale(op, "k", k, k_scale_inv)
    _need_scale(op, "v", v, v_scale_inv)
    bs = list(block_size)
    if out is None:
        return _ops.fp8_qkv_pack.default(q, q_scale_inv, k, k_scale_inv, v, v_scale_inv, bs, num_heads,
                                         num_query_groups, head_dim, tp_size, tp_rank, output_gate, dtype)
    _ops.fp8_qkv_pack_out.default(q, q_scale_inv, k, k_scale_inv, v, v_scale_inv, bs, num_heads, num_query_groups,
                                  head_dim, tp_size, tp_rank, output_gate, out)
    return out


def fp8_qkv_unpack(
    packed: torch.Tensor,
    *,
    num_heads: int,
    num_query_groups: int,
    head_dim: int,
    block_size: Sequence[int] = DEFAULT_BLOCK_SIZE,
    output_gate: bool = False,
    dtype: torch.dtype = torch.float8_e4m3fn,
    rule: str = "deepseek",
    out: Optional[Sequence[Optional[torch.Tensor]]] = None,
) -> Tuple[torch.Tensor, ...]:
    """:func:`qkv_unpack` of the full packed ``linear_qkv`` ``[rows, K]`` quantized per block of the HF tensors:
    ``(q, q_scale_inv, k, k_scale_inv, v, v_scale_inv)``. ``out``: those six destinations (q and q_scale_inv None
    for a KV-only layout)."""
    bs = list(block_size)
    if out is None:
        return _ops.fp8_qkv_unpack.default(packed, bs, num_heads, num_query_groups, head_dim, output_gate, dtype, rule)
    q, qs, k, ks, v, vs = out
    _ops.fp8_qkv_unpack_out.default(packed, bs, num_heads, num_query_groups, head_dim, output_gate, rule, q, qs, k, ks,
                                    v, vs)
    return tuple(out)


def fp8_gate_up_pack(
    gate: torch.Tensor,
    gate_scale_inv: Optional[torch.Tensor],
    up: Optional[torch.Tensor] = None,
    up_scale_inv: Optional[torch.Tensor] = None,
    *,
    block_size: Sequence[int] = DEFAULT_BLOCK_SIZE,
    tp_size: int = 1,
    tp_rank: int = 0,
    interleaved: bool = False,
    dtype: torch.dtype = torch.bfloat16,
    out: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """:func:`gate_up_pack` of FP8 gate and up (with scales), dequantized: TP rank ``tp_rank``'s ``[gate_t; up_t]``.

    ``up=None``: ``gate`` is one fused ``gate_up`` ``[2F, K]`` with one scale grid (halves, or even / odd rows with
    ``interleaved``); blocks may straddle gate and up, each element takes its own block's scale.
    """
    op = "fp8_gate_up_pack"
    _need_scale(op, "gate", gate, gate_scale_inv)
    _need_scale(op, "up", up, up_scale_inv)
    bs = list(block_size)
    if out is None:
        return _ops.fp8_gate_up_pack.default(gate, gate_scale_inv, up, up_scale_inv, bs, tp_size, tp_rank,
                                             interleaved, dtype)
    _ops.fp8_gate_up_pack_out.default(gate, gate_scale_inv, up, up_scale_inv, bs, tp_size, tp_rank, interleaved, out)
    return out


def fp8_gate_up_unpack(
    packed: torch.Tensor,
    *,
    block_size: Sequence[int] = DEFAULT_BLOCK_SIZE,
    tp_size: int = 1,
    dtype: torch.dtype = torch.float8_e4m3fn,
    rule: str = "deepseek",
    out: Optional[Sequence[torch.Tensor]] = None,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`gate_up_unpack` of the gathered ``[g0; u0; g1; u1; ...]`` quantized per HF block:
    ``(gate, gate_scale_inv, up, up_scale_inv)``."""
    bs = list(block_size)
    if out is None:
        return _ops.fp8_gate_up_unpack.default(packed, bs, tp_size, dtype, rule)
    _ops.fp8_gate_up_unpack_out.default(packed, bs, tp_size, rule, *out)
    return tuple(out)


def _scales_for(op: str, name: str, ws: List[torch.Tensor], ss, *, scales: Optional[str] = None,
                weights: Optional[str] = None, what: str = "block-quantized") -> List[torch.Tensor]:
    """The scale tensors of per-expert weights ``ws``, one per weight (FP8: ``<name>_scale_inv`` of ``<name>``;
    MXFP4: ``scales=<name>_scales`` of ``weights=<name>_blocks``); a missing or short list is named."""
    scales = scales or f"{name}_scale_inv"
    weights = weights or name
    if ss is None:
        raise ValueError(f"{op}: {scales} {'are' if scales.endswith('scales') else 'is'} missing: the {what} "
                         f"{weights} cannot be read without {'their' if weights.endswith('blocks') else 'its'} scales")
    ss = _as_list(ss, op, scales)
    if len(ss) != len(ws):
        raise ValueError(f"{op}: {scales} has {len(ss)} tensors but {weights} has {len(ws)} (one per expert)")
    return ss


def fp8_expert_pack_fc1(
    gate: TensorOrList,
    gate_scale_inv: Optional[TensorOrList],
    up: Optional[TensorOrList] = None,
    up_scale_inv: Optional[TensorOrList] = None,
    *,
    block_size: Sequence[int] = DEFAULT_BLOCK_SIZE,
    ep_size: int = 1,
    ep_rank: int = 0,
    etp_size: int = 1,
    etp_rank: int = 0,
    interleaved: bool = False,
    dtype: torch.dtype = torch.bfloat16,
    out: Optional[TensorOrList] = None,
) -> TensorOrList:
    """:func:`expert_pack_fc1` of FP8 experts (per-expert lists, or stacked ``[E, ...]`` tensors unbound here):
    this (EP, ETP) rank's ``linear_fc1`` ``[E/ep, 2F/etp, K]``, dequantized, reading only its experts and rows.

    ``up=None``: ``gate`` holds each expert's fused ``gate_up`` ``[2F, K]`` (halves, or ``interleaved`` rows).
    ``out``: a stacked destination or a list of E/ep per-expert destinations.
    """
    op = "fp8_expert_pack_fc1"
    gate = _as_list(gate, op, "gate")
    gs = _scales_for(op, "gate", gate, gate_scale_inv)
    ups = _as_list(up) if up is not None else []
    us = _scales_for(op, "up", ups, up_scale_inv) if up is not None else []
    if up is None and up_scale_inv is not None:
        raise ValueError(f"{op}: up_scale_inv is given without up")
    bs = list(block_size)
    if out is None:
        return _ops.fp8_expert_pack_fc1.default(gate, gs, ups, us, bs, ep_size, ep_rank, etp_size, etp_rank,
                                                interleaved, dtype)
    if isinstance(out, torch.Tensor):
        _ops.fp8_expert_pack_fc1_out.default(gate, gs, ups, us, bs, ep_size, ep_rank, etp_size, etp_rank, interleaved,
                                             out)
    else:
        _ops.fp8_expert_pack_fc1_out.list(gate, gs, ups, us, bs, ep_size, ep_rank, etp_size, etp_rank, interleaved,
                                          list(out))
    return out


def fp8_expert_pack_fc2(
    down: TensorOrList,
    down_scale_inv: Optional[TensorOrList],
    *,
    block_size: Sequence[int] = DEFAULT_BLOCK_SIZE,
    ep_size: int = 1,
    ep_rank: int = 0,
    etp_size: int = 1,
    etp_rank: int = 0,
    dtype: torch.dtype = torch.bfloat16,
    out: Optional[TensorOrList] = None,
) -> TensorOrList:
    """:func:`expert_pack_fc2` of FP8 experts ``[D, F]``: this rank's ``linear_fc2`` ``[E/ep, D, F/etp]``."""
    op = "fp8_expert_pack_fc2"
    down = _as_list(down, op, "down")
    ds = _scales_for(op, "down", down, down_scale_inv)
    bs = list(block_size)
    if out is None:
        return _ops.fp8_expert_pack_fc2.default(down, ds, bs, ep_size, ep_rank, etp_size, etp_rank, dtype)
    if isinstance(out, torch.Tensor):
        _ops.fp8_expert_pack_fc2_out.default(down, ds, bs, ep_size, ep_rank, etp_size, etp_rank, out)
    else:
        _ops.fp8_expert_pack_fc2_out.list(down, ds, bs, ep_size, ep_rank, etp_size, etp_rank, list(out))
    return out


def fp8_expert_unpack_fc1(
    shards: Sequence[torch.Tensor],
    *,
    block_size: Sequence[int] = DEFAULT_BLOCK_SIZE,
    ep_size: int = 1,
    etp_size: int = 1,
    dtype: torch.dtype = torch.float8_e4m3fn,
    rule: str = "deepseek",
    out: Optional[Sequence[Sequence[torch.Tensor]]] = None,
) -> Tuple[TensorOrList, ...]:
    """:func:`expert_unpack_fc1` quantized per HF block: ``(gate, gate_scale_inv, up, up_scale_inv)`` stacked
    ``[E, F, K]`` / ``[E, ceil(F/bn), ceil(K/bk)]``; ``out``: four E-long lists of destinations."""
    shards = _as_list(shards, "fp8_expert_unpack_fc1", "shards")
    bs = list(block_size)
    if out is None:
        return _ops.fp8_expert_unpack_fc1.default(shards, bs, ep_size, etp_size, dtype, rule)
    g, gs, u, us = out
    _ops.fp8_expert_unpack_fc1_out.default(shards, bs, ep_size, etp_size, rule, list(g), list(gs), list(u), list(us))
    return tuple(out)


def fp8_expert_unpack_fc2(
    shards: Sequence[torch.Tensor],
    *,
    block_size: Sequence[int] = DEFAULT_BLOCK_SIZE,
    ep_size: int = 1,
    etp_size: int = 1,
    dtype: torch.dtype = torch.float8_e4m3fn,
    rule: str = "deepseek",
    out: Optional[Sequence[Sequence[torch.Tensor]]] = None,
) -> Tuple[TensorOrList, ...]:
    """:func:`expert_unpack_fc2` quantized per HF block: ``(down, down_scale_inv)`` stacked ``[E, D, F]`` /
    ``[E, ceil(D/bn), ceil(F/bk)]``; ``out``: two E-long lists of destinations."""
    shards = _as_list(shards, "fp8_expert_unpack_fc2", "shards")
    bs = list(block_size)
    if out is None:
        return _ops.fp8_expert_unpack_fc2.default(shards, bs, ep_size, etp_size, dtype, rule)
    d, ds = out
    _ops.fp8_expert_unpack_fc2_out.default(shards, bs, ep_size, etp_size, rule, list(d), list(ds))
    return tuple(out)


def _mx_scales_for(op: str, name: str, ws: List[torch.Tensor], ss) -> List[torch.Tensor]:
    return _scales_for(op, name, ws, ss, scales=f"{name}_scales", weights=f"{name}_blocks", what="MXFP4")


def mxfp4_expert_pack_fc1(
    gate_blocks: TensorOrList,
    gate_scales: Optional[TensorOrList],
    up_blocks: Optional[TensorOrList] = None,
    up_scales: Optional[TensorOrList] = None,
    *,
    ep_size: int = 1,
    ep_rank: int = 0,
    etp_size: int = 1,
    etp_rank: int = 0,
    interleaved: bool = False,
    dtype: torch.dtype = torch.bfloat16,
    out: Optional[TensorOrList] = None,
) -> TensorOrList:
    """This (EP, ETP) rank's ``linear_fc1`` ``[E/ep, 2F/etp, K]`` from MXFP4 experts, dequantized.

    GPT-OSS: ``gate_blocks`` = ``gate_up_proj_blocks`` ``[E, 2F, K/32, 16]``, ``gate_scales`` = ``gate_up_proj_scales``
    ``[E, 2F, K/32]``, ``up_blocks=None``, ``interleaved=True`` (gate = even rows, up = odd rows).
    """
    op = "mxfp4_expert_pack_fc1"
    gb = _as_list(gate_blocks, op, "gate_blocks")
    gs = _mx_scales_for(op, "gate", gb, gate_scales)
    ub = _as_list(up_blocks) if up_blocks is not None else []
    us = _mx_scales_for(op, "up", ub, up_scales) if up_blocks is not None else []
    if up_blocks is None and up_scales is not None:
        raise ValueError(f"{op}: up_scales are given without up_blocks")
    if out is None:
        return _ops.mxfp4_expert_pack_fc1.default(gb, gs, ub, us, ep_size, ep_rank, etp_size, etp_rank, interleaved,
                                                  dtype)
    if isinstance(out, torch.Tensor):
        _ops.mxfp4_expert_pack_fc1_out.default(gb, gs, ub, us, ep_size, ep_rank, etp_size, etp_rank, interleaved, out)
    else:
        _ops.mxfp4_expert_pack_fc1_out.list(gb, gs, ub, us, ep_size, ep_rank, etp_size, etp_rank, interleaved,
                                            list(out))
    return out


def mxfp4_expert_pack_fc2(
    down_blocks: TensorOrList,
    down_scales: Optional[TensorOrList],
    *,
    ep_size: int = 1,
    ep_rank: int = 0,
    etp_size: int = 1,
    etp_rank: int = 0,
    dtype: torch.dtype = torch.bfloat16,
    out: Optional[TensorOrList] = None,
) -> TensorOrList:
    """This rank's ``linear_fc2`` ``[E/ep, D, F/etp]`` from MXFP4 experts ``[D, F/32, 16]`` (GPT-OSS
    ``down_proj_blocks`` / ``down_proj_scales``), dequantized; a column slice may cut a 32-value group."""
    op = "mxfp4_expert_pack_fc2"
    db = _as_list(down_blocks, op, "down_blocks")
    ds = _mx_scales_for(op, "down", db, down_scales)
    if out is None:
        return _ops.mxfp4_expert_pack_fc2.default(db, ds, ep_size, ep_rank, etp_size, etp_rank, dtype)
    if isinstance(out, torch.Tensor):
        _ops.mxfp4_expert_pack_fc2_out.default(db, ds, ep_size, ep_rank, etp_size, etp_rank, out)
    else:
        _ops.mxfp4_expert_pack_fc2_out.list(db, ds, ep_size, ep_rank, etp_size, etp_rank, list(out))
    return out


# --------------------------------------------------------------------------------------------------------------------
# Fake kernels (shape functions for meta / FakeTensor / torch.compile): the geometry module's checks, so a bad call
# fails under tracing with the same values in its message as the kernel would give.
# --------------------------------------------------------------------------------------------------------------------


def _with_rows(like: torch.Tensor, rows: int) -> Tuple[int, ...]:
    return (rows, *like.shape[1:])


def _check_rows(op: str, t: torch.Tensor, name: str, rows: int, what: str) -> None:
    torch._check(t.dim() >= 1 and t.shape[0] == rows,
                 lambda: f"{op}: {name} has {t.shape[0] if t.dim() else 0} rows (shape {list(t.shape)}), "
                         f"expected {what} = {rows}")


def _check_like(op: str, t: torch.Tensor, name: str, ref: torch.Tensor, ref_name: str) -> None:
    torch._check(t.dtype == ref.dtype, lambda: f"{op}: {name} has dtype {t.dtype} but {ref_name} has dtype {ref.dtype}")
    torch._check(t.dim() == ref.dim() and tuple(t.shape[1:]) == tuple(ref.shape[1:]),
                 lambda: f"{op}: {name} has shape {list(t.shape)} but {ref_name} has shape {list(ref.shape)} "
                         "(trailing dims must match)")


def _check_shape(op: str, t: torch.Tensor, name: str, shape: Sequence[int]) -> None:
    torch._check(tuple(t.shape) == tuple(shape), lambda: f"{op}: {name} has shape {list(t.shape)}, expected {list(shape)}")


def _qkv_fake_inputs(op, q, k, v, num_heads, num_query_groups, head_dim, tp_size, tp_rank, output_gate):
    g = geometry.qkv_geometry(op, num_heads, num_query_groups, head_dim, output_gate, tp_size, tp_rank)
    _check_like(op, v, "v", k, "k")
    _check_rows(op, k, "k", g.kv_rows, "G*d")
    _check_rows(op, v, "v", g.kv_rows, "G*d")
    if q is not None:
        _check_like(op, q, "q", k, "k")
        _check_rows(op, q, "q", g.q_rows, "2*H*d" if output_gate else "H*d")
    else:
        torch._check(num_heads == 0, lambda: f"{op}: q is None but num_heads = {num_heads}")
    return g


@torch.library.register_fake("bridge::qkv_pack")
def _(q, k, v, num_heads, num_query_groups, head_dim, tp_size=1, tp_rank=0, output_gate=False):
    g = _qkv_fake_inputs("qkv_pack", q, k, v, num_heads, num_query_groups, head_dim, tp_size, tp_rank, output_gate)
    return k.new_empty(_with_rows(k, g.shard_rows(tp_size)))


@torch.library.register_fake("bridge::qkv_pack_out")
def _(q, k, v, num_heads, num_query_groups, head_dim, tp_size, tp_rank, output_gate, out):
    op = "qkv_pack_out"
    g = _qkv_fake_inputs(op, q, k, v, num_heads, num_query_groups, head_dim, tp_size, tp_rank, output_gate)
    _check_shape(op, out, "out", _with_rows(k, g.shard_rows(tp_size)))


def _qkv_fake_packed(op, packed, num_heads, num_query_groups, head_dim, output_gate):
    g = geometry.qkv_geometry(op, num_heads, num_query_groups, head_dim, output_gate)
    _check_rows(op, packed, "packed", g.packed_rows, "(2*H + 2*G)*d" if output_gate else "(H + 2*G)*d")
    return g


@torch.library.register_fake("bridge::qkv_unpack")
def _(packed, num_heads, num_query_groups, head_dim, output_gate=False):
    g = _qkv_fake_packed("qkv_unpack", packed, num_heads, num_query_groups, head_dim, output_gate)
    return (packed.new_empty(_with_rows(packed, g.q_rows)), packed.new_empty(_with_rows(packed, g.kv_rows)),
            packed.new_empty(_with_rows(packed, g.kv_rows)))


@torch.library.register_fake("bridge::qkv_unpack_out")
def _(packed, num_heads, num_query_groups, head_dim, output_gate, q, k, v):
    op = "qkv_unpack_out"
    g = _qkv_fake_packed(op, packed, num_heads, num_query_groups, head_dim, output_gate)
    for name, t, rows, what in (("k", k, g.kv_rows, "G*d"), ("v", v, g.kv_rows, "G*d"),
                                ("q", q, g.q_rows, "2*H*d" if output_gate else "H*d")):
        if t is not None:
            _check_like(op, t, name, packed, "packed")
            _check_rows(op, t, name, rows, what)


@torch.library.register_fake("bridge::gate_up_pack")
def _(gate, up, tp_size=1, tp_rank=0):
    op = "gate_up_pack"
    _check_like(op, up, "up", gate, "gate")
    return gate.new_empty(_with_rows(gate, geometry.gate_up_shard_rows(op, gate.shape[0], tp_size, tp_rank)))


@torch.library.register_fake("bridge::gate_up_pack_out")
def _(gate, up, tp_size, tp_rank, out):
    op = "gate_up_pack_out"
    _check_like(op, up, "up", gate, "gate")
    _check_shape(op, out, "out", _with_rows(gate, geometry.gate_up_shard_rows(op, gate.shape[0], tp_size, tp_rank)))


def _gate_up_fake_packed(op, packed, tp_size):
    geometry.check_divisible(op, "packed rows", packed.shape[0], "2*tp_size", 2 * tp_size)
    return _with_rows(packed, packed.shape[0] // 2)


@torch.library.register_fake("bridge::gate_up_unpack")
def _(packed, tp_size=1):
    shape = _gate_up_fake_packed("gate_up_unpack", packed, tp_size)
    return packed.new_empty(shape), packed.new_empty(shape)


@torch.library.register_fake("bridge::gate_up_unpack_out")
def _(packed, tp_size, gate, up):
    op = "gate_up_unpack_out"
    shape = _gate_up_fake_packed(op, packed, tp_size)
    _check_shape(op, gate, "gate", shape)
    _check_shape(op, up, "up", shape)


def _fc1_fake(op, gate, up, ep_size, ep_rank, etp_size, etp_rank):
    torch._check(len(up) == len(gate), lambda: f"{op}: up has {len(up)} experts but gate has {len(gate)}")
    return geometry.expert_fc1_shard_shape(op, len(gate), tuple(gate[0].shape), ep_size, ep_rank, etp_size, etp_rank)


def _fc2_fake(op, down, ep_size, ep_rank, etp_size, etp_rank):
    return geometry.expert_fc2_shard_shape(op, len(down), tuple(down[0].shape), ep_size, ep_rank, etp_size, etp_rank)


def _check_list(op: str, ts: Sequence[torch.Tensor], name: str, count: int, shape: Sequence[int]) -> None:
    torch._check(len(ts) == count, lambda: f"{op}: {name} has {len(ts)} tensors, expected {count}")
    for e, t in enumerate(ts):
        _check_shape(op, t, f"{name}[{e}]", shape)


@torch.library.register_fake("bridge::expert_pack_fc1")
def _(gate, up, ep_size=1, ep_rank=0, etp_size=1, etp_rank=0):
    return gate[0].new_empty(_fc1_fake("expert_pack_fc1", gate, up, ep_size, ep_rank, etp_size, etp_rank))


@torch.library.register_fake("bridge::expert_pack_fc1_out")
def _(gate, up, ep_size, ep_rank, etp_size, etp_rank, out):
    op = "expert_pack_fc1_out"
    _check_shape(op, out, "out", _fc1_fake(op, gate, up, ep_size, ep_rank, etp_size, etp_rank))


@torch.library.register_fake("bridge::expert_pack_fc2")
def _(down, ep_size=1, ep_rank=0, etp_size=1, etp_rank=0):
    return down[0].new_empty(_fc2_fake("expert_pack_fc2", down, ep_size, ep_rank, etp_size, etp_rank))


@torch.library.register_fake("bridge::expert_pack_fc2_out")
def _(down, ep_size, ep_rank, etp_size, etp_rank, out):
    op = "expert_pack_fc2_out"
    _check_shape(op, out, "out", _fc2_fake(op, down, ep_size, ep_rank, etp_size, etp_rank))


@torch.library.register_fake("bridge::expert_pack_fc1_out.list")
def _(gate, up, ep_size, ep_rank, etp_size, etp_rank, out):
    op = "expert_pack_fc1_out.list"
    shape = _fc1_fake(op, gate, up, ep_size, ep_rank, etp_size, etp_rank)
    _check_list(op, out, "out", shape[0], shape[1:])


@torch.library.register_fake("bridge::expert_pack_fc2_out.list")
def _(down, ep_size, ep_rank, etp_size, etp_rank, out):
    op = "expert_pack_fc2_out.list"
    shape = _fc2_fake(op, down, ep_size, ep_rank, etp_size, etp_rank)
    _check_list(op, out, "out", shape[0], shape[1:])


def _shards_fake(op, shards, ep_size, etp_size):
    torch._check(len(shards) == ep_size * etp_size,
                 lambda: f"{op}: got {len(shards)} shards, expected ep_size*etp_size = {ep_size * etp_size}")
    for i, s in enumerate(shards[1:], 1):
        _check_shape(op, s, f"shards[{i}]", tuple(shards[0].shape))


@torch.library.register_fake("bridge::expert_unpack_fc1")
def _(shards, ep_size, etp_size):
    op = "expert_unpack_fc1"
    _shards_fake(op, shards, ep_size, etp_size)
    shape = (shards[0].shape[0] * ep_size, *geometry.expert_fc1_expert_shape(op, tuple(shards[0].shape), ep_size,
                                                                             etp_size))
    return shards[0].new_empty(shape), shards[0].new_empty(shape)


@torch.library.register_fake("bridge::expert_unpack_fc1_out")
def _(shards, ep_size, etp_size, gate, up):
    op = "expert_unpack_fc1_out"
    _shards_fake(op, shards, ep_size, etp_size)
    shape = geometry.expert_fc1_expert_shape(op, tuple(shards[0].shape), ep_size, etp_size)
    _check_list(op, gate, "gate", shards[0].shape[0] * ep_size, shape)
    _check_list(op, up, "up", shards[0].shape[0] * ep_size, shape)


@torch.library.register_fake("bridge::expert_unpack_fc2")
def _(shards, ep_size, etp_size):
    op = "expert_unpack_fc2"
    _shards_fake(op, shards, ep_size, etp_size)
    shape = geometry.expert_fc2_expert_shape(op, tuple(shards[0].shape), ep_size, etp_size)
    return shards[0].new_empty((shards[0].shape[0] * ep_size, *shape))


@torch.library.register_fake("bridge::expert_unpack_fc2_out")
def _(shards, ep_size, etp_size, down):
    op = "expert_unpack_fc2_out"
    _shards_fake(op, shards, ep_size, etp_size)
    shape = geometry.expert_fc2_expert_shape(op, tuple(shards[0].shape), ep_size, etp_size)
    _check_list(op, down, "down", shards[0].shape[0] * ep_size, shape)


@torch.library.register_fake("bridge::shard_copy")
def _(src, dst, mesh_shape, mesh_coord, shard_dims):
    op = "shard_copy"
    box = geometry.shard_shape(op, tuple(src.shape), mesh_shape, mesh_coord, shard_dims)
    _check_shape(op, dst, "dst", [n for _, n in box])


@torch.library.register_fake("bridge::flat_range_copy")
def _(src, dst, start):
    torch._check(0 <= start and start + dst.numel() <= src.numel(),
                 lambda: f"flat_range_copy: range [{start}, {start + dst.numel()}) is beyond src.numel() = "
                         f"{src.numel()}")


# ---- fakes of the block-quantized ops ------------------------------------------------------------------------------

_FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)
_WIDE_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
_SCALE_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float8_e8m0fnu)
_MX_SCALE_DTYPES = (torch.uint8, torch.float8_e8m0fnu)


def _wide(op: str, dtype: Optional[torch.dtype], what: str = "dtype") -> torch.dtype:
    dtype = torch.bfloat16 if dtype is None else dtype
    torch._check(dtype in _WIDE_DTYPES, lambda: f"{op}: {what} is {dtype}, expected bfloat16, float16 or float32")
    return dtype


def _fp8(op: str, dtype: Optional[torch.dtype]) -> torch.dtype:
    dtype = torch.float8_e4m3fn if dtype is None else dtype
    torch._check(dtype in _FP8_DTYPES, lambda: f"{op}: dtype = {dtype}, expected float8_e4m3fn or float8_e5m2")
    return dtype


def _fp8_matrix(op: str, w: torch.Tensor, name: str, s: torch.Tensor, sname: str, block_size) -> Tuple[int, int]:
    """(N, K) of an FP8 weight with its scale grid checked."""
    torch._check(w.dtype in _FP8_DTYPES,
                 lambda: f"{op}: {name} has dtype {w.dtype}, expected float8_e4m3fn or float8_e5m2")
    torch._check(w.dim() == 2, lambda: f"{op}: {name} has shape {list(w.shape)}, expected a matrix [N, K]")
    torch._check(s.dtype in _SCALE_DTYPES, lambda: f"{op}: {sname} has dtype {s.dtype}, expected float32")
    _check_shape(op, s, sname, geometry.fp8_scale_shape(op, w.shape[0], w.shape[1], block_size))
    return w.shape[0], w.shape[1]


def _mx_matrix(op: str, b: torch.Tensor, name: str, s: torch.Tensor, sname: str) -> Tuple[int, int]:
    """(N, K) of an MXFP4 weight with its scales checked."""
    torch._check(b.dtype == torch.uint8, lambda: f"{op}: {name} has dtype {b.dtype}, expected uint8")
    n, k = geometry.mxfp4_matrix_shape(op, name, tuple(b.shape))
    torch._check(s.dtype in _MX_SCALE_DTYPES, lambda: f"{op}: {sname} has dtype {s.dtype}, expected uint8")
    _check_shape(op, s, sname, (b.shape[0], b.shape[1]))
    return n, k


def _dequant_fake_shape(op, w, s, block_size, tp_size, tp_rank, tp_dim, mx: bool) -> Tuple[int, ...]:
    inner = 3 if mx else 2
    torch._check(w.dim() >= inner, lambda: f"{op}: weight has shape {list(w.shape)}")
    lead = tuple(w.shape[:w.dim() - inner])
    if mx:
        n, k = _mx_matrix(op, w[(0,) * len(lead)] if lead else w, "blocks", s[(0,) * len(lead)] if lead else s,
                          "scales")
        _check_shape(op, s, "scales", (*lead, w.shape[-3], w.shape[-2]))
    else:
        n, k = _fp8_matrix(op, w[(0,) * len(lead)] if lead else w, "weight", s[(0,) * len(lead)] if lead else s,
                           "scale_inv", block_size)
        _check_shape(op, s, "scale_inv", (*lead, *geometry.fp8_scale_shape(op, n, k, block_size)))
    return (*lead, *geometry.quant_slice_shape(op, n, k, tp_size, tp_rank, tp_dim))


@torch.library.register_fake("bridge::fp8_block_dequant")
def _(weight, scale_inv, block_size, dtype=None, tp_size=1, tp_rank=0, tp_dim=0):
    op = "fp8_block_dequant"
    shape = _dequant_fake_shape(op, weight, scale_inv, block_size, tp_size, tp_rank, tp_dim, False)
    return weight.new_empty(shape, dtype=_wide(op, dtype))


@torch.library.register_fake("bridge::fp8_block_dequant_out")
def _(weight, scale_inv, block_size, tp_size, tp_rank, tp_dim, out):
    op = "fp8_block_dequant_out"
    _wide(op, out.dtype, "out's dtype")
    _check_shape(op, out, "out", _dequant_fake_shape(op, weight, scale_inv, block_size, tp_size, tp_rank, tp_dim,
                                                     False))


@torch.library.register_fake("bridge::mxfp4_dequant")
def _(blocks, scales, dtype=None, tp_size=1, tp_rank=0, tp_dim=0):
    op = "mxfp4_dequant"
    shape = _dequant_fake_shape(op, blocks, scales, None, tp_size, tp_rank, tp_dim, True)
    return blocks.new_empty(shape, dtype=_wide(op, dtype))


@torch.library.register_fake("bridge::mxfp4_dequant_out")
def _(blocks, scales, tp_size, tp_rank, tp_dim, out):
    op = "mxfp4_dequant_out"
    _wide(op, out.dtype, "out's dtype")
    _check_shape(op, out, "out", _dequant_fake_shape(op, blocks, scales, None, tp_size, tp_rank, tp_dim, True))


def _quant_fake(op, weight, block_size, rule):
    geometry.check_quant_rule(op, rule)
    _wide(op, weight.dtype, "weight's dtype")
    torch._check(weight.dim() >= 2, lambda: f"{op}: weight has shape {list(weight.shape)}, expected [..., N, K]")
    return (*weight.shape[:-2], *geometry.fp8_scale_shape(op, weight.shape[-2], weight.shape[-1], block_size))


@torch.library.register_fake("bridge::fp8_block_quant")
def _(weight, block_size, dtype=None, rule="deepseek"):
    op = "fp8_block_quant"
    grid = _quant_fake(op, weight, block_size, rule)
    return weight.new_empty(weight.shape, dtype=_fp8(op, dtype)), weight.new_empty(grid, dtype=torch.float32)


@torch.library.register_fake("bridge::fp8_block_quant_out")
def _(weight, block_size, rule, out, scale_inv):
    op = "fp8_block_quant_out"
    grid = _quant_fake(op, weight, block_size, rule)
    _fp8(op, out.dtype)
    _check_shape(op, out, "out", weight.shape)
    _check_shape(op, scale_inv, "scale_inv", grid)


def _fp8_qkv_fake(op, q, q_s, k, k_s, v, v_s, block_size, H, G, d, tp_size, tp_rank, gate):
    g = geometry.qkv_geometry(op, H, G, d, gate, tp_size, tp_rank)
    _, K = _fp8_matrix(op, k, "k", k_s, "k_scale_inv", block_size)
    _fp8_matrix(op, v, "v", v_s, "v_scale_inv", block_size)
    _check_rows(op, k, "k", g.kv_rows, "G*d")
    _check_rows(op, v, "v", g.kv_rows, "G*d")
    if q is not None:
        _fp8_matrix(op, q, "q", q_s, "q_scale_inv", block_size)
        _check_rows(op, q, "q", g.q_rows, "2*H*d" if gate else "H*d")
    else:
        torch._check(H == 0, lambda: f"{op}: q is None but num_heads = {H}")
    return (g.shard_rows(tp_size), K)


@torch.library.register_fake("bridge::fp8_qkv_pack")
def _(q, q_scale_inv, k, k_scale_inv, v, v_scale_inv, block_size, num_heads, num_query_groups, head_dim, tp_size=1,
      tp_rank=0, output_gate=False, dtype=None):
    op = "fp8_qkv_pack"
    shape = _fp8_qkv_fake(op, q, q_scale_inv, k, k_scale_inv, v, v_scale_inv, block_size, num_heads, num_query_groups,
                          head_dim, tp_size, tp_rank, output_gate)
    return k.new_empty(shape, dtype=_wide(op, dtype))


@torch.library.register_fake("bridge::fp8_qkv_pack_out")
def _(q, q_scale_inv, k, k_scale_inv, v, v_scale_inv, block_size, num_heads, num_query_groups, head_dim, tp_size,
      tp_rank, output_gate, out):
    op = "fp8_qkv_pack_out"
    shape = _fp8_qkv_fake(op, q, q_scale_inv, k, k_scale_inv, v, v_scale_inv, block_size, num_heads, num_query_groups,
                          head_dim, tp_size, tp_rank, output_gate)
    _wide(op, out.dtype, "out's dtype")
    _check_shape(op, out, "out", shape)


def _fp8_qkv_unpack_fake(op, packed, block_size, H, G, d, gate, rule):
    geometry.check_quant_rule(op, rule)
    g = _qkv_fake_packed(op, packed, H, G, d, gate)
    _wide(op, packed.dtype, "packed's dtype")
    torch._check(packed.dim() == 2, lambda: f"{op}: packed has shape {list(packed.shape)}, expected [rows, K]")
    K = packed.shape[1]
    return [((rows, K), geometry.fp8_scale_shape(op, rows, K, block_size)) for rows in (g.q_rows, g.kv_rows, g.kv_rows)]


@torch.library.register_fake("bridge::fp8_qkv_unpack")
def _(packed, block_size, num_heads, num_query_groups, head_dim, output_gate=False, dtype=None, rule="deepseek"):
    op = "fp8_qkv_unpack"
    shapes = _fp8_qkv_unpack_fake(op, packed, block_size, num_heads, num_query_groups, head_dim, output_gate, rule)
    qd = _fp8(op, dtype)
    return tuple(t for w, s in shapes
                 for t in (packed.new_empty(w, dtype=qd), packed.new_empty(s, dtype=torch.float32)))


@torch.library.register_fake("bridge::fp8_qkv_unpack_out")
def _(packed, block_size, num_heads, num_query_groups, head_dim, output_gate, rule, q, q_scale_inv, k, k_scale_inv, v,
      v_scale_inv):
    op = "fp8_qkv_unpack_out"
    shapes = _fp8_qkv_unpack_fake(op, packed, block_size, num_heads, num_query_groups, head_dim, output_gate, rule)
    for (w, s), (name, t, ts) in zip(shapes, (("q", q, q_scale_inv), ("k", k, k_scale_inv), ("v", v, v_scale_inv))):
        if t is not None:
            _check_shape(op, t, name, w)
            _check_shape(op, ts, f"{name}_scale_inv", s)


def _fp8_gate_up_fake(op, gate, gate_s, up, up_s, block_size, tp_size, tp_rank):
    N, K = _fp8_matrix(op, gate, "gate", gate_s, "gate_scale_inv", block_size)
    if up is not None:
        _fp8_matrix(op, up, "up", up_s, "up_scale_inv", block_size)
        _check_shape(op, up, "up", (N, K))
        F = N
    else:
        torch._check(N % 2 == 0, lambda: f"{op}: the fused gate_up has {N} rows, expected an even 2F")
        F = N // 2
    return geometry.gate_up_shard_rows(op, F, tp_size, tp_rank), K


@torch.library.register_fake("bridge::fp8_gate_up_pack")
def _(gate, gate_scale_inv, up, up_scale_inv, block_size, tp_size=1, tp_rank=0, interleaved=False, dtype=None):
    op = "fp8_gate_up_pack"
    shape = _fp8_gate_up_fake(op, gate, gate_scale_inv, up, up_scale_inv, block_size, tp_size, tp_rank)
    return gate.new_empty(shape, dtype=_wide(op, dtype))


@torch.library.register_fake("bridge::fp8_gate_up_pack_out")
def _(gate, gate_scale_inv, up, up_scale_inv, block_size, tp_size, tp_rank, interleaved, out):
    op = "fp8_gate_up_pack_out"
    shape = _fp8_gate_up_fake(op, gate, gate_scale_inv, up, up_scale_inv, block_size, tp_size, tp_rank)
    _wide(op, out.dtype, "out's dtype")
    _check_shape(op, out, "out", shape)


def _fp8_gate_up_unpack_fake(op, packed, block_size, tp_size, rule):
    geometry.check_quant_rule(op, rule)
    _wide(op, packed.dtype, "packed's dtype")
    torch._check(packed.dim() == 2, lambda: f"{op}: packed has shape {list(packed.shape)}, expected [2F, K]")
    geometry.check_divisible(op, "packed rows", packed.shape[0], "2*tp_size", 2 * tp_size)
    F, K = packed.shape[0] // 2, packed.shape[1]
    return (F, K), geometry.fp8_scale_shape(op, F, K, block_size)


@torch.library.register_fake("bridge::fp8_gate_up_unpack")
def _(packed, block_size, tp_size=1, dtype=None, rule="deepseek"):
    op = "fp8_gate_up_unpack"
    w, s = _fp8_gate_up_unpack_fake(op, packed, block_size, tp_size, rule)
    qd = _fp8(op, dtype)
    return (packed.new_empty(w, dtype=qd), packed.new_empty(s, dtype=torch.float32), packed.new_empty(w, dtype=qd),
            packed.new_empty(s, dtype=torch.float32))


@torch.library.register_fake("bridge::fp8_gate_up_unpack_out")
def _(packed, block_size, tp_size, rule, gate, gate_scale_inv, up, up_scale_inv):
    op = "fp8_gate_up_unpack_out"
    w, s = _fp8_gate_up_unpack_fake(op, packed, block_size, tp_size, rule)
    for name, t, shape in (("gate", gate, w), ("gate_scale_inv", gate_scale_inv, s), ("up", up, w),
                           ("up_scale_inv", up_scale_inv, s)):
        _check_shape(op, t, name, shape)


def _q_expert_fc1_fake(op, gate, gate_s, up, up_s, block_size, ep_size, ep_rank, etp_size, etp_rank, mx: bool):
    torch._check(len(gate) == len(gate_s), lambda: f"{op}: {len(gate_s)} scale tensors for {len(gate)} experts")
    matrix = _mx_matrix if mx else (lambda o, w, n, s, sn: _fp8_matrix(o, w, n, s, sn, block_size))
    N, K = matrix(op, gate[0], "gate[0]", gate_s[0], "gate scales[0]")
    if len(up):
        torch._check(len(up) == len(gate), lambda: f"{op}: up has {len(up)} experts but gate has {len(gate)}")
        matrix(op, up[0], "up[0]", up_s[0], "up scales[0]")
        F = N
    else:
        torch._check(N % 2 == 0, lambda: f"{op}: the fused gate_up[0] has {N} rows, expected an even 2F")
        F = N // 2
    return geometry.expert_fc1_shard_shape(op, len(gate), (F, K), ep_size, ep_rank, etp_size, etp_rank)


def _q_expert_fc2_fake(op, down, down_s, block_size, ep_size, ep_rank, etp_size, etp_rank, mx: bool):
    torch._check(len(down) == len(down_s), lambda: f"{op}: {len(down_s)} scale tensors for {len(down)} experts")
    if mx:
        D, F = _mx_matrix(op, down[0], "down[0]", down_s[0], "down scales[0]")
    else:
        D, F = _fp8_matrix(op, down[0], "down[0]", down_s[0], "down scales[0]", block_size)
    return geometry.expert_fc2_shard_shape(op, len(down), (D, F), ep_size, ep_rank, etp_size, etp_rank)


@torch.library.register_fake("bridge::fp8_expert_pack_fc1")
def _(gate, gate_scale_inv, up, up_scale_inv, block_size, ep_size=1, ep_rank=0, etp_size=1, etp_rank=0,
      interleaved=False, dtype=None):
    op = "fp8_expert_pack_fc1"
    shape = _q_expert_fc1_fake(op, gate, gate_scale_inv, up, up_scale_inv, block_size, ep_size, ep_rank, etp_size,
                               etp_rank, False)
    return gate[0].new_empty(shape, dtype=_wide(op, dtype))


@torch.library.register_fake("bridge::fp8_expert_pack_fc1_out")
def _(gate, gate_scale_inv, up, up_scale_inv, block_size, ep_size, ep_rank, etp_size, etp_rank, interleaved, out):
    op = "fp8_expert_pack_fc1_out"
    _check_shape(op, out, "out", _q_expert_fc1_fake(op, gate, gate_scale_inv, up, up_scale_inv, block_size,
                                                    ep_size, ep_rank, etp_size, etp_rank, False))


@torch.library.register_fake("bridge::fp8_expert_pack_fc1_out.list")
def _(gate, gate_scale_inv, up, up_scale_inv, block_size, ep_size, ep_rank, etp_size, etp_rank, interleaved, out):
    op = "fp8_expert_pack_fc1_out.list"
    shape = _q_expert_fc1_fake(op, gate, gate_scale_inv, up, up_scale_inv, block_size, ep_size, ep_rank, etp_size,
                               etp_rank, False)
    _check_list(op, out, "out", shape[0], shape[1:])


@torch.library.register_fake("bridge::fp8_expert_pack_fc2")
def _(down, down_scale_inv, block_size, ep_size=1, ep_rank=0, etp_size=1, etp_rank=0, dtype=None):
    op = "fp8_expert_pack_fc2"
    shape = _q_expert_fc2_fake(op, down, down_scale_inv, block_size, ep_size, ep_rank, etp_size, etp_rank, False)
    return down[0].new_empty(shape, dtype=_wide(op, dtype))


@torch.library.register_fake("bridge::fp8_expert_pack_fc2_out")
def _(down, down_scale_inv, block_size, ep_size, ep_rank, etp_size, etp_rank, out):
    op = "fp8_expert_pack_fc2_out"
    _check_shape(op, out, "out", _q_expert_fc2_fake(op, down, down_scale_inv, block_size, ep_size, ep_rank,
                                                    etp_size, etp_rank, False))


@torch.library.register_fake("bridge::fp8_expert_pack_fc2_out.list")
def _(down, down_scale_inv, block_size, ep_size, ep_rank, etp_size, etp_rank, out):
    op = "fp8_expert_pack_fc2_out.list"
    shape = _q_expert_fc2_fake(op, down, down_scale_inv, block_size, ep_size, ep_rank, etp_size, etp_rank, False)
    _check_list(op, out, "out", shape[0], shape[1:])


@torch.library.register_fake("bridge::mxfp4_expert_pack_fc1")
def _(gate_blocks, gate_scales, up_blocks, up_scales, ep_size=1, ep_rank=0, etp_size=1, etp_rank=0,
      interleaved=False, dtype=None):
    op = "mxfp4_expert_pack_fc1"
    shape = _q_expert_fc1_fake(op, gate_blocks, gate_scales, up_blocks, up_scales, None, ep_size, ep_rank,
                               etp_size, etp_rank, True)
    return gate_blocks[0].new_empty(shape, dtype=_wide(op, dtype))


@torch.library.register_fake("bridge::mxfp4_expert_pack_fc1_out")
def _(gate_blocks, gate_scales, up_blocks, up_scales, ep_size, ep_rank, etp_size, etp_rank, interleaved, out):
    op = "mxfp4_expert_pack_fc1_out"
    _check_shape(op, out, "out", _q_expert_fc1_fake(op, gate_blocks, gate_scales, up_blocks, up_scales, None,
                                                    ep_size, ep_rank, etp_size, etp_rank, True))


@torch.library.register_fake("bridge::mxfp4_expert_pack_fc1_out.list")
def _(gate_blocks, gate_scales, up_blocks, up_scales, ep_size, ep_rank, etp_size, etp_rank, interleaved, out):
    op = "mxfp4_expert_pack_fc1_out.list"
    shape = _q_expert_fc1_fake(op, gate_blocks, gate_scales, up_blocks, up_scales, None, ep_size, ep_rank,
                               etp_size, etp_rank, True)
    _check_list(op, out, "out", shape[0], shape[1:])


@torch.library.register_fake("bridge::mxfp4_expert_pack_fc2")
def _(down_blocks, down_scales, ep_size=1, ep_rank=0, etp_size=1, etp_rank=0, dtype=None):
    op = "mxfp4_expert_pack_fc2"
    shape = _q_expert_fc2_fake(op, down_blocks, down_scales, None, ep_size, ep_rank, etp_size, etp_rank, True)
    return down_blocks[0].new_empty(shape, dtype=_wide(op, dtype))


@torch.library.register_fake("bridge::mxfp4_expert_pack_fc2_out")
def _(down_blocks, down_scales, ep_size, ep_rank, etp_size, etp_rank, out):
    op = "mxfp4_expert_pack_fc2_out"
    _check_shape(op, out, "out", _q_expert_fc2_fake(op, down_blocks, down_scales, None, ep_size, ep_rank,
                                                    etp_size, etp_rank, True))


@torch.library.register_fake("bridge::mxfp4_expert_pack_fc2_out.list")
def _(down_blocks, down_scales, ep_size, ep_rank, etp_size, etp_rank, out):
    op = "mxfp4_expert_pack_fc2_out.list"
    shape = _q_expert_fc2_fake(op, down_blocks, down_scales, None, ep_size, ep_rank, etp_size, etp_rank, True)
    _check_list(op, out, "out", shape[0], shape[1:])


def _q_unpack_fc_fake(op, shards, block_size, ep_size, etp_size, rule, fc1: bool):
    geometry.check_quant_rule(op, rule)
    _shards_fake(op, shards, ep_size, etp_size)
    _wide(op, shards[0].dtype, "shards' dtype")
    torch._check(shards[0].dim() == 3, lambda: f"{op}: shards[0] has shape {list(shards[0].shape)}, expected "
                                               "[E/ep, rows, cols] (expert weights; biases are not quantized)")
    shape_of = geometry.expert_fc1_expert_shape if fc1 else geometry.expert_fc2_expert_shape
    w = shape_of(op, tuple(shards[0].shape), ep_size, etp_size)
    return shards[0].shape[0] * ep_size, w, geometry.fp8_scale_shape(op, w[0], w[1], block_size)


@torch.library.register_fake("bridge::fp8_expert_unpack_fc1")
def _(shards, block_size, ep_size, etp_size, dtype=None, rule="deepseek"):
    op = "fp8_expert_unpack_fc1"
    E, w, s = _q_unpack_fc_fake(op, shards, block_size, ep_size, etp_size, rule, True)
    qd = _fp8(op, dtype)
    new = shards[0].new_empty
    return (new((E, *w), dtype=qd), new((E, *s), dtype=torch.float32), new((E, *w), dtype=qd),
            new((E, *s), dtype=torch.float32))


@torch.library.register_fake("bridge::fp8_expert_unpack_fc1_out")
def _(shards, block_size, ep_size, etp_size, rule, gate, gate_scale_inv, up, up_scale_inv):
    op = "fp8_expert_unpack_fc1_out"
    E, w, s = _q_unpack_fc_fake(op, shards, block_size, ep_size, etp_size, rule, True)
    _check_list(op, gate, "gate", E, w)
    _check_list(op, gate_scale_inv, "gate_scale_inv", E, s)
    _check_list(op, up, "up", E, w)
    _check_list(op, up_scale_inv, "up_scale_inv", E, s)


@torch.library.register_fake("bridge::fp8_expert_unpack_fc2")
def _(shards, block_size, ep_size, etp_size, dtype=None, rule="deepseek"):
    op = "fp8_expert_unpack_fc2"
    E, w, s = _q_unpack_fc_fake(op, shards, block_size, ep_size, etp_size, rule, False)
    return shards[0].new_empty((E, *w), dtype=_fp8(op, dtype)), shards[0].new_empty((E, *s), dtype=torch.float32)


@torch.library.register_fake("bridge::fp8_expert_unpack_fc2_out")
def _(shards, block_size, ep_size, etp_size, rule, down, down_scale_inv):
    op = "fp8_expert_unpack_fc2_out"
    E, w, s = _q_unpack_fc_fake(op, shards, block_size, ep_size, etp_size, rule, False)
    _check_list(op, down, "down", E, w)
    _check_list(op, down_scale_inv, "down_scale_inv", E, s)
