"""bridge::expert_pack_fc1/fc2 and expert_unpack_fc1/fc2 (per-expert and fused HF layouts) against the reference."""

from __future__ import annotations

import pytest
import torch
from conftest import DTYPES, LAYOUTS, as_layout, rand
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from reference import expert_fc1_shard, expert_fc1_split, expert_fc2_shard, expert_fc2_split, same, split_list

from megatron_bridge_ext import ops

HYP = settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def _roundtrip_fc1(gate, up, ep, etp):
    shards = []
    for r in range(ep):
        for t in range(etp):
            got = ops.expert_pack_fc1(gate, up, ep_size=ep, ep_rank=r, etp_size=etp, etp_rank=t)
            assert same(got, expert_fc1_shard(gate, up, ep, r, etp, t)), f"ep rank {r}, etp rank {t}"
            shards.append(got)
    g2, u2 = ops.expert_unpack_fc1(shards, ep_size=ep, etp_size=etp)
    want_g, want_u = expert_fc1_split(shards, ep, etp)
    assert same(g2, want_g) and same(u2, want_u)
    assert same(g2, torch.stack(list(gate))) and same(u2, torch.stack(list(up)))
    return shards


def _roundtrip_fc2(down, ep, etp):
    shards = []
    for r in range(ep):
        for t in range(etp):
            got = ops.expert_pack_fc2(down, ep_size=ep, ep_rank=r, etp_size=etp, etp_rank=t)
            assert same(got, expert_fc2_shard(down, ep, r, etp, t)), f"ep rank {r}, etp rank {t}"
            shards.append(got)
    back = ops.expert_unpack_fc2(shards, ep_size=ep, etp_size=etp)
    assert same(back, expert_fc2_split(shards, ep, etp))
    assert same(back, torch.stack(list(down)))
    return shards


