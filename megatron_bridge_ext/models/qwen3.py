"""Qwen3 (``Qwen3ForCausalLM``): Llama's layout plus per-head RMSNorms on queries and keys (``q_norm`` / ``k_norm``,
megatron ``qk_layernorm``), a ``head_dim`` independent of hidden / heads, and optional sliding-window layers
(``use_sliding_window``: the layers from ``max_window_layers`` on, carried as megatron's per-layer window pattern).
"""

from __future__ import annotations

from typing import Any, Dict

from megatron_bridge_ext.models.hf_config import qwen_window_hf_fields, window_settings
from megatron_bridge_ext.models.llama import LlamaBridge
from megatron_bridge_ext.models.tables import (
    GPT_MODEL,
    attention_mappings,
    embedding_mappings,
    gated_mlp_mappings,
    qk_norm_mappings,
)
from megatron_bridge_ext.registry import MegatronMappingRegistry

__all__ = ["Qwen3Bridge"]


@LlamaBridge.register_bridge(source="Qwen3ForCausalLM", target=GPT_MODEL)
class Qwen3Bridge(LlamaBridge):
    """HF Qwen3ForCausalLM <-> Megatron-Core GPTModel with q/k layernorm."""

    hf_model_type = "qwen3"

    def hf_config_to_megatron_kwargs(self, hf_config: Any) -> Dict[str, Any]:
        kw = super().hf_config_to_megatron_kwargs(hf_config)  # attention_bias needs MLP biases Qwen3 lacks: refused
        return {**kw, "qk_layernorm": True, **window_settings(hf_config, type(self).__name__)}

    def megatron_to_hf_config(self, config: Any) -> Dict[str, Any]:
        hf = self.dense_hf_fields(config)
        if not config.qk_layernorm:
            raise ValueError(f"{type(self).__name__}: qk_layernorm=False; Qwen3 always normalises queries and keys")
        # Qwen3's attention_bias covers q/k/v and o_proj; it has no MLP biases
        return {**hf, "attention_bias": bool(config.add_bias_linear),
                **qwen_window_hf_fields(config, type(self).__name__)}

    def mapping_registry(self) -> MegatronMappingRegistry:
        return MegatronMappingRegistry(*embedding_mappings(), *attention_mappings(), *qk_norm_mappings(),
                                       *gated_mlp_mappings())
