"""Qwen3.5 dense, text only (``Qwen3_5ForCausalLM``, config ``Qwen3_5TextConfig``, ``model_type="qwen3_5_text"``):
Qwen3-Next's gated delta-net / gated attention layers (``models.gated_delta_net``) with a dense SwiGLU MLP in every
layer. Needs megatron-core >= 0.19 (refused by name below it).

Differences from Qwen3-Next: the delta-net's projections are split, ``in_proj_qkv`` (``[q; k; v]``, the convolution's
channel order) / ``in_proj_z`` / ``in_proj_b`` / ``in_proj_a`` (``mappings.gated_delta_net.GDNSplitInProjMapping``),
and the rotary embedding is multimodal RoPE (``mrope_section``): for text every section has the same positions, so it
is the plain (partial) RoPE megatron computes.

The released vision-language ``Qwen3_5ForConditionalGeneration`` checkpoints are ``models.qwen3_5_vl``'s. A
text-only checkpoint holding multi-token-prediction tensors (``mtp.*``) is refused by the engine naming them.
"""

from __future__ import annotations

from typing import Any, Dict

from megatron_bridge_ext.models.gated_delta_net import (
    GatedDeltaNetFamily, check_gdn_config, gated_attention_mappings, gdn_hf_fields, gdn_mappings, gdn_megatron_kwargs,
)
from megatron_bridge_ext.models.llama import LlamaBridge
from megatron_bridge_ext.models.tables import GPT_MODEL, embedding_mappings, gated_mlp_mappings
from megatron_bridge_ext.registry import MegatronMappingRegistry

__all__ = ["Qwen3_5Bridge"]


@LlamaBridge.register_bridge(source="Qwen3_5ForCausalLM", target=GPT_MODEL)
class Qwen3_5Bridge(GatedDeltaNetFamily, LlamaBridge):
    """HF Qwen3_5ForCausalLM <-> Megatron-Core GPTModel with gated delta-net layers and dense MLPs."""

    hf_model_type = "qwen3_5_text"

    def hf_config_to_megatron_kwargs(self, hf_config: Any) -> Dict[str, Any]:
        self.require_megatron_core()
        gdn = gdn_megatron_kwargs(hf_config, type(self).__name__)
        return {**super().hf_config_to_megatron_kwargs(hf_config), **gdn}

    def megatron_to_hf_config(self, config: Any) -> Dict[str, Any]:
        family = type(self).__name__
        check_gdn_config(config, family)
        if config.num_moe_experts:
            raise ValueError(f"{family}: num_moe_experts={config.num_moe_experts}; Qwen3.5 dense has no experts "
                             "(Qwen3_5MoeForCausalLM has)")
        return {**self.dense_hf_fields(config), **gdn_hf_fields(config)}

    def mapping_registry(self) -> MegatronMappingRegistry:
        return MegatronMappingRegistry(*embedding_mappings(), *gated_attention_mappings(), *gdn_mappings(True),
                                       *gated_mlp_mappings())
