"""Megatron model chunks as named tensors: wrapper prefixes, local -> global names (pipeline layer offsets from
``layer_number``, expert offsets under expert parallelism), owning modules, and the model's config."""

from __future__ import annotations

import functools

from dataclasses import dataclass
from typing import Any, Dict, Iterator, List, Optional, Sequence, Union

import torch

from megatron_bridge_ext import ops
from megatron_bridge_ext.mcore.topology import Topology
from megatron_bridge_ext.naming import is_embedding, is_extra_state, is_mtp, is_output_layer, layer_number, unwrap_name

__all__ = ["LocalParam", "ModelView", "as_chunks", "unwrap_name", "unwrap_model", "local_params", "model_config",
           "padded_vocab_size_of", "is_tied", "is_embedding_copy"]

Chunks = Union[torch.nn.Module, Sequence[torch.nn.Module]]


@dataclass(frozen=True)
class LocalParam:
    """A parameter or persistent buffer of this rank.

    Attributes:
        vp_stage: virtual-pipeline chunk index.
        local_name: unwrapped name in its chunk.
        global_name: the name with global layer / expert indices.
        tensor: the parameter or buffer.
        module: its owning module (None when the path does not resolve).
    """

    vp_stage: int
    local_name: str
    global_name: str
    tensor: torch.Tensor
    module: Optional[torch.nn.Module]


def as_chunks(model: Chunks) -> List[torch.nn.Module]:
    """A model chunk or a list of virtual-pipeline chunks, as a list."""
    return list(model) if isinstance(model, (list, tuple)) else [model]


def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    """The innermost model under ``.module`` wrappers."""
    while hasattr(model, "module") and isinstance(getattr(model, "module"), torch.nn.Module):
        model = model.module
    return model


def model_config(chunks: Sequence[torch.nn.Module]) -> Any:
    """The TransformerConfig of the model (None when the chunk carries none)."""
    return getattr(unwrap_model(chunks[0]), "config", None)


def padded_vocab_size_of(chunks: Sequence[torch.nn.Module]) -> Optional[int]:
    """Megatron's padded vocabulary size of the model (None when unknown)."""
    return getattr(unwrap_model(chunks[0]), "vocab_size", None)


def _local_tensors(chunk: torch.nn.Module) -> Dict[str, torch.Tensor]:
    out: Dict[str, torch.Tensor] = {}
    for name, value in chunk.state_dict(keep_vars=True).items():
        if is_extra_state(name) or not isinstance(value, torch.Tensor):
            continue
        out[unwrap_name(name)] = value
    return out


def _module_of(model: torch.nn.Module, name: str) -> Optional[torch.nn.Module]:
    module = model
    for part in name.rsplit(".", 1)[0].split(".") if "." in name else []:
        if not hasattr(module, part):
            return None
        module = getattr(module, part)
    return module


def _layer_index_map(model: torch.nn.Module) -> Dict[int, int]:
    """Local layer index -> global layer index (``layer_number - 1``) of a chunk's decoder layers."""
    layers = getattr(getattr(model, "decoder", None), "layers", None)
    if layers is None:
        return {}
    return {i: int(getattr(layer, "layer_number", i + 1)) - 1 for i, layer in enumerate(layers)}


def local_params(chunks: Sequence[torch.nn.Module], topo: Topology, *, skip_tied_output: bool = True
                 ) -> Iterator[LocalParam]:
    """Every parameter and persistent buffer of this rank's chunks, with its global name.

    With tied embeddings the output layer (a copy of the embedding on the last stage) is skipped unless
    ``skip_tied_output`` is False. The embedding of a chunk that holds multi-token-prediction layers but not the
    first stage (megatron-core keeps a copy of the first stage's embedding there, see
    :func:`~megatron_bridge_ext.mcore.embeddings.broadcast_tied_embeddings`) is always skipped. MTP layers
    (``mtp.layers.{i}``) keep their index (they are numbered apart from the decoder layers).
    """
    cfg = model_config(chunks)
    num_experts = getattr(cfg, "num_moe_experts", None) or 0
    expert_offset = (num_experts // topo.ep_size) * topo.ep_rank if topo.ep_size > 1 and num_experts else 0
    tied = is_tied(chunks)
    for vp, chunk in enumerate(chunks):
        model = unwrap_model(chunk)
        index_map = _layer_index_map(model)
        embedding_copy = is_embedding_copy(model)
        for local, tensor in _local_tensors(chunk).items():
            if embedding_copy and is_embedding(local):
                continue
            layer_offset = 0
            li = layer_number(local)
            if li is not None and topo.pp_size > 1 and not is_mtp(local):
                layer_offset = index_map.get(li, li) - li
            global_name = ops.local_to_global_name(local, layer_offset, expert_offset) if (
                layer_offset or expert_offset) else local
            if skip_tied_output and tied and is_output_layer(global_name):
                continue
            yield LocalParam(vp, local, global_name, tensor, _module_of(model, local))


def is_embedding_copy(model: torch.nn.Module) -> bool:
    """Whether a (unwrapped) chunk's embedding is megatron-core's copy of the first stage's: a chunk with
    multi-token-prediction layers (``mtp_process``) that is not the first stage."""
    return bool(getattr(model, "mtp_process", False)) and not getattr(model, "pre_process", True) and hasattr(
        model, "embedding")


def is_tied(chunks: Sequence[torch.nn.Module]) -> bool:
    """Whether the model shares its embedding with the output layer."""
    m = unwrap_model(chunks[0])
    cfg = getattr(m, "config", None)
    return bool(getattr(m, "share_embeddings_and_output_weights",
                        getattr(cfg, "share_embeddings_and_output_weights", False)))


class ModelView:
    """This rank's chunks seen once for one call (an import, an export, a plan): the walk of their tensors
    (:func:`local_params`) is made here, once, and every step of the call reads it.

    Args:
        model: a model chunk or the list of virtual-pipeline chunks.
        topo: this rank's place in the layout (default: :meth:`Topology.current`).
        skip_tied_output: as in :func:`local_params`.

    Attributes:
        chunks: the chunks, as a list.
        topo: the topology the global names were made under.
        params: every parameter and persistent buffer of this rank, with its global name, in walk order.
    """

    def __init__(self, model: Chunks, topo: Optional[Topology] = None, *, skip_tied_output: bool = True) -> None:
        self.chunks = as_chunks(model)
        self.topo = Topology.current() if topo is None else topo
        self.params: List[LocalParam] = list(local_params(self.chunks, self.topo, skip_tied_output=skip_tied_output))
        self._by_global: Optional[Dict[str, LocalParam]] = None

    @property
    def by_global(self) -> Dict[str, LocalParam]:
        """Global name -> the local parameter."""
        if self._by_global is None:
            self._by_global = {p.global_name: p for p in self.params}
        return self._by_global

    def local_name(self, global_name: str) -> Optional[str]:
        """The unwrapped local name of a global parameter on this rank (None where this rank does not hold it)."""
        p = self.by_global.get(global_name)
        return None if p is None else p.local_name

    @functools.cached_property
    def config(self) -> Any:
        """The model's TransformerConfig (None when the chunk carries none)."""
        return model_config(self.chunks)

    @functools.cached_property
    def padded_vocab_size(self) -> Optional[int]:
        """Megatron's padded vocabulary size of the model (None when unknown)."""
        return padded_vocab_size_of(self.chunks)

    @functools.cached_property
    def tied(self) -> bool:
        """Whether the model shares its embedding with the output layer."""
        return is_tied(self.chunks)
