"""This rank's place in Megatron's parallel layout, read from ``parallel_state`` (the only reader of it besides the
other ``mcore`` modules)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Optional, Tuple

import torch
import torch.distributed as dist

from megatron_bridge_ext.naming import is_routed_expert

__all__ = ["Topology", "comm_device", "current_parallel_sizes", "is_routed_expert"]


@dataclass(frozen=True)
class Topology:
    """Parallel sizes and ranks of this process (all 1 / 0 without megatron's parallel state).

    Attributes:
        replica_zero: data-parallel (and context-parallel) rank 0: takes part in export.
        expert_replica_zero: expert-data-parallel rank 0: takes part in the export of expert tensors.
    """

    tp_size: int = 1
    tp_rank: int = 0
    pp_size: int = 1
    pp_rank: int = 0
    replica_zero: bool = True
    ep_size: int = 1
    ep_rank: int = 0
    etp_size: int = 1
    etp_rank: int = 0
    expert_replica_zero: bool = True
    rank: int = 0
    world: int = 1

    def shard_of(self, global_name: str) -> Tuple[int, int, bool]:
        """(shard index, shard count, replica zero) of a parameter: expert tensors follow expert-TP, others TP."""
        if is_routed_expert(global_name):
            return self.etp_rank, self.etp_size, self.expert_replica_zero
        return self.tp_rank, self.tp_size, self.replica_zero

    @classmethod
    def current(cls) -> "Topology":
        """The topology under the current megatron parallel state.

        Raises:
            RuntimeError: a multi-rank job without megatron's parallel state.
        """
        if not dist.is_available() or not dist.is_initialized():
            return cls()
        from megatron.core import parallel_state as ps

        if not ps.model_parallel_is_initialized():
            if dist.get_world_size() > 1:
                raise RuntimeError(
                    "megatron parallel_state is not initialised in a multi-rank job: call "
                    "megatron.core.parallel_state.initialize_model_parallel(...) before converting"
                )
            return cls(rank=dist.get_rank(), world=1)
        return cls(
            tp_size=ps.get_tensor_model_parallel_world_size(),
            tp_rank=ps.get_tensor_model_parallel_rank(),
            pp_size=ps.get_pipeline_model_parallel_world_size(),
            pp_rank=ps.get_pipeline_model_parallel_rank(),
            replica_zero=ps.get_data_parallel_rank(with_context_parallel=True) == 0,
            ep_size=ps.get_expert_model_parallel_world_size(),
            ep_rank=ps.get_expert_model_parallel_rank(),
            etp_size=ps.get_expert_tensor_parallel_world_size(),
            etp_rank=ps.get_expert_tensor_parallel_rank(),
            expert_replica_zero=ps.get_expert_data_parallel_rank() == 0,
            rank=dist.get_rank(),
            world=dist.get_world_size(),
        )


def comm_device() -> torch.device:
    """Where collective buffers live: the current CUDA device for NCCL, else the CPU."""
    if dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def current_parallel_sizes() -> Dict[str, Any]:
    """TransformerConfig parallel-size fields of the current megatron parallel state ({} without one)."""
    if not dist.is_available() or not dist.is_initialized():
        return {}
    from megatron.core import parallel_state as ps

    if not ps.model_parallel_is_initialized():
        return {}
    sizes: Dict[str, Any] = {
        "tensor_model_parallel_size": ps.get_tensor_model_parallel_world_size(),
        "pipeline_model_parallel_size": ps.get_pipeline_model_parallel_world_size(),
        "expert_model_parallel_size": ps.get_expert_model_parallel_world_size(),
        "expert_tensor_parallel_size": ps.get_expert_tensor_parallel_world_size(),
    }
    vpp = ps.get_virtual_pipeline_model_parallel_world_size()
    if vpp:
        sizes["virtual_pipeline_model_parallel_size"] = vpp
    return sizes


def layout_world_size(tp: int, pp: int, ep: int = 1, etp: Optional[int] = None) -> int:
    """The smallest world megatron accepts for a layout: a multiple of tp*pp and of etp*ep*pp (etp defaults to tp)."""
    import math

    return math.lcm(tp * pp, (etp or tp) * ep * pp)
