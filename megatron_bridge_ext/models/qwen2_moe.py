"""Qwen2-MoE (``Qwen2MoeForCausalLM``): Qwen2's attention (``qkv_bias``: q/k/v biases, no o_proj bias) with routed
SwiGLU experts behind a softmax top-k router (``norm_topk_prob``), plus a shared expert (a dense SwiGLU MLP of
``shared_expert_intermediate_size``) whose output is scaled by ``sigmoid(shared_expert_gate(x))`` (megatron
``moe_shared_expert_gate``, parameter ``mlp.shared_experts.gate_weight``); dense layers from ``mlp_only_layers`` /
``decoder_sparse_step``; Qwen2's optional sliding-window layers.

HF experts: one tensor per expert (what ``save_pretrained`` writes; the default) or fused, read from the keys.
"""

from __future__ import annotations

from typing import Any, Dict

from megatron_bridge_ext.models.hf_config import config_get, qwen_window_hf_fields, window_settings
from megatron_bridge_ext.models.llama import LlamaBridge
from megatron_bridge_ext.models.moe import (
    PER_EXPERT, family_expert_layout, moe_hf_fields, moe_runtime_kwargs, qwen_moe_pattern, qwen_moe_pattern_hf_fields,
    routed_expert_mappings, router_mappings, shared_expert_mappings, softmax_router_hf_fields, softmax_router_kwargs,
)
from megatron_bridge_ext.models.tables import GPT_MODEL, H, attention_mappings, embedding_mappings, gated_mlp_mappings
from megatron_bridge_ext.registry import MegatronMappingRegistry

__all__ = ["Qwen2MoeBridge"]


@LlamaBridge.register_bridge(source="Qwen2MoeForCausalLM", target=GPT_MODEL)
class Qwen2MoeBridge(LlamaBridge):
    """HF Qwen2MoeForCausalLM <-> Megatron-Core GPTModel with MoE layers and a gated shared expert."""

    hf_model_type = "qwen2_moe"
    default_hf_layout = PER_EXPERT

    def hf_config_to_megatron_kwargs(self, hf_config: Any) -> Dict[str, Any]:
        family = type(self).__name__
        kw = self.dense_megatron_kwargs(hf_config)
        shared = int(config_get(hf_config, "shared_expert_intermediate_size", 0) or 0)
        if shared <= 0:
            raise ValueError(f"{family}: shared_expert_intermediate_size={shared}; Qwen2-MoE's shared expert needs a "
                             "positive size")
        kw.update(
            add_qkv_bias=bool(config_get(hf_config, "qkv_bias", True)),  # q/k/v biases only
            add_bias_linear=False,
            **window_settings(hf_config, family),
            **moe_runtime_kwargs(config_get(hf_config, "num_experts"), config_get(hf_config, "num_experts_per_tok"),
                                 config_get(hf_config, "moe_intermediate_size"), qwen_moe_pattern(hf_config)),
            **softmax_router_kwargs(bool(config_get(hf_config, "norm_topk_prob", False))),
            moe_shared_expert_intermediate_size=shared,
            moe_shared_expert_gate=True,
        )
        return kw

    def megatron_to_hf_config(self, config: Any) -> Dict[str, Any]:
        family = type(self).__name__
        if config.add_bias_linear:
            raise ValueError(f"{family}: add_bias_linear=True; Qwen2-MoE has no o_proj / MLP biases")
        if not config.moe_shared_expert_intermediate_size or not config.moe_shared_expert_gate:
            raise ValueError(f"{family}: moe_shared_expert_intermediate_size="
                             f"{config.moe_shared_expert_intermediate_size}, moe_shared_expert_gate="
                             f"{config.moe_shared_expert_gate}; Qwen2-MoE has a gated shared expert")
        hf = self.dense_hf_fields(config)
        hf.update(qkv_bias=bool(config.add_qkv_bias),
                  shared_expert_intermediate_size=config.moe_shared_expert_intermediate_size,
                  **moe_hf_fields(config, "num_experts"), **softmax_router_hf_fields(config, family),
                  **qwen_moe_pattern_hf_fields(config), **qwen_window_hf_fields(config, family))
        return hf

    def detect_hf_layout(self, hf_state, hf_config):
        return family_expert_layout(self, hf_state, hf_config, experts_field="num_experts")

    def mapping_registry(self) -> MegatronMappingRegistry:
        return MegatronMappingRegistry(
            *embedding_mappings(), *attention_mappings(), *gated_mlp_mappings(), *router_mappings(),
            *routed_expert_mappings(self.hf_layout),
            *shared_expert_mappings(f"{H}.mlp.shared_expert", gate=f"{H}.mlp.shared_expert_gate.weight"),
        )
