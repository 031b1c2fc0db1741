"""Shape arithmetic of every layout, in one place: the op wrappers, the fake (meta) kernels and the mappings use it.

Pure integer functions (no tensors, no torch ops), mirroring the geometry of ``csrc/common/*.h``. Each checker raises
``ValueError`` whose message names the op, the argument and the values, as the C++ kernels do.

Notation (``conversion_semantics.md``): H heads, G query groups, d head_dim, n = H / G, F rows of gate (or up),
E experts, tp / ep / etp parallel sizes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Sequence, Tuple

__all__ = [
    "QkvGeometry",
    "qkv_geometry",
    "check_rank",
    "check_divisible",
    "gate_up_shard_rows",
    "gate_up_half_shape",
    "fused_gate_up_shape",
    "expert_fc1_shard_shape",
    "expert_fc2_shard_shape",
    "expert_fc1_expert_shape",
    "expert_fc2_expert_shape",
    "chunk_range",
    "shard_shape",
    "ceil_div",
    "block_size_of",
    "fp8_scale_shape",
    "mxfp4_matrix_shape",
    "quant_slice_shape",
    "check_quant_rule",
    "MXFP4_GROUP",
]


def check_rank(op: str, rank_name: str, rank: int, size_name: str, size: int) -> None:
    """``0 <= rank < size`` (and ``size >= 1``)."""
    if not (size >= 1 and 0 <= rank < size):
        raise ValueError(f"{op}: {rank_name} = {rank} is out of range for {size_name} = {size}")


def check_divisible(op: str, a_name: str, a: int, b_name: str, b: int) -> None:
    """``b > 0`` and ``a % b == 0``."""
    if not (b > 0 and a % b == 0):
        raise ValueError(f"{op}: {a_name} = {a} is not divisible by {b_name} = {b}")


@dataclass(frozen=True)
class QkvGeometry:
    """Row counts of Megatron's fused ``linear_qkv`` (section 1 of the semantics).

    Attributes:
        heads, groups, head_dim, output_gate: H, G, d and the gated-attention flag.
        q_rows_per_group: n*d (2*n*d with the output gate).
        block_rows: P, the rows of one group block (q rows + 2*d).
        q_rows: rows of HF q (H*d, or 2*H*d with the output gate).
        kv_rows: rows of HF k (and v): G*d.
        packed_rows: rows of the full packed tensor: G*P.
    """

    heads: int
    groups: int
    head_dim: int
    output_gate: bool
    q_rows_per_group: int
    block_rows: int
    q_rows: int
    kv_rows: int
    packed_rows: int

    def shard_rows(self, tp_size: int) -> int:
        """Rows of one TP rank's shard: packed rows / tp (G / tp whole groups, or 1 / (tp / G) of a group)."""
        return self.packed_rows // tp_size

    def with_groups(self, groups: int) -> "QkvGeometry":
        """The geometry of ``groups`` of these groups (e.g. one TP rank's: H/tp heads, G/tp groups)."""
        return qkv_geometry("qkv", self.heads // self.groups * groups, groups, self.head_dim, self.output_gate)


def qkv_geometry(op: str, num_heads: int, num_query_groups: int, head_dim: int, output_gate: bool = False,
                 tp_size: int = 1, tp_rank: int = 0) -> QkvGeometry:
    """Checks H, G, d (and tp) and returns the row counts.

    TP rank t holds packed rows ``[t*G*P/tp, (t+1)*G*P/tp)``: whole groups when tp divides G, a slice of one group
    when G divides tp (fewer key/value heads than TP ranks, megatron-core's layout).

    Raises:
        ValueError: G < 1, d < 1, H < 0, H not divisible by G, a bad tp rank, or tp and G that do not divide.
    """
    if num_query_groups < 1:
        raise ValueError(f"{op}: num_query_groups = {num_query_groups} must be >= 1")
    if head_dim < 1:
        raise ValueError(f"{op}: head_dim = {head_dim} must be >= 1")
    if num_heads < 0:
        raise ValueError(f"{op}: num_heads = {num_heads} must be >= 0 (0 for a KV-only layout)")
    if num_heads > 0:
        check_divisible(op, "num_heads", num_heads, "num_query_groups", num_query_groups)
    check_rank(op, "tp_rank", tp_rank, "tp_size", tp_size)
    gate = 2 if output_gate else 1
    n = num_heads // num_query_groups
    q_per_group = n * head_dim * gate
    block = q_per_group + 2 * head_dim
    if num_query_groups >= tp_size:
        check_divisible(op, "num_query_groups", num_query_groups, "tp_size", tp_size)
    elif tp_size % num_query_groups:
        raise ValueError(f"{op}: num_query_groups = {num_query_groups} is not divisible by tp_size = {tp_size}, nor "
                         "tp_size by num_query_groups (fewer query groups than TP ranks need tp_size to be a "
                         "multiple of num_query_groups)")
    elif block % (tp_size // num_query_groups):
        raise ValueError(f"{op}: a query group's {block} packed rows do not split into tp_size / num_query_groups = "
                         f"{tp_size // num_query_groups} equal parts")
    return QkvGeometry(
        heads=num_heads, groups=num_query_groups, head_dim=head_dim, output_gate=output_gate,
        q_rows_per_group=q_per_group, block_rows=block, q_rows=num_heads * head_dim * gate,
        kv_rows=num_query_groups * head_dim, packed_rows=num_query_groups * block,
    )


def gate_up_shard_rows(op: str, rows: int, tp_size: int, tp_rank: int = 0) -> int:
    """Rows 2*F/tp of TP rank ``tp_rank``'s ``[gate_t; up_t]``; checks F % tp and the rank."""
    check_rank(op, "tp_rank", tp_rank, "tp_size", tp_size)
    check_divisible(op, "F (gate rows)", rows, "tp_size", tp_size)
    return 2 * (rows // tp_size)


def gate_up_half_shape(op: str, shape: Sequence[int], transposed: bool = False) -> Tuple[int, ...]:
    """Gate's (or up's) ``[F, ...]`` in one HF tensor holding both: ``[2F, D]`` (``[D, 2F]`` if transposed) or a
    ``[2F]`` bias (the views of ``ops.gate_up_views``, interleaved or not)."""
    x = (shape[1], shape[0], *shape[2:]) if transposed and len(shape) == 2 else tuple(shape)
    if not x or x[0] % 2:
        raise ValueError(f"{op}: gate_up tensor of shape {list(shape)} has an odd number of gate+up rows")
    return (x[0] // 2, *x[1:])


def fused_gate_up_shape(half: Sequence[int], transposed: bool = False) -> Tuple[int, ...]:
    """The HF tensor holding gate and up of shape ``half`` each: ``[2F, ...]`` (``[D, 2F]`` if transposed)."""
    if transposed and len(half) == 2:
        return (half[1], 2 * half[0])
    return (2 * half[0], *half[1:])


def expert_fc1_shard_shape(op: str, num_experts: int, expert_shape: Sequence[int], ep_size: int, ep_rank: int,
                           etp_size: int, etp_rank: int) -> Tuple[int, ...]:
    """``[E/ep, 2F/etp, ...]``: an (EP, ETP) rank's stacked ``linear_fc1`` from E per-expert ``[F, ...]`` gates."""
    _check_experts(op, num_experts, ep_size, ep_rank, etp_size, etp_rank)
    if len(expert_shape) < 1:
        raise ValueError(f"{op}: gate[0] must have at least 1 dim, got shape {list(expert_shape)}")
    check_divisible(op, "F (gate rows)", expert_shape[0], "etp_size", etp_size)
    return (num_experts // ep_size, 2 * (expert_shape[0] // etp_size), *expert_shape[1:])


def expert_fc2_shard_shape(op: str, num_experts: int, expert_shape: Sequence[int], ep_size: int, ep_rank: int,
                           etp_size: int, etp_rank: int) -> Tuple[int, ...]:
    """``[E/ep, D, F/etp]`` (weights, columns sharded) or ``[E/ep, D]`` (1-D biases, replicated over ETP)."""
    _check_experts(op, num_experts, ep_size, ep_rank, etp_size, etp_rank)
    if len(expert_shape) not in (1, 2):
        raise ValueError(f"{op}: down[0] has shape {list(expert_shape)}, expected [D, F] (weight) or [D] (bias)")
    if len(expert_shape) == 1:
        return (num_experts // ep_size, expert_shape[0])
    check_divisible(op, "F (down columns)", expert_shape[1], "etp_size", etp_size)
    return (num_experts // ep_size, expert_shape[0], expert_shape[1] // etp_size)


def expert_fc1_expert_shape(op: str, shard_shape: Sequence[int], ep_size: int, etp_size: int) -> Tuple[int, ...]:
    """One HF expert's gate (or up) ``[F, ...]`` from a gathered fc1 shard ``[E/ep, 2F/etp, ...]``."""
    if len(shard_shape) < 2:
        raise ValueError(f"{op}: shards[0] has shape {list(shard_shape)}, expected [E/ep, rows(, cols)]")
    if shard_shape[1] % 2:
        raise ValueError(f"{op}: shards have {shard_shape[1]} rows per expert (dim 1), expected an even 2F/etp")
    return (shard_shape[1] // 2 * etp_size, *shard_shape[2:])


def expert_fc2_expert_shape(op: str, shard_shape: Sequence[int], ep_size: int, etp_size: int) -> Tuple[int, ...]:
    """One HF expert's down ``[D, F]`` (or ``[D]``) from a gathered fc2 shard ``[E/ep, D, F/etp]``."""
    if len(shard_shape) not in (2, 3):
        raise ValueError(f"{op}: shards[0] has shape {list(shard_shape)}, expected [E/ep, D, F/etp] (weight) or "
                         f"[E/ep, D] (bias)")
    if len(shard_shape) == 3:
        return (shard_shape[1], shard_shape[2] * etp_size)
    return (shard_shape[1],)


def _check_experts(op: str, num_experts: int, ep_size: int, ep_rank: int, etp_size: int, etp_rank: int) -> None:
    if ep_size < 1:
        raise ValueError(f"{op}: ep_size = {ep_size} must be >= 1")
    if etp_size < 1:
        raise ValueError(f"{op}: etp_size = {etp_size} must be >= 1")
    if num_experts < 1:
        raise ValueError(f"{op}: got {num_experts} experts, expected at least 1")
    check_divisible(op, "number of experts E", num_experts, "ep_size", ep_size)
    check_rank(op, "ep_rank", ep_rank, "ep_size", ep_size)
    check_rank(op, "etp_rank", etp_rank, "etp_size", etp_size)


def chunk_range(length: int, parts: int, index: int) -> Tuple[int, int]:
    """``(start, size)`` of chunk ``index`` of ``torch.chunk(x, parts)`` along a dim of ``length``.

    Chunks are ceil-sized; trailing chunks may be short or empty.
    """
    chunk = -(-length // parts)
    start = min(index * chunk, length)
    return start, min(chunk, length - start)


def shard_shape(op: str, shape: Sequence[int], mesh_shape: Sequence[int], mesh_coord: Sequence[int],
                shard_dims: Sequence[int]) -> List[Tuple[int, int]]:
    """Per tensor dim, ``(offset, length)`` of the shard owned by ``mesh_coord`` (torch.chunk, nested in mesh-dim
    order; ``shard_dims[i] == -1`` replicates over mesh dim i)."""
    if not (len(mesh_shape) == len(mesh_coord) == len(shard_dims)):
        raise ValueError(f"{op}: mesh_shape {list(mesh_shape)}, mesh_coord {list(mesh_coord)} and shard_dims "
                         f"{list(shard_dims)} must have the same length")
    box = [(0, int(s)) for s in shape]
    for i, (m, c, k) in enumerate(zip(mesh_shape, mesh_coord, shard_dims)):
        if m < 1:
            raise ValueError(f"{op}: mesh_shape[{i}] = {m} must be >= 1 (mesh_shape {list(mesh_shape)})")
        if not 0 <= c < m:
            raise ValueError(f"{op}: mesh_coord[{i}] = {c} is out of range for mesh_shape[{i}] = {m}")
        if not -1 <= k < len(shape):
            raise ValueError(f"{op}: shard_dims[{i}] = {k} is out of range for a {len(shape)}-d tensor "
                             "(use -1 for Replicate)")
        if k < 0:
            continue
        start, size = chunk_range(box[k][1], m, c)
        box[k] = (box[k][0] + start, size)
    return box


# --------------------------------------------------------------------------------------------------------------------
# Block-quantized weights (csrc/common/quant.h): FP8 with per-block scales, MXFP4
# --------------------------------------------------------------------------------------------------------------------

#: MXFP4 values per E8M0 scale (and per 16-byte block of packed E2M1 values)
MXFP4_GROUP = 32


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def block_size_of(op: str, block_size: Sequence[int]) -> Tuple[int, int]:
    """``(bn, bk)`` of ``quantization_config.weight_block_size``; two positive ints."""
    bs = [int(b) for b in block_size]
    if len(bs) != 2 or bs[0] < 1 or bs[1] < 1:
        raise ValueError(f"{op}: block_size = {list(block_size)} must be two positive ints [block rows, block columns] "
                         "(quantization_config.weight_block_size)")
    return bs[0], bs[1]


def fp8_scale_shape(op: str, rows: int, cols: int, block_size: Sequence[int]) -> Tuple[int, int]:
    """The ``weight_scale_inv`` grid of an FP8 ``[rows, cols]`` weight: ``[ceil(rows/bn), ceil(cols/bk)]`` (partial
    blocks at the bottom / right edge, as DeepSeek-V3's kernel and its 576-row ``kv_a_proj_with_mqa`` have)."""
    bn, bk = block_size_of(op, block_size)
    return ceil_div(rows, bn), ceil_div(cols, bk)


def mxfp4_matrix_shape(op: str, name: str, blocks_shape: Sequence[int]) -> Tuple[int, int]:
    """``(N, K)`` of the matrix whose MXFP4 ``*_blocks`` are ``[N, K/32, 16]``."""
    if len(blocks_shape) != 3 or blocks_shape[2] != 16:
        raise ValueError(f"{op}: {name} has shape {list(blocks_shape)}, expected [N, K/32, 16] (MXFP4 *_blocks)")
    return blocks_shape[0], blocks_shape[1] * MXFP4_GROUP


def quant_slice_shape(op: str, rows: int, cols: int, tp_size: int, tp_rank: int, tp_dim: int) -> Tuple[int, int]:
    """The ``[rows, cols]`` of TP rank ``tp_rank``'s slice of a weight: rows (``tp_dim`` 0, a column-parallel linear)
    or columns (``tp_dim`` 1, a row-parallel linear) split in ``tp_size`` equal parts."""
    check_rank(op, "tp_rank", tp_rank, "tp_size", tp_size)
    if tp_dim not in (0, 1):
        raise ValueError(f"{op}: tp_dim = {tp_dim}, expected 0 (rows: a column-parallel linear) or 1 (columns: a "
                         "row-parallel linear)")
    if tp_dim == 0:
        check_divisible(op, "N (weight rows)", rows, "tp_size", tp_size)
        return rows // tp_size, cols
    check_divisible(op, "K (weight columns)", cols, "tp_size", tp_size)
    return rows, cols // tp_size


def check_quant_rule(op: str, rule: str) -> None:
    """The scale rule of ``fp8_block_quant``: ``"deepseek"`` or ``"transformers"``."""
    if rule not in ("deepseek", "transformers"):
        raise ValueError(f"{op}: rule = {rule!r}, expected 'deepseek' or 'transformers'")
