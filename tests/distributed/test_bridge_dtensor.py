"""The bridge fills DTensor parameters (e.g. Megatron FSDP's) through the DTensor-aware copy: the local shards equal
what torch's own distribute_tensor gives, for even and uneven shards and replicated placements (2 gloo ranks)."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("megatron.core")

from megatron_bridge_ext.launch import spawn_local  # noqa: E402


def _worker(rank: int, world: int) -> dict:
    from types import SimpleNamespace

    import torch.distributed as dist
    from megatron.core import parallel_state as ps
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    from megatron_bridge_ext.engine import MegatronModelBridge
    from megatron_bridge_ext.mappings import ReplicatedMapping
    from megatron_bridge_ext.registry import MegatronMappingRegistry

    ps.initialize_model_parallel(tensor_model_parallel_size=1)  # data parallel 2, like a sharded-data-parallel job
    mesh = init_device_mesh("cpu", (world,))
    g = torch.Generator().manual_seed(0)
    hf = {"a": torch.randn(6, 4, generator=g), "b": torch.randn(5, 3, generator=g), "c": torch.randn(7, generator=g)}

    class Toy(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.even = torch.nn.Parameter(distribute_tensor(torch.zeros(6, 4), mesh, [Shard(0)]))
            self.uneven = torch.nn.Parameter(distribute_tensor(torch.zeros(5, 3), mesh, [Shard(0)]))
            self.repl = torch.nn.Parameter(distribute_tensor(torch.zeros(7), mesh, [Replicate()]))

    class ToyBridge(MegatronModelBridge):
        def mapping_registry(self):
            return MegatronMappingRegistry(
                ReplicatedMapping("even", "a"), ReplicatedMapping("uneven", "b"), ReplicatedMapping("repl", "c"))

    model = Toy()
    ToyBridge().load_weights_hf_to_megatron(SimpleNamespace(state=hf, config=None), model, show_progress=False)
    out = {}
    for name, key, placement in (("even", "a", Shard(0)), ("uneven", "b", Shard(0)), ("repl", "c", Replicate())):
        got = getattr(model, name).data.to_local()
        want = distribute_tensor(hf[key], mesh, [placement]).to_local()
        out[name] = (tuple(got.shape), bool(torch.equal(got, want)))
    ps.destroy_model_parallel()
    dist.barrier()
    return out


def test_dtensor_parameters_match_distribute_tensor():
    results = spawn_local(_worker, 2, timeout=300)
    for rank, res in enumerate(results):
        for name, (shape, equal) in res.items():
            assert equal, f"rank {rank}: {name} local shard {shape} differs from distribute_tensor"
    assert results[0]["uneven"][0] == (3, 3) and results[1]["uneven"][0] == (2, 3)
