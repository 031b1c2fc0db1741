"""bridge::shard_copy and bridge::flat_range_copy against plain torch (chunk / flatten) in one process.

The comparison with real DTensors (distribute_tensor) on gloo worlds is in tests/distributed/.
"""

from __future__ import annotations

import pytest
import torch
from conftest import DTYPES, LAYOUTS, as_layout, empty_layout, rand
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from reference import flat_range, local_shard, same

from megatron_bridge_ext import ops

HYP = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@st.composite
def _shard_case(draw):
    ndim = draw(st.integers(1, 3))
    shape = tuple(draw(st.integers(0, 7)) for _ in range(ndim))
    mdims = draw(st.integers(1, 3))
    mesh = [draw(st.integers(1, 4)) for _ in range(mdims)]
    coord = [draw(st.integers(0, m - 1)) for m in mesh]
    shard_dims = [draw(st.integers(-1, ndim - 1)) for _ in range(mdims)]
    return shape, mesh, coord, shard_dims


@HYP
@given(case=_shard_case(), transposed=st.booleans(), dtype=st.sampled_from([torch.bfloat16, torch.int8, torch.float64]),
       seed=st.integers(0, 2**31))
def test_shard_copy_random(device, case, transposed, dtype, seed):
    shape, mesh, coord, shard_dims = case
    src = rand(shape, dtype, gen=torch.Generator().manual_seed(seed)).to(device)
    if transposed and src.dim() >= 2:
        src = src.transpose(0, -1).contiguous().transpose(0, -1)
    want = local_shard(src, mesh, coord, shard_dims)
    dst = torch.zeros(want.shape, dtype=dtype, device=device)
    assert ops.shard_copy(src, dst, mesh_shape=mesh, mesh_coord=coord, shard_dims=shard_dims) is dst
    assert same(dst, want)


@pytest.mark.parametrize(
    "shape,mesh,shard_dims",
    [
        ((10, 6), [4], [0]),            # uneven: chunks 3, 3, 3, 1
        ((5, 6), [4], [0]),             # uneven with an empty trailing chunk
        ((7, 9), [2, 2], [0, 0]),       # same dim sharded twice (nested chunking)
        ((7, 9), [2, 2], [1, 0]),
        ((7, 9), [2, 3], [-1, 1]),      # replicate then shard
        ((3, 4, 5), [2, 2, 2], [2, 0, 2]),
    ],
)
def test_shard_copy_cases(device, shape, mesh, shard_dims):
    src = rand(shape, torch.float32).to(device)
    coords = torch.cartesian_prod(*[torch.arange(m) for m in mesh]).reshape(-1, len(mesh)).tolist()
    for coord in coords:
        want = local_shard(src, mesh, coord, shard_dims)
        dst = empty_layout(want.shape, src.dtype, device, "transposed") if want.dim() == 2 else torch.empty_like(want)
        ops.shard_copy(src, dst, mesh_shape=mesh, mesh_coord=coord, shard_dims=shard_dims)
        assert same(dst, want), coord


def test_shard_copy_large_parallel(device):
    src = rand((1030, 700), torch.bfloat16).to(device)
    for layout in ("contiguous", "transposed"):
        s = as_layout(src, layout)
        for coord in range(3):
            want = local_shard(s, [3], [coord], [1])
            dst = torch.empty(want.shape, dtype=s.dtype, device=device)
            ops.shard_copy(s, dst, mesh_shape=[3], mesh_coord=[coord], shard_dims=[1])
            assert same(dst, want)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_every_dtype(device, dtype):
    src = rand((9, 4), dtype).to(device)
    dst = torch.empty((3, 2), dtype=dtype, device=device)
    ops.shard_copy(src, dst, mesh_shape=[3, 2], mesh_coord=[1, 1], shard_dims=[0, 1])
    assert same(dst, src[3:6, 2:4])
    flat = torch.empty(7, dtype=dtype, device=device)
    ops.flat_range_copy(src.t(), flat, 5)
    assert same(flat, src.t().reshape(-1)[5:12])


@HYP
@given(
    src_shape=st.lists(st.integers(1, 6), min_size=1, max_size=3), src_layout=st.sampled_from(LAYOUTS),
    dst_layout=st.sampled_from(LAYOUTS), dst_cols=st.integers(1, 5), frac=st.floats(0, 1), seed=st.integers(0, 2**31),
)
def test_flat_range_copy_random(device, src_shape, src_layout, dst_layout, dst_cols, frac, seed):
    src = rand(src_shape, torch.float16, gen=torch.Generator().manual_seed(seed))
    if src.dim() == 2:
        src = as_layout(src, src_layout)
    elif src.dim() == 3 and src_layout != "contiguous":
        src = src.permute(2, 0, 1).contiguous().permute(1, 2, 0)
    src = src.to(device)
    total = src.numel()
    n = int(frac * total)
    rows = n // dst_cols
    dst_shape = (rows, dst_cols) if rows else (n,)
    start = int((total - rows * dst_cols if rows else total - n) * frac)
    dst = empty_layout(dst_shape, src.dtype, device, dst_layout) if len(dst_shape) == 2 else torch.empty(n, dtype=src.dtype, device=device)
    assert ops.flat_range_copy(src, dst, start) is dst
    assert same(dst, flat_range(src, start, dst_shape))


