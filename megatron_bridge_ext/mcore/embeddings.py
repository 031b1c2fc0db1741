"""Copies of the first stage's embedding on the last pipeline stage: the output layer with tied embeddings, and the
embedding of the stage holding multi-token-prediction layers (megatron-core's MTP embeds the shifted tokens with the
main model's embedding and keeps a copy of it there, tied to the first stage's)."""

from __future__ import annotations

from typing import List, Sequence

import torch
import torch.distributed as dist

from megatron_bridge_ext.mcore.names import is_embedding_copy, is_tied, model_config, unwrap_model
from megatron_bridge_ext.naming import WORD_EMBEDDINGS

__all__ = ["broadcast_tied_embeddings", "is_tied", "TIED_EMBEDDING"]

#: the Megatron parameter that a tied output layer copies
TIED_EMBEDDING = WORD_EMBEDDINGS


def broadcast_tied_embeddings(chunks: Sequence[torch.nn.Module]) -> None:
    """With PP > 1, fill the last stage's copies of the first stage's embedding (a tied output layer, the embedding
    of a stage with MTP layers) by a broadcast in megatron's embedding group; every rank calls it, ranks outside the
    group return at once."""
    tied = is_tied(chunks)
    mtp = bool(getattr(model_config(chunks), "mtp_num_layers", None))
    if not (tied or mtp) or not dist.is_initialized():
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
    emb = None
    copies: List[torch.Tensor] = []
    for chunk in chunks:
        m = unwrap_model(chunk)
        if getattr(m, "pre_process", False) and hasattr(m, "embedding"):
            emb = m.embedding.word_embeddings.weight
        elif is_embedding_copy(m):
            copies.append(m.embedding.word_embeddings.weight)
        out = getattr(m, "output_layer", None) if getattr(m, "post_process", False) else None
        if tied and out is not None and out.weight is not None:
            copies.append(out.weight)
    if emb is None and not copies:
        raise RuntimeError(f"rank {dist.get_rank()}: in the embedding group {ranks} but holds neither the embedding "
                           "nor a copy of it")
    buf = emb.data if first else torch.empty_like(copies[0].data)
    dist.broadcast(buf, src=ranks[0], group=group)
    if last:
        for t in copies:
            if emb is None or t.data_ptr() != emb.data_ptr():
                t.data.copy_(buf)
