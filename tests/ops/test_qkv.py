"""bridge::qkv_pack / qkv_unpack (and _out, fused, KV-only) against the plain-torch reference."""

from __future__ import annotations

import pytest
import torch
from conftest import DTYPES, LAYOUTS, as_layout, empty_layout, rand
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from reference import qkv_full, qkv_full_by_row_map, qkv_shard, qkv_split, same

from megatron_bridge_ext import ops

HYP = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def _inputs(H, G, d, D, dtype, device, output_gate=False, layout="contiguous", gen=None, finite=False):
    """Random q, k, v; ``finite`` draws normal values (opcheck compares numerically, where NaN != NaN)."""
    trail = (D,) if D else ()
    make = (lambda shape, dtype, gen: torch.randn(shape, generator=gen).to(dtype)) if finite else rand
    q = make((H * d * (2 if output_gate else 1), *trail), dtype, gen=gen) if H else None
    k = make((G * d, *trail), dtype, gen=gen)
    v = make((G * d, *trail), dtype, gen=gen)
    lay = (lambda x: as_layout(x, layout).to(device)) if layout != "contiguous" else (lambda x: x.to(device))
    return (lay(q) if q is not None else None), lay(k), lay(v)


def _check_all_ranks(q, k, v, H, G, d, tp, output_gate):
    kw = dict(num_heads=H, num_query_groups=G, head_dim=d, output_gate=output_gate)
    shards = []
    for t in range(tp):
        got = ops.qkv_pack(q, k, v, tp_size=tp, tp_rank=t, **kw)
        assert same(got, qkv_shard(q, k, v, H, G, d, tp, t, output_gate)), f"tp rank {t} of {tp}"
        shards.append(got)
    packed = torch.cat(shards, 0)
    q2, k2, v2 = ops.qkv_unpack(packed, **kw)
    if q is None:
        assert q2.shape[0] == 0 and q2.shape[1:] == k.shape[1:]
    else:
        assert same(q2, q)
    assert same(k2, k) and same(v2, v)


@HYP
@given(
    G=st.integers(1, 4), n=st.integers(0, 4), d=st.integers(1, 5), D=st.integers(0, 7), tp_pick=st.integers(0, 3),
    output_gate=st.booleans(), layout=st.sampled_from(LAYOUTS), seed=st.integers(0, 2**31 - 1),
    dtype=st.sampled_from([torch.bfloat16, torch.float32, torch.float8_e4m3fn, torch.int8, torch.float64]),
)
def test_pack_unpack_random(device, G, n, d, D, tp_pick, output_gate, layout, seed, dtype):
    gen = torch.Generator().manual_seed(seed)
    tps = [t for t in range(1, G + 1) if G % t == 0]
    tp = tps[tp_pick % len(tps)]
    H = n * G
    q, k, v = _inputs(H, G, d, D, dtype, device, output_gate, layout, gen)
    _check_all_ranks(q, k, v, H, G, d, tp, output_gate)


_EDGE_CASES = [
    (8, 1, 4, 16, False),   # MQA
    (6, 6, 3, 18, False),   # MHA
    (8, 8, 2, 16, True),    # MHA + output gate
    (8, 2, 5, 12, False),   # head_dim != D/H
    (12, 4, 4, 7, True),    # output gate, odd D
    (0, 4, 4, 16, False),   # KV only (linear_kv)
    (16, 8, 2, 0, False),   # bias
    (16, 8, 2, 0, True),    # gated bias
]


@pytest.mark.parametrize(
    "H,G,d,D,output_gate,tp",
    [(*case, tp) for case in _EDGE_CASES for tp in (1, 2, 4, 8) if case[1] % tp == 0],
)
def test_edge_cases(device, H, G, d, D, output_gate, tp):
    q, k, v = _inputs(H, G, d, D, torch.bfloat16, device, output_gate)
    _check_all_ranks(q, k, v, H, G, d, tp, output_gate)


@HYP
@given(
    G=st.integers(1, 4), n=st.integers(0, 4), d=st.integers(1, 6), D=st.integers(0, 5), split=st.integers(2, 4),
    output_gate=st.booleans(), layout=st.sampled_from(LAYOUTS), seed=st.integers(0, 2**31 - 1),
)
def test_fewer_groups_than_tp_ranks(device, G, n, d, D, split, output_gate, layout, seed):
    """G < tp (tp = G * split): rank t holds rows [t*R/tp, (t+1)*R/tp) of the packed tensor, megatron-core's
    column-parallel split, each group cut into ``split`` slices (the reference is torch.chunk of the packed tensor)."""
    block = (n * (2 if output_gate else 1) + 2) * d
    if block % split:  # megatron-core needs whole rows per slice; covered by test_errors_name_the_values
        return
    gen = torch.Generator().manual_seed(seed)
    q, k, v = _inputs(n * G, G, d, D, torch.bfloat16, device, output_gate, layout, gen)
    _check_all_ranks(q, k, v, n * G, G, d, G * split, output_gate)


