"""Qwen3.5 MoE, text only (``Qwen3_5MoeForCausalLM``, config ``Qwen3_5MoeTextConfig``,
``model_type="qwen3_5_moe_text"``): Qwen3.5's gated delta-net / gated attention layers (``models.qwen3_5``) with a
mixture of experts in every layer: routed SwiGLU experts behind a softmax top-k router that always renormalises the
top-k probabilities (HF has no ``norm_topk_prob`` field: megatron ``moe_router_pre_softmax=False``) and a shared
expert scaled by ``sigmoid(shared_expert_gate(x))``. Needs megatron-core >= 0.19 (refused by name below it).

HF experts: one tensor per expert (``save_pretrained``; the default) or fused, read from the keys. The released
vision-language ``Qwen3_5MoeForConditionalGeneration`` checkpoints are ``models.qwen3_5_vl``'s; a text-only checkpoint
holding ``mtp.*`` tensors is refused by the engine naming them.
"""

from __future__ import annotations

from typing import Any, Dict

from megatron_bridge_ext.models.gated_delta_net import (
    GatedDeltaNetFamily, check_gdn_config, gated_attention_mappings, gdn_mappings, gdn_megatron_kwargs,
)
from megatron_bridge_ext.models.hf_config import config_get
from megatron_bridge_ext.models.llama import LlamaBridge
from megatron_bridge_ext.models.moe import (
    PER_EXPERT, family_expert_layout, megatron_moe_pattern, routed_expert_mappings, router_mappings,
    shared_expert_mappings, softmax_router_hf_fields,
)
from megatron_bridge_ext.models.qwen3_next import gdn_moe_hf_fields, gdn_moe_kwargs
from megatron_bridge_ext.models.tables import GPT_MODEL, H, embedding_mappings, pre_mlp_norm_mappings
from megatron_bridge_ext.registry import MegatronMappingRegistry

__all__ = ["Qwen3_5MoeBridge"]


@LlamaBridge.register_bridge(source="Qwen3_5MoeForCausalLM", target=GPT_MODEL)
class Qwen3_5MoeBridge(GatedDeltaNetFamily, LlamaBridge):
    """HF Qwen3_5MoeForCausalLM <-> Megatron-Core GPTModel with gated delta-net layers and MoE MLPs."""

    hf_model_type = "qwen3_5_moe_text"
    default_hf_layout = PER_EXPERT
    required_hf_fields = LlamaBridge.required_hf_fields + ("num_experts", "num_experts_per_tok")

    def hf_config_to_megatron_kwargs(self, hf_config: Any) -> Dict[str, Any]:
        family = type(self).__name__
        self.require_megatron_core()
        gdn = gdn_megatron_kwargs(hf_config, family)
        layers = int(config_get(hf_config, "num_hidden_layers"))
        return {**super().hf_config_to_megatron_kwargs(hf_config), **gdn,
                **gdn_moe_kwargs(hf_config, family, [1] * layers, True)}

    def megatron_to_hf_config(self, config: Any) -> Dict[str, Any]:
        family = type(self).__name__
        check_gdn_config(config, family)
        if 0 in megatron_moe_pattern(config):
            raise ValueError(f"{family}: moe_layer_freq={config.moe_layer_freq}: every Qwen3.5 MoE layer has experts")
        if not softmax_router_hf_fields(config, family).get("norm_topk_prob", False):
            raise ValueError(f"{family}: the router does not renormalise the top-k probabilities; Qwen3.5 MoE always "
                             "does (HF has no norm_topk_prob)")
        return {**self.dense_hf_fields(config), **gdn_moe_hf_fields(config, family)}

    def detect_hf_layout(self, hf_state, hf_config):
        return family_expert_layout(self, hf_state, hf_config, experts_field="num_experts")

    def mapping_registry(self) -> MegatronMappingRegistry:
        return MegatronMappingRegistry(
            *embedding_mappings(), *gated_attention_mappings(), *gdn_mappings(True), *pre_mlp_norm_mappings(),
            *router_mappings(), *routed_expert_mappings(self.hf_layout),
            *shared_expert_mappings(f"{H}.mlp.shared_expert", gate=f"{H}.mlp.shared_expert_gate.weight"),
        )
