"""Phi-3 (``Phi3ForCausalLM``): fused ``qkv_proj`` (``[q; k; v]`` rows) and ``gate_up_proj`` (``[gate; up]`` rows)
on disk, converted with the fused-input ops (``qkv_pack_fused``, ``gate_up_pack_fused``); SwiGLU, RMSNorm, no
biases, partial rotary embeddings (``partial_rotary_factor`` -> ``rotary_percent``), an optional sliding window on
every layer.

Not expressible in megatron-core 0.16.1 (named errors): ``longrope`` (``su`` / ``yarn``) rope scaling, which
Phi-3-*-128k checkpoints use: ``RotaryEmbedding`` has one inverse-frequency vector and no per-dimension short / long
factors or attention factor.
"""

from __future__ import annotations

from typing import Any, Dict

from megatron_bridge_ext.models.hf_config import config_get, refuse_biases, uniform_window_hf_field, window_settings
from megatron_bridge_ext.models.llama import LlamaBridge
from megatron_bridge_ext.models.tables import (
    GPT_MODEL,
    embedding_mappings,
    fused_gated_mlp_mappings,
    fused_qkv_attention_mappings,
)
from megatron_bridge_ext.registry import MegatronMappingRegistry

__all__ = ["Phi3Bridge"]

_HF_DEFAULT_PAD_TOKEN_ID = 32000


def _rope_type(hf_config: Any) -> str:
    params = config_get(hf_config, "rope_parameters") or config_get(hf_config, "rope_scaling") or {}
    return str(params.get("rope_type", params.get("type", "default")))


@LlamaBridge.register_bridge(source="Phi3ForCausalLM", target=GPT_MODEL)
class Phi3Bridge(LlamaBridge):
    """HF Phi3ForCausalLM <-> Megatron-Core GPTModel."""

    hf_model_type = "phi3"

    def hf_config_to_megatron_kwargs(self, hf_config: Any) -> Dict[str, Any]:
        family = type(self).__name__
        rope_type = _rope_type(hf_config)
        if rope_type in ("longrope", "su", "yarn"):
            raise ValueError(
                f"{family}: rope_type={rope_type!r} (Phi-3 long-context rope with short_factor / long_factor) is not "
                "supported: megatron-core 0.16.1's RotaryEmbedding has no per-dimension rescaling factors"
            )
        kw = super().hf_config_to_megatron_kwargs(hf_config)  # Phi-3 has no biases (attention_bias unset)
        return {**kw, **window_settings(hf_config, family)}

    def megatron_to_hf_config(self, config: Any) -> Dict[str, Any]:
        hf = self.dense_hf_fields(config, head_dim=False)  # Phi-3 derives head_dim from hidden_size / heads
        family = type(self).__name__
        refuse_biases(config, family, "Phi-3")
        if config.kv_channels != config.hidden_size // config.num_attention_heads:
            raise ValueError(f"{family}: kv_channels={config.kv_channels} != hidden_size / num_attention_heads = "
                             f"{config.hidden_size // config.num_attention_heads}; Phi-3 derives head_dim from them")
        hf.update(sliding_window=uniform_window_hf_field(config, family),
                  original_max_position_embeddings=config.seq_length)
        if config.vocab_size <= _HF_DEFAULT_PAD_TOKEN_ID:  # Phi3Config's default pad id would be outside the vocabulary
            hf["pad_token_id"] = None
        return hf

    def mapping_registry(self) -> MegatronMappingRegistry:
        return MegatronMappingRegistry(*embedding_mappings(), *fused_qkv_attention_mappings(),
                                       *fused_gated_mlp_mappings())
