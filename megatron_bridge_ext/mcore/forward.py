"""Eval forward of a whole (TP / PP / VPP-split) megatron-core GPTModel returning full logits, for parity checks."""

from __future__ import annotations

from typing import List, Optional, Sequence

import torch
import torch.distributed as dist
from megatron.core import parallel_state

__all__ = ["megatron_logits"]


def _unwrap(chunk: torch.nn.Module) -> torch.nn.Module:
    while hasattr(chunk, "module") and not hasattr(chunk, "set_input_tensor"):
        chunk = chunk.module
    return chunk


@torch.no_grad()
def megatron_logits(
    chunks: Sequence[torch.nn.Module],
    input_ids: torch.Tensor,
    *,
    vocab_size: Optional[int] = None,
    broadcast: bool = True,
) -> Optional[torch.Tensor]:
    """Run an eval forward of the model split over the current megatron parallel state; return full fp32 logits.

    Must be called on every rank of the world with the same ``input_ids``. Hidden states travel between pipeline
    stages with ``torch.distributed.send/recv``: virtual stage ``s`` (of ``pp * vpp``) is chunk ``s // pp`` on pp
    rank ``s % pp``. The last stage all-gathers the TP vocabulary shards, drops the padded columns and (with
    ``broadcast``) sends the result to every rank of its pipeline.

    Args:
        chunks: this rank's GPTModel chunks in virtual-stage order (``model_builder.build_model_chunks``).
        input_ids: ``[b, s]`` token ids (equal-length, unpadded rows: GPTModel's RoPE uses positions 0..s-1).
        vocab_size: unpadded vocabulary size; default the chunks' ``unpadded_vocab_size`` (set by the builder).
        broadcast: return the logits on every rank; otherwise only on the last stage (None elsewhere).

    Returns:
        ``[b, s, vocab_size]`` float32 logits, or None (``broadcast=False``, not the last stage).
    """
    models: List[torch.nn.Module] = [_unwrap(c) for c in chunks]
    if not models:
        raise ValueError("megatron_logits: no model chunks given")
    if input_ids.dim() != 2:
        raise ValueError(f"megatron_logits: input_ids must be [batch, seq], got shape {tuple(input_ids.shape)}")
    if vocab_size is None:
        vocab_size = getattr(models[0], "unpadded_vocab_size", None)
        if vocab_size is None:
            raise ValueError("megatron_logits: pass vocab_size (the chunks carry no unpadded_vocab_size)")
    pp = parallel_state.get_pipeline_model_parallel_world_size()
    pp_rank = parallel_state.get_pipeline_model_parallel_rank()
    vpp = parallel_state.get_virtual_pipeline_model_parallel_world_size() or 1
    if len(models) != vpp:
        raise ValueError(f"megatron_logits: {len(models)} chunk(s) on this rank, the parallel state has vpp={vpp}")
    pp_ranks = dist.get_process_group_ranks(parallel_state.get_pipeline_model_parallel_group())
    config = models[0].config
    dtype = config.pipeline_dtype or config.params_dtype

    b, s = input_ids.shape
    input_ids = input_ids.to(torch.long)
    position_ids = torch.arange(s, dtype=torch.long).unsqueeze(0).expand(b, s)
    mask = torch.triu(torch.ones(1, 1, s, s, dtype=torch.bool), diagonal=1)
    for m in models:
        m.eval()

    n_stages = pp * vpp
    out: Optional[torch.Tensor] = None
    for stage in range(n_stages):
        if stage % pp != pp_rank:
            continue
        model = models[stage // pp]
        if stage > 0:
            hidden = torch.empty(s, b, config.hidden_size, dtype=dtype)
            dist.recv(hidden, src=pp_ranks[(stage - 1) % pp])
            model.set_input_tensor(hidden)
        else:
            model.set_input_tensor(None)
        out = model(input_ids=input_ids, position_ids=position_ids, attention_mask=mask)
        if stage < n_stages - 1:
            dist.send(out.to(dtype).contiguous(), dst=pp_ranks[(stage + 1) % pp])

    last = pp_rank == pp - 1
    logits: Optional[torch.Tensor] = None
    if last:
        shard = out.float().contiguous()  # [b, s, vocab_padded / tp]
        tp = parallel_state.get_tensor_model_parallel_world_size()
        if tp > 1:
            parts = [torch.empty_like(shard) for _ in range(tp)]
            dist.all_gather(parts, shard, group=parallel_state.get_tensor_model_parallel_group())
            shard = torch.cat(parts, dim=-1)
        if shard.shape[-1] < vocab_size:
            raise ValueError(f"megatron_logits: model vocabulary {shard.shape[-1]} < vocab_size {vocab_size}")
        logits = shard[..., :vocab_size].contiguous()
    if not broadcast or pp == 1:
        return logits
    if logits is None:
        logits = torch.empty(b, s, vocab_size, dtype=torch.float32)
    dist.broadcast(logits, src=pp_ranks[-1], group=parallel_state.get_pipeline_model_parallel_group())
    return logits
