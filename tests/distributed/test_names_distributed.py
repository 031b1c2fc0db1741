"""gather_param_names on one world of 4 gloo ranks, checked on the world and on subgroups of 2 and 1 ranks.

The expected list is built independently on every rank: ``all_gather_object`` + a Python set + ``sorted`` by the
``re``-based key of conversion_semantics.md §5, ``((layer, expert), name)``.
"""

import itertools
import random
import re

import pytest

from megatron_bridge_ext.launch import spawn_local

_LAYER = re.compile(r"layers\.(\d+)", re.ASCII)
_EXPERT = re.compile(r"(?:bias|weight)(\d+)", re.ASCII)
_LOCAL_EXPERT = re.compile(r"local_experts\.(\d+)", re.ASCII)


def _ref_key(name):
    m = _LAYER.search(name)
    layer = int(m.group(1)) if m else -1
    m = _EXPERT.search(name) or _LOCAL_EXPERT.search(name)
    return (layer, int(m.group(1)) if m else -1), name


def _pp_stage_names(stage, stages, layers_per_stage=6, experts=64):
    """A PP stage's global names; embedding/output names are held by the first and last stages both (tied)."""
    names = []
    if stage in (0, stages - 1):
        names += ["embedding.word_embeddings.weight", "output_layer.weight"]
    if stage == stages - 1:
        names.append("decoder.final_layernorm.weight")
    for layer in range(stage * layers_per_stage, (stage + 1) * layers_per_stage):
        p = f"decoder.layers.{layer}"
        names += [f"{p}.self_attention.linear_qkv.weight", f"{p}.self_attention.linear_proj.weight",
                  f"{p}.self_attention.linear_qkv.layer_norm_weight", f"{p}.pre_mlp_layernorm.weight",
                  f"{p}.mlp.router.weight", f"{p}.mlp.router.expert_bias"]
        names += [f"{p}.mlp.experts.linear_fc{i}.weight{e}" for e in range(experts) for i in (1, 2)]
        if layer % 3 == 0:
            names += [f"{p}.mlp.experts.local_experts.{e}.linear_fc1.weight" for e in range(4)]
    return names


_ALPHABET = "abcxyz._0123456789éü日本語ß€ "


def _random_names(seed, count):
    """Random (unicode) names drawn from a small pool, so ranks overlap and lists hold duplicates."""
    rng = random.Random(seed)
    pool_rng = random.Random(1234)  # the same pool on every rank
    pool = ["".join(pool_rng.choice(_ALPHABET) for _ in range(pool_rng.randint(0, 24))) for _ in range(400)]
    pool += [f"decoder.layers.{i}.mlp.experts.linear_fc1.weight{i % 5}" for i in range(50)]
    return [rng.choice(pool) for _ in range(count)]


def _cases(rank, size):
    """(label, this rank's names) for one group; `rank` is the rank inside the group."""
    yield "pp_stages", _pp_stage_names(rank, size)
    yield "empty_on_odd_ranks", [] if rank % 2 else _pp_stage_names(rank, size, layers_per_stage=2, experts=8)
    yield "empty_everywhere", []
    yield "only_last_rank", _pp_stage_names(0, 1, layers_per_stage=1, experts=2) if rank == size - 1 else []
    yield "unicode_random", _random_names(seed=rank, count=300 + 100 * rank)
    yield "identical_on_all", ["décodeur.layers.1.w", "日本.layers.0.weight3", "a", "", "a"]


def _worker(rank, world):
    import torch
    import torch.distributed as dist

    from megatron_bridge_ext import ops

    torch.set_num_threads(1)
    # Every rank creates every group, in the same order.
    pairs = [dist.new_group([0, 1]), dist.new_group([2, 3])]
    singles = [dist.new_group([r]) for r in range(world)]
    groups = [("world", dist.group.WORLD), ("pair", pairs[rank // 2]), ("single", singles[rank])]
    checked = []
    for label, group in groups:
        size, grank = dist.get_world_size(group), dist.get_rank(group)
        for case, names in _cases(grank, size):
            got = ops.gather_param_names(names, group)
            gathered = [None] * size
            dist.all_gather_object(gathered, names, group=group)
            expected = sorted(set(itertools.chain.from_iterable(gathered)), key=_ref_key)
            if got != expected:
                first = next((i for i, (a, b) in enumerate(zip(got, expected)) if a != b), min(len(got), len(expected)))
                raise AssertionError(f"{label} (size {size}) case {case}: {len(got)} names vs {len(expected)} "
                                     f"expected; first difference at {first}: {got[first:first + 3]} vs "
                                     f"{expected[first:first + 3]}")
            everyone = [None] * size
            dist.all_gather_object(everyone, got, group=group)
            if any(other != got for other in everyone):
                raise AssertionError(f"{label} case {case}: ranks of the group got different lists")
            checked.append((label, size, case, len(got)))
    # A staging device that is neither CPU nor CUDA is refused before any collective, naming the group.
    name = dist.group.WORLD.group_name
    try:
        torch.ops.bridge.gather_param_names(["x"], name, torch.device("meta"))
    except RuntimeError as e:
        assert f"'{name}'" in str(e) and "meta" in str(e), str(e)
    else:
        raise AssertionError("gather_param_names accepted a meta staging device")
    if not torch.cuda.is_available():  # staging on a device this torch lacks fails on every rank, naming the group
        try:
            torch.ops.bridge.gather_param_names(["x"], name, torch.device("cuda", 0))
        except RuntimeError as e:
            assert f"process group '{name}' (backend gloo" in str(e), str(e)
        else:
            raise AssertionError("gather_param_names staged on CUDA without CUDA")
    return checked


def test_gather_param_names_world_pairs_singles():
    results = spawn_local(_worker, 4, timeout=300)
    for rank, checked in enumerate(results):
        sizes = sorted({size for _, size, _, _ in checked})
        assert sizes == [1, 2, 4], (rank, sizes)
        assert len(checked) == 3 * 6, (rank, checked)
        by_case = {(label, case): n for label, _, case, n in checked}
        # The world's PP-stage list: 4 stages x 6 layers x (6 + 128 experts) + 4 sequential per 3rd layer + 3 shared.
        assert by_case[("world", "pp_stages")] == 24 * (6 + 128) + 8 * 4 + 3
        assert by_case[("world", "empty_everywhere")] == 0
    # The world's ranks agree on every case's length (the lists themselves were compared inside the world).
    assert len({tuple(c for c in checked if c[0] == "world") for checked in results}) == 1