def test_reference_row_map_agrees(device):
    # The reference builder and the per-row map of the semantics file describe the same layout.
    H, G, d, D = 12, 3, 2, 5
    q, k, v = _inputs(H, G, d, D, torch.float32, "cpu")
    full = qkv_full_by_row_map(q, k, v, H, G, d)
    assert same(full, qkv_full(q, k, v, H, G, d))
    got = ops.qkv_pack(q.to(device), k.to(device), v.to(device), num_heads=H, num_query_groups=G, head_dim=d)
    assert same(got.cpu(), full)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_every_dtype(device, dtype):
    H, G, d, D, tp = 8, 4, 3, 5, 2
    q, k, v = _inputs(H, G, d, D, dtype, device, layout="transposed")
    _check_all_ranks(q, k, v, H, G, d, tp, False)


@pytest.mark.parametrize("output_gate", [False, True])
@pytest.mark.parametrize("tp", [1, 2, 4])
def test_fused_hf_qkv(device, output_gate, tp):
    H, G, d, D = 8, 4, 3, 10
    qkv = rand(((H * (2 if output_gate else 1) + 2 * G) * d, D), torch.float16).to(device)
    qr = H * d * (2 if output_gate else 1)
    q, k, v = qkv[:qr], qkv[qr:qr + G * d], qkv[qr + G * d:]
    kw = dict(num_heads=H, num_query_groups=G, head_dim=d, output_gate=output_gate)
    shards = [ops.qkv_pack_fused(qkv, tp_size=tp, tp_rank=t, **kw) for t in range(tp)]
    for t, s in enumerate(shards):
        assert same(s, qkv_shard(q, k, v, H, G, d, tp, t, output_gate))
    assert same(ops.qkv_unpack_fused(torch.cat(shards), **kw), qkv)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_out_variants_strided(device, layout):
    H, G, d, D, tp = 8, 2, 4, 6, 2
    q, k, v = _inputs(H, G, d, D, torch.bfloat16, device)
    kw = dict(num_heads=H, num_query_groups=G, head_dim=d)
    shard_rows = (H + 2 * G) * d // tp
    for t in range(tp):
        out = empty_layout((shard_rows, D), torch.bfloat16, device, layout)
        ret = ops.qkv_pack(q, k, v, tp_size=tp, tp_rank=t, out=out, **kw)
        assert ret is out and same(out, qkv_shard(q, k, v, H, G, d, tp, t))
    packed = qkv_full(q, k, v, H, G, d)
    outs = tuple(empty_layout(x.shape, x.dtype, device, layout) for x in (q, k, v))
    ops.qkv_unpack(packed, out=outs, **kw)
    for got, want in zip(outs, (q, k, v)):
        assert same(got, want)


def test_kv_only_wrappers(device):
    G, d, D, tp = 4, 2, 3, 2
    _, k, v = _inputs(0, G, d, D, torch.float32, device)
    shards = [ops.kv_pack(k, v, num_query_groups=G, head_dim=d, tp_size=tp, tp_rank=t) for t in range(tp)]
    want = torch.cat([torch.cat([k[g * d:(g + 1) * d], v[g * d:(g + 1) * d]]) for g in range(G)])
    assert same(torch.cat(shards), want)
    k2, v2 = ops.kv_unpack(want, num_query_groups=G, head_dim=d)
    assert same(k2, k) and same(v2, v)
    kk, vv = torch.empty_like(k), torch.empty_like(v)
    ops.qkv_unpack(want, num_heads=0, num_query_groups=G, head_dim=d, out=(None, kk, vv))
    assert same(kk, k) and same(vv, v)


def test_unpack_reference_inverse(device):
    H, G, d, D = 8, 2, 3, 4
    q, k, v = _inputs(H, G, d, D, torch.float32, device, output_gate=True)
    packed = qkv_full(q, k, v, H, G, d, True)
    for got, want in zip(ops.qkv_unpack(packed, num_heads=H, num_query_groups=G, head_dim=d, output_gate=True),
                         qkv_split(packed, H, G, d, True)):
        assert same(got, want)


def test_opcheck(device):
    H, G, d, D = 4, 2, 2, 3
    q, k, v = _inputs(H, G, d, D, torch.float32, device, finite=True)
    packed = qkv_full(q, k, v, H, G, d)
    lib = torch.ops.bridge
    torch.library.opcheck(lib.qkv_pack.default, (q, k, v, H, G, d, 2, 1, False))
    torch.library.opcheck(lib.qkv_pack.default, (None, k, v, 0, G, d, 1, 0, False))
    torch.library.opcheck(lib.qkv_pack_out.default, (q, k, v, H, G, d, 2, 0, False, torch.empty(8, D, device=device)))
    torch.library.opcheck(lib.qkv_unpack.default, (packed, H, G, d, False))
    outs = (torch.empty_like(q), torch.empty_like(k), torch.empty_like(v))
    torch.library.opcheck(lib.qkv_unpack_out.default, (packed, H, G, d, False, *outs))


