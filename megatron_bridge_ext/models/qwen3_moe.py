"""Qwen3-MoE (``Qwen3MoeForCausalLM``): Qwen3's attention (per-head q/k RMSNorms, ``head_dim`` independent of
hidden / heads) with routed SwiGLU experts behind a softmax top-k router (``norm_topk_prob`` renormalises the top-k
probabilities), dense layers where ``mlp_only_layers`` / ``decoder_sparse_step`` say so, and a sliding window on
every layer with ``use_sliding_window``.

HF experts are one tensor per expert (what transformers' ``save_pretrained`` writes, and the default when exporting
without a source) or fused ``gate_up_proj`` ``[E, 2F, D]`` / ``down_proj`` ``[E, D, F]`` (either orientation), read
from the checkpoint's keys; both give the same Megatron parameters.
"""

from __future__ import annotations

from typing import Any, Dict

from megatron_bridge_ext.models.hf_config import config_get, uniform_window_hf_field, window_settings
from megatron_bridge_ext.models.llama import LlamaBridge
from megatron_bridge_ext.models.moe import (
    PER_EXPERT, family_expert_layout, moe_hf_fields, moe_runtime_kwargs, qwen_moe_pattern, qwen_moe_pattern_hf_fields,
    routed_expert_mappings, router_mappings, softmax_router_hf_fields, softmax_router_kwargs,
)
from megatron_bridge_ext.models.tables import (
    GPT_MODEL, attention_mappings, embedding_mappings, gated_mlp_mappings, qk_norm_mappings,
)
from megatron_bridge_ext.registry import MegatronMappingRegistry

__all__ = ["Qwen3MoeBridge"]


@LlamaBridge.register_bridge(source="Qwen3MoeForCausalLM", target=GPT_MODEL)
class Qwen3MoeBridge(LlamaBridge):
    """HF Qwen3MoeForCausalLM <-> Megatron-Core GPTModel with q/k layernorm and MoE layers."""

    hf_model_type = "qwen3_moe"
    default_hf_layout = PER_EXPERT

    def hf_config_to_megatron_kwargs(self, hf_config: Any) -> Dict[str, Any]:
        kw = super().hf_config_to_megatron_kwargs(hf_config)  # attention_bias needs MLP biases Qwen3 lacks: refused
        return {
            **kw,
            "qk_layernorm": True,
            **window_settings(hf_config, type(self).__name__),  # use_sliding_window: every layer
            **moe_runtime_kwargs(config_get(hf_config, "num_experts"), config_get(hf_config, "num_experts_per_tok"),
                                 config_get(hf_config, "moe_intermediate_size"), qwen_moe_pattern(hf_config)),
            **softmax_router_kwargs(bool(config_get(hf_config, "norm_topk_prob", False))),
        }

    def megatron_to_hf_config(self, config: Any) -> Dict[str, Any]:
        family = type(self).__name__
        if not config.qk_layernorm:
            raise ValueError(f"{family}: qk_layernorm=False; Qwen3-MoE always normalises queries and keys")
        hf = self.dense_hf_fields(config)
        window = uniform_window_hf_field(config, family)
        # Qwen3's attention_bias covers q/k/v and o_proj; it has no MLP biases
        hf.update(attention_bias=bool(config.add_bias_linear), use_sliding_window=window is not None,
                  sliding_window=window,
                  **moe_hf_fields(config, "num_experts"), **softmax_router_hf_fields(config, family),
                  **qwen_moe_pattern_hf_fields(config))
        return hf

    def detect_hf_layout(self, hf_state, hf_config):
        return family_expert_layout(self, hf_state, hf_config, experts_field="num_experts")

    def mapping_registry(self) -> MegatronMappingRegistry:
        return MegatronMappingRegistry(*embedding_mappings(), *attention_mappings(), *qk_norm_mappings(),
                                       *gated_mlp_mappings(), *router_mappings(),
                                       *routed_expert_mappings(self.hf_layout))
