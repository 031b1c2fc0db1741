"""Tiny transformers checkpoints with random weights (fixed seed), for the demo, the tests and the benchmarks."""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["TINY_LLAMA", "make_tiny_llama"]

TINY_LLAMA = dict(
    vocab_size=1003,  # odd on purpose: exercises vocabulary padding and trimming
    hidden_size=128,
    intermediate_size=352,
    num_hidden_layers=4,
    num_attention_heads=8,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=256,
    rms_norm_eps=1e-5,
    rope_theta=10000.0,
    tie_word_embeddings=False,
)


def make_tiny_llama(path: str, seed: int = 0, dtype: torch.dtype = torch.float32, **overrides: Any) -> str:
    """Write a random-weight transformers LlamaForCausalLM (fixed seed) to ``path``; returns ``path``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(**{**TINY_LLAMA, **overrides})
    model = LlamaForCausalLM(config).to(dtype)
    with torch.no_grad():  # random norms too, so that a mix-up between norms is visible
        for name, p in model.named_parameters():
            if "norm" in name:
                p.normal_(1.0, 0.1)
    model.save_pretrained(path, safe_serialization=True)
    return path
