"""Tied embeddings across pipeline stages: the last stage's output layer is a copy of the first stage's embedding."""

from __future__ import annotations

from typing import Sequence

import torch
import torch.distributed as dist

from megatron_bridge_ext.mcore.names import is_tied, unwrap_model

__all__ = ["broadcast_tied_embeddings", "is_tied", "TIED_EMBEDDING"]

#: the Megatron parameter that a tied output layer copies
TIED_EMBEDDING = "embedding.word_embeddings.weight"


def broadcast_tied_embeddings(chunks: Sequence[torch.nn.Module]) -> None:
    """With tied embeddings and PP > 1, fill the last stage's output layer from the first stage's embedding (a
    broadcast in megatron's embedding group; every rank calls it, ranks outside the group return at once)."""
    if not is_tied(chunks) or not dist.is_initialized():
        return
    from megatron.core import parallel_state as ps

    if not ps.model_parallel_is_initialized() or ps.get_pipeline_model_parallel_world_size() == 1:
        return
    first = ps.is_pipeline_first_stage(ignore_virtual=True)
    last = ps.is_pipeline_last_stage(ignore_virtual=True)
    if not (first or last):
        return
    group = ps.get_embedding_group()
    ranks = dist.get_process_group_ranks(group)
    if dist.get_rank() not in ranks:
        return
    emb = out = None
    for chunk in chunks:
        m = unwrap_model(chunk)
        if getattr(m, "pre_process", False) and hasattr(m, "embedding"):
            emb = m.embedding.word_embeddings.weight
        if getattr(m, "post_process", False) and getattr(m, "output_layer", None) is not None:
            out = m.output_layer.weight
    buf = emb.data if first else torch.empty_like(out.data)
    dist.broadcast(buf, src=ranks[0], group=group)
    if last and out is not None and (emb is None or out.data_ptr() != emb.data_ptr()):
        out.data.copy_(buf)
