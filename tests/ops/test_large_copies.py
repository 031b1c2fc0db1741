"""Large jobs take the vector store paths of the CPU copy engine: non-temporal stores into resident destinations
(>= 32 MiB) and plain vector stores into untouched ones (>= 1 MiB, e.g. a fresh allocation or a parameter megatron
allocated without initialising it). Check both against the plain-torch references with odd sizes and misaligned
destinations, so heads and tails are exercised."""

import pytest
import torch

import megatron_bridge_ext  # noqa: F401
from megatron_bridge_ext import ops
import reference as ref


def _rand(shape, dtype):
    return torch.randint(-(2**15), 2**15, shape, dtype=torch.int16).view(dtype) if dtype.itemsize == 2 else \
        torch.randint(0, 255, shape, dtype=torch.uint8).view(dtype)


@pytest.mark.parametrize("resident", [True, False], ids=["resident", "untouched"])
@pytest.mark.parametrize("F", [2 * 1031, 2 * 131], ids=["over32MiB", "1to32MiB"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.uint8])
def test_large_gate_up_pack_misaligned_destination(dtype, F, resident):
    D = 4099 * (2 if dtype.itemsize == 1 else 1)  # odd row length
    gate, up = _rand((F, D), dtype), _rand((F, D), dtype)
    for tp, t in ((1, 0), (2, 1)):
        want = ref.gate_up_shard(gate, up, tp, t)
        backing = torch.empty(want.numel() + 3, dtype=dtype)  # destination starts 3 elements into its storage
        if resident:
            backing.fill_(7)  # every page touched: the non-temporal path (or memcpy under 32 MiB)
        out = backing[3:].view(want.shape)
        ops.gate_up_pack(gate, up, tp_size=tp, tp_rank=t, out=out)
        assert ref.same(out, want)
        if resident:  # the elements in front of the destination are left alone
            assert ref.same(backing[:3], torch.full((3,), 7, dtype=dtype))


def test_large_qkv_round_trip():
    H, G, d, D = 32, 8, 128, 4099
    q, k, v = _rand((H * d, D), torch.bfloat16), _rand((G * d, D), torch.bfloat16), _rand((G * d, D), torch.bfloat16)
    want = ref.qkv_full(q, k, v, H, G, d)
    assert want.numel() * 2 >= 32 << 20
    packed = ops.qkv_pack(q, k, v, num_heads=H, num_query_groups=G, head_dim=d)  # fresh output
    assert ref.same(packed, want)
    resident = torch.full_like(want, 3.0)  # every page touched
    assert ref.same(ops.qkv_pack(q, k, v, num_heads=H, num_query_groups=G, head_dim=d, out=resident), want)
    q2, k2, v2 = ops.qkv_unpack(packed, num_heads=H, num_query_groups=G, head_dim=d)
    assert ref.same(q2, q) and ref.same(k2, k) and ref.same(v2, v)


def test_large_expert_fc2_column_shards():
    E, D, F = 36, 1027, 1030  # 36 MiB per (ep, etp) shard
    down = [_rand((D, F), torch.bfloat16) for _ in range(E)]
    for ep, r, etp, t in ((1, 0, 2, 1), (2, 1, 1, 0)):
        want = ref.expert_fc2_shard(down, ep, r, etp, t)
        got = ops.expert_pack_fc2(down, ep_size=ep, ep_rank=r, etp_size=etp, etp_rank=t)  # fresh output
        assert ref.same(got, want)
        resident = torch.full_like(want, 3.0)
        assert ref.same(ops.expert_pack_fc2(down, ep_size=ep, ep_rank=r, etp_size=etp, etp_rank=t, out=resident), want)
