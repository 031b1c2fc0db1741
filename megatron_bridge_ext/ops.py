"""Typed wrappers around ``torch.ops.bridge.*`` and their fake (meta) kernels.

Every op moves bytes: inputs may be non-contiguous views (slices of memory-mapped safetensors, transposed or
row-strided views) of any dtype, and the result is bit-identical to the layout described in
``conversion_semantics.md``. Layout variants (a single HF ``qkv`` tensor, row-interleaved or transposed gate/up,
fused expert tensors) are expressed as zero-copy views handed to the same kernels.

Weights are 2-D ``[rows, cols]`` and biases 1-D ``[rows]``; "rows" below always means dim 0 of the HF tensor as
Megatron stores it (output features).
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple, Union

import torch

from megatron_bridge_ext import geometry

__all__ = [
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
    """``(layer, expert)`` of a global parameter name, -1 where absent (the reference ordering key)."""
    return tuple(_ops.param_sort_key.default(name))


def local_to_global_name(name: str, layer_offset: int = 0, expert_offset: int = 0) -> str:
    """Rewrite a local Megatron name to its global name (first layer index + offset, expert index + offset)."""
    return _ops.local_to_global_name.default(name, layer_offset, expert_offset)


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
