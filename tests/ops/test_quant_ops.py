"""The block-quantized ops (FP8 per-block scales, MXFP4) against plain-torch references and transformers' own code.

References: ``reference.fp8_dequant`` / ``mxfp4_dequant`` / ``fp8_quant`` (the formats' definitions on whole tensors)
composed with the layout references of the byte-moving ops (``qkv_shard``, ``gate_up_shard``, ``expert_fc1_shard``,
...), and transformers 5.24's ``Fp8Dequantize`` / ``_dequantize_fp8_weight`` / ``Fp8Quantize`` /
``convert_moe_packed_tensors``. Results compare bit for bit. One sample list (``samples``) drives the correctness
check and ``torch.library.opcheck`` of every op overload.
"""

from __future__ import annotations

import types
from typing import Callable, List, NamedTuple, Optional, Sequence

import pytest
import torch
from conftest import as_layout
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from reference import (
    expert_fc1_shard,
    expert_fc1_split,
    expert_fc2_shard,
    expert_fc2_split,
    fp8_dequant,
    fp8_quant,
    gate_up_shard,
    gate_up_split,
    mxfp4_dequant,
    qkv_shard,
    qkv_split,
    same,
)

from megatron_bridge_ext import ops

HYP = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
FP8 = [torch.float8_e4m3fn, torch.float8_e5m2]
WIDE = [torch.bfloat16, torch.float16, torch.float32]
BLOCKS = [(128, 128), (16, 32), (1, 8), (7, 5), (3, 64)]
RULES = ["deepseek", "transformers"]
lib = torch.ops.bridge


# ------------------------------------------------------------------------------------------------------- inputs


def fp8_rand(shape, fmt=torch.float8_e4m3fn, gen=None) -> torch.Tensor:
    """Random finite FP8 values (every finite bit pattern is possible; NaN / Inf bytes become 0)."""
    raw = torch.randint(0, 256, tuple(shape), generator=gen, dtype=torch.uint8)
    raw[~torch.isfinite(raw.view(fmt).to(torch.float32))] = 0
    return raw.view(fmt)


def scale_rand(shape, gen=None, dtype=torch.float32) -> torch.Tensor:
    """Positive scales spread over many binades (amax / 448 of real weights lies around 1e-6 .. 1e-2)."""
    e = torch.randint(-24, 2, tuple(shape), generator=gen).to(torch.float32)
    m = 1 + torch.rand(tuple(shape), generator=gen)
    return (m * torch.pow(2.0, e)).to(dtype)


