"""gather_param_names vs the reference path (all_gather_object + set + sorted by a regex key) on a local gloo world.

~100,000 Megatron MoE parameter names are spread over the ranks as pipeline stages hold them (contiguous layers; the
embedding and output layer on the first and last stages). Every rank times both paths in the same run; the median of
``--repeat`` runs on rank 0 is printed with the ratio. ``--check`` (default on) verifies the two lists are equal.

    GLOO_SOCKET_IFNAME=lo PYTHONPATH=. python benchmarks/bench_names.py [--names 100000] [--ranks 4]
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import sys
import time
from typing import List, Tuple

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))  # run from a checkout too

from megatron_bridge_ext.launch import spawn_local  # noqa: E402

_LAYER = re.compile(r"layers\.(\d+)")
_EXPERT = re.compile(r"(?:bias|weight)(\d+)")
_LOCAL_EXPERT = re.compile(r"local_experts\.(\d+)")


def ref_sort_key(name: str) -> Tuple[Tuple[int, int], str]:
    """The reference ordering key ``((layer, expert), name)`` of conversion_semantics.md §5."""
    m = _LAYER.search(name)
    layer = int(m.group(1)) if m else -1
    m = _EXPERT.search(name) or _LOCAL_EXPERT.search(name)
    return (layer, int(m.group(1)) if m else -1), name


def _layer_names(layer: int, experts: int) -> List[str]:
    p = f"decoder.layers.{layer}"
    names = [f"{p}.{s}" for s in (
        "self_attention.linear_qkv.weight", "self_attention.linear_qkv.layer_norm_weight",
        "self_attention.linear_proj.weight", "self_attention.q_layernorm.weight", "self_attention.k_layernorm.weight",
        "pre_mlp_layernorm.weight", "mlp.router.weight", "mlp.router.expert_bias",
        "mlp.shared_experts.linear_fc1.weight", "mlp.shared_experts.linear_fc2.weight")]
    names += [f"{p}.mlp.experts.linear_fc{i}.weight{e}" for i in (1, 2) for e in range(experts)]
    return names


def stage_names(stage: int, stages: int, total: int, experts: int) -> List[str]:
    """PP stage ``stage``'s global names out of a model with about ``total`` names."""
    per_layer = len(_layer_names(0, experts))
    layers = max(stages, round(total / per_layer))
    lo, hi = stage * layers // stages, (stage + 1) * layers // stages
    names = []
    if stage == 0:
        names += ["embedding.word_embeddings.weight"]
    if stage == stages - 1:
        names += ["decoder.final_layernorm.weight", "output_layer.weight", "embedding.word_embeddings.weight"]
    for layer in range(lo, hi):
        names += _layer_names(layer, experts)
    return names


def _reference(names: List[str], group) -> List[str]:
    import torch.distributed as dist

    gathered = [None] * dist.get_world_size(group)
    dist.all_gather_object(gathered, names, group=group)
    return sorted(set(sum(gathered, [])), key=ref_sort_key)


def _worker(rank: int, world: int, total: int, experts: int, repeat: int, check: bool):
    import torch.distributed as dist

    from megatron_bridge_ext import ops

    names = stage_names(rank, world, total, experts)
    group = dist.group.WORLD
    if check:
        got, ref = ops.gather_param_names(names, group), _reference(names, group)
        if got != ref:
            raise AssertionError(f"rank {rank}: op gives {len(got)} names, reference {len(ref)}")
    times = {"op": [], "ref": []}
    for _ in range(repeat):
        paths = (("op", lambda: ops.gather_param_names(names, group)), ("ref", lambda: _reference(names, group)))
        for label, fn in paths:
            dist.barrier()
            t0 = time.perf_counter()
            out = fn()
            times[label].append(time.perf_counter() - t0)
    return len(names), len(out), times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--names", type=int, default=100_000, help="approximate total number of names")
    parser.add_argument("--experts", type=int, default=256, help="grouped experts per layer")
    parser.add_argument("--ranks", type=int, default=4, help="gloo ranks (PP stages)")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--no-check", dest="check", action="store_false")
    args = parser.parse_args()
    results = spawn_local(_worker, args.ranks, (args.names, args.experts, args.repeat, args.check), timeout=600)
    held = [r[0] for r in results]
    unique = results[0][1]
    # A rank's time is the time until it holds the list; the slowest rank bounds the step.
    op = statistics.median(max(r[2]["op"][i] for r in results) for i in range(args.repeat))
    ref = statistics.median(max(r[2]["ref"][i] for r in results) for i in range(args.repeat))
    print(f"names held per rank {held} -> {unique} unique names on {args.ranks} gloo ranks"
          f"{' (checked equal)' if args.check else ''}")
    print(f"gather_param_names            median {op * 1e3:9.2f} ms")
    print(f"all_gather_object+set+sorted  median {ref * 1e3:9.2f} ms")
    print(f"speedup {ref / op:.1f}x")


if __name__ == "__main__":
    main()
