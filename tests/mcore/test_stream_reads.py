"""The streamed export's direct reads of factory pieces (``mcore.stream._concatenated_rows``): a sharded-tensor
factory whose merge puts its pieces one after the other along the first axis is read straight into the rows of one
tensor, instead of reading each piece and running the merge. The reference is megatron-core's own merge function run
on the same random pieces; merges that are not such a concatenation must fall back to megatron-core's merge."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("megatron.core")

from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory  # noqa: E402
from megatron.core.transformer.mlp import apply_swiglu_sharded_factory  # noqa: E402

from megatron_bridge_ext.mcore.stream import _concatenated_rows  # noqa: E402


def _ckpt(*keys: str, dtype: torch.dtype = torch.bfloat16) -> SimpleNamespace:
    """What ``_concatenated_rows`` reads of an open checkpoint: the stored dtype of each key."""
    return SimpleNamespace(tensors={k: SimpleNamespace(dtype=dtype) for k in keys})


def _merge_of_real_pieces(factory: ShardedTensorFactory, values: dict) -> torch.Tensor:
    """megatron-core's own merge of the factory's pieces, each given the random value ``values[id(piece)]``."""
    from megatron.core.dist_checkpointing.dict_utils import dict_list_map_outplace

    pieces = factory.build()
    return factory.merge_fn(dict_list_map_outplace(
        lambda x: values[x.key, tuple(x.global_offset)] if isinstance(x, ShardedTensor) else x, pieces))


@pytest.mark.parametrize("singleton", [False, True], ids=["one-key", "w-v-keys"])
@pytest.mark.parametrize("layer_axis", [False, True], ids=["plain", "layer-stacked"])
def test_swiglu_fc1_is_read_into_rows_as_megatron_merges_it(singleton, layer_axis):
    ffn, hidden = 12, 8
    offsets = ((0, 3, 5),) if layer_axis else ()
    param = torch.empty(2 * ffn, hidden, dtype=torch.bfloat16)
    sh = ShardedTensor.from_rank_offsets("decoder.layers.mlp.linear_fc1.weight", param, *offsets, (len(offsets), 0, 1))
    factory = apply_swiglu_sharded_factory(sh, offsets, singleton_local_shards=singleton)
    pieces = factory.build()
    keys = {p.key for p in (pieces if isinstance(pieces, list) else pieces.values())}
    rows = _concatenated_rows(factory, pieces, _ckpt(*keys), {})
    assert rows is not None and [(start, n) for _, start, n in rows] == [(0, ffn), (ffn, ffn)]
    # the rows' reading equals megatron-core's merge of the same random pieces
    g = torch.Generator().manual_seed(0)
    values = {(p.key, tuple(p.global_offset)): torch.randn(p.local_shape, generator=g).to(torch.bfloat16)
              for p, _, _ in rows}
    into = torch.empty_like(param)
    for p, start, n in rows:
        into.narrow(0, start, n).copy_(values[p.key, tuple(p.global_offset)])
    assert torch.equal(into, _merge_of_real_pieces(factory, values))


def _factory(merge, n_pieces: int = 2, rows: int = 4, cols: int = 3) -> ShardedTensorFactory:
    param = torch.empty(n_pieces * rows, cols)

    def build(key, t, replica_id, flattened_range):
        return [ShardedTensor.from_rank_offsets(f"{key}.{i}", part) for i, part in enumerate(t.chunk(n_pieces))]

    return ShardedTensorFactory("w", param, build, merge, replica_id=0)


@pytest.mark.parametrize("merge", [
    lambda parts: torch.stack(parts, dim=1).flatten(0, 1),  # rows interleaved
    lambda parts: torch.cat(parts[::-1]),  # pieces in the other order
    lambda parts: torch.cat([parts[0] * 2, parts[1]]),  # arithmetic
    lambda parts: torch.cat([p.add_(0) for p in parts]),  # needs writable data: fails on the stand-ins
], ids=["interleaved", "reversed", "scaled", "in-place"])
def test_other_merges_run_as_megatron_runs_them(merge):
    factory = _factory(merge)
    assert _concatenated_rows(factory, factory.build(), _ckpt("w.0", "w.1", dtype=torch.float32), {}) is None


def test_pieces_of_two_stored_dtypes_are_not_read_into_rows():
    factory = _factory(lambda parts: torch.cat(parts))
    ckpt = SimpleNamespace(tensors={"w.0": SimpleNamespace(dtype=torch.float32),
                                    "w.1": SimpleNamespace(dtype=torch.bfloat16)})
    assert _concatenated_rows(factory, factory.build(), ckpt, {}) is None
    assert _concatenated_rows(factory, factory.build(), _ckpt("w.0", "w.1", dtype=torch.float32), {}) is not None


def test_the_check_is_kept_per_closure_values():
    """Two merges of one function whose captured values differ are checked apart (a cached answer of one must not
    serve the other)."""
    def make(order):
        def merge(parts):
            return torch.cat([parts[i] for i in order])
        return merge

    probes: dict = {}
    straight, swapped = _factory(make((0, 1))), _factory(make((1, 0)))
    assert _concatenated_rows(straight, straight.build(), _ckpt("w.0", "w.1", dtype=torch.float32), probes)
    assert _concatenated_rows(swapped, swapped.build(), _ckpt("w.0", "w.1", dtype=torch.float32), probes) is None