def fp8_pair(N, K, block, fmt=torch.float8_e4m3fn, gen=None, scale_dtype=torch.float32):
    bn, bk = block
    return fp8_rand((N, K), fmt, gen), scale_rand((-(-N // bn), -(-K // bk)), gen, scale_dtype)


def mx_pair(N, K, gen=None):
    G = K // 32
    blocks = torch.randint(0, 256, (N, G, 16), generator=gen, dtype=torch.uint8)
    scales = torch.randint(100, 140, (N, G), generator=gen, dtype=torch.uint8)
    return blocks, scales


def wide_rand(shape, dtype, gen=None) -> torch.Tensor:
    """Weights whose magnitude varies by column and row (blocks get different scales), with all-zero rows."""
    x = torch.randn(tuple(shape), generator=gen) * torch.logspace(-5, 2, shape[-1])
    x = x * torch.logspace(-2, 1, shape[-2])[:, None]
    x[..., ::7, :] = 0
    return x.to(dtype)


def strided(x: torch.Tensor, layout: str) -> torch.Tensor:
    """``conftest.as_layout`` for 2-D tensors of any dtype (the FP8 bytes are laid out through uint8)."""
    if layout == "contiguous" or x.dim() != 2:
        return x
    return as_layout(x.view(torch.uint8), layout).view(x.dtype) if x.element_size() == 1 else as_layout(x, layout)


def deq(pair, block, dtype):
    return fp8_dequant(pair[0], pair[1], block, dtype)


def all_same(got, want) -> bool:
    if isinstance(got, torch.Tensor):
        return same(got, want)
    return len(got) == len(want) and all(all_same(g, w) for g, w in zip(got, want))


# ------------------------------------------------------------------------------------------------- the formats


@pytest.mark.parametrize("fmt", FP8, ids=str)
@pytest.mark.parametrize("dtype", WIDE, ids=str)
def test_fp8_every_byte(device, fmt, dtype):
    w = torch.arange(256, dtype=torch.uint8).view(fmt).reshape(16, 16)
    s = torch.tensor([[0.37, 3.0e-5], [2.0**-20, 1.5]], dtype=torch.float32)
    got = ops.fp8_block_dequant(w.to(device), s.to(device), block_size=(8, 8), dtype=dtype).cpu()
    want = fp8_dequant(w, s, (8, 8), dtype)
    nan = torch.isnan(want.to(torch.float32))
    assert torch.equal(torch.isnan(got.to(torch.float32)), nan)
    assert same(got[~nan], want[~nan])


@pytest.mark.parametrize("scale_dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float8_e8m0fnu], ids=str)
def test_fp8_scale_dtypes(device, scale_dtype):
    gen = torch.Generator().manual_seed(1)
    w, s = fp8_pair(40, 70, (16, 32), gen=gen)
    s = s.to(scale_dtype)
    got = ops.fp8_block_dequant(w.to(device), s.to(device), block_size=(16, 32), dtype=torch.float32).cpu()
    assert same(got, fp8_dequant(w, s, (16, 32), torch.float32))


@pytest.mark.parametrize("dtype", WIDE, ids=str)
def test_fp8_dequant_matches_transformers(device, dtype):
    from transformers.integrations.finegrained_fp8 import Fp8Dequantize, _dequantize_fp8_weight

    gen = torch.Generator().manual_seed(2)
    for (N, K), block in (((256, 384), (128, 128)), ((64, 96), (16, 32)), ((30, 20), (1, 4))):
        w, s = fp8_pair(N, K, block, gen=gen)
        got = ops.fp8_block_dequant(w.to(device), s.to(device), block_size=block, dtype=dtype).cpu()
        assert same(got, Fp8Dequantize(None)._dequantize_one(w, s, output_dtype=dtype))
    # partial edge blocks (DeepSeek-V3's kv_a_proj_with_mqa has 576 rows): transformers' Fp8Dequantize refuses the
    # grid, its backward's _dequantize_fp8_weight takes it (and multiplies in the requested dtype: float32 here)
    for (N, K), block in (((576, 200), (128, 128)), ((33, 47), (8, 16))):
        w, s = fp8_pair(N, K, block, gen=gen)
        got = ops.fp8_block_dequant(w.to(device), s.to(device), block_size=block, dtype=torch.float32).cpu()
        assert same(got, _dequantize_fp8_weight(w, s, list(block), torch.float32))
        assert same(got, fp8_dequant(w, s, block, torch.float32))


@pytest.mark.parametrize("dtype", WIDE, ids=str)
def test_mxfp4_matches_transformers(device, dtype):
    """Every byte under every finite E8M0 scale (0..254: 2^-127 .. 2^127, overflowing to inf) against transformers'
    convert_moe_packed_tensors (which also transposes: [E, N, K] -> [E, K, N])."""
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    blocks = torch.arange(256, dtype=torch.uint8).reshape(1, 16, 16).expand(255, 16, 16).contiguous()
    scales = torch.arange(255, dtype=torch.uint8)[:, None].expand(255, 16).contiguous()
    got = ops.mxfp4_dequant(blocks.to(device), scales.to(device), dtype=dtype).cpu()
    theirs = convert_moe_packed_tensors(blocks[None], scales[None], dtype=dtype)[0].t()
    assert same(got, theirs)
    assert same(got, mxfp4_dequant(blocks, scales, dtype))


@pytest.mark.parametrize("fmt", FP8, ids=str)
@pytest.mark.parametrize("rule", RULES)
@HYP
@given(N=st.integers(1, 300), K=st.integers(1, 300), block=st.sampled_from(BLOCKS), dtype=st.sampled_from(WIDE),
       layout=st.sampled_from(["contiguous", "transposed", "row_strided", "col_slice"]), seed=st.integers(0, 2**31))
def test_fp8_quant_random(device, fmt, rule, N, K, block, dtype, layout, seed):
    w = strided(wide_rand((N, K), dtype, torch.Generator().manual_seed(seed)), layout)
    q, s = ops.fp8_block_quant(w.to(device), block_size=block, dtype=fmt, rule=rule)
    want_q, want_s = fp8_quant(w, block, rule, fmt)
    assert same(q.cpu(), want_q) and same(s.cpu(), want_s)


@pytest.mark.parametrize("src", ["float32", "bfloat16"])
def test_fp8_cast_matches_torch(device, src):
    """The FP8 cast inside fp8_block_quant is torch's: blocks of one row whose amax is 448 get scale 448 / 448 = 1
    (rule 'deepseek'), so q = fp8(w). w: every bfloat16 of magnitude <= 448, or 4M float32 bit patterns spread over
    [0, 448] plus the midpoints between neighbouring e4m3 values and the floats just above and below them."""
    if src == "bfloat16":
        bits = torch.arange(0, 0x43E0 + 1, dtype=torch.int32).to(torch.int16)
        x = bits.view(torch.bfloat16).to(torch.float32)
    else:
        x = torch.arange(0, 0x43E00000 + 1, 257, dtype=torch.int32).view(torch.float32)
        grid = torch.arange(0, 127, dtype=torch.uint8).view(torch.float8_e4m3fn).to(torch.float64)
        mid = ((grid[1:] + grid[:-1]) / 2).to(torch.float32)
        up = mid.view(torch.int32) + 1
        down = mid.view(torch.int32) - 1
        x = torch.cat([x, mid, up.view(torch.float32), down.view(torch.float32)])
    x = torch.cat([x, -x])
    x = torch.nn.functional.pad(x, (0, -x.numel() % 127)).reshape(-1, 127)
    w = torch.cat([torch.full((x.shape[0], 1), 448.0), x], 1).to(getattr(torch, src))  # [rows, 128]
    q, s = ops.fp8_block_quant(w.to(device), block_size=(1, 128))
    assert bool((s.cpu() == 1.0).all())
    assert same(q.cpu(), w.to(torch.float8_e4m3fn))


@pytest.mark.parametrize("dtype", WIDE, ids=str)
def test_fp8_quant_matches_transformers(device, dtype):
    from transformers import FineGrainedFP8Config
    from transformers.integrations.finegrained_fp8 import Fp8Quantize

    gen = torch.Generator().manual_seed(3)
    for shape, block in (((256, 384), (128, 128)), ((3, 64, 96), (16, 32)), ((40, 24), (8, 8))):
        w = wide_rand(shape[-2:], dtype, gen).expand(*shape).clone()
        w[0, :8] = 0  # an all-zero block
        quantizer = types.SimpleNamespace(quantization_config=FineGrainedFP8Config(weight_block_size=block))
        theirs = Fp8Quantize(quantizer)._quantize_one("m.weight", w)
        q, s = ops.fp8_block_quant(w.to(device), block_size=block, rule="transformers")
        assert same(q.cpu(), theirs["m.weight"]) and same(s.cpu(), theirs["m.weight_scale_inv"])


@pytest.mark.parametrize("rule", RULES)
def test_fp8_quant_wide_rows(device, rule):
    """Rows wide enough that a row of scale blocks is quantized in several chunks of column blocks (the CPU kernel
    keeps ~192 KiB in cache between its amax and value passes), with partial edge blocks in both directions; a NaN in
    a later chunk is reported with its block."""
    w = wide_rand((300, 2000), torch.bfloat16, torch.Generator().manual_seed(13))
    q, s = ops.fp8_block_quant(w.to(device), rule=rule)
    want_q, want_s = fp8_quant(w, (128, 128), rule)
    assert same(q.cpu(), want_q) and same(s.cpu(), want_s)
    w[130, 1900] = float("nan")
    with pytest.raises(RuntimeError, match=r"weight has NaN or Inf values in block \[1, 14\] \(rows \[128, 256\), "
                                           r"columns \[1792, 1920\)\)"):
        ops.fp8_block_quant(w.to(device), rule=rule)


def test_fp8_quant_all_zero_block(device):
    """An all-zero block: rule 'deepseek' clamps amax to 1e-4 as DeepSeek-V3's act_quant does (scale 1e-4 / 448,
    zeros); rule 'transformers' stores scale 1 (Fp8Quantize's "keep zeros stable"). Either dequantizes to zeros."""
    w = torch.zeros(4, 8, dtype=torch.bfloat16)
    w[0, 4:] = 1.0
    for rule, zero_scale in (("deepseek", torch.tensor(1e-4, dtype=torch.float32) / 448), ("transformers", 1.0)):
        q, s = ops.fp8_block_quant(w.to(device), block_size=(4, 4), rule=rule)
        q, s = q.cpu(), s.cpu()
        assert s[0, 0].item() == float(zero_scale) and not q[:, :4].view(torch.uint8).any()
        assert s[0, 1].item() == float(torch.tensor(1.0) / 448) or rule == "transformers"
        back = ops.fp8_block_dequant(q, s, block_size=(4, 4), dtype=torch.bfloat16)
        assert same(back, w)  # 1.0 and 0.0 survive both rules exactly


def test_fp8_quant_leading_dims_and_roundtrip(device):
    gen = torch.Generator().manual_seed(4)
    w = wide_rand((2, 3, 50, 70), torch.bfloat16, gen)
    q, s = ops.fp8_block_quant(w.to(device), block_size=(16, 32))
    assert q.shape == w.shape and s.shape == (2, 3, 4, 3)
    for i in range(2):
        for j in range(3):
            want_q, want_s = fp8_quant(w[i, j], (16, 32))
            assert same(q[i, j].cpu(), want_q) and same(s[i, j].cpu(), want_s)
    back = ops.fp8_block_dequant(q, s, block_size=(16, 32), dtype=torch.float32).cpu()
    # e4m3 keeps 3 mantissa bits: |w - deq(q(w))| <= 2^-4 |w| above the block's subnormal range (amax / 448 * 2^-6)
    err = (back - w.float()).abs()
    assert bool((err <= w.float().abs() * 2**-4 + s.repeat_interleave(16, -2)[..., :50, :].repeat_interleave(
        32, -1)[..., :70].cpu() * 2**-9 * 1.01).all())


# ------------------------------------------------------------------------------------------- TP slices, layouts


@HYP
@given(n=st.integers(1, 40), k=st.integers(1, 40), tp=st.integers(1, 4), tp_dim=st.integers(0, 1),
       block=st.sampled_from(BLOCKS), lead=st.integers(0, 2), dtype=st.sampled_from(WIDE),
       layout=st.sampled_from(["contiguous", "transposed", "row_strided", "col_slice"]), seed=st.integers(0, 2**31))
def test_fp8_dequant_tp_slices(device, n, k, tp, tp_dim, block, lead, dtype, layout, seed):
    gen = torch.Generator().manual_seed(seed)
    N, K = (n * tp, k) if tp_dim == 0 else (n, k * tp)
    if lead:
        pairs = [fp8_pair(N, K, block, gen=gen) for _ in range(lead)]
        w, s = torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])
        want = torch.stack([fp8_dequant(p[0], p[1], block, dtype) for p in pairs])
    else:
        w, s = fp8_pair(N, K, block, gen=gen)
        w, s = strided(w, layout), strided(s, layout)
        want = fp8_dequant(w, s, block, dtype)
    parts = []
    for t in range(tp):
        got = ops.fp8_block_dequant(w.to(device), s.to(device), block_size=block, dtype=dtype, tp_size=tp, tp_rank=t,
                                    tp_dim=tp_dim)
        assert same(got.cpu(), torch.chunk(want, tp, -2 + tp_dim)[t])
        parts.append(got.cpu())
    out = strided(torch.empty(want.shape, dtype=dtype), layout) if not lead else torch.empty(want.shape, dtype=dtype)
    assert ops.fp8_block_dequant(w, s, block_size=block, out=out) is out and same(out, want)


@HYP
@given(n=st.integers(1, 30), g=st.integers(1, 4), tp=st.sampled_from([1, 2, 4, 8]), tp_dim=st.integers(0, 1),
       dtype=st.sampled_from(WIDE), seed=st.integers(0, 2**31))
def test_mxfp4_dequant_tp_slices(device, n, g, tp, tp_dim, dtype, seed):
    """Column slices of 32*G / tp values cut the 32-value groups when tp does not divide G."""
    gen = torch.Generator().manual_seed(seed)
    N, K = (n * tp if tp_dim == 0 else n), 32 * g * (tp if tp_dim == 1 else 1)
    blocks, scales = mx_pair(N, K, gen)
    want = mxfp4_dequant(blocks, scales, dtype)
    for t in range(tp):
        got = ops.mxfp4_dequant(blocks.to(device), scales.to(device), dtype=dtype, tp_size=tp, tp_rank=t,
                                tp_dim=tp_dim)
        assert same(got.cpu(), torch.chunk(want, tp, tp_dim)[t])


def test_mxfp4_dequant_leading_dims_and_strides(device):
    gen = torch.Generator().manual_seed(5)
    blocks = torch.randint(0, 256, (3, 2, 10, 4, 16), generator=gen, dtype=torch.uint8)
    scales = torch.randint(110, 135, (3, 2, 10, 4), generator=gen, dtype=torch.uint8)
    got = ops.mxfp4_dequant(blocks.to(device), scales.to(device))
    assert same(got.cpu(), mxfp4_dequant(blocks, scales, torch.bfloat16))
    # every other row of a bigger tensor (the interleaved gate rows of GPT-OSS's gate_up_proj)
    got = ops.mxfp4_dequant(blocks[0, 0, 0::2].to(device), scales[0, 0, 0::2].to(device), dtype=torch.float32)
    assert same(got.cpu(), mxfp4_dequant(blocks[0, 0, 0::2], scales[0, 0, 0::2], torch.float32))


@HYP
@given(G=st.sampled_from([1, 2, 4, 8]), n=st.integers(1, 3), d=st.sampled_from([4, 8, 16]),
       tp=st.sampled_from([1, 2, 4, 8]), gate=st.booleans(), kv_only=st.booleans(), D=st.integers(1, 40),
       block=st.sampled_from(BLOCKS), dtype=st.sampled_from(WIDE), seed=st.integers(0, 2**31))
def test_fp8_qkv_pack_random(device, G, n, d, tp, gate, kv_only, D, block, dtype, seed):
    H = 0 if kv_only else G * n
    gate = gate and not kv_only
    P = (n * (2 if gate else 1) + 2) * d if H else 2 * d
    if not (G % tp == 0 or (tp % G == 0 and P % (tp // G) == 0)):
        return
    gen = torch.Generator().manual_seed(seed)
    q = fp8_pair(H * d * (2 if gate else 1), D, block, gen=gen) if H else (None, None)
    k, v = fp8_pair(G * d, D, block, gen=gen), fp8_pair(G * d, D, block, gen=gen)
    dq = deq(q, block, dtype) if H else None
    dk, dv = deq(k, block, dtype), deq(v, block, dtype)
    dev = [None if x is None else x.to(device) for x in (*q, *k, *v)]
    for t in range(tp):
        got = ops.fp8_qkv_pack(*dev, num_heads=H, num_query_groups=G, head_dim=d, block_size=block, tp_size=tp,
                               tp_rank=t, output_gate=gate, dtype=dtype)
        assert same(got.cpu(), qkv_shard(dq, dk, dv, H, G, d, tp, t, gate)), f"tp rank {t}"


@HYP
@given(G=st.sampled_from([1, 2, 4]), n=st.integers(1, 3), d=st.sampled_from([4, 8, 16]), gate=st.booleans(),
       kv_only=st.booleans(), D=st.integers(1, 40), block=st.sampled_from(BLOCKS), dtype=st.sampled_from(WIDE),
       rule=st.sampled_from(RULES), seed=st.integers(0, 2**31))
def test_fp8_qkv_unpack_random(device, G, n, d, gate, kv_only, D, block, dtype, rule, seed):
    H = 0 if kv_only else G * n
    gate = gate and not kv_only
    rows = (H * (2 if gate else 1) + 2 * G) * d
    packed = wide_rand((rows, D), dtype, torch.Generator().manual_seed(seed))
    got = ops.fp8_qkv_unpack(packed.to(device), num_heads=H, num_query_groups=G, head_dim=d, block_size=block,
                             output_gate=gate, rule=rule)
    q, k, v = qkv_split(packed, H, G, d, gate)
    want = [t for x in (q, k, v) for t in fp8_quant(x, block, rule)]
    assert all_same([g.cpu() for g in got], want)


@pytest.mark.parametrize("fused", ["separate", "halves", "interleaved"])
@pytest.mark.parametrize("tp", [1, 2, 4])
@pytest.mark.parametrize("block", [(128, 128), (3, 8), (16, 16)])
def test_fp8_gate_up_pack(device, fused, tp, block):
    gen = torch.Generator().manual_seed(6)
    F, D = 24, 40
    if fused == "separate":
        g, u = fp8_pair(F, D, block, gen=gen), fp8_pair(F, D, block, gen=gen)
        args = (g[0], g[1], u[0], u[1])

        def hf(dtype):
            return deq(g, block, dtype), deq(u, block, dtype)
    else:
        gu = fp8_pair(2 * F, D, block, gen=gen)  # one scale grid over both: blocks straddle gate and up
        args = (gu[0], gu[1], None, None)

        def hf(dtype):
            full = deq(gu, block, dtype)
            return (full[0::2], full[1::2]) if fused == "interleaved" else (full[:F], full[F:])
    args = tuple(None if a is None else a.to(device) for a in args)
    inter = fused == "interleaved"
    for t in range(tp):
        got = ops.fp8_gate_up_pack(*args, block_size=block, tp_size=tp, tp_rank=t, interleaved=inter)
        assert same(got.cpu(), gate_up_shard(*hf(torch.bfloat16), tp, t))
        out = torch.empty((2 * F // tp, D), dtype=torch.float32, device=device)
        ops.fp8_gate_up_pack(*args, block_size=block, tp_size=tp, tp_rank=t, interleaved=inter, out=out)
        assert same(out.cpu(), gate_up_shard(*hf(torch.float32), tp, t))


@pytest.mark.parametrize("tp", [1, 2, 3])
@pytest.mark.parametrize("rule", RULES)
def test_fp8_gate_up_unpack(device, tp, rule):
    gen = torch.Generator().manual_seed(7)
    packed = wide_rand((2 * 18 * tp, 50), torch.bfloat16, gen)
    got = ops.fp8_gate_up_unpack(packed.to(device), block_size=(16, 16), tp_size=tp, rule=rule)
    g, u = gate_up_split(packed, tp)
    assert all_same([x.cpu() for x in got], [*fp8_quant(g, (16, 16), rule), *fp8_quant(u, (16, 16), rule)])
    outs = [torch.empty_like(x) for x in got]
    ops.fp8_gate_up_unpack(packed.to(device), block_size=(16, 16), tp_size=tp, rule=rule, out=outs)
    assert all_same(outs, got)


@HYP
@given(er=st.integers(1, 3), ep=st.integers(1, 3), f=st.integers(1, 12), etp=st.integers(1, 3),
       D=st.integers(1, 30), layout=st.sampled_from(["separate", "halves", "interleaved"]),
       block=st.sampled_from(BLOCKS), dtype=st.sampled_from(WIDE), seed=st.integers(0, 2**31))
def test_fp8_expert_pack_fc1_random(device, er, ep, f, etp, D, layout, block, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    E, F = er * ep, f * etp
    if layout == "separate":
        gp = [fp8_pair(F, D, block, gen=gen) for _ in range(E)]
        up = [fp8_pair(F, D, block, gen=gen) for _ in range(E)]
        dg, du = [deq(p, block, dtype) for p in gp], [deq(p, block, dtype) for p in up]
        args = ([p[0] for p in gp], [p[1] for p in gp], [p[0] for p in up], [p[1] for p in up])
    else:
        pairs = [fp8_pair(2 * F, D, block, gen=gen) for _ in range(E)]
        full = [deq(p, block, dtype) for p in pairs]
        sl = (lambda x: (x[0::2], x[1::2])) if layout == "interleaved" else (lambda x: (x[:F], x[F:]))
        dg, du = [sl(x)[0] for x in full], [sl(x)[1] for x in full]
        # stacked [E, 2F, D] tensors, as transformers' FP8Experts stores them
        args = (torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs]), None, None)
    dev = tuple(None if a is None else (a.to(device) if isinstance(a, torch.Tensor) else [x.to(device) for x in a])
                for a in args)
    inter = layout == "interleaved"
    for r in range(ep):
        for t in range(etp):
            want = expert_fc1_shard(dg, du, ep, r, etp, t)
            got = ops.fp8_expert_pack_fc1(*dev, block_size=block, ep_size=ep, ep_rank=r, etp_size=etp, etp_rank=t,
                                          interleaved=inter, dtype=dtype)
            assert same(got.cpu(), want), f"ep {r} etp {t}"
            outs = [torch.empty(want.shape[1:], dtype=dtype, device=device) for _ in range(er)]
            ops.fp8_expert_pack_fc1(*dev, block_size=block, ep_size=ep, ep_rank=r, etp_size=etp, etp_rank=t,
                                    interleaved=inter, out=outs)
            assert same(torch.stack(outs).cpu(), want)


@HYP
@given(er=st.integers(1, 3), ep=st.integers(1, 3), f=st.integers(1, 12), etp=st.integers(1, 3),
       D=st.integers(1, 30), block=st.sampled_from(BLOCKS), dtype=st.sampled_from(WIDE), seed=st.integers(0, 2**31))
def test_fp8_expert_pack_fc2_random(device, er, ep, f, etp, D, block, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    E, F = er * ep, f * etp
    pairs = [fp8_pair(D, F, block, gen=gen) for _ in range(E)]
    dd = [deq(p, block, dtype) for p in pairs]
    w, s = [p[0].to(device) for p in pairs], [p[1].to(device) for p in pairs]
    for r in range(ep):
        for t in range(etp):
            want = expert_fc2_shard(dd, ep, r, etp, t)
            got = ops.fp8_expert_pack_fc2(w, s, block_size=block, ep_size=ep, ep_rank=r, etp_size=etp, etp_rank=t,
                                          dtype=dtype)
            assert same(got.cpu(), want)
            out = torch.empty(want.shape, dtype=dtype, device=device)
            ops.fp8_expert_pack_fc2(w, s, block_size=block, ep_size=ep, ep_rank=r, etp_size=etp, etp_rank=t, out=out)
            assert same(out.cpu(), want)


@pytest.mark.parametrize("ep,etp", [(1, 1), (2, 1), (2, 2), (1, 3)])
@pytest.mark.parametrize("rule", RULES)
def test_fp8_expert_unpack(device, ep, etp, rule):
    gen = torch.Generator().manual_seed(8)
    El, f, D, block = 2, 10, 36, (8, 16)
    shards1 = [wide_rand((El, 2 * f, D), torch.bfloat16, gen) for _ in range(ep * etp)]
    shards2 = [wide_rand((El, D, f), torch.float32, gen) for _ in range(ep * etp)]
    got1 = ops.fp8_expert_unpack_fc1([x.to(device) for x in shards1], block_size=block, ep_size=ep, etp_size=etp,
                                     rule=rule)
    g, u = expert_fc1_split(shards1, ep, etp)
    want1 = [torch.stack(x) for x in zip(*[(*fp8_quant(g[e], block, rule), *fp8_quant(u[e], block, rule))
                                           for e in range(g.shape[0])])]
    assert all_same([x.cpu() for x in got1], want1)
    got2 = ops.fp8_expert_unpack_fc2([x.to(device) for x in shards2], block_size=block, ep_size=ep, etp_size=etp,
                                     rule=rule)
    d = expert_fc2_split(shards2, ep, etp)
    want2 = [torch.stack(x) for x in zip(*[fp8_quant(d[e], block, rule) for e in range(d.shape[0])])]
    assert all_same([x.cpu() for x in got2], want2)
    outs = [list(torch.empty_like(x).unbind(0)) for x in got2]
    ops.fp8_expert_unpack_fc2([x.to(device) for x in shards2], block_size=block, ep_size=ep, etp_size=etp, rule=rule,
                              out=outs)
    assert all_same([torch.stack(o).cpu() for o in outs], want2)


@pytest.mark.parametrize("ep,etp", [(1, 1), (2, 1), (1, 2), (2, 4)])
def test_mxfp4_experts_gpt_oss_layout(device, ep, etp):
    """GPT-OSS: gate_up_proj_blocks [E, 2F, D/32, 16] with gate / up interleaved along 2F, down_proj_blocks
    [E, D, F/32, 16]; transformers dequantizes them to gate_up_proj [E, D, 2F] and down_proj [E, F, D] (transposed).
    The fused ops give Megatron's linear_fc1 [2F/etp, D] = [gate_t; up_t] and linear_fc2 [D, F/etp]: against
    transformers' own conversion followed by the reference layouts. F = 64 with etp = 4 cuts 32-value groups."""
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    gen = torch.Generator().manual_seed(9)
    E, F, D = 2 * ep, 64, 96
    gu_b = torch.randint(0, 256, (E, 2 * F, D // 32, 16), generator=gen, dtype=torch.uint8)
    gu_s = torch.randint(110, 135, (E, 2 * F, D // 32), generator=gen, dtype=torch.uint8)
    dn_b = torch.randint(0, 256, (E, D, F // 32, 16), generator=gen, dtype=torch.uint8)
    dn_s = torch.randint(110, 135, (E, D, F // 32), generator=gen, dtype=torch.uint8)
    gate_up = convert_moe_packed_tensors(gu_b, gu_s, dtype=torch.bfloat16)  # [E, D, 2F], interleaved columns
    down = convert_moe_packed_tensors(dn_b, dn_s, dtype=torch.bfloat16)  # [E, F, D]
    gate = [gate_up[e, :, 0::2].t() for e in range(E)]
    up = [gate_up[e, :, 1::2].t() for e in range(E)]
    dd = [down[e].t() for e in range(E)]
    dev = [x.to(device) for x in (gu_b, gu_s, dn_b, dn_s)]
    for r in range(ep):
        for t in range(etp):
            got1 = ops.mxfp4_expert_pack_fc1(dev[0], dev[1], ep_size=ep, ep_rank=r, etp_size=etp, etp_rank=t,
                                             interleaved=True)
            assert same(got1.cpu(), expert_fc1_shard(gate, up, ep, r, etp, t))
            got2 = ops.mxfp4_expert_pack_fc2(dev[2], dev[3], ep_size=ep, ep_rank=r, etp_size=etp, etp_rank=t)
            assert same(got2.cpu(), expert_fc2_shard(dd, ep, r, etp, t))
            outs = [torch.empty(got2.shape[1:], dtype=torch.float32, device=device) for _ in range(E // ep)]
            ops.mxfp4_expert_pack_fc2(dev[2], dev[3], ep_size=ep, ep_rank=r, etp_size=etp, etp_rank=t, out=outs)
            assert same(torch.stack(outs).cpu(), expert_fc2_shard([x.float() for x in dd], ep, r, etp, t))


def test_reads_only_its_rows_and_experts(device):
    """A rank's op never reads another rank's experts or rows: NaN bytes and NaN scales there change nothing."""
    gen = torch.Generator().manual_seed(10)
    block = (8, 8)
    pairs = [fp8_pair(32, 16, block, gen=gen) for _ in range(4)]
    dd = [deq(p, block, torch.bfloat16) for p in pairs]
    w, s = [p[0].clone() for p in pairs], [p[1].clone() for p in pairs]
    for e in (0, 1):  # EP rank 0 owns experts 0, 1; of gate_up [32, 16], ETP rank 1 owns gate rows [8, 16), up [24, 32)
        w[e].view(torch.uint8)[8:16] = 0x7F
        w[e].view(torch.uint8)[24:32] = 0x7F
    for e in (2, 3):
        s[e][:] = float("nan")
    fused = [x.to(device) for x in (torch.stack(w), torch.stack(s))]
    got = ops.fp8_expert_pack_fc1(*fused, ep_size=2, ep_rank=0, etp_size=2, etp_rank=0, block_size=block)
    halves = [(x[:16], x[16:]) for x in dd]
    assert same(got.cpu(), expert_fc1_shard([h[0] for h in halves], [h[1] for h in halves], 2, 0, 2, 0))
    with pytest.raises(RuntimeError, match=r"the scale of gate_up\[2\] is nan"):
        ops.fp8_expert_pack_fc1(*fused, ep_size=2, ep_rank=1, etp_size=2, etp_rank=0, block_size=block)


# ------------------------------------------------------------------------ one sample list: reference + opcheck


class Sample(NamedTuple):
    name: str
    op: Callable
    args: tuple
    want: Callable[[], object]  # the reference result (the returned tensors, or the out arguments' values)
    outs: Optional[Callable[[tuple], object]] = None  # the out arguments after the call (None: the return value)


def samples(device: str) -> List[Sample]:
    gen = torch.Generator().manual_seed(11)
    bs = [16, 8]
    dt = torch.bfloat16

    def dev(x):
        if isinstance(x, (list, tuple)):
            return [dev(y) for y in x]
        return x.to(device) if isinstance(x, torch.Tensor) else x

    out: List[Sample] = []
    w, s = fp8_pair(40, 24, bs, gen=gen)
    out.append(Sample("fp8_block_dequant", lib.fp8_block_dequant.default, dev((w, s, bs, dt, 2, 1, 0)),
                      lambda: torch.chunk(fp8_dequant(w, s, bs, dt), 2, 0)[1]))
    o = torch.empty(40, 12, dtype=torch.float32)
    out.append(Sample("fp8_block_dequant_out", lib.fp8_block_dequant_out.default, dev((w, s, bs, 2, 0, 1, o)),
                      lambda: torch.chunk(fp8_dequant(w, s, bs, torch.float32), 2, 1)[0], lambda a: a[-1]))
    mb, ms = mx_pair(6, 64, gen)
    out.append(Sample("mxfp4_dequant", lib.mxfp4_dequant.default, dev((mb, ms, dt, 2, 1, 1)),
                      lambda: torch.chunk(mxfp4_dequant(mb, ms, dt), 2, 1)[1]))
    out.append(Sample("mxfp4_dequant_out", lib.mxfp4_dequant_out.default,
                      dev((mb, ms, 1, 0, 0, torch.empty(6, 64, dtype=torch.float16))),
                      lambda: mxfp4_dequant(mb, ms, torch.float16), lambda a: a[-1]))
    x = wide_rand((37, 21), dt, gen)
    out.append(Sample("fp8_block_quant", lib.fp8_block_quant.default, dev((x, bs, None, "deepseek")),
                      lambda: fp8_quant(x, bs, "deepseek")))
    qo, so = torch.empty(37, 21, dtype=torch.float8_e5m2), torch.empty(3, 3)
    out.append(Sample("fp8_block_quant_out", lib.fp8_block_quant_out.default, dev((x, bs, "transformers", qo, so)),
                      lambda: fp8_quant(x, bs, "transformers", torch.float8_e5m2), lambda a: (a[3], a[4])))
    H, G, d, D = 4, 2, 8, 20
    q, k, v = fp8_pair(2 * H * d, D, bs, gen=gen), fp8_pair(G * d, D, bs, gen=gen), fp8_pair(G * d, D, bs, gen=gen)
    dq, dk, dv = (deq(p, bs, dt) for p in (q, k, v))
    out.append(Sample("fp8_qkv_pack", lib.fp8_qkv_pack.default,
                      dev((*q, *k, *v, bs, H, G, d, 4, 3, True, dt)), lambda: qkv_shard(dq, dk, dv, H, G, d, 4, 3, True)))
    o = torch.empty((H + 2 * G) * d // 2, D, dtype=dt)
    out.append(Sample("fp8_qkv_pack_out", lib.fp8_qkv_pack_out.default,
                      dev((None, None, *k, *v, bs, 0, G, d, 2, 0, False, torch.empty(2 * d, D, dtype=dt))),
                      lambda: qkv_shard(None, dk, dv, 0, G, d, 2, 0), lambda a: a[-1]))
    packed = wide_rand(((H + 2 * G) * d, D), dt, gen)
    out.append(Sample("fp8_qkv_unpack", lib.fp8_qkv_unpack.default, dev((packed, bs, H, G, d, False, None, "deepseek")),
                      lambda: [t for y in qkv_split(packed, H, G, d) for t in fp8_quant(y, bs)]))
    dests = [torch.empty(H * d, D, dtype=torch.float8_e4m3fn), torch.empty(2, 3), torch.empty(G * d, D,
             dtype=torch.float8_e4m3fn), torch.empty(1, 3), torch.empty(G * d, D, dtype=torch.float8_e4m3fn),
             torch.empty(1, 3)]
    out.append(Sample("fp8_qkv_unpack_out", lib.fp8_qkv_unpack_out.default,
                      dev((packed, bs, H, G, d, False, "transformers", *dests)),
                      lambda: [t for y in qkv_split(packed, H, G, d) for t in fp8_quant(y, bs, "transformers")],
                      lambda a: a[7:]))
    g, u = fp8_pair(24, D, bs, gen=gen), fp8_pair(24, D, bs, gen=gen)
    out.append(Sample("fp8_gate_up_pack", lib.fp8_gate_up_pack.default, dev((*g, *u, bs, 2, 1, False, dt)),
                      lambda: gate_up_shard(deq(g, bs, dt), deq(u, bs, dt), 2, 1)))
    gu = fp8_pair(48, D, bs, gen=gen)
    full = deq(gu, bs, torch.float32)
    out.append(Sample("fp8_gate_up_pack_out", lib.fp8_gate_up_pack_out.default,
                      dev((*gu, None, None, bs, 3, 2, True, torch.empty(16, D))),
                      lambda: gate_up_shard(full[0::2], full[1::2], 3, 2), lambda a: a[-1]))
    pk = wide_rand((48, D), torch.float16, gen)
    out.append(Sample("fp8_gate_up_unpack", lib.fp8_gate_up_unpack.default, dev((pk, bs, 2, None, "deepseek")),
                      lambda: [t for y in gate_up_split(pk, 2) for t in fp8_quant(y, bs)]))
    gd = [torch.empty(24, D, dtype=torch.float8_e4m3fn), torch.empty(2, 3), torch.empty(24, D,
          dtype=torch.float8_e4m3fn), torch.empty(2, 3)]
    out.append(Sample("fp8_gate_up_unpack_out", lib.fp8_gate_up_unpack_out.default, dev((pk, bs, 1, "deepseek", *gd)),
                      lambda: [t for y in gate_up_split(pk, 1) for t in fp8_quant(y, bs)], lambda a: a[4:]))
    E, F = 4, 16
    eg = [fp8_pair(F, D, bs, gen=gen) for _ in range(E)]
    eu = [fp8_pair(F, D, bs, gen=gen) for _ in range(E)]
    dg, du = [deq(p, bs, dt) for p in eg], [deq(p, bs, dt) for p in eu]
    lists = ([p[0] for p in eg], [p[1] for p in eg], [p[0] for p in eu], [p[1] for p in eu])
    out.append(Sample("fp8_expert_pack_fc1", lib.fp8_expert_pack_fc1.default,
                      dev((*lists, bs, 2, 1, 2, 0, False, dt)), lambda: expert_fc1_shard(dg, du, 2, 1, 2, 0)))
    out.append(Sample("fp8_expert_pack_fc1_out", lib.fp8_expert_pack_fc1_out.default,
                      dev((*lists, bs, 2, 0, 1, 0, False, torch.empty(2, 2 * F, D, dtype=dt))),
                      lambda: expert_fc1_shard(dg, du, 2, 0, 1, 0), lambda a: a[-1]))
    egu = [fp8_pair(2 * F, D, bs, gen=gen) for _ in range(E)]
    fulls = [deq(p, bs, dt) for p in egu]
    out.append(Sample("fp8_expert_pack_fc1_out.list", lib.fp8_expert_pack_fc1_out.list,
                      dev(([p[0] for p in egu], [p[1] for p in egu], [], [], bs, 4, 3, 2, 1, True,
                           [torch.empty(F, D, dtype=dt)])),
                      lambda: expert_fc1_shard([x[0::2] for x in fulls], [x[1::2] for x in fulls], 4, 3, 2, 1),
                      lambda a: torch.stack(a[-1])))
    ed = [fp8_pair(D, F, bs, gen=gen) for _ in range(E)]
    ddn = [deq(p, bs, dt) for p in ed]
    dl = ([p[0] for p in ed], [p[1] for p in ed])
    out.append(Sample("fp8_expert_pack_fc2", lib.fp8_expert_pack_fc2.default, dev((*dl, bs, 2, 0, 2, 1, dt)),
                      lambda: expert_fc2_shard(ddn, 2, 0, 2, 1)))
    out.append(Sample("fp8_expert_pack_fc2_out", lib.fp8_expert_pack_fc2_out.default,
                      dev((*dl, bs, 1, 0, 4, 3, torch.empty(E, D, F // 4, dtype=dt))),
                      lambda: expert_fc2_shard(ddn, 1, 0, 4, 3), lambda a: a[-1]))
    out.append(Sample("fp8_expert_pack_fc2_out.list", lib.fp8_expert_pack_fc2_out.list,
                      dev((*dl, bs, 2, 1, 1, 0, [torch.empty(D, F, dtype=dt) for _ in range(2)])),
                      lambda: expert_fc2_shard(ddn, 2, 1, 1, 0), lambda a: torch.stack(a[-1])))
    sh1 = [wide_rand((2, 2 * F // 2, D), dt, gen) for _ in range(4)]
    g1, u1 = expert_fc1_split(sh1, 2, 2)

    def fc1_want(rule):
        per = [(*fp8_quant(g1[e], bs, rule), *fp8_quant(u1[e], bs, rule)) for e in range(g1.shape[0])]
        return [torch.stack(x) for x in zip(*per)]

    out.append(Sample("fp8_expert_unpack_fc1", lib.fp8_expert_unpack_fc1.default, dev((sh1, bs, 2, 2, None,
                                                                                      "deepseek")),
                      lambda: fc1_want("deepseek")))
    fc1_dests = [[torch.empty(F, D, dtype=torch.float8_e4m3fn) if i % 2 == 0 else torch.empty(1, 3)
                  for _ in range(4)] for i in range(4)]
    out.append(Sample("fp8_expert_unpack_fc1_out", lib.fp8_expert_unpack_fc1_out.default,
                      dev((sh1, bs, 2, 2, "transformers", *fc1_dests)), lambda: fc1_want("transformers"),
                      lambda a: [torch.stack(x) for x in a[5:]]))
    sh2 = [wide_rand((2, D, F // 2), torch.float32, gen) for _ in range(4)]
    d2 = expert_fc2_split(sh2, 2, 2)

    def fc2_want():
        return [torch.stack(x) for x in zip(*[fp8_quant(d2[e], bs) for e in range(d2.shape[0])])]

    out.append(Sample("fp8_expert_unpack_fc2", lib.fp8_expert_unpack_fc2.default,
                      dev((sh2, bs, 2, 2, None, "deepseek")), fc2_want))
    fc2_dests = [[torch.empty(D, F, dtype=torch.float8_e4m3fn) for _ in range(4)], [torch.empty(2, 2)
                                                                                   for _ in range(4)]]
    out.append(Sample("fp8_expert_unpack_fc2_out", lib.fp8_expert_unpack_fc2_out.default,
                      dev((sh2, bs, 2, 2, "deepseek", *fc2_dests)), fc2_want,
                      lambda a: [torch.stack(x) for x in a[5:]]))
    mgu = [mx_pair(2 * F, 64, gen) for _ in range(E)]
    mfull = [mxfp4_dequant(b, s_, dt) for b, s_ in mgu]
    mlists = ([p[0] for p in mgu], [p[1] for p in mgu], [], [])
    out.append(Sample("mxfp4_expert_pack_fc1", lib.mxfp4_expert_pack_fc1.default,
                      dev((*mlists, 2, 1, 2, 1, True, dt)),
                      lambda: expert_fc1_shard([x[0::2] for x in mfull], [x[1::2] for x in mfull], 2, 1, 2, 1)))
    out.append(Sample("mxfp4_expert_pack_fc1_out", lib.mxfp4_expert_pack_fc1_out.default,
                      dev((*mlists, 1, 0, 1, 0, False, torch.empty(E, 2 * F, 64, dtype=dt))),
                      lambda: expert_fc1_shard([x[:F] for x in mfull], [x[F:] for x in mfull], 1, 0, 1, 0),
                      lambda a: a[-1]))
    out.append(Sample("mxfp4_expert_pack_fc1_out.list", lib.mxfp4_expert_pack_fc1_out.list,
                      dev((*mlists, 4, 2, 1, 0, True, [torch.empty(2 * F, 64, dtype=dt)])),
                      lambda: expert_fc1_shard([x[0::2] for x in mfull], [x[1::2] for x in mfull], 4, 2, 1, 0),
                      lambda a: torch.stack(a[-1])))
    mdn = [mx_pair(D, 64, gen) for _ in range(E)]
    mdd = [mxfp4_dequant(b, s_, dt) for b, s_ in mdn]
    ml = ([p[0] for p in mdn], [p[1] for p in mdn])
    out.append(Sample("mxfp4_expert_pack_fc2", lib.mxfp4_expert_pack_fc2.default, dev((*ml, 2, 1, 4, 2, dt)),
                      lambda: expert_fc2_shard(mdd, 2, 1, 4, 2)))
    out.append(Sample("mxfp4_expert_pack_fc2_out", lib.mxfp4_expert_pack_fc2_out.default,
                      dev((*ml, 1, 0, 2, 1, torch.empty(E, D, 32, dtype=dt))),
                      lambda: expert_fc2_shard(mdd, 1, 0, 2, 1), lambda a: a[-1]))
    out.append(Sample("mxfp4_expert_pack_fc2_out.list", lib.mxfp4_expert_pack_fc2_out.list,
                      dev((*ml, 2, 0, 1, 0, [torch.empty(D, 64, dtype=dt) for _ in range(2)])),
                      lambda: expert_fc2_shard(mdd, 2, 0, 1, 0), lambda a: torch.stack(a[-1])))
    return out


SAMPLE_NAMES = [s.name for s in samples("cpu")]


def _sample(device: str, name: str) -> Sample:
    return next(s for s in samples(device) if s.name == name)


def _cpu(x):
    if isinstance(x, torch.Tensor):
        return x.cpu()
    return [_cpu(y) for y in x]


def test_every_quantized_op_has_a_sample():
    schemas = {o for o in dir(lib) if o.startswith(("fp8_", "mxfp4_"))}
    covered = {s.op.name().split("::")[1].split(".")[0] for s in samples("cpu")}
    assert schemas == covered, f"ops without a sample: {sorted(schemas - covered)}"


@pytest.mark.parametrize("name", SAMPLE_NAMES)
def test_sample_matches_reference(device, name):
    s = _sample(device, name)
    result = s.op(*s.args)
    got = s.outs(s.args) if s.outs is not None else result
    assert all_same(_cpu(got), s.want())


@pytest.fixture
def fp8_aware_allclose(monkeypatch):
    """opcheck's schema test compares each argument before and after the call with torch.allclose, which has no
    float8 kernel: compare 1-byte float tensors by their bytes instead (stricter: bit for bit)."""
    allclose = torch.allclose

    def patched(a, b, *args, **kwargs):
        if isinstance(a, torch.Tensor) and a.dtype in FP8 + [torch.float8_e8m0fnu]:
            return a.dtype == b.dtype and torch.equal(a.view(torch.uint8), b.view(torch.uint8))
        return allclose(a, b, *args, **kwargs)

    monkeypatch.setattr(torch, "allclose", patched)


@pytest.mark.parametrize("name", SAMPLE_NAMES)
def test_sample_opcheck(device, name, fp8_aware_allclose):
    s = _sample(device, name)
    torch.library.opcheck(s.op, s.args)


def test_torch_compile_fullgraph(device):
    """Import-side dequantization and export-side quantization traced into one graph (fakes + kernels)."""
    gen = torch.Generator().manual_seed(12)
    bs = (16, 16)
    k, v = fp8_pair(32, 48, bs, gen=gen), fp8_pair(32, 48, bs, gen=gen)
    q = fp8_pair(64, 48, bs, gen=gen)
    args = [t.to(device) for t in (*q, *k, *v)]

    def step(qw, qs, kw, ks, vw, vs):
        shards = [ops.fp8_qkv_pack(qw, qs, kw, ks, vw, vs, num_heads=4, num_query_groups=2, head_dim=16,
                                   block_size=bs, tp_size=2, tp_rank=t) for t in range(2)]
        return ops.fp8_qkv_unpack(torch.cat(shards), num_heads=4, num_query_groups=2, head_dim=16, block_size=bs)

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    assert all_same(_cpu(compiled(*args)), _cpu(step(*args)))


# ------------------------------------------------------------------------------------------------------- errors


def _errors():
    bs = [128, 128]
    w = fp8_rand((256, 256))
    s = scale_rand((2, 2))
    nan_s = s.clone()
    nan_s[1, 0] = float("nan")
    inf_s = s.clone()
    inf_s[0, 1] = float("inf")
    w576 = fp8_rand((576, 200))
    bad_w = wide_rand((64, 64), torch.bfloat16)
    bad_w[3, 40] = float("inf")
    mb, ms = mx_pair(4, 64)
    ms255 = ms.clone()
    ms255[2, 1] = 255
    return [
        (lambda: ops.fp8_block_dequant(w, None), ValueError, r"fp8_block_dequant: weight_scale_inv is missing"),
        (lambda: ops.fp8_qkv_pack(w[:32], None, w[:16], s[:1], w[:16], s[:1], num_heads=2, num_query_groups=1,
                                  head_dim=16, block_size=bs), ValueError, r"fp8_qkv_pack: q_scale_inv is missing"),
        (lambda: ops.fp8_expert_pack_fc2([w, w], None), ValueError, r"fp8_expert_pack_fc2: down_scale_inv is missing"),
        (lambda: ops.mxfp4_expert_pack_fc2([mb], None), ValueError, r"mxfp4_expert_pack_fc2: down_scales are missing"),
        (lambda: ops.fp8_block_dequant(w, s[:, :1]), RuntimeError,
         r"fp8_block_dequant: scale_inv has shape \[2, 1\], expected \[2, 2\] = \[ceil\(256 / 128\), ceil\(256 / 128\)"
         r"\] for weight \[256, 256\] with block_size \[128, 128\]"),
        # a block size that does not divide the weight: partial edge blocks, so the grid is the ceil grid (576 rows:
        # 5 row blocks); a floor grid is refused with both shapes named
        (lambda: ops.fp8_block_dequant(w576, scale_rand((4, 1))), RuntimeError,
         r"scale_inv has shape \[4, 1\], expected \[5, 2\] = \[ceil\(576 / 128\), ceil\(200 / 128\)\]"),
        (lambda: ops.fp8_block_dequant(w, s.to(torch.int32)), RuntimeError,
         r"fp8_block_dequant: scale_inv has dtype Int, expected float32"),
        (lambda: ops.fp8_block_dequant(w.view(torch.uint8), s), RuntimeError,
         r"fp8_block_dequant: weight has dtype Byte, expected float8_e4m3fn or float8_e5m2"),
        (lambda: ops.fp8_block_dequant(w, s, block_size=(0, 128)), RuntimeError,
         r"fp8_block_dequant: block_size = \[0, 128\] must be two positive ints"),
        (lambda: ops.fp8_block_dequant(w, s, dtype=torch.int32), RuntimeError,
         r"fp8_block_dequant: dtype is Int, expected bfloat16, float16 or float32"),
        (lambda: ops.fp8_block_dequant(w, s, tp_size=3), RuntimeError,
         r"fp8_block_dequant: N \(weight rows\) = 256 is not divisible by tp_size = 3"),
        (lambda: ops.fp8_block_dequant(w, nan_s), RuntimeError,
         r"fp8_block_dequant: the scale of weight is nan \(float32\) at \[1, 0\]: the block of rows \[128, 256\) and "
         r"columns \[0, 128\) cannot be dequantized"),
        (lambda: ops.fp8_gate_up_pack(w, s, w, inf_s, block_size=bs), RuntimeError,
         r"fp8_gate_up_pack: the scale of up is inf \(float32\) at \[0, 1\]"),
        (lambda: ops.mxfp4_expert_pack_fc2([mb, mb], [ms, ms255], ep_size=2, ep_rank=1), RuntimeError,
         r"mxfp4_expert_pack_fc2: the scale of down\[1\] is nan \(E8M0\) at \[2, 1\]"),
        (lambda: ops.mxfp4_dequant(mb[:, :, :8], ms), RuntimeError,
         r"mxfp4_dequant: blocks has shape \[4, 2, 8\], expected \[N, K/32, 16\]"),
        (lambda: ops.mxfp4_dequant(mb, ms[:, :1]), RuntimeError,
         r"mxfp4_dequant: scales has shape \[4, 1\], expected \[4, 2\]"),
        (lambda: ops.fp8_block_quant(bad_w, block_size=(32, 32)), RuntimeError,
         r"fp8_block_quant: weight has NaN or Inf values in block \[0, 1\] \(rows \[0, 32\), columns \[32, 64\)\)"),
        (lambda: ops.fp8_block_quant(bad_w, rule="round"), RuntimeError,
         r"fp8_block_quant: rule = 'round', expected 'deepseek' or 'transformers'"),
        (lambda: ops.fp8_block_quant(w), RuntimeError,
         r"fp8_block_quant: weight's dtype is Float8_e4m3fn, expected bfloat16, float16 or float32"),
        (lambda: ops.fp8_expert_unpack_fc2([bad_w[None, :, :32], bad_w[None, :, 32:]], block_size=(32, 32),
                                           etp_size=2), RuntimeError,
         r"fp8_expert_unpack_fc2: down\[0\] has NaN or Inf values in block \[0, 1\]"),
        (lambda: ops.fp8_expert_pack_fc1([w, w], [s, s], [w], [s]), RuntimeError,
         r"fp8_expert_pack_fc1: up has 1 experts but gate has 2"),
        (lambda: ops.fp8_gate_up_pack(w, s, w, s, interleaved=True), RuntimeError,
         r"interleaved = True needs one fused gate_up tensor"),
    ]


@pytest.mark.parametrize("case", range(len(_errors())))
def test_errors_name_the_values(case):
    call, exc, match = _errors()[case]
    with pytest.raises(exc, match=match):
        call()


def test_fake_errors_name_the_values():
    """The fakes (meta tensors) refuse the same inputs with the values in the message."""
    w = torch.empty(256, 256, dtype=torch.float8_e4m3fn, device="meta")
    with pytest.raises(RuntimeError, match=r"scale_inv has shape \[2, 1\], expected \[2, 2\]"):
        ops.fp8_block_dequant(w, torch.empty(2, 1, device="meta"))
    with pytest.raises(ValueError, match=r"N \(weight rows\) = 256 is not divisible by tp_size = 3"):
        ops.fp8_block_dequant(w, torch.empty(2, 2, device="meta"), tp_size=3)
    out = ops.fp8_block_dequant(w, torch.empty(2, 2, device="meta"), tp_size=2, tp_dim=1, dtype=torch.float16)
    assert out.shape == (256, 128) and out.dtype == torch.float16
