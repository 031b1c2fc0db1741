"""Eval forward of a whole (TP / PP / VPP-split) megatron-core GPTModel returning full logits, for parity checks.

Multi-token-prediction layers (``config.mtp_num_layers``): megatron-core 0.16.1's ``GPTModel.forward`` on the stage
holding them requires ``labels`` (it computes the MTP loss: ``labels.clone()``) and then returns the main model's loss,
not its logits. The forward here passes the input ids as labels (the loss is discarded) and takes the logits from
the output layer's calls instead: one per MTP depth (on the MTP layers' hidden states), then the main model's.
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
from megatron.core import parallel_state

__all__ = ["megatron_logits", "megatron_logits_with_mtp"]


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
    """Run an eval forward of the model split over the current megatron parallel state; return full fp32 logits of
    the main model (multi-token-prediction layers run but their logits are dropped; see
    :func:`megatron_logits_with_mtp`).

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
    return _forward(chunks, input_ids, vocab_size, broadcast)[0]


@torch.no_grad()
def megatron_logits_with_mtp(
    chunks: Sequence[torch.nn.Module],
    input_ids: torch.Tensor,
    *,
    vocab_size: Optional[int] = None,
    broadcast: bool = True,
) -> Tuple[Optional[torch.Tensor], List[torch.Tensor]]:
    """:func:`megatron_logits` and the logits of each multi-token-prediction depth.

    MTP depth ``k`` (1-based) at position ``i`` predicts token ``i + k + 1``: megatron-core shifts the input ids
    left by one per depth, the vacated last positions holding token id 0, and embeds them with the main model's
    embedding; its logits go through the main model's output layer.

    Returns:
        (main logits, [depth-1 logits, depth-2 logits, ...]), each ``[b, s, vocab_size]`` float32, where the main
        logits are returned (the list is empty without MTP layers).
    """
    return _forward(chunks, input_ids, vocab_size, broadcast)


def _gather_vocab(out: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """``[b, s, vocab_padded / tp]`` -> ``[b, s, vocab_size]`` float32 (TP all-gather, padded columns dropped)."""
    shard = out.float().contiguous()
    tp = parallel_state.get_tensor_model_parallel_world_size()
    if tp > 1:
        parts = [torch.empty_like(shard) for _ in range(tp)]
        dist.all_gather(parts, shard, group=parallel_state.get_tensor_model_parallel_group())
        shard = torch.cat(parts, dim=-1)
    if shard.shape[-1] < vocab_size:
        raise ValueError(f"megatron_logits: model vocabulary {shard.shape[-1]} < vocab_size {vocab_size}")
    return shard[..., :vocab_size].contiguous()


def _mtp_forward(model: torch.nn.Module, input_ids, position_ids, mask) -> Tuple[torch.Tensor, List[torch.Tensor]]:
    """The forward of a chunk holding MTP layers: labels given (required there), logits taken from the output
    layer's calls (``[s, b, v]`` each: the MTP depths first, the main model last)."""
    calls: List[torch.Tensor] = []

    def keep(_module, _args, output):  # a copy: megatron's vocab-parallel cross entropy shifts the logits in place
        calls.append((output[0] if isinstance(output, tuple) else output).clone())

    handle = model.output_layer.register_forward_hook(keep)
    try:
        model(input_ids=input_ids, position_ids=position_ids, attention_mask=mask, labels=input_ids)
    finally:
        handle.remove()
    depth = int(model.config.mtp_num_layers)
    if len(calls) != depth + 1:
        raise RuntimeError(f"megatron_logits: the output layer ran {len(calls)} times, expected {depth} MTP "
                           "depth(s) + the main model")
    return calls[-1].transpose(0, 1), [c.transpose(0, 1) for c in calls[:-1]]


def _forward(chunks, input_ids, vocab_size, broadcast) -> Tuple[Optional[torch.Tensor], List[torch.Tensor]]:
    """(main logits, MTP logits per depth) of :func:`megatron_logits_with_mtp`."""
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
    mtp_out: List[torch.Tensor] = []
    for stage in range(n_stages):
        if stage % pp != pp_rank:
            continue
        model = models[stage // pp]
        if stage > 0:
            # the stage's output: [s, b, h], or this rank's [s / tp, b, h] with sequence parallelism
            local = s // parallel_state.get_tensor_model_parallel_world_size() if config.sequence_parallel else s
            hidden = torch.empty(local, b, config.hidden_size, dtype=dtype)
            dist.recv(hidden, src=pp_ranks[(stage - 1) % pp])
            model.set_input_tensor(hidden)
        else:
            model.set_input_tensor(None)
        if getattr(model, "mtp_process", False) and getattr(model, "post_process", False):
            out, mtp_out = _mtp_forward(model, input_ids, position_ids, mask)
        else:
            out = model(input_ids=input_ids, position_ids=position_ids, attention_mask=mask)
        if stage < n_stages - 1:
            dist.send(out.to(dtype).contiguous(), dst=pp_ranks[(stage + 1) % pp])

    last = pp_rank == pp - 1
    depth = int(getattr(config, "mtp_num_layers", None) or 0)
    logits: Optional[torch.Tensor] = None
    mtp_logits: List[torch.Tensor] = []
    if last:
        logits = _gather_vocab(out, vocab_size)  # [b, s, vocab_padded / tp] -> [b, s, vocab]
        mtp_logits = [_gather_vocab(o, vocab_size) for o in mtp_out]
        if len(mtp_logits) != depth:
            raise RuntimeError(f"megatron_logits: the last stage ran {len(mtp_logits)} MTP depth(s), the config has "
                               f"mtp_num_layers={depth}")
    if not broadcast or pp == 1:
        return logits, mtp_logits
    group = parallel_state.get_pipeline_model_parallel_group()
    if logits is None:
        logits = torch.empty(b, s, vocab_size, dtype=torch.float32)
        mtp_logits = [torch.empty(b, s, vocab_size, dtype=torch.float32) for _ in range(depth)]
    for t in [logits, *mtp_logits]:
        dist.broadcast(t, src=pp_ranks[-1], group=group)
    return logits, mtp_logits
