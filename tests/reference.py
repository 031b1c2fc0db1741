"""Plain-torch reference layouts, written from ``conversion_semantics.md`` (indexing and ``cat`` only).

These never call ``torch.ops.bridge``; the tests compare the ops against them with ``torch.equal``.
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch


# --------------------------------------------------------------------------------------------------------------------
# QKV (section 1)
# --------------------------------------------------------------------------------------------------------------------


def qkv_full(
    q: Optional[torch.Tensor], k: torch.Tensor, v: torch.Tensor, H: int, G: int, d: int, output_gate: bool = False
) -> torch.Tensor:
    """The full packed linear_qkv (all TP shards), built group by group."""
    n = H // G if H else 0
    blocks = []
    for g in range(G):
        if n:
            if output_gate:
                heads = [q[(g * n + s) * 2 * d:(g * n + s) * 2 * d + 2 * d] for s in range(n)]
                blocks += [h[:d] for h in heads]  # q_h of every head of the group
                blocks += [h[d:] for h in heads]  # then z_h
            else:
                blocks.append(q[g * n * d:(g + 1) * n * d])
        blocks.append(k[g * d:(g + 1) * d])
        blocks.append(v[g * d:(g + 1) * d])
    return torch.cat(blocks, 0)


def qkv_full_by_row_map(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, H: int, G: int, d: int) -> torch.Tensor:
    """The packed tensor through the per-row map of the semantics file (no output gate)."""
    n = H // G
    P = (n + 2) * d
    rows = []
    for R in range((H + 2 * G) * d):
        g, o = divmod(R, P)
        s, j = divmod(o, d)
        if s < n:
            rows.append(q[(g * n + s) * d + j])
        elif s == n:
            rows.append(k[g * d + j])
        else:
            rows.append(v[g * d + j])
    return torch.stack(rows, 0)


def qkv_shard(q, k, v, H: int, G: int, d: int, tp: int, t: int, output_gate: bool = False) -> torch.Tensor:
    """TP rank t's rows [t*(G/tp)*P, (t+1)*(G/tp)*P) of the full packed tensor."""
    full = qkv_full(q, k, v, H, G, d, output_gate)
    return torch.chunk(full, tp, 0)[t]


def qkv_split(
    packed: torch.Tensor, H: int, G: int, d: int, output_gate: bool = False
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inverse of :func:`qkv_full`: (q, k, v) in HF layout."""
    n = H // G if H else 0
    qh = n * d * (2 if output_gate else 1)
    P = qh + 2 * d
    qs, ks, vs = [], [], []
    for g in range(G):
        blk = packed[g * P:(g + 1) * P]
        if output_gate:
            for s in range(n):
                qs.append(blk[s * d:(s + 1) * d])
                qs.append(blk[(n + s) * d:(n + s + 1) * d])
        else:
            qs.append(blk[:qh])
        ks.append(blk[qh:qh + d])
        vs.append(blk[qh + d:qh + 2 * d])
    q = torch.cat(qs, 0) if qs else packed[:0]
    return q, torch.cat(ks, 0), torch.cat(vs, 0)


# --------------------------------------------------------------------------------------------------------------------
# gate / up (section 2)
# --------------------------------------------------------------------------------------------------------------------


def gate_up_shard(gate: torch.Tensor, up: torch.Tensor, tp: int, t: int) -> torch.Tensor:
    f = gate.shape[0] // tp
    return torch.cat([gate[t * f:(t + 1) * f], up[t * f:(t + 1) * f]], 0)


def gate_up_gathered(gate: torch.Tensor, up: torch.Tensor, tp: int) -> torch.Tensor:
    return torch.cat([gate_up_shard(gate, up, tp, t) for t in range(tp)], 0)


def gate_up_split(packed: torch.Tensor, tp: int) -> Tuple[torch.Tensor, torch.Tensor]:
    shards = torch.chunk(packed, tp, 0)
    halves = [torch.chunk(s, 2, 0) for s in shards]
    return torch.cat([h[0] for h in halves], 0), torch.cat([h[1] for h in halves], 0)


# --------------------------------------------------------------------------------------------------------------------
# Experts (section 4)
# --------------------------------------------------------------------------------------------------------------------


def expert_fc1_shard(gate: Sequence[torch.Tensor], up: Sequence[torch.Tensor], ep: int, r: int, etp: int, t: int):
    Er = len(gate) // ep
    return torch.stack([gate_up_shard(gate[r * Er + e], up[r * Er + e], etp, t) for e in range(Er)], 0)


def expert_fc2_shard(down: Sequence[torch.Tensor], ep: int, r: int, etp: int, t: int) -> torch.Tensor:
    Er = len(down) // ep
    mine = down[r * Er:(r + 1) * Er]
    if mine[0].dim() == 1:
        return torch.stack(list(mine), 0)
    return torch.stack([torch.chunk(x, etp, 1)[t] for x in mine], 0)


def expert_fc1_split(shards: Sequence[torch.Tensor], ep: int, etp: int) -> Tuple[torch.Tensor, torch.Tensor]:
    gates, ups = [], []
    for r in range(ep):
        for e in range(shards[0].shape[0]):
            per_t = [shards[r * etp + t][e] for t in range(etp)]
            g, u = gate_up_split(torch.cat(per_t, 0), etp)
            gates.append(g)
            ups.append(u)
    return torch.stack(gates, 0), torch.stack(ups, 0)


def expert_fc2_split(shards: Sequence[torch.Tensor], ep: int, etp: int) -> torch.Tensor:
    out = []
    for r in range(ep):
        for e in range(shards[0].shape[0]):
            if shards[0].dim() == 2:
                out.append(shards[r * etp][e])
            else:
                out.append(torch.cat([shards[r * etp + t][e] for t in range(etp)], 1))
    return torch.stack(out, 0)


# --------------------------------------------------------------------------------------------------------------------
# DTensor / flat ranges
# --------------------------------------------------------------------------------------------------------------------


def local_shard(
    full: torch.Tensor, mesh_shape: Sequence[int], coord: Sequence[int], shard_dims: Sequence[int]
) -> torch.Tensor:
    """torch.chunk on each sharded dim, nested in mesh-dim order (an empty tensor for missing chunks)."""
    x = full
    for m, c, k in zip(mesh_shape, coord, shard_dims):
        if k < 0:
            continue
        chunks = torch.chunk(x, m, k) if x.shape[k] > 0 else ()
        if c < len(chunks):
            x = chunks[c]
        else:
            x = x.narrow(k, x.shape[k], 0)
    return x


def flat_range(src: torch.Tensor, start: int, shape: Sequence[int]) -> torch.Tensor:
    return src.reshape(-1)[start:start + int(torch.Size(shape).numel())].reshape(shape)


def bits(x: torch.Tensor) -> torch.Tensor:
    """Same bytes as an integer tensor, so that NaN payloads and fp8 compare with torch.equal."""
    if x.dim() == 0:
        x = x.reshape(1)
    return x.view({1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64, 16: torch.int64}[x.element_size()])


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit-identical tensors of the same shape and dtype."""
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(bits(a.contiguous()), bits(b.contiguous()))


def split_list(x: torch.Tensor) -> List[torch.Tensor]:
    return list(x.unbind(0))


# --------------------------------------------------------------------------------------------------------------------
# Block-quantized weights, from the formats' definitions (whole tensors: padding, repeat_interleave, reshape)
# --------------------------------------------------------------------------------------------------------------------

E2M1_VALUES = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0]