def test_flat_range_copy_large_parallel(device):
    src = rand((600, 900), torch.float32).to(device)
    for s in (src, src.t()):
        dst = torch.empty(170, 2000, device=device)
        ops.flat_range_copy(s, dst, 12345)
        assert same(dst, flat_range(s, 12345, (170, 2000)))
        dst_t = torch.empty(2000, 170, device=device).t()
        ops.flat_range_copy(s, dst_t, 777)
        assert same(dst_t, flat_range(s, 777, (170, 2000)))


def test_opcheck(device):
    src = torch.randn(6, 4).to(device)
    lib = torch.ops.bridge
    torch.library.opcheck(lib.shard_copy.default, (src, torch.empty(3, 2, device=device), [2, 2], [1, 0], [0, 1]))
    torch.library.opcheck(lib.shard_copy.default, (src, torch.empty(6, 4, device=device), [2], [1], [-1]))
    torch.library.opcheck(lib.flat_range_copy.default, (src, torch.empty(2, 5, device=device), 3))
    torch.library.opcheck(lib.flat_range_copy.default, (src.t(), torch.empty(7, device=device), 0))


def test_torch_compile_fullgraph(device):
    src = rand((6, 4), torch.float32).to(device)

    @torch.compile(fullgraph=True, backend="aot_eager")
    def f(src):
        dst = torch.empty(3, 4, device=src.device)
        ops.shard_copy(src, dst, mesh_shape=[2], mesh_coord=[1], shard_dims=[0])
        flat = torch.empty(5, device=src.device)
        ops.flat_range_copy(src, flat, 2)
        return dst, flat

    dst, flat = f(src)
    assert same(dst, src[3:]) and same(flat, src.reshape(-1)[2:7])


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda s: ops.shard_copy(s, torch.empty(3, 4), mesh_shape=[2], mesh_coord=[2], shard_dims=[0]),
         r"shard_copy: mesh_coord\[0\] = 2 is out of range for mesh_shape\[0\] = 2"),
        (lambda s: ops.shard_copy(s, torch.empty(3, 4), mesh_shape=[2], mesh_coord=[0], shard_dims=[2]),
         r"shard_copy: shard_dims\[0\] = 2 is out of range for a 2-d tensor"),
        (lambda s: ops.shard_copy(s, torch.empty(3, 4), mesh_shape=[2, 2], mesh_coord=[0], shard_dims=[0, 1]),
         r"shard_copy: mesh_shape \[2, 2\], mesh_coord \[0\] and shard_dims \[0, 1\] must have the same length"),
        (lambda s: ops.shard_copy(s, torch.empty(3, 3), mesh_shape=[2], mesh_coord=[1], shard_dims=[0]),
         r"shard_copy: dst has shape \[3, 3\] but the shard of src \[6, 4\] at mesh_coord \[1\] .* has shape \[3, 4\]"),
        (lambda s: ops.shard_copy(s, torch.empty(3, 4, dtype=torch.half), mesh_shape=[2], mesh_coord=[1],
                                  shard_dims=[0]),
         r"shard_copy: dst has dtype Half but src has dtype Float"),
        (lambda s: ops.flat_range_copy(s, torch.empty(5), 20),
         r"flat_range_copy: range \[20, 25\) .* is beyond src.numel\(\) = 24"),
        (lambda s: ops.flat_range_copy(s, torch.empty(5), -1), r"flat_range_copy: range \[-1, 4\)"),
        (lambda s: ops.flat_range_copy(s, torch.empty(5, dtype=torch.int32), 0),
         r"flat_range_copy: dst has dtype Int but src has dtype Float"),
    ],
)
def test_errors_name_the_values(call, match):
    with pytest.raises(RuntimeError, match=match):
        call(rand((6, 4), torch.float32))


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", [torch.int8, torch.bfloat16, torch.float32, torch.complex128], ids=str)
def test_copy_engine_task_splitting(device, layout, dtype):
    # Copies well above one task (1 MiB) in every pair shape the engine splits differently: whole contiguous blocks,
    # row runs, square blocks of transposed tiles with ragged edges, and a long strided 1-D run.
    es = torch.empty((), dtype=dtype).element_size()
    rows, cols = 1100, (3 << 20) // (1100 * es) + 7
    src = as_layout(rand((rows, cols), dtype), layout).to(device)
    for dst_layout in ("contiguous", "transposed"):
        dst = empty_layout((rows, cols), dtype, device, dst_layout)
        ops.shard_copy(src, dst, mesh_shape=[1], mesh_coord=[0], shard_dims=[0])
        assert same(dst, src), dst_layout
    flat = as_layout(rand(((3 << 20) // es,), dtype), layout).to(device)
    out = torch.empty_like(flat)
    ops.shard_copy(flat, out, mesh_shape=[2], mesh_coord=[0], shard_dims=[-1])
    assert same(out, flat)
