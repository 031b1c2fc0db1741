"""Test-only helpers: tiny HF Llama models and a naive, plain-torch HF -> Megatron weight loader.

The loader is an independent reference written from conversion_semantics.md (sections 1, 2, 3, 5, 6); it is not the
product's conversion path and deliberately uses simple cat/chunk code.
"""

from __future__ import annotations

from typing import Dict, List

import torch

VOCAB_EVEN = 100
VOCAB_ODD = 97


def tiny_llama_config(vocab_size: int = VOCAB_EVEN, tied: bool = False, llama3: bool = False, layers: int = 4):
    """A tiny Llama config: hidden 64, 4 heads, 2 kv heads, head_dim 16, intermediate 128."""
    from transformers import LlamaConfig

    rope: Dict[str, object]
    if llama3:
        # theta 5e5 puts head_dim-16 wavelengths in all three llama3 bands (high, medium, low frequency)
        rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    else:
        rope = {"rope_type": "default", "rope_theta": 10000.0}
    return LlamaConfig(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=64,
        rms_norm_eps=1e-5, tie_word_embeddings=tied, rope_parameters=rope, dtype="float32",
    )


def tiny_llama(config, seed: int):
    """A LlamaForCausalLM with random fp32 weights from a fixed seed (norm weights randomised too), in eval mode.

    q/k projections get a larger scale (std 0.2) so attention is sharp and RoPE details visibly change the logits.
    """
    import transformers

    transformers.logging.set_verbosity_error()
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).float().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            elif "q_proj" in name or "k_proj" in name:
                p.copy_(0.2 * torch.randn_like(p))
            else:
                p.copy_(0.05 * torch.randn_like(p))
    return model


def _pad_rows(t: torch.Tensor, rows: int) -> torch.Tensor:
    out = torch.zeros(rows, *t.shape[1:], dtype=t.dtype)
    out[: t.shape[0]] = t
    return out


def _pack_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, groups: int, d: int) -> torch.Tensor:
    n = heads // groups
    blocks = []
    for g in range(groups):
        blocks += [q[g * n * d:(g + 1) * n * d], k[g * d:(g + 1) * d], v[g * d:(g + 1) * d]]
    return torch.cat(blocks, dim=0)


def naive_load(chunks: List[torch.nn.Module], hf_sd: Dict[str, torch.Tensor], hf_config: Dict, *, tp: int,
               tp_rank: int, pp: int, pp_rank: int, padded_vocab: int) -> List[str]:
    """Copy HF weights into this rank's Megatron chunks (virtual stage s = chunk * pp + pp_rank). Returns filled names.

    ``hf_config`` is the HF config's ``to_dict()``. Raises KeyError for any Megatron parameter it cannot fill.
    """
    L = hf_config["num_hidden_layers"]
    H, G, d = hf_config["num_attention_heads"], hf_config["num_key_value_heads"], hf_config["head_dim"]
    vpp = len(chunks)
    per_stage = L // (pp * vpp)
    tied = hf_config["tie_word_embeddings"]
    filled: List[str] = []

    def col(t: torch.Tensor) -> torch.Tensor:
        return torch.chunk(t, tp, dim=0)[tp_rank]

    def row(t: torch.Tensor) -> torch.Tensor:
        return torch.chunk(t, tp, dim=1)[tp_rank]

    for v, chunk in enumerate(chunks):
        offset = (v * pp + pp_rank) * per_stage
        targets = chunk.state_dict(keep_vars=True)
        for name, param in targets.items():
            if name.endswith("_extra_state"):
                continue
            parts = name.split(".")
            if name == "embedding.word_embeddings.weight":
                src = col(_pad_rows(hf_sd["model.embed_tokens.weight"], padded_vocab))
            elif name == "output_layer.weight":
                key = "model.embed_tokens.weight" if tied else "lm_head.weight"
                src = col(_pad_rows(hf_sd[key], padded_vocab))
            elif name == "decoder.final_layernorm.weight":
                src = hf_sd["model.norm.weight"]
            elif parts[:2] == ["decoder", "layers"]:
                hf = f"model.layers.{offset + int(parts[2])}."
                leaf = ".".join(parts[3:])
                if leaf == "input_layernorm.weight":
                    src = hf_sd[hf + "input_layernorm.weight"]
                elif leaf == "pre_mlp_layernorm.weight":
                    src = hf_sd[hf + "post_attention_layernorm.weight"]
                elif leaf == "self_attention.linear_qkv.weight":
                    a = hf + "self_attn."
                    packed = _pack_qkv(hf_sd[a + "q_proj.weight"], hf_sd[a + "k_proj.weight"],
                                       hf_sd[a + "v_proj.weight"], H, G, d)
                    src = col(packed)
                elif leaf == "self_attention.linear_proj.weight":
                    src = row(hf_sd[hf + "self_attn.o_proj.weight"])
                elif leaf == "mlp.linear_fc1.weight":
                    src = torch.cat([col(hf_sd[hf + "mlp.gate_proj.weight"]), col(hf_sd[hf + "mlp.up_proj.weight"])])
                elif leaf == "mlp.linear_fc2.weight":
                    src = row(hf_sd[hf + "mlp.down_proj.weight"])
                else:
                    raise KeyError(f"naive_load: no rule for Megatron parameter {name!r}")
            else:
                raise KeyError(f"naive_load: no rule for Megatron parameter {name!r}")
            if tuple(src.shape) != tuple(param.shape):
                raise ValueError(f"naive_load: {name} expects {tuple(param.shape)}, built {tuple(src.shape)}")
            with torch.no_grad():
                param.copy_(src)
            filled.append(f"{v}:{name}")
    return filled


def hf_logits(model, input_ids: torch.Tensor) -> torch.Tensor:
    """Full fp32 logits of an HF causal LM (no cache)."""
    with torch.no_grad():
        return model(input_ids=input_ids, use_cache=False).logits.float()


def max_abs_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    if a.shape != b.shape:
        raise ValueError(f"shape mismatch {tuple(a.shape)} vs {tuple(b.shape)}")
    return (a - b).abs().max().item()


def out_keys(chunk: torch.nn.Module) -> Dict[str, bool]:
    sd = chunk.state_dict()
    return {"output_layer.weight": "output_layer.weight" in sd,
            "extra_state": any(k.endswith("_extra_state") for k in sd)}