def fp8_dequant(w: torch.Tensor, scale: torch.Tensor, block: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
    """FP8 [N, K] with per-block scales [ceil(N/bn), ceil(K/bk)]: fp32(w) * fp32(scale of its block), rounded once."""
    bn, bk = block
    N, K = w.shape
    s = scale.to(torch.float32).repeat_interleave(bn, 0)[:N].repeat_interleave(bk, 1)[:, :K]
    return (w.to(torch.float32) * s).to(dtype)


def mxfp4_dequant(blocks: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """MXFP4 [..., N, G, 16] uint8 (low nibble = even value) and E8M0 scales [..., N, G] -> [..., N, 32*G]: the exact
    product e2m1 * 2^(scale - 127) in float64, then float32 (where it may overflow to inf), then ``dtype``."""
    lut = torch.tensor(E2M1_VALUES, dtype=torch.float64)
    b = blocks.to(torch.int64)
    vals = torch.stack([lut[b & 15], lut[b >> 4]], -1).reshape(*blocks.shape[:-1], 32)
    pow2 = torch.pow(torch.tensor(2.0, dtype=torch.float64), scales.to(torch.float64) - 127)
    return (vals * pow2[..., None]).to(torch.float32).reshape(*blocks.shape[:-2], -1).to(dtype)


def fp8_quant(w: torch.Tensor, block: Sequence[int], rule: str = "deepseek",
              dtype: torch.dtype = torch.float8_e4m3fn) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-block FP8 quantization of [N, K] (partial edge blocks padded with zeros, which leave amax unchanged).

    deepseek: s = max(amax, 1e-4) / fmax, q = fp8(w / s), scale_inv = s (DeepSeek-V3 inference/kernel.py act_quant);
    transformers: f = (1 / amax) * fmax (1 where amax == 0), q = fp8(clamp(w * f, -fmax, fmax)), scale_inv = 1 / f
    (transformers 5.24 Fp8Quantize).
    """
    bn, bk = block
    N, K = w.shape
    nb, kb = -(-N // bn), -(-K // bk)
    x = torch.nn.functional.pad(w.to(torch.float32), (0, kb * bk - K, 0, nb * bn - N))
    x4 = x.reshape(nb, bn, kb, bk)
    amax = x4.abs().amax(dim=(1, 3))
    fmax = torch.finfo(dtype).max
    if rule == "deepseek":
        s = amax.clamp(min=1e-4) / fmax
        q = x4 / s[:, None, :, None]
    else:
        f = torch.where(amax > 0, amax.reciprocal() * fmax, torch.ones_like(amax))
        q = torch.clamp(x4 * f[:, None, :, None], -fmax, fmax)
        s = f.reciprocal()
    return q.reshape(nb * bn, kb * bk)[:N, :K].to(dtype), s
