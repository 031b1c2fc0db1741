"""The Mamba-2 mixer mappings (``mappings.mamba``): each TP rank's tensor against a plain-torch reading of megatron's
layout (every component of ``[z; x; B; C; dt]`` / ``[x; B; C]`` chunked over TP on its own, the rank's pieces
concatenated: ``MambaMixer``'s ``partition_sizes``), the shards back to the HF tensor (torch.equal), the shape
contract (``megatron_shape`` / ``hf_shapes``) against what the conversions make, and the named refusals."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from megatron_bridge_ext.mappings import ConversionContext, MambaSplitMapping, shapes_of
from megatron_bridge_ext.mappings.mamba import CONV_PARTS, IN_PROJ_PARTS

NHEADS, HEAD_DIM, NGROUPS, STATE, HIDDEN, K = 8, 3, 4, 5, 16, 4
CONFIG = SimpleNamespace(mamba_num_heads=NHEADS, mamba_head_dim=HEAD_DIM, mamba_num_groups=NGROUPS,
                         mamba_state_dim=STATE)
D_INNER, GN = NHEADS * HEAD_DIM, NGROUPS * STATE


def _reference(hf: torch.Tensor, sizes, tp: int, r: int) -> torch.Tensor:
    return torch.cat([part.chunk(tp, 0)[r] for part in torch.split(hf, sizes, 0)], 0)


CASES = [
    ("in_proj", MambaSplitMapping("l.mixer.in_proj.weight", "in_proj", IN_PROJ_PARTS),
     (2 * D_INNER + 2 * GN + NHEADS, HIDDEN), [D_INNER, D_INNER, GN, GN, NHEADS]),
    ("conv1d_weight", MambaSplitMapping("l.mixer.conv1d_weight", "conv_w", CONV_PARTS), (D_INNER + 2 * GN, 1, K),
     [D_INNER, GN, GN]),
    ("conv1d_bias", MambaSplitMapping("l.mixer.conv1d_bias", "conv_b", CONV_PARTS), (D_INNER + 2 * GN,),
     [D_INNER, GN, GN]),
]


@pytest.mark.parametrize("tp", [1, 2, 4])
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_split_per_component_both_ways(case, tp):
    _, mapping, shape, sizes = case
    hf = torch.randn(*shape)
    shards = []
    for r in range(tp):
        ctx = ConversionContext(tp_size=tp, tp_rank=r, config=CONFIG)
        got = mapping.hf_to_megatron(hf, ctx)
        assert torch.equal(got, _reference(hf, sizes, tp, r)), r
        assert mapping.megatron_shape(shapes_of(hf), ctx) == tuple(got.shape)
        out = torch.full_like(got, float("nan"))
        assert mapping.hf_to_megatron(hf, ctx, out=out) is out and torch.equal(out, got)
        shards.append(got)
    ctx = ConversionContext(tp_size=tp, config=CONFIG)
    back = mapping.megatron_to_hf(shards, ctx)
    assert list(back) == [mapping.hf_param] and torch.equal(back[mapping.hf_param], hf)
    assert mapping.hf_shapes(tuple(shards[0].shape), tp, ctx) == {mapping.hf_param: tuple(hf.shape)}


def test_tp2_in_proj_rank_holds_its_half_of_every_component():
    """Rank 1 of 2 holds z[12:24], x[12:24], B[10:20], C[10:20], dt[4:8] of the HF rows, in that order (written out
    row by row, not through torch.split)."""
    rows = torch.arange(2 * D_INNER + 2 * GN + NHEADS, dtype=torch.float32).unsqueeze(1)
    got = CASES[0][1].hf_to_megatron(rows, ConversionContext(tp_size=2, tp_rank=1, config=CONFIG)).squeeze(1)
    z0, x0, b0, c0, dt0 = 0, D_INNER, 2 * D_INNER, 2 * D_INNER + GN, 2 * D_INNER + 2 * GN
    want = [*range(z0 + 12, z0 + 24), *range(x0 + 12, x0 + 24), *range(b0 + 10, b0 + 20), *range(c0 + 10, c0 + 20),
            *range(dt0 + 4, dt0 + 8)]
    assert got.tolist() == [float(v) for v in want]


def test_refusals_name_the_tensor_and_the_setting():
    mapping = CASES[0][1]
    with pytest.raises(ValueError, match=r"component B of in_proj has 20 rows, not divisible by "
                                         r"tensor_model_parallel_size = 3"):
        mapping.hf_to_megatron(torch.randn(2 * D_INNER + 2 * GN + NHEADS, HIDDEN),
                               ConversionContext(tp_size=3, tp_rank=0, config=CONFIG))
    with pytest.raises(ValueError, match=r"in_proj.weight: HF tensor in_proj has 10 rows, expected 96 = z 24 \+ x 24 "
                                         r"\+ B 20 \+ C 20 \+ dt 8"):
        mapping.megatron_shape((10, HIDDEN), ConversionContext(config=CONFIG))
    with pytest.raises(ValueError, match=r"mamba_state_dim=None"):
        mapping.megatron_shape((10, HIDDEN), ConversionContext(config=SimpleNamespace(
            mamba_num_heads=NHEADS, mamba_head_dim=HEAD_DIM, mamba_num_groups=NGROUPS, mamba_state_dim=None)))
