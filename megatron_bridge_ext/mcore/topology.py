"""This rank's place in Megatron's parallel layout, read from ``parallel_state`` (the only reader of it besides the
other ``mcore`` modules); and, for a layout no process group holds (the ``inspect`` plan), megatron's placement of
ranks, layers and embeddings worked out from the sizes alone.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.distributed as dist

from megatron_bridge_ext.naming import decoder_layer, is_embedding, is_routed_expert

__all__ = ["Topology", "comm_device", "current_parallel_sizes", "is_routed_expert", "layout_world_size",
           "RankPlace", "layout_ranks", "stages_of", "one_process_world"]


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
    return math.lcm(tp * pp, (etp or tp) * ep * pp)


@dataclass(frozen=True)
class RankPlace:
    """A global rank's pipeline, tensor-parallel, expert-parallel and expert-tensor-parallel ranks."""

    rank: int
    pp: int
    tp: int
    ep: int
    etp: int


def layout_ranks(tp: int, pp: int, ep: int = 1, etp: Optional[int] = None) -> List[RankPlace]:
    """Every rank of the smallest world of a layout (:func:`layout_world_size`), placed in megatron's order: tp
    fastest, pp slowest; within a pipeline stage the expert ranks go etp fastest, then ep."""
    etp = etp or tp
    world = layout_world_size(tp, pp, ep, etp)
    per_pp = world // pp
    return [RankPlace(r, r // per_pp, r % tp, (r % per_pp // etp) % ep, r % per_pp % etp) for r in range(world)]


def stages_of(name: str, num_layers: int, pp: int, vpp: int, embedding_copy: bool) -> List[Tuple[int, int]]:
    """(pp rank, virtual-pipeline chunk) holding a global parameter under megatron's even split of ``num_layers``
    decoder layers over ``pp * vpp`` stages (chunk ``c`` of rank ``r`` is stage ``c * pp + r``).

    The embedding is on the first stage, and on the last as well when it keeps a copy (``embedding_copy``: a tied
    output layer, multi-token-prediction layers); everything else outside the decoder layers (final norm, output
    layer, MTP layers) is on the last stage.
    """
    layer = decoder_layer(name)
    if layer is not None:
        s = layer // (num_layers // (pp * vpp))
        return [(s % pp, s // pp)]
    if is_embedding(name):
        places = [(0, 0)]
        if embedding_copy and pp > 1:  # the last stage keeps a copy (a tied output layer, or for its MTP layers)
            places.append((pp - 1, vpp - 1))
        return places
    return [(pp - 1, vpp - 1)]  # final norm, output layer


def one_process_world(what: str) -> None:
    """A one-process gloo world of its own (a ``file://`` rendezvous in a temporary directory) when torch.distributed
    has none; an existing one-process world is kept.

    Raises:
        RuntimeError: the process is a rank of a larger world (``what`` says what needs a one-process one).
    """
    if not dist.is_initialized():
        # an in-memory store: a one-process world needs no rendezvous file (nothing left in the temporary directory)
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    elif dist.get_world_size() != 1:
        raise RuntimeError(f"{what} in a one-process world; call it outside a job's world (this one has "
                           f"{dist.get_world_size()} ranks)")
