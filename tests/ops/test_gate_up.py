"""bridge::gate_up_pack / gate_up_unpack (and _out, interleaved / transposed HF layouts) against the reference."""

from __future__ import annotations

import pytest
import torch
from conftest import DTYPES, LAYOUTS, as_layout, empty_layout, rand
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from reference import gate_up_gathered, gate_up_shard, gate_up_split, same

from megatron_bridge_ext import ops

HYP = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def _check_all_ranks(gate, up, tp):
    shards = []
    for t in range(tp):
        got = ops.gate_up_pack(gate, up, tp_size=tp, tp_rank=t)
        assert same(got, gate_up_shard(gate, up, tp, t)), f"tp rank {t} of {tp}"
        shards.append(got)
    packed = torch.cat(shards, 0)
    assert same(packed, gate_up_gathered(gate, up, tp))
    g2, u2 = ops.gate_up_unpack(packed, tp_size=tp)
    assert same(g2, gate) and same(u2, up)


@HYP
@given(
    f=st.integers(1, 6), tp=st.integers(1, 8), D=st.integers(0, 9), layout=st.sampled_from(LAYOUTS),
    dtype=st.sampled_from([torch.bfloat16, torch.float32, torch.float8_e5m2, torch.int8]), seed=st.integers(0, 2**31),
)
def test_pack_unpack_random(device, f, tp, D, layout, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    F = f * tp
    shape = (F, D) if D else (F,)
    gate = as_layout(rand(shape, dtype, gen=gen), layout).to(device)
    up = as_layout(rand(shape, dtype, gen=gen), layout).to(device)
    _check_all_ranks(gate, up, tp)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_every_dtype(device, dtype):
    gate, up = rand((12, 5), dtype).to(device), rand((12, 5), dtype).to(device)
    _check_all_ranks(gate, up, 3)


@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("tp", [1, 2, 4, 8])
def test_fused_hf_layouts(device, interleaved, transposed, tp):
    F, D = 16, 24
    hf = rand((D, 2 * F) if transposed else (2 * F, D), torch.bfloat16).to(device)
    x = hf.t() if transposed else hf
    gate, up = (x[0::2], x[1::2]) if interleaved else (x[:F], x[F:])
    shards = []
    for t in range(tp):
        got = ops.gate_up_pack_fused(hf, tp_size=tp, tp_rank=t, interleaved=interleaved, transposed=transposed)
        assert same(got, gate_up_shard(gate, up, tp, t))
        shards.append(got)
    back = ops.gate_up_unpack_fused(torch.cat(shards), tp_size=tp, interleaved=interleaved, transposed=transposed)
    assert same(back, hf)


def test_fused_bias_interleaved(device):
    b = rand((20,), torch.float16).to(device)
    for t in range(2):
        assert same(ops.gate_up_pack_fused(b, tp_size=2, tp_rank=t, interleaved=True),
                    gate_up_shard(b[0::2], b[1::2], 2, t))


@pytest.mark.parametrize("layout", LAYOUTS)
def test_out_variants_strided(device, layout):
    F, D, tp = 8, 6, 2
    gate, up = rand((F, D), torch.float32).to(device), rand((F, D), torch.float32).to(device)
    for t in range(tp):
        out = empty_layout((2 * F // tp, D), torch.float32, device, layout)
        assert ops.gate_up_pack(gate, up, tp_size=tp, tp_rank=t, out=out) is out
        assert same(out, gate_up_shard(gate, up, tp, t))
    packed = gate_up_gathered(gate, up, tp)
    g2, u2 = empty_layout((F, D), torch.float32, device, layout), empty_layout((F, D), torch.float32, device, layout)
    ops.gate_up_unpack(packed, tp_size=tp, out=(g2, u2))
    want_g, want_u = gate_up_split(packed, tp)
    assert same(g2, want_g) and same(u2, want_u) and same(g2, gate)


def test_large_transposed_tiles(device):
    # Bigger than one task and one tile so the parallel, tiled path runs (including ragged tile edges).
    F, D = 700, 333
    hf = rand((D, 2 * F), torch.bfloat16).to(device)
    gate, up = ops.gate_up_views(hf, transposed=True)
    got = ops.gate_up_pack(gate, up, tp_size=2, tp_rank=1)
    assert same(got, gate_up_shard(gate, up, 2, 1))
    back = ops.gate_up_unpack_fused(ops.gate_up_pack(gate, up), transposed=True)
    assert same(back, hf)


def test_opcheck(device):
    gate, up = torch.randn(8, 3).to(device), torch.randn(8, 3).to(device)
    lib = torch.ops.bridge
    torch.library.opcheck(lib.gate_up_pack.default, (gate, up, 2, 1))
    torch.library.opcheck(lib.gate_up_pack_out.default, (gate, up, 4, 3, torch.empty(4, 3, device=device)))
    packed = gate_up_gathered(gate, up, 2)
    torch.library.opcheck(lib.gate_up_unpack.default, (packed, 2))
    torch.library.opcheck(lib.gate_up_unpack_out.default, (packed, 2, torch.empty_like(gate), torch.empty_like(up)))


def test_torch_compile_fullgraph(device):
    gate, up = rand((8, 3), torch.float32).to(device), rand((8, 3), torch.float32).to(device)

    @torch.compile(fullgraph=True, backend="aot_eager")
    def roundtrip(gate, up):
        shards = [ops.gate_up_pack(gate, up, tp_size=2, tp_rank=t) for t in range(2)]
        return ops.gate_up_unpack(torch.cat(shards), tp_size=2)

    g2, u2 = roundtrip(gate, up)
    assert same(g2, gate) and same(u2, up)


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda g, u: ops.gate_up_pack(g, u, tp_size=3), r"gate_up_pack: F \(gate rows\) = 8 is not divisible by tp_size = 3"),
        (lambda g, u: ops.gate_up_pack(g, u, tp_size=2, tp_rank=5), r"gate_up_pack: tp_rank = 5 is out of range for tp_size = 2"),
        (lambda g, u: ops.gate_up_pack(g, u[:6]), r"gate_up_pack: up has 6 rows but gate has 8"),
        (lambda g, u: ops.gate_up_pack(g, u[:, :2]), r"gate_up_pack: up has shape \[8, 2\] but gate has shape \[8, 3\]"),
        (lambda g, u: ops.gate_up_pack(g, u.half()), r"gate_up_pack: up has dtype Half but gate has dtype Float"),
        (lambda g, u: ops.gate_up_pack(g, u, tp_size=2, out=torch.empty(4, 3)),
         r"gate_up_pack_out: out has shape \[4, 3\], expected \[8, 3\]"),
        (lambda g, u: ops.gate_up_unpack(torch.empty(10, 3), tp_size=2),
         r"gate_up_unpack: packed rows = 10 is not divisible by 2\*tp_size = 4"),
        (lambda g, u: ops.gate_up_unpack(torch.empty(16, 3), tp_size=2, out=(torch.empty(8, 3), torch.empty(7, 3))),
         r"gate_up_unpack_out: up has 7 rows .*expected packed rows / 2 = 8"),
    ],
)
def test_errors_name_the_values(call, match):
    gate, up = rand((8, 3), torch.float32), rand((8, 3), torch.float32)
    with pytest.raises(RuntimeError, match=match):
        call(gate, up)
