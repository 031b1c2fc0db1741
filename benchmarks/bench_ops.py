"""Benchmark the byte-moving ops against `copy_` of the same bytes and against the eager reference path.

Sizes: a 70B-class layer (H=64, G=8, d=128, D=8192, F=28672) and a 64-expert MoE layer (E=64, F=1408, D=2048),
bf16. Bytes are counted as read + written by the op: every output byte is read once from the input and written
once, so bytes = 2 * output bytes. The `copy_` baseline copies a buffer of the same size into an existing one in the
same run (same byte count). The eager path is the reference's way: per-group slices and `torch.cat` to merge
everything, then `torch.chunk(...)[rank].contiguous()` and a copy into the parameter; unpack with index lists
(`index_select`) or chunk + cat. Ops write into preallocated outputs (`out=`), as an import into an existing Megatron
parameter does.

For the strided layouts (expert fc2 column shards) `vs views copy_` = time of torch's `copy_` of the same source views
into the same destination / op time: the floor of that access pattern, next to the contiguous `copy_`.

Fresh outputs: where the peers build the same tensor with one `torch.cat` (or `torch.stack`) of views, the op is also
timed without `out=` (it allocates its result, as the `torch.cat` does) next to that single `torch.cat`: `fresh vs cat`
= cat time / fresh op time (>= 1.00: the op is no slower), `fresh vs copy_` = time of `copy_` of the same bytes into an
existing tensor / fresh op time. The two are called alternately (medians of each), so that both meet the same
allocator state: whether a call's result lands in fresh pages (page faults in its time) or in memory an earlier
call freed depends on what was allocated and freed before it.

Block-quantized weights (`--ops fp8,mxfp4`): DeepSeek-V3-shaped FP8 (e4m3, 128 x 128 blocks: an expert's gate_proj
[2048, 7168], kv_a_proj_with_mqa [576, 7168] with partial row blocks, a row-parallel [7168, 4096] at TP 8, 8 experts'
linear_fc1 at EP 2) and GPT-OSS-shaped MXFP4 (8 experts, hidden = intermediate = 2880, EP 2) dequantized to bf16, and
bf16 quantized to FP8 (an expert's [2048, 7168]; the fc1 unpack of 8 experts). The eager path is the formats'
plain-torch code (scales expanded with repeat_interleave, LUT + ldexp as transformers does, amax over reshaped
blocks) followed by the same cat / chunk; `vs copy_` compares with `copy_` of the bf16 side's bytes (the output of a
dequantization, the input of a quantization), and bytes moved count the 1-byte FP8 (or 4-bit MXFP4) side as such.

Usage: python benchmarks/bench_ops.py [--device cpu|cuda] [--quick] [--check] [--ops qkv,gate_up,...]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Callable, List, Optional, Tuple

import os

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))  # run from a checkout too

import megatron_bridge_ext  # noqa: E402, F401  (registers torch.ops.bridge)
from megatron_bridge_ext import ops  # noqa: E402


@dataclass
class Case:
    op: str
    setting: str
    run: Callable[[], object]  # the op, writing into preallocated outputs; returns them
    eager: Callable[[], object]  # the reference path; returns the same tensors
    out_bytes: int
    fresh: Optional[Callable[[], object]] = None  # the op allocating its output
    cat: Optional[Callable[[], object]] = None  # the peers' single torch.cat / torch.stack building the same tensor(s)
    views_copy: Optional[Callable[[], object]] = None  # torch copy_ of the same (strided) source views into `out`
    moved_bytes: Optional[int] = None  # bytes read + written when not 2 * out_bytes (the quantized ops)
    copy_bytes: Optional[int] = None  # bytes of the `copy_` baseline when not out_bytes (quantization: the bf16 input)


def _bytes(*ts: torch.Tensor) -> int:
    return sum(t.numel() * t.element_size() for t in ts)


def _rand(shape, dtype, device) -> torch.Tensor:
    return torch.randn(shape, dtype=torch.float32, device=device).to(dtype)


# ---------------------------------------------------------------------------------------------------------- cases


def qkv_cases(H, G, d, D, dtype, dev) -> List[Case]:
    n = H // G
    q, k, v = _rand((H * d, D), dtype, dev), _rand((G * d, D), dtype, dev), _rand((G * d, D), dtype, dev)
    cases = []
    for tp, t in ((1, 0), (8, 3)):
        out = torch.empty(((H + 2 * G) * d // tp, D), dtype=dtype, device=dev)

        def run(out=out, tp=tp, t=t):
            return ops.qkv_pack(q, k, v, num_heads=H, num_query_groups=G, head_dim=d, tp_size=tp, tp_rank=t, out=out)

        def eager(out=out, tp=tp, t=t):
            blocks = []
            for g in range(G):
                blocks += [q[g * n * d:(g + 1) * n * d], k[g * d:(g + 1) * d], v[g * d:(g + 1) * d]]
            return out.copy_(torch.chunk(torch.cat(blocks, 0), tp, 0)[t].contiguous())

        def fresh(tp=tp, t=t):
            return ops.qkv_pack(q, k, v, num_heads=H, num_query_groups=G, head_dim=d, tp_size=tp, tp_rank=t)

        def cat(tp=tp, t=t):  # the rank's groups only, one cat of their views
            blocks = []
            for g in range(t * G // tp, (t + 1) * G // tp):
                blocks += [q[g * n * d:(g + 1) * n * d], k[g * d:(g + 1) * d], v[g * d:(g + 1) * d]]
            return torch.cat(blocks, 0)

        cases.append(Case("qkv_pack", f"tp={tp} rank={t}", run, eager, _bytes(out), fresh, cat))
    packed = _rand(((H + 2 * G) * d, D), dtype, dev)
    P = (n + 2) * d
    rows = torch.arange(G * P, device=dev).view(G, P)
    qi, ki, vi = rows[:, :n * d].reshape(-1), rows[:, n * d:n * d + d].reshape(-1), rows[:, n * d + d:].reshape(-1)
    uq, uk, uv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)

    def run_u():
        return ops.qkv_unpack(packed, num_heads=H, num_query_groups=G, head_dim=d, out=(uq, uk, uv))

    def eager_u():
        return packed.index_select(0, qi), packed.index_select(0, ki), packed.index_select(0, vi)

    def fresh_u():
        return ops.qkv_unpack(packed, num_heads=H, num_query_groups=G, head_dim=d)

    def cat_u():  # one cat per output, of the per-group views
        grp = packed.view(G, P, D)
        return (torch.cat(list(grp[:, :n * d]), 0), torch.cat(list(grp[:, n * d:n * d + d]), 0),
                torch.cat(list(grp[:, n * d + d:]), 0))

    cases.append(Case("qkv_unpack", "full", run_u, eager_u, _bytes(uq, uk, uv), fresh_u, cat_u))
    return cases


def gate_up_cases(F, D, dtype, dev) -> List[Case]:
    gate, up = _rand((F, D), dtype, dev), _rand((F, D), dtype, dev)
    cases = []
    for tp, t in ((1, 0), (8, 3)):
        out = torch.empty((2 * F // tp, D), dtype=dtype, device=dev)

        def run(out=out, tp=tp, t=t):
            return ops.gate_up_pack(gate, up, tp_size=tp, tp_rank=t, out=out)

        def eager(out=out, tp=tp, t=t):
            gs, us = torch.chunk(gate, tp, 0), torch.chunk(up, tp, 0)
            merged = torch.cat([torch.cat([gs[i], us[i]], 0) for i in range(tp)], 0)
            return out.copy_(torch.chunk(merged, tp, 0)[t].contiguous())

        def fresh(tp=tp, t=t):
            return ops.gate_up_pack(gate, up, tp_size=tp, tp_rank=t)

        def cat(tp=tp, t=t):
            return torch.cat([torch.chunk(gate, tp, 0)[t], torch.chunk(up, tp, 0)[t]], 0)

        cases.append(Case("gate_up_pack", f"tp={tp} rank={t}", run, eager, _bytes(out), fresh, cat))
    for tp in (1, 8):
        packed = _rand((2 * F, D), dtype, dev)
        g_out, u_out = torch.empty_like(gate), torch.empty_like(up)

        def run_u(packed=packed, tp=tp, g_out=g_out, u_out=u_out):
            return ops.gate_up_unpack(packed, tp_size=tp, out=(g_out, u_out))

        def eager_u(packed=packed, tp=tp):
            shards = [torch.chunk(s, 2, 0) for s in torch.chunk(packed, tp, 0)]
            return torch.cat([s[0] for s in shards], 0), torch.cat([s[1] for s in shards], 0)

        def fresh_u(packed=packed, tp=tp):
            return ops.gate_up_unpack(packed, tp_size=tp)

        cases.append(Case("gate_up_unpack", f"tp={tp}", run_u, eager_u, _bytes(g_out, u_out), fresh_u, eager_u))
    return cases


def _time_copy(n_el: int, dtype: torch.dtype, dev: str, quick: bool) -> float:
    """Median time of ``dst.copy_(src)`` of ``n_el`` elements into an existing (touched) tensor."""
    src = torch.ones(n_el, dtype=dtype, device=dev)
    dst = torch.empty(n_el, dtype=dtype, device=dev)
    return median_seconds(lambda: dst.copy_(src), dev, quick)


def expert_cases(E, F, D, dtype, dev) -> List[Case]:
    gate = [_rand((F, D), dtype, dev) for _ in range(E)]
    up = [_rand((F, D), dtype, dev) for _ in range(E)]
    down = [_rand((D, F), dtype, dev) for _ in range(E)]
    cases = []
    for ep, r, etp, t in ((1, 0, 1, 0), (8, 3, 1, 0), (4, 1, 2, 1)):
        El, f, c = E // ep, F // etp, F // etp
        out1 = torch.empty((El, 2 * f, D), dtype=dtype, device=dev)
        out2 = torch.empty((El, D, c), dtype=dtype, device=dev)
        local = range(r * El, (r + 1) * El)

        def run1(out1=out1, ep=ep, r=r, etp=etp, t=t):
            return ops.expert_pack_fc1(gate, up, ep_size=ep, ep_rank=r, etp_size=etp, etp_rank=t, out=out1)

        def eager1(out1=out1, etp=etp, t=t, local=local):
            per = []
            for e in local:
                gs, us = torch.chunk(gate[e], etp, 0), torch.chunk(up[e], etp, 0)
                merged = torch.cat([torch.cat([gs[i], us[i]], 0) for i in range(etp)], 0)
                per.append(torch.chunk(merged, etp, 0)[t].contiguous())
            return out1.copy_(torch.stack(per, 0))

        def run2(out2=out2, ep=ep, r=r, etp=etp, t=t):
            return ops.expert_pack_fc2(down, ep_size=ep, ep_rank=r, etp_size=etp, etp_rank=t, out=out2)

        def eager2(out2=out2, etp=etp, t=t, local=local):
            return out2.copy_(torch.stack([torch.chunk(down[e], etp, 1)[t].contiguous() for e in local], 0))

        def fresh2(ep=ep, r=r, etp=etp, t=t):
            return ops.expert_pack_fc2(down, ep_size=ep, ep_rank=r, etp_size=etp, etp_rank=t)

        def cat2(etp=etp, t=t, local=local):  # one stack of the column-shard views
            return torch.stack([torch.chunk(down[e], etp, 1)[t] for e in local], 0)

        def views2(out2=out2, etp=etp, t=t, local=local):  # the same strided views, copy_ per expert
            for i, e in enumerate(local):
                out2[i].copy_(torch.chunk(down[e], etp, 1)[t])
            return out2

        s = f"ep={ep}/{r} etp={etp}/{t}"
        cases += [Case("expert_pack_fc1", s, run1, eager1, _bytes(out1)),
                  Case("expert_pack_fc2", s, run2, eager2, _bytes(out2), fresh2, cat2, views2)]
    for ep, etp in ((8, 1), (4, 2)):
        El, f = E // ep, F // etp
        shards1 = [_rand((El, 2 * f, D), dtype, dev) for _ in range(ep * etp)]
        shards2 = [_rand((El, D, f), dtype, dev) for _ in range(ep * etp)]
        g_out = torch.empty((E, F, D), dtype=dtype, device=dev)
        u_out = torch.empty_like(g_out)
        d_out = torch.empty((E, D, F), dtype=dtype, device=dev)

        def run_u1(shards1=shards1, ep=ep, etp=etp, g_out=g_out, u_out=u_out):
            ops.expert_unpack_fc1(shards1, ep_size=ep, etp_size=etp, out=(list(g_out), list(u_out)))
            return g_out, u_out

        def eager_u1(shards1=shards1, ep=ep, etp=etp, El=El, f=f):
            gs, us = [], []
            for rr in range(ep):
                for e in range(El):
                    parts = [shards1[rr * etp + tt][e] for tt in range(etp)]
                    gs.append(torch.cat([p[:f] for p in parts], 0))
                    us.append(torch.cat([p[f:] for p in parts], 0))
            return torch.stack(gs, 0), torch.stack(us, 0)

        def run_u2(shards2=shards2, ep=ep, etp=etp, d_out=d_out):
            ops.expert_unpack_fc2(shards2, ep_size=ep, etp_size=etp, out=list(d_out))
            return d_out

        def eager_u2(shards2=shards2, ep=ep, etp=etp, El=El):
            return torch.stack([torch.cat([shards2[rr * etp + tt][e] for tt in range(etp)], 1)
                                for rr in range(ep) for e in range(El)], 0)

        s = f"ep={ep} etp={etp}"
        cases += [Case("expert_unpack_fc1", s, run_u1, eager_u1, _bytes(g_out, u_out)),
                  Case("expert_unpack_fc2", s, run_u2, eager_u2, _bytes(d_out))]
    return cases


def _fp8_weight(N, K, block, dev, gen) -> Tuple[torch.Tensor, torch.Tensor]:
    """A DeepSeek-V3-like FP8 weight: finite e4m3 values and per-block scales around amax / 448."""
    raw = torch.randint(0, 256, (N, K), generator=gen, dtype=torch.uint8)
    raw[(raw & 0x7F) == 0x7F] = 0  # no NaN bytes
    nb, kb = -(-N // block[0]), -(-K // block[1])
    scale = torch.rand((nb, kb), generator=gen) * 1e-3 + 1e-4
    return raw.view(torch.float8_e4m3fn).to(dev), scale.to(dev)


def _eager_fp8_dequant(w, s, block, dtype):
    """The plain-torch way (transformers / DeepSeek's fp8_cast_bf16 semantics): scales expanded to the weight."""
    N, K = w.shape
    full = s.repeat_interleave(block[0], 0)[:N].repeat_interleave(block[1], 1)[:, :K]
    return (w.to(torch.float32) * full).to(dtype)


def _eager_mxfp4_dequant(blocks, scales, dtype):
    """transformers' convert_moe_packed_tensors without its final transpose: LUT lookups and ldexp."""
    lut = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0],
                       dtype=dtype, device=blocks.device)
    *prefix, G, B = blocks.shape
    out = torch.empty(*prefix, G, B * 2, dtype=dtype, device=blocks.device)
    out[..., 0::2] = lut[(blocks & 0x0F).to(torch.int)]
    out[..., 1::2] = lut[(blocks >> 4).to(torch.int)]
    torch.ldexp(out, (scales.to(torch.int32) - 127)[..., None], out=out)
    return out.reshape(*prefix, G * B * 2)