@HYP
@given(
    er=st.integers(1, 3), ep=st.integers(1, 4), f=st.integers(1, 4), etp=st.integers(1, 4), D=st.integers(0, 6),
    transposed=st.booleans(), dtype=st.sampled_from([torch.bfloat16, torch.float8_e4m3fn, torch.float32]),
    seed=st.integers(0, 2**31),
)
def test_fc1_random(device, er, ep, f, etp, D, transposed, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    E, F = er * ep, f * etp
    shape = (F, D) if D else (F,)
    lay = "transposed" if transposed else "row_strided"
    gate = [as_layout(rand(shape, dtype, gen=gen), lay).to(device) for _ in range(E)]
    up = [as_layout(rand(shape, dtype, gen=gen), lay).to(device) for _ in range(E)]
    _roundtrip_fc1(gate, up, ep, etp)


@HYP
@given(
    er=st.integers(1, 3), ep=st.integers(1, 4), f=st.integers(1, 4), etp=st.integers(1, 4), D=st.integers(1, 6),
    bias=st.booleans(), transposed=st.booleans(), seed=st.integers(0, 2**31),
)
def test_fc2_random(device, er, ep, f, etp, D, bias, transposed, seed):
    gen = torch.Generator().manual_seed(seed)
    E, F = er * ep, f * etp
    shape = (D,) if bias else (D, F)
    down = [as_layout(rand(shape, torch.float16, gen=gen), "transposed" if transposed else "col_slice").to(device)
            for _ in range(E)]
    _roundtrip_fc2(down, ep, etp)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_every_dtype(device, dtype):
    gate = [rand((4, 3), dtype).to(device) for _ in range(4)]
    up = [rand((4, 3), dtype).to(device) for _ in range(4)]
    _roundtrip_fc1(gate, up, 2, 2)
    _roundtrip_fc2([rand((3, 4), dtype).to(device) for _ in range(4)], 2, 2)


@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("ep,etp", [(1, 1), (2, 1), (1, 2), (2, 2), (4, 2)])
def test_fused_hf_experts(device, interleaved, transposed, ep, etp):
    E, F, D = 8, 6, 5
    fused_gu = rand((E, D, 2 * F) if transposed else (E, 2 * F, D), torch.bfloat16).to(device)
    fused_down = rand((E, F, D) if transposed else (E, D, F), torch.bfloat16).to(device)
    gate, up = ops.expert_fc1_views(fused_gu, interleaved=interleaved, transposed=transposed)
    down = ops.expert_fc2_views(fused_down, transposed=transposed)
    # The per-expert views are the reference's inputs, built here by plain indexing.
    x = fused_gu.transpose(1, 2) if transposed else fused_gu
    ref_gate = x[:, 0::2] if interleaved else x[:, :F]
    ref_up = x[:, 1::2] if interleaved else x[:, F:]
    assert all(same(a, b) for a, b in zip(gate, split_list(ref_gate)))
    assert all(same(a, b) for a, b in zip(up, split_list(ref_up)))
    fc1 = _roundtrip_fc1(gate, up, ep, etp)
    fc2 = _roundtrip_fc2(down, ep, etp)
    # Unpack straight into views of fresh fused HF tensors.
    out_gu = torch.zeros_like(fused_gu)
    og, ou = ops.expert_fc1_views(out_gu, interleaved=interleaved, transposed=transposed)
    ops.expert_unpack_fc1(fc1, ep_size=ep, etp_size=etp, out=(og, ou))
    assert same(out_gu, fused_gu)
    out_down = torch.zeros_like(fused_down)
    ops.expert_unpack_fc2(fc2, ep_size=ep, etp_size=etp, out=ops.expert_fc2_views(out_down, transposed=transposed))
    assert same(out_down, fused_down)


def test_stacked_inputs_and_out(device):
    E, F, D, ep, etp = 4, 4, 3, 2, 2
    gate, up = rand((E, F, D), torch.float32).to(device), rand((E, F, D), torch.float32).to(device)
    for r in range(ep):
        for t in range(etp):
            out = torch.empty(E // ep, 2 * F // etp, D, device=device).transpose(1, 2).contiguous().transpose(1, 2)
            ops.expert_pack_fc1(gate, up, ep_size=ep, ep_rank=r, etp_size=etp, etp_rank=t, out=out)
            assert same(out, expert_fc1_shard(split_list(gate), split_list(up), ep, r, etp, t))
            down = rand((E, D, F), torch.float32).to(device)
            out2 = torch.empty(E // ep, D, F // etp, device=device)
            ops.expert_pack_fc2(down, ep_size=ep, ep_rank=r, etp_size=etp, etp_rank=t, out=out2)
            assert same(out2, expert_fc2_shard(split_list(down), ep, r, etp, t))


def test_fc2_bias_replicated_over_etp(device):
    E, D, ep, etp = 4, 5, 2, 2
    bias = [rand((D,), torch.float32).to(device) for _ in range(E)]
    shards = [ops.expert_pack_fc2(bias, ep_size=ep, ep_rank=r, etp_size=etp, etp_rank=t)
              for r in range(ep) for t in range(etp)]
    for i, s in enumerate(shards):
        assert s.shape == (E // ep, D) and same(s, torch.stack(bias[(i // etp) * 2:(i // etp) * 2 + 2]))
    assert same(ops.expert_unpack_fc2(shards, ep_size=ep, etp_size=etp), torch.stack(bias))


def test_opcheck(device):
    E, F, D = 4, 4, 3
    gate = [torch.randn(F, D).to(device) for _ in range(E)]
    up = [torch.randn(F, D).to(device) for _ in range(E)]
    down = [torch.randn(D, F).to(device) for _ in range(E)]
    lib = torch.ops.bridge
    torch.library.opcheck(lib.expert_pack_fc1.default, (gate, up, 2, 1, 2, 1))
    torch.library.opcheck(lib.expert_pack_fc1_out.default, (gate, up, 2, 0, 2, 1, torch.empty(2, 4, D, device=device)))
    torch.library.opcheck(lib.expert_pack_fc2.default, (down, 2, 1, 2, 0))
    torch.library.opcheck(lib.expert_pack_fc2_out.default, (down, 1, 0, 2, 1, torch.empty(4, D, 2, device=device)))
    fc1 = [torch.randn(2, 4, D).to(device) for _ in range(4)]
    fc2 = [torch.randn(2, D, 2).to(device) for _ in range(4)]
    torch.library.opcheck(lib.expert_unpack_fc1.default, (fc1, 2, 2))
    outs_g = [torch.empty(F, D, device=device) for _ in range(E)]
    outs_u = [torch.empty(F, D, device=device) for _ in range(E)]
    torch.library.opcheck(lib.expert_unpack_fc1_out.default, (fc1, 2, 2, outs_g, outs_u))
    torch.library.opcheck(lib.expert_unpack_fc2.default, (fc2, 2, 2))
    torch.library.opcheck(lib.expert_unpack_fc2_out.default, (fc2, 2, 2, [torch.empty(D, F, device=device)
                                                                           for _ in range(E)]))


def test_torch_compile_fullgraph(device):
    E, F, D = 4, 4, 3
    gate = rand((E, F, D), torch.float32).to(device)
    up = rand((E, F, D), torch.float32).to(device)

    @torch.compile(fullgraph=True, backend="aot_eager")
    def roundtrip(gate, up):
        shards = [ops.expert_pack_fc1(gate, up, ep_size=2, ep_rank=r, etp_size=2, etp_rank=t)
                  for r in range(2) for t in range(2)]
        return ops.expert_unpack_fc1(shards, ep_size=2, etp_size=2)

    g2, u2 = roundtrip(gate, up)
    assert same(g2, gate) and same(u2, up)


def _lists(E=4, F=4, D=3):
    return ([rand((F, D), torch.float32) for _ in range(E)], [rand((F, D), torch.float32) for _ in range(E)])


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda g, u: ops.expert_pack_fc1(g, u, ep_size=3),
         r"expert_pack_fc1: number of experts E = 4 is not divisible by ep_size = 3"),
        (lambda g, u: ops.expert_pack_fc1(g, u, etp_size=3),
         r"expert_pack_fc1: F \(gate rows\) = 4 is not divisible by etp_size = 3"),
        (lambda g, u: ops.expert_pack_fc1(g, u, ep_size=2, ep_rank=2),
         r"expert_pack_fc1: ep_rank = 2 is out of range for ep_size = 2"),
        (lambda g, u: ops.expert_pack_fc1(g, u, etp_size=2, etp_rank=-1),
         r"expert_pack_fc1: etp_rank = -1 is out of range for etp_size = 2"),
        (lambda g, u: ops.expert_pack_fc1(g, u[:2]), r"expert_pack_fc1: up has 2 experts but gate has 4"),
        (lambda g, u: ops.expert_pack_fc1(g[:3] + [g[3][:2]], u),
         r"expert_pack_fc1: gate\[3\] is Float \[2, 3\] .* but gate\[0\] is Float \[4, 3\]"),
        (lambda g, u: ops.expert_pack_fc1(g, u, ep_size=2, out=torch.empty(2, 8, 4)),
         r"expert_pack_fc1_out: out has shape \[2, 8, 4\], expected \[2, 8, 3\]"),
        (lambda g, u: ops.expert_pack_fc2([x.t() for x in g], etp_size=3),
         r"expert_pack_fc2: F \(down columns\) = 4 is not divisible by etp_size = 3"),
        (lambda g, u: ops.expert_pack_fc2([x.t() for x in g], ep_size=2, ep_rank=1, out=torch.empty(2, 3, 3)),
         r"expert_pack_fc2_out: out has shape \[2, 3, 3\], expected \[2, 3, 4\]"),
        (lambda g, u: ops.expert_unpack_fc1([torch.empty(2, 4, 3)] * 3, ep_size=2, etp_size=2),
         r"expert_unpack_fc1: got 3 shards, expected ep_size\*etp_size = 4"),
        (lambda g, u: ops.expert_unpack_fc1([torch.empty(2, 4, 3)] * 3 + [torch.empty(2, 4, 2)], ep_size=2,
                                            etp_size=2),
         r"expert_unpack_fc1: shards\[3\] is Float \[2, 4, 2\] .* but shards\[0\] is Float \[2, 4, 3\]"),
        (lambda g, u: ops.expert_unpack_fc1([torch.empty(2, 4, 3)] * 4, ep_size=2, etp_size=2, out=(g[:3], u)),
         r"expert_unpack_fc1_out: gate has 3 tensors, expected E = 4"),
        (lambda g, u: ops.expert_unpack_fc1([torch.empty(2, 4, 3)] * 4, ep_size=2, etp_size=2,
                                            out=(g, [x[:, :2] for x in u])),
         r"expert_unpack_fc1_out: up\[0\] has shape \[4, 2\], expected \[4, 3\]"),
        (lambda g, u: ops.expert_unpack_fc2([torch.empty(2, 3, 2)] * 4, ep_size=2, etp_size=2, out=g),
         r"expert_unpack_fc2_out: down\[0\] has shape \[4, 3\], expected \[3, 4\]"),
    ],
)
def test_errors_name_the_values(call, match):
    gate, up = _lists()
    with pytest.raises(RuntimeError, match=match):
        call(gate, up)


def test_empty_lists_are_named():
    with pytest.raises(ValueError, match=r"expert_pack_fc1: gate is an empty list"):
        ops.expert_pack_fc1([], [])
    with pytest.raises(ValueError, match=r"expert_unpack_fc2: shards is an empty list"):
        ops.expert_unpack_fc2([], ep_size=1, etp_size=1)


# --------------------------------------------------------------------------------------------------------------------
# expert_pack_fc1_out.list / expert_pack_fc2_out.list: E/ep separate per-local-expert destinations (sequential
# experts), called through torch.ops directly (the Python wrapper lives in ops.py).
# --------------------------------------------------------------------------------------------------------------------

_LIST = torch.ops.bridge


def _outs(shapes, dtype, device, layouts):
    """One destination per local expert, each in its own (possibly non-contiguous) layout, filled with a sentinel."""
    outs = []
    for i, shape in enumerate(shapes):
        lay = layouts[i % len(layouts)]
        if len(shape) != 2 and lay in ("transposed", "col_slice"):
            lay = "row_strided"  # as_layout gives 1-D tensors a strided view; N-d: strided rows
        if len(shape) > 2:
            big = torch.zeros((shape[0] * 2, *shape[1:]), dtype=dtype, device=device)
            outs.append(big[1::2])
        else:
            outs.append(as_layout(torch.zeros(shape, dtype=dtype, device=device), lay))
    return outs


@pytest.mark.parametrize("ep,etp", [(1, 1), (2, 1), (1, 2), (2, 2), (4, 2), (2, 4)])
@pytest.mark.parametrize("trailing", [(), (5,), (3, 2)], ids=["1d", "2d", "3d"])
def test_fc1_out_list(device, ep, etp, trailing):
    E, F = 8, 8
    gate = [as_layout(rand((F, *trailing), torch.bfloat16), "row_strided").to(device) for _ in range(E)]
    up = [rand((F, *trailing), torch.bfloat16).to(device) for _ in range(E)]
    for r in range(ep):
        for t in range(etp):
            want = expert_fc1_shard(gate, up, ep, r, etp, t)
            strided = [x for x in LAYOUTS if x != "contiguous"]
            outs = _outs([want.shape[1:]] * (E // ep), torch.bfloat16, device, strided)
            assert not any(o.is_contiguous() for o in outs)
            assert _LIST.expert_pack_fc1_out.list(gate, up, ep, r, etp, t, outs) is None
            for e, o in enumerate(outs):
                assert same(o, want[e]), f"ep rank {r}, etp rank {t}, local expert {e}"
            # The same bytes as the stacked overload.
            stacked = torch.empty_like(want)
            _LIST.expert_pack_fc1_out.default(gate, up, ep, r, etp, t, stacked)
            assert same(torch.stack(outs), stacked)


@pytest.mark.parametrize("ep,etp", [(1, 1), (2, 1), (1, 2), (2, 2), (4, 2)])
@pytest.mark.parametrize("bias", [False, True])
def test_fc2_out_list(device, ep, etp, bias):
    E, D, F = 8, 5, 8
    shape = (D,) if bias else (D, F)
    down = [as_layout(rand(shape, torch.float16), "transposed").to(device) for _ in range(E)]
    for r in range(ep):
        for t in range(etp):
            want = expert_fc2_shard(down, ep, r, etp, t)
            outs = _outs([want.shape[1:]] * (E // ep), torch.float16, device, ["transposed", "col_slice", "contiguous"])
            _LIST.expert_pack_fc2_out.list(down, ep, r, etp, t, outs)
            for e, o in enumerate(outs):
                assert same(o, want[e]), f"ep rank {r}, etp rank {t}, local expert {e}"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_out_list_every_dtype(device, dtype):
    E, F, D, ep, etp = 4, 4, 3, 2, 2
    gate = [rand((F, D), dtype).to(device) for _ in range(E)]
    up = [rand((F, D), dtype).to(device) for _ in range(E)]
    down = [rand((D, F), dtype).to(device) for _ in range(E)]
    for r in range(ep):
        for t in range(etp):
            outs1 = _outs([(2 * F // etp, D)] * (E // ep), dtype, device, ["transposed", "row_strided"])
            _LIST.expert_pack_fc1_out.list(gate, up, ep, r, etp, t, outs1)
            assert same(torch.stack(outs1), expert_fc1_shard(gate, up, ep, r, etp, t))
            outs2 = _outs([(D, F // etp)] * (E // ep), dtype, device, ["col_slice", "transposed"])
            _LIST.expert_pack_fc2_out.list(down, ep, r, etp, t, outs2)
            assert same(torch.stack(outs2), expert_fc2_shard(down, ep, r, etp, t))


def test_out_list_fused_hf_into_sequential_experts(device):
    # A fused HF gate_up_proj [E, D, 2F] (transposed, interleaved) into per-expert parameters, as Megatron's
    # sequential experts hold them; destinations are views into one buffer with padding between experts.
    E, F, D, ep, etp = 8, 6, 5, 2, 3
    fused = rand((E, D, 2 * F), torch.bfloat16).to(device)
    gate, up = ops.expert_fc1_views(fused, interleaved=True, transposed=True)
    for r in range(ep):
        for t in range(etp):
            buf = torch.zeros(E // ep, 2 * F // etp + 1, D, dtype=torch.bfloat16, device=device)
            outs = [buf[e, 1:] for e in range(E // ep)]
            _LIST.expert_pack_fc1_out.list(gate, up, ep, r, etp, t, outs)
            assert same(buf[:, 1:], expert_fc1_shard(gate, up, ep, r, etp, t))
            assert not buf[:, 0].any()  # nothing written outside the destinations


def test_out_list_opcheck(device):
    """Schema (only out is mutated), fake kernel, autograd registration and dispatch of the .list overloads."""
    E, F, D = 4, 4, 3
    gate = [torch.randn(F, D, device=device) for _ in range(E)]
    up = [torch.randn(F, D, device=device) for _ in range(E)]
    down = [torch.randn(D, F, device=device) for _ in range(E)]
    torch.library.opcheck(_LIST.expert_pack_fc1_out.list,
                          (gate, up, 2, 1, 2, 0, [torch.empty(4, D, device=device) for _ in range(2)]))
    torch.library.opcheck(_LIST.expert_pack_fc2_out.list,
                          (down, 2, 0, 2, 1, [torch.empty(D, 2, device=device) for _ in range(2)]))


def test_out_list_through_the_wrapper(device):
    """ops.expert_pack_fc1/fc2 with a list ``out`` fill each local expert's own tensor."""
    E, F, D = 6, 4, 3
    gate, up = [rand((F, D), torch.float32).to(device) for _ in range(E)], [rand((F, D), torch.float32).to(device)
                                                                            for _ in range(E)]
    down = [rand((D, F), torch.float32).to(device) for _ in range(E)]
    outs = [torch.empty(2 * F // 2, D, device=device) for _ in range(E // 3)]
    assert ops.expert_pack_fc1(gate, up, ep_size=3, ep_rank=2, etp_size=2, etp_rank=1, out=outs) is outs
    assert same(torch.stack(outs), expert_fc1_shard(gate, up, 3, 2, 2, 1))
    outs = [torch.empty(D, F // 2, device=device) for _ in range(E // 3)]
    ops.expert_pack_fc2(down, ep_size=3, ep_rank=1, etp_size=2, etp_rank=0, out=outs)
    assert same(torch.stack(outs), expert_fc2_shard(down, 3, 1, 2, 0))


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda g, u, d: _LIST.expert_pack_fc1_out.list(g, u, 2, 0, 1, 0, [torch.empty(8, 3)] * 3),
         r"expert_pack_fc1_out\.list: out has 3 tensors, expected E/ep = 2"),
        (lambda g, u, d: _LIST.expert_pack_fc1_out.list(g, u, 2, 1, 2, 0, [torch.empty(4, 3), torch.empty(8, 3)]),
         r"expert_pack_fc1_out\.list: out\[1\] has shape \[8, 3\], expected \[4, 3\] \(one local expert's linear_fc1"
         r" shard \[2F/etp, \.\.\.\]\)"),
        (lambda g, u, d: _LIST.expert_pack_fc1_out.list(g, u, 1, 0, 1, 0, [torch.empty(8, 3)] * 3
                                                         + [torch.empty(8, 3, dtype=torch.half)]),
         r"expert_pack_fc1_out\.list: out\[3\] is Half on cpu but gate\[0\] is Float on cpu"),
        (lambda g, u, d: _LIST.expert_pack_fc1_out.list(g, u, 2, 2, 1, 0, [torch.empty(8, 3)] * 2),
         r"expert_pack_fc1_out\.list: ep_rank = 2 is out of range for ep_size = 2"),
        (lambda g, u, d: _LIST.expert_pack_fc1_out.list(g, u, 1, 0, 3, 0, [torch.empty(8, 3)] * 4),
         r"expert_pack_fc1_out\.list: F \(gate rows\) = 4 is not divisible by etp_size = 3"),
        (lambda g, u, d: _LIST.expert_pack_fc1_out.list(g, u[:3], 1, 0, 1, 0, [torch.empty(8, 3)] * 4),
         r"expert_pack_fc1_out\.list: up has 3 experts but gate has 4"),
        (lambda g, u, d: _LIST.expert_pack_fc2_out.list(d, 2, 0, 2, 1, [torch.empty(3, 2), torch.empty(3, 4)]),
         r"expert_pack_fc2_out\.list: out\[1\] has shape \[3, 4\], expected \[3, 2\] \(one local expert's linear_fc2"
         r" shard \[D, F/etp\]\)"),
        (lambda g, u, d: _LIST.expert_pack_fc2_out.list([x[:, 0] for x in d], 1, 0, 2, 1, [torch.empty(3, 1)] * 4),
         r"expert_pack_fc2_out\.list: out\[0\] has shape \[3, 1\], expected \[3\] \(one local expert's linear_fc2"
         r" bias \[D\]\)"),
        (lambda g, u, d: _LIST.expert_pack_fc2_out.list(d, 4, 0, 1, 0, []),
         r"expert_pack_fc2_out\.list: out has 0 tensors, expected E/ep = 1"),
        (lambda g, u, d: _LIST.expert_pack_fc2_out.list(d, 3, 0, 1, 0, [torch.empty(3, 4)]),
         r"expert_pack_fc2_out\.list: number of experts E = 4 is not divisible by ep_size = 3"),
    ],
)
def test_out_list_errors_name_the_values(call, match):
    gate, up = _lists()
    down = [x.t().contiguous() for x in gate]
    with pytest.raises(RuntimeError, match=match):
        call(gate, up, down)
