"""Setting up several megatron layouts in one process does not accumulate process groups or their threads:
``destroy_parallel`` destroys the groups ``init_parallel`` created (megatron-core only forgets them), and keeps the
default group and groups the caller made before."""

from __future__ import annotations

import os

import pytest

pytest.importorskip("megatron.core")


def _worker(rank: int, world: int):
    import torch.distributed as dist
    from torch.distributed import distributed_c10d as c10d

    from megatron_bridge_ext.mcore.model_builder import destroy_parallel, init_parallel

    mine = dist.new_group([0, 1])  # the caller's own group: kept
    groups0 = len(c10d._world.pg_map)
    counts = []
    for layout in [dict(tp=2, pp=1), dict(tp=1, pp=2), dict(tp=1, pp=1, ep=2)] * 3:
        init_parallel(**layout)
        dist.barrier()
        destroy_parallel()
        counts.append((len(c10d._world.pg_map), len(os.listdir(f"/proc/{os.getpid()}/task"))))
    dist.all_reduce(__import__("torch").ones(1), group=mine)  # still usable
    return groups0, counts


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="thread counts are read from /proc (Linux)")
def test_layouts_set_up_in_turn_leave_no_groups_or_threads_behind():
    from megatron_bridge_ext.launch import spawn_local

    for groups0, counts in spawn_local(_worker, 2, (), timeout=600):
        assert all(g == groups0 for g, _ in counts), (groups0, counts)
        threads = [t for _, t in counts]
        assert threads[-1] <= threads[2] + 2, threads  # no growth after the first round of layouts