def _eager_fp8_quant(w, block, rule="deepseek"):
    """The formulas on whole tensors, per block amax: DeepSeek's (amax clamped to 1e-4, scale = amax / 448,
    fp8(w / scale)) or transformers' Fp8Quantize (f = 448 / amax, fp8(clamp(w * f)), scale = 1 / f)."""
    N, K = w.shape
    bn, bk = block
    nb, kb = -(-N // bn), -(-K // bk)
    x = torch.nn.functional.pad(w.to(torch.float32), (0, kb * bk - K, 0, nb * bn - N)).view(nb, bn, kb, bk)
    amax = x.abs().amax(dim=(1, 3))
    if rule == "deepseek":
        s = amax.clamp(min=1e-4) / 448.0
        y = x / s[:, None, :, None]
    else:
        f = torch.where(amax > 0, 448.0 / amax, torch.ones_like(amax))
        y = torch.clamp(x * f[:, None, :, None], -448.0, 448.0)
        s = 1.0 / f
    return y.view(nb * bn, kb * bk)[:N, :K].to(torch.float8_e4m3fn), s


def quant_cases(D, F, E, Dg, Fg, dtype, dev) -> List[Case]:
    """DeepSeek-V3-shaped FP8 (hidden D, expert F, 128 x 128 blocks) and GPT-OSS-shaped MXFP4 (hidden Dg, expert Fg)
    weights. copy_ baseline: the bf16 bytes of the dequantized (or to-be-quantized) tensor."""
    gen = torch.Generator().manual_seed(0)
    blk = (128, 128)
    cases = []
    w, s = _fp8_weight(F, D, blk, dev, gen)  # one expert's gate_proj [F, D]
    out = torch.empty((F, D), dtype=dtype, device=dev)
    bf = _bytes(out)
    cases.append(Case("fp8_block_dequant", f"[{F}, {D}]", lambda: ops.fp8_block_dequant(w, s, out=out),
                      lambda: out.copy_(_eager_fp8_dequant(w, s, blk, dtype)), bf, moved_bytes=bf + bf // 2))
    kv, kvs = _fp8_weight(576, D, blk, dev, gen)  # kv_a_proj_with_mqa: partial row blocks
    out_kv = torch.empty((576, D), dtype=dtype, device=dev)
    cases.append(Case("fp8_block_dequant", f"[576, {D}] partial", lambda: ops.fp8_block_dequant(kv, kvs, out=out_kv),
                      lambda: out_kv.copy_(_eager_fp8_dequant(kv, kvs, blk, dtype)), _bytes(out_kv),
                      moved_bytes=_bytes(out_kv) * 3 // 2))
    o, os_ = _fp8_weight(D, 2 * F, blk, dev, gen)  # a row-parallel weight, TP rank 3 of 8 (columns)
    out_o = torch.empty((D, 2 * F // 8), dtype=dtype, device=dev)

    def eager_o():
        return out_o.copy_(torch.chunk(_eager_fp8_dequant(o, os_, blk, dtype), 8, 1)[3])

    cases.append(Case("fp8_block_dequant", f"[{D}, {2 * F}] tp=8 cols rank 3",
                      lambda: ops.fp8_block_dequant(o, os_, tp_size=8, tp_rank=3, tp_dim=1, out=out_o), eager_o,
                      _bytes(out_o), moved_bytes=_bytes(out_o) * 3 // 2))
    experts = [_fp8_weight(F, D, blk, dev, gen) for _ in range(2 * E)]
    gate, up = experts[:E], experts[E:]
    ep, r = 2, 1
    El = E // ep
    out1 = torch.empty((El, 2 * F, D), dtype=dtype, device=dev)
    gl, gsl = [x[0] for x in gate], [x[1] for x in gate]
    ul, usl = [x[0] for x in up], [x[1] for x in up]

    def eager1():
        per = [torch.cat([_eager_fp8_dequant(*gate[e], blk, dtype), _eager_fp8_dequant(*up[e], blk, dtype)], 0)
               for e in range(r * El, (r + 1) * El)]
        return out1.copy_(torch.stack(per, 0))

    cases.append(Case("fp8_expert_pack_fc1", f"E={E} ep={ep}/{r}",
                      lambda: ops.fp8_expert_pack_fc1(gl, gsl, ul, usl, ep_size=ep, ep_rank=r, out=out1), eager1,
                      _bytes(out1), moved_bytes=_bytes(out1) * 3 // 2))
    # GPT-OSS: gate_up_proj_blocks [E, 2F, D/32, 16] interleaved, down_proj_blocks [E, D, F/32, 16]
    gu_b = torch.randint(0, 256, (E, 2 * Fg, Dg // 32, 16), generator=gen, dtype=torch.uint8).to(dev)
    gu_s = torch.randint(115, 130, (E, 2 * Fg, Dg // 32), generator=gen, dtype=torch.uint8).to(dev)
    dn_b = torch.randint(0, 256, (E, Dg, Fg // 32, 16), generator=gen, dtype=torch.uint8).to(dev)
    dn_s = torch.randint(115, 130, (E, Dg, Fg // 32), generator=gen, dtype=torch.uint8).to(dev)
    out_m1 = torch.empty((El, 2 * Fg, Dg), dtype=dtype, device=dev)
    out_m2 = torch.empty((El, Dg, Fg), dtype=dtype, device=dev)
    mine = slice(r * El, (r + 1) * El)

    def eager_m1():
        full = _eager_mxfp4_dequant(gu_b[mine], gu_s[mine], dtype)
        return out_m1.copy_(torch.cat([full[:, 0::2], full[:, 1::2]], 1))

    def eager_m2():
        return out_m2.copy_(_eager_mxfp4_dequant(dn_b[mine], dn_s[mine], dtype))

    mx_moved = lambda t: _bytes(t) + _bytes(t) // 4 + _bytes(t) // 64  # noqa: E731  (bf16 out, 4-bit in, scales)
    cases.append(Case("mxfp4_expert_pack_fc1", f"E={E} ep={ep}/{r} interleaved",
                      lambda: ops.mxfp4_expert_pack_fc1(gu_b, gu_s, ep_size=ep, ep_rank=r, interleaved=True,
                                                        out=out_m1), eager_m1, _bytes(out_m1),
                      moved_bytes=mx_moved(out_m1)))
    cases.append(Case("mxfp4_expert_pack_fc2", f"E={E} ep={ep}/{r}",
                      lambda: ops.mxfp4_expert_pack_fc2(dn_b, dn_s, ep_size=ep, ep_rank=r, out=out_m2), eager_m2,
                      _bytes(out_m2), moved_bytes=mx_moved(out_m2)))
    # export: quantization, fused with the unpack
    x = (torch.randn((F, D), generator=gen) * 0.02).to(dtype).to(dev)
    q_out = torch.empty((F, D), dtype=torch.float8_e4m3fn, device=dev)
    s_out = torch.empty((-(-F // 128), -(-D // 128)), dtype=torch.float32, device=dev)

    for rule in ("deepseek", "transformers"):
        def run_q(rule=rule):
            return ops.fp8_block_quant(x, rule=rule, out=(q_out, s_out))

        def eager_q(rule=rule):
            q, sc = _eager_fp8_quant(x, blk, rule)
            return q_out.copy_(q), s_out.copy_(sc)

        cases.append(Case("fp8_block_quant", f"[{F}, {D}] {rule}", run_q, eager_q, _bytes(q_out),
                          moved_bytes=_bytes(x) + _bytes(q_out), copy_bytes=_bytes(x)))
    shards = [(torch.randn((El, 2 * F, D), generator=gen) * 0.02).to(dtype).to(dev) for _ in range(ep)]
    g_q = [torch.empty((F, D), dtype=torch.float8_e4m3fn, device=dev) for _ in range(E)]
    u_q = [torch.empty_like(t) for t in g_q]
    g_s = [torch.empty((-(-F // 128), -(-D // 128)), device=dev) for _ in range(E)]
    u_s = [torch.empty_like(t) for t in g_s]

    def run_u():
        return ops.fp8_expert_unpack_fc1(shards, ep_size=ep, out=(g_q, g_s, u_q, u_s))

    def eager_u():
        for rr in range(ep):
            for e in range(El):
                ge = rr * El + e
                for half, qd, sd in ((shards[rr][e, :F], g_q[ge], g_s[ge]), (shards[rr][e, F:], u_q[ge], u_s[ge])):
                    q, sc = _eager_fp8_quant(half, blk)
                    qd.copy_(q)
                    sd.copy_(sc)
        return g_q, g_s, u_q, u_s

    in_bytes = sum(_bytes(t) for t in shards)
    cases.append(Case("fp8_expert_unpack_fc1", f"E={E} ep={ep}", run_u, eager_u, in_bytes // 2,
                      moved_bytes=in_bytes + in_bytes // 2, copy_bytes=in_bytes))
    return cases


def dtensor_cases(F, D, dtype, dev) -> List[Case]:
    src = _rand((F, D), dtype, dev)
    cases = []
    for mesh, coord, dims in (((8,), (3,), (0,)), ((2, 4), (1, 2), (0, 1))):
        view = src
        for m, c, dd in zip(mesh, coord, dims):
            view = torch.chunk(view, m, dd)[c]
        dst = torch.empty(view.shape, dtype=dtype, device=dev)

        def run(dst=dst, mesh=mesh, coord=coord, dims=dims):
            return ops.shard_copy(src, dst, mesh_shape=mesh, mesh_coord=coord, shard_dims=dims)

        def eager(dst=dst, mesh=mesh, coord=coord, dims=dims):
            v = src
            for m, c, dd in zip(mesh, coord, dims):
                v = torch.chunk(v, m, dd)[c].contiguous()
            return dst.copy_(v)

        cases.append(Case("shard_copy", f"mesh={mesh} dims={dims}", run, eager, _bytes(dst)))
    n = src.numel() // 8
    flat_dst = torch.empty(n, dtype=dtype, device=dev)
    start = 3 * n + 5

    def run_f():
        return ops.flat_range_copy(src, flat_dst, start)

    def eager_f():
        return flat_dst.copy_(src.flatten()[start:start + n])

    cases.append(Case("flat_range_copy", "1/8 of [F, D]", run_f, eager_f, _bytes(flat_dst)))
    return cases


# --------------------------------------------------------------------------------------------------------- timing


def _sync(dev: str) -> None:
    if dev == "cuda":
        torch.cuda.synchronize()


def median_seconds(fn: Callable[[], object], dev: str, quick: bool) -> float:
    """Median wall time of fn: torch.utils.benchmark on CPU, CUDA events after warm-up on GPU."""
    if dev == "cuda":
        for _ in range(3):
            fn()
        torch.cuda.synchronize()
        times = []
        for _ in range(10 if quick else 30):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b) / 1e3)
        return statistics.median(times)
    from torch.utils.benchmark import Timer

    fn()  # warm-up (first touch of lazily allocated pages)
    return Timer(stmt="fn()", globals={"fn": fn}).blocked_autorange(min_run_time=0.2 if quick else 1.0).median


def median_seconds_alternating(fa: Callable[[], object], fb: Callable[[], object], dev: str,
                               quick: bool) -> Tuple[float, float]:
    """Median wall times of fa and fb, called alternately (a, b, a, b, ...) so that both meet the same allocator and
    page-cache state: used for the fresh-output comparisons, where each call allocates its result."""
    def once(fn) -> float:
        _sync(dev)
        t0 = time.perf_counter()
        r = fn()
        _sync(dev)
        t = time.perf_counter() - t0
        del r
        return t

    once(fa), once(fb)  # warm-up
    est = max(once(fa), once(fb), 1e-5)
    n = int(min(200, max(7, (0.4 if quick else 2.0) / (2 * est))))
    ta, tb = [], []
    for _ in range(n):
        ta.append(once(fa))
        tb.append(once(fb))
    return statistics.median(ta), statistics.median(tb)


def _equal(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        if not (isinstance(b, torch.Tensor) and a.shape == b.shape and a.dtype == b.dtype):
            return False
        if a.element_size() == 1 and a.dtype.is_floating_point:  # fp8: compare the bytes
            a, b = a.view(torch.uint8), b.view(torch.uint8)
        return torch.equal(a, b)
    return len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b))


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--quick", action="store_true", help="smaller layers (1/4 of D) and shorter timing")
    p.add_argument("--check", action="store_true", help="verify equality with the eager path before timing")
    p.add_argument("--no-fresh", action="store_true", help="skip the fresh-output timings")
    p.add_argument("--ops", default="", help="comma-separated filter on op names (substring match)")
    a = p.parse_args(argv)
    dev = a.device
    if dev == "cuda" and not torch.cuda.is_available():
        print("bench_ops: --device cuda but torch.cuda.is_available() is False", file=sys.stderr)
        return 2
    dtype = torch.bfloat16
    s = 4 if a.quick else 1
    H, G, d, D, F = 64, 8, 128, 8192 // s, 28672 // s
    E, Fe, De = 64, 1408, 2048 // s
    torch.manual_seed(0)
    builders = [
        ("qkv", lambda: qkv_cases(H, G, d, D, dtype, dev)),
        ("gate_up", lambda: gate_up_cases(F, D, dtype, dev)),
        ("expert", lambda: expert_cases(E, Fe, De, dtype, dev)),
        ("shard_copy flat_range_copy", lambda: dtensor_cases(F, D, dtype, dev)),
        ("fp8 mxfp4", lambda: quant_cases(7168 // s, 2048 // s, 8, 2880 // s // 32 * 32, 2880 // s // 32 * 32, dtype,
                                          dev)),
    ]
    wanted = [w for w in a.ops.split(",") if w]
    print(f"bench_ops: device={dev} dtype={dtype} threads={torch.get_num_threads()} "
          f"70B layer H={H} G={G} d={d} D={D} F={F}; MoE E={E} F={Fe} D={De}; bytes = read + written")
    header = ("op", "setting", "MiB", "op ms", "GB/s", "vs copy_", "vs views copy_", "eager ms", "speedup",
              "fresh ms", "cat ms", "fresh vs cat", "fresh vs copy_", "check")
    rows = []
    failed = False
    for names, build in builders:
        if wanted and not any(w in n or n in w for w in wanted for n in names.split()):
            continue
        for c in build():
            if wanted and not any(w in c.op for w in wanted):
                continue
            moved = c.moved_bytes if c.moved_bytes is not None else 2 * c.out_bytes
            check = "-"
            if a.check:
                ok = _equal(c.run(), c.eager())
                check = "ok" if ok else "MISMATCH"
                failed |= not ok
            t_op = median_seconds(c.run, dev, a.quick)
            n_el = (c.copy_bytes if c.copy_bytes is not None else c.out_bytes) // 2
            # a real source (filled: never-touched memory would be read from the shared zero page) into a destination
            t_copy = _time_copy(n_el, dtype, dev, a.quick)
            t_eager = median_seconds(c.eager, dev, a.quick)
            fresh_cols = ("-", "-", "-", "-")
            if c.fresh is not None and not a.no_fresh:
                if a.check:
                    ok = _equal(c.fresh(), c.eager()) and _equal(c.cat(), c.eager())
                    check = "ok" if ok and check != "MISMATCH" else "MISMATCH"
                    failed |= not ok
                t_fresh, t_cat = median_seconds_alternating(c.fresh, c.cat, dev, a.quick)
                fresh_cols = (f"{t_fresh * 1e3:.3f}", f"{t_cat * 1e3:.3f}", f"{t_cat / t_fresh:.2f}",
                              f"{t_copy / t_fresh:.2f}")
            views_col = "-"
            if c.views_copy is not None:
                if a.check:
                    ok = _equal(c.views_copy(), c.eager())
                    check = "ok" if ok and check != "MISMATCH" else "MISMATCH"
                    failed |= not ok
                views_col = f"{median_seconds(c.views_copy, dev, a.quick) / t_op:.2f}"
            rows.append((c.op, c.setting, f"{c.out_bytes / 2**20:.0f}", f"{t_op * 1e3:.3f}",
                         f"{moved / t_op / 1e9:.1f}", f"{t_copy / t_op:.2f}", views_col, f"{t_eager * 1e3:.3f}",
                         f"{t_eager / t_op:.1f}x", *fresh_cols, check))
            _sync(dev)
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)]
    fmt = "  ".join(f"{{:{'<' if i < 2 else '>'}{w}}}" for i, w in enumerate(widths))
    print(fmt.format(*header))
    print("  ".join("-" * w for w in widths))
    for r in rows:
        print(fmt.format(*r))
    print("vs copy_ = time of dst.copy_(src) of the same bytes / op time (1.00 = as fast as a plain copy); vs views "
          "copy_ = time of torch's copy_ of the same strided source views into the same destination / op time; "
          "speedup = eager reference time / op time;\nfresh = the op allocating its output, cat = the peers' single "
          "torch.cat/stack of views giving the same tensor(s); fresh vs cat = cat time / fresh time; fresh vs copy_ = "
          "copy_ time into an existing tensor / fresh time")
    if failed:
        print("bench_ops: some ops differ from the eager reference", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