def test_torch_compile_fullgraph(device):
    H, G, d, D = 4, 2, 2, 3
    q, k, v = _inputs(H, G, d, D, torch.float32, device)

    @torch.compile(fullgraph=True, backend="aot_eager")
    def roundtrip(q, k, v):
        shard0 = ops.qkv_pack(q, k, v, num_heads=H, num_query_groups=G, head_dim=d, tp_size=2, tp_rank=0)
        shard1 = ops.qkv_pack(q, k, v, num_heads=H, num_query_groups=G, head_dim=d, tp_size=2, tp_rank=1)
        return ops.qkv_unpack(torch.cat([shard0, shard1]), num_heads=H, num_query_groups=G, head_dim=d)

    for got, want in zip(roundtrip(q, k, v), (q, k, v)):
        assert same(got, want)


def _qkv(H=8, G=2, d=4, D=6, dtype=torch.float32):
    return _inputs(H, G, d, D, dtype, "cpu")


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda q, k, v: ops.qkv_pack(q, k, v, num_heads=8, num_query_groups=2, head_dim=4, tp_size=3),
         r"qkv_pack: num_query_groups = 2 is not divisible by tp_size = 3, nor tp_size by num_query_groups"),
        (lambda q, k, v: ops.qkv_pack(q, k, v, num_heads=8, num_query_groups=2, head_dim=4, tp_size=32),
         r"qkv_pack: a query group's 24 packed rows .* do not split into tp_size / num_query_groups = 16 equal"),
        (lambda q, k, v: ops.qkv_pack(q, k, v, num_heads=8, num_query_groups=3, head_dim=4),
         r"qkv_pack: num_heads = 8 is not divisible by num_query_groups = 3"),
        (lambda q, k, v: ops.qkv_pack(q[:-1], k, v, num_heads=8, num_query_groups=2, head_dim=4),
         r"qkv_pack: q has 31 rows .*expected H\*d = 32"),
        (lambda q, k, v: ops.qkv_pack(q, k, v, num_heads=8, num_query_groups=2, head_dim=4, output_gate=True),
         r"qkv_pack: q has 32 rows .*expected 2\*H\*d = 64"),
        (lambda q, k, v: ops.qkv_pack(q, k[:-2], v, num_heads=8, num_query_groups=2, head_dim=4),
         r"qkv_pack: k has 6 rows .*expected G\*d = 8"),
        (lambda q, k, v: ops.qkv_pack(q, k, v.double(), num_heads=8, num_query_groups=2, head_dim=4),
         r"qkv_pack: v has dtype Double but k has dtype Float"),
        (lambda q, k, v: ops.qkv_pack(q[:, :5], k, v, num_heads=8, num_query_groups=2, head_dim=4),
         r"qkv_pack: q has shape \[32, 5\] but k has shape \[8, 6\]"),
        (lambda q, k, v: ops.qkv_pack(q, k, v, num_heads=8, num_query_groups=2, head_dim=4, tp_size=2, tp_rank=2),
         r"qkv_pack: tp_rank = 2 is out of range for tp_size = 2"),
        (lambda q, k, v: ops.qkv_pack(None, k, v, num_heads=8, num_query_groups=2, head_dim=4),
         r"qkv_pack: q is None but num_heads = 8"),
        (lambda q, k, v: ops.qkv_pack(q, k, v, num_heads=8, num_query_groups=2, head_dim=4,
                                      out=torch.empty(47, 6)),
         r"qkv_pack_out: out has shape \[47, 6\], expected \[48, 6\]"),
        (lambda q, k, v: ops.qkv_unpack(torch.empty(47, 6), num_heads=8, num_query_groups=2, head_dim=4),
         r"qkv_unpack: packed has 47 rows .*expected \(H \+ 2\*G\)\*d = 48"),
        (lambda q, k, v: ops.qkv_unpack(torch.empty(48, 6), num_heads=8, num_query_groups=2, head_dim=4,
                                        out=(torch.empty(32, 6), torch.empty(8, 6), torch.empty(9, 6))),
         r"qkv_unpack_out: v has 9 rows .*expected G\*d = 8"),
        (lambda q, k, v: ops.qkv_unpack(torch.empty(48, 6), num_heads=8, num_query_groups=2, head_dim=4,
                                        out=(torch.empty(32, 6), torch.empty(8, 6, dtype=torch.half),
                                             torch.empty(8, 6))),
         r"qkv_unpack_out: k has dtype Half but packed has dtype Float"),
        (lambda q, k, v: ops.qkv_unpack(torch.empty(48, 6), num_heads=8, num_query_groups=2, head_dim=4,
                                        output_gate=True),
         r"qkv_unpack: packed has 48 rows .*expected \(2\*H \+ 2\*G\)\*d = 80"),
    ],
)
def test_errors_name_the_values(call, match):
    q, k, v = _qkv()
    with pytest.raises(RuntimeError, match=match):
        call(q, k, v)
