"""ops.copy_into_dtensor against torch.distributed.tensor.distribute_tensor on a real 4-rank gloo world.

One spawned world covers a 1-D mesh of 4, a 2-D (2, 2) mesh with the same dim sharded twice and uneven sizes, and
sub-meshes of 1 and 2 ranks (ranks outside a sub-mesh hold nothing and must be left alone).
"""

from __future__ import annotations

import zlib
from typing import List

import torch

from megatron_bridge_ext.launch import spawn_local

WORLD = 4


def _cases():
    from torch.distributed.tensor import Replicate, Shard

    one_d = [(Shard(0),), (Shard(1),), (Replicate(),), (Shard(-1),)]
    two_d = [
        (Shard(0), Shard(0)), (Shard(0), Shard(1)), (Shard(1), Shard(0)), (Replicate(), Shard(1)),
        (Shard(1), Replicate()), (Replicate(), Replicate()), (Shard(1), Shard(1)),
    ]
    shapes = [(8, 12), (10, 7), (3, 5), (2, 9, 5)]  # even, uneven, fewer rows than ranks, 3-D
    return one_d, two_d, shapes


def _check_mesh(mesh, placements_list, shapes, dtype, failures: List[str]) -> None:
    from torch.distributed.tensor import Shard, distribute_tensor
    from torch.distributed.tensor import empty as dtensor_empty

    from megatron_bridge_ext import ops

    for shape in shapes:
        for placements in placements_list:
            if any(getattr(p, "dim", 0) >= len(shape) for p in placements):
                continue
            gen = torch.Generator().manual_seed(zlib.crc32(repr((shape, placements)).encode()))  # same on every rank
            full = torch.randint(-100, 100, shape, generator=gen).to(dtype)
            want = distribute_tensor(full, mesh, list(placements))
            for src in (full, full.transpose(0, -1).contiguous().transpose(0, -1)):
                normalized = [Shard(p.dim % len(shape)) if isinstance(p, Shard) else p for p in placements]
                got = dtensor_empty(*shape, dtype=dtype, device_mesh=mesh, placements=normalized)
                got.to_local().fill_(-1)
                ops.copy_into_dtensor(src, got)
                a, b = got.to_local(), want.to_local()
                if mesh.get_coordinate() is None:
                    continue
                if a.shape != b.shape or not torch.equal(a, b):
                    failures.append(
                        f"mesh {tuple(mesh.shape)} coord {mesh.get_coordinate()} {shape} {placements}: "
                        f"got {tuple(a.shape)} {a.flatten()[:6].tolist()}, "
                        f"distribute_tensor {tuple(b.shape)} {b.flatten()[:6].tolist()}"
                    )


def _rank_fn(rank: int, world: int) -> List[str]:
    import torch.distributed as dist
    from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

    one_d, two_d, shapes = _cases()
    failures: List[str] = []
    _check_mesh(init_device_mesh("cpu", (world,)), one_d, shapes, torch.float32, failures)
    _check_mesh(init_device_mesh("cpu", (2, 2)), two_d, shapes, torch.bfloat16, failures)
    # World sizes 1 and 2 as sub-meshes; every rank constructs every mesh (group creation is collective).
    _check_mesh(DeviceMesh("cpu", [0]), one_d[:2], shapes[:2], torch.int32, failures)
    _check_mesh(DeviceMesh("cpu", [2, 3]), one_d, shapes, torch.float16, failures)
    dist.barrier()
    return failures


def test_copy_into_dtensor_matches_distribute_tensor():
    results = spawn_local(_rank_fn, WORLD, timeout=240)
    failures = [f for r in results for f in r]
    assert not failures, "\n".join(failures[:20])
