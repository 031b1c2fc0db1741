"""GLM-4.5 (``Glm4MoeForCausalLM``): GQA attention with q/k/v biases (``attention_bias``; no o_proj bias), optional
per-head q/k RMSNorms (``use_qk_norm``), partial RoPE (``partial_rotary_factor``, the first channels of each head,
halves rotated), the first ``first_k_dense_replace`` layers dense and the rest routed experts with shared experts
behind DeepSeek-V3's sigmoid router (``e_score_correction_bias`` kept in fp32, grouped top-k, routed scaling).

HF experts: one tensor per expert (what ``save_pretrained`` writes; the default) or fused, read from the keys.
Router weights stay fp32 in bf16 models, as HF keeps them. Multi-token-prediction layers (HF layers
``num_hidden_layers + i``, DeepSeek-V3's structure) convert when the checkpoint holds them (read from the keys).
"""

from __future__ import annotations

from typing import Any, Dict

from megatron_bridge_ext.engine import MegatronModelBridge
from megatron_bridge_ext.models.hf_config import (
    activation_hf_fields, common_hf_fields, common_megatron_kwargs, config_get, gated_activation_kwargs,
    refuse_megatron_settings,
    rms_norm_hf_fields, rms_norm_kwargs,
)
from megatron_bridge_ext.models.moe import (
    PER_EXPERT, first_k_dense_hf_field, first_k_dense_pattern, moe_hf_fields, moe_runtime_kwargs,
    routed_expert_mappings, router_mappings, shared_expert_mappings, shared_expert_size, sigmoid_router_hf_fields,
    sigmoid_router_kwargs,
    ungated_shared_experts_hf_field,
)
from megatron_bridge_ext.models.mtp import RoutedExpertsWithMTP, mtp_kwargs, mtp_mappings
from megatron_bridge_ext.models.tables import (
    GPT_MODEL, H, attention_mappings, embedding_mappings, gated_mlp_mappings, qk_norm_mappings,
)
from megatron_bridge_ext.registry import MegatronMappingRegistry

__all__ = ["Glm4MoeBridge"]


@MegatronModelBridge.register_bridge(source="Glm4MoeForCausalLM", target=GPT_MODEL)
class Glm4MoeBridge(RoutedExpertsWithMTP, MegatronModelBridge):
    """HF Glm4MoeForCausalLM <-> Megatron-Core GPTModel with MoE layers and shared experts."""

    hf_model_type = "glm4_moe"
    default_hf_layout = PER_EXPERT

    def hf_config_to_megatron_kwargs(self, hf_config: Any) -> Dict[str, Any]:
        family = type(self).__name__
        kw = common_megatron_kwargs(hf_config)
        shared = shared_expert_size(hf_config, family)
        pattern = first_k_dense_pattern(hf_config)
        kw.update(
            **rms_norm_kwargs(hf_config, default_eps=1e-5),
            **gated_activation_kwargs(hf_config, family),
            add_bias_linear=False,
            add_qkv_bias=bool(config_get(hf_config, "attention_bias", False)),  # q/k/v biases only
            qk_layernorm=bool(config_get(hf_config, "use_qk_norm", False)),
            **moe_runtime_kwargs(config_get(hf_config, "n_routed_experts"),
                                 config_get(hf_config, "num_experts_per_tok"),
                                 config_get(hf_config, "moe_intermediate_size"), pattern),
            **sigmoid_router_kwargs(hf_config, family),
            **mtp_kwargs(self.hf_layout.mtp, hf_config, family),
        )
        if shared:
            kw["moe_shared_expert_intermediate_size"] = shared
        return kw

    def megatron_to_hf_config(self, config: Any) -> Dict[str, Any]:
        family = type(self).__name__
        refuse_megatron_settings(config, family, "GLM-4.5", (("normalization", "RMSNorm"), ("gated_linear_unit", True),
                                                             ("add_bias_linear", False)))
        n_shared = ungated_shared_experts_hf_field(config, family)
        hf = {**super().megatron_to_hf_config(config), **common_hf_fields(config)}
        hf.update(
            **rms_norm_hf_fields(config),
            **activation_hf_fields(config),
            attention_bias=bool(config.add_qkv_bias),
            use_qk_norm=bool(config.qk_layernorm),
            n_shared_experts=n_shared,
            first_k_dense_replace=first_k_dense_hf_field(config, family),
            num_nextn_predict_layers=config.mtp_num_layers or 0,
            **moe_hf_fields(config, "n_routed_experts"),
            **sigmoid_router_hf_fields(config, family),
        )
        return hf

    def mapping_registry(self) -> MegatronMappingRegistry:
        layer = [*attention_mappings(), *qk_norm_mappings(), *gated_mlp_mappings(), *router_mappings(),
                 *routed_expert_mappings(self.hf_layout), *shared_expert_mappings(f"{H}.mlp.shared_experts")]
        return MegatronMappingRegistry(*mtp_mappings(self.hf_layout.mtp, layer), *embedding_mappings(), *layer)
