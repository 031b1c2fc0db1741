"""Gemma 3 text (``Gemma3ForCausalLM``, ``model_type`` ``gemma3_text``): Gemma 2's layout (GeGLU, zero-centred
sandwich norms, scaled embeddings, ``query_pre_attn_scalar``) plus zero-centred per-head q/k norms (``q_norm`` /
``k_norm`` -> ``qk_layernorm``), a 5:1 sliding / full layer pattern, and per-layer-type RoPE: full-attention layers
use ``rope_parameters["full_attention"]`` (the model's RoPE, default or linear scaling) and sliding layers
``rope_parameters["sliding_attention"]`` (``local_rotary_base``, built by ``LayerTypeRopeSelfAttention``).

Soft-capping (``attn_logit_softcapping`` / ``final_logit_softcapping``, None in released Gemma 3 checkpoints) converts
as for Gemma 2 when a config sets it (transformers runs attention capping only with eager / flex attention).
Sliding-layer RoPE other than the default type is refused (megatron-side it would need a second scaled rotary
embedding).
"""

from __future__ import annotations

from typing import Any, Dict

from megatron_bridge_ext.models.gemma2 import Gemma2Bridge
from megatron_bridge_ext.models.hf_config import layer_type_rope_hf_fields, layer_type_rope_kwargs
from megatron_bridge_ext.models.tables import (
    GPT_MODEL,
    attention_mappings,
    embedding_mappings,
    gated_mlp_mappings,
    post_norm_mappings,
    qk_norm_mappings,
)
from megatron_bridge_ext.registry import MegatronMappingRegistry

__all__ = ["Gemma3Bridge"]


@Gemma2Bridge.register_bridge(source="Gemma3ForCausalLM", target=GPT_MODEL)
class Gemma3Bridge(Gemma2Bridge):
    """HF Gemma3ForCausalLM <-> Megatron-Core GPTModel."""

    hf_model_type = "gemma3_text"

    def _common_kwargs(self, hf_config: Any) -> Dict[str, Any]:
        return layer_type_rope_kwargs(hf_config, type(self).__name__)

    def _rope_hf_fields(self, config: Any) -> Dict[str, Any]:
        return layer_type_rope_hf_fields(config)

    def hf_config_to_megatron_kwargs(self, hf_config: Any) -> Dict[str, Any]:
        return {**super().hf_config_to_megatron_kwargs(hf_config), "qk_layernorm": True}

    def megatron_to_hf_config(self, config: Any) -> Dict[str, Any]:
        if not config.qk_layernorm:
            raise ValueError(f"{type(self).__name__}: qk_layernorm=False; Gemma 3 always normalises queries and keys")
        return {**super().megatron_to_hf_config(config), "use_bidirectional_attention": False}

    def mapping_registry(self) -> MegatronMappingRegistry:
        return MegatronMappingRegistry(*embedding_mappings(), *attention_mappings(), *qk_norm_mappings(),
                                       *gated_mlp_mappings(pre_norm="pre_feedforward_layernorm"),
                                       *post_norm_mappings())
