"""Mixtral (``MixtralForCausalLM``): Llama attention with a routed mixture of SwiGLU experts (top-k softmax router).

HF checkpoints hold one tensor per expert (``block_sparse_moe.experts.{e}.w1/w3/w2``: gate, up, down). Megatron holds
sequential experts (``mlp.experts.local_experts.{e}``, local spec) or grouped-GEMM experts (``linear_fc1.weight{e}``);
with expert parallelism each EP rank holds E / ep of them. Each layer's experts convert with one fused op call per
rank (``ExpertFC1Mapping`` / ``ExpertFC2Mapping``). Experts, router and their config fields are the shared MoE pieces
of ``models.moe``, as for Qwen2-MoE / Qwen3-MoE: every layer has experts, the router takes a softmax over the top-k
logits (HF's renormalised top-k probabilities), and the expert width is HF ``intermediate_size``.
"""

from __future__ import annotations

from typing import Any, Dict

from megatron_bridge_ext.models.hf_config import config_get, uniform_window_hf_field, window_settings
from megatron_bridge_ext.models.llama import LlamaBridge
from megatron_bridge_ext.models.moe import (
    PER_EXPERT,
    moe_hf_fields,
    moe_runtime_kwargs,
    routed_expert_mappings,
    router_mappings,
    softmax_router_kwargs,
)
from megatron_bridge_ext.models.tables import (
    GPT_MODEL,
    H,
    attention_mappings,
    embedding_mappings,
    pre_mlp_norm_mappings,
)
from megatron_bridge_ext.registry import MegatronMappingRegistry

__all__ = ["MixtralBridge"]


@LlamaBridge.register_bridge(source="MixtralForCausalLM", target=GPT_MODEL)
class MixtralBridge(LlamaBridge):
    """HF MixtralForCausalLM <-> Megatron-Core GPTModel with MoE layers."""

    hf_model_type = "mixtral"
    required_hf_fields = LlamaBridge.required_hf_fields + ("num_local_experts", "num_experts_per_tok")

    def hf_config_to_megatron_kwargs(self, hf_config: Any) -> Dict[str, Any]:
        kw = super().hf_config_to_megatron_kwargs(hf_config)
        return {
            **kw,
            **moe_runtime_kwargs(config_get(hf_config, "num_local_experts"),
                                 config_get(hf_config, "num_experts_per_tok"),
                                 config_get(hf_config, "intermediate_size"),
                                 [1] * int(config_get(hf_config, "num_hidden_layers"))),
            **softmax_router_kwargs(True),  # softmax over the top-k logits == HF's renormalised top-k probabilities
            **window_settings(hf_config, type(self).__name__),  # Mixtral's sliding_window applies to every layer
        }

    def megatron_to_hf_config(self, config: Any) -> Dict[str, Any]:
        return {**self.dense_hf_fields(config),
                **moe_hf_fields(config, "num_local_experts", ffn_field="intermediate_size"),
                "sliding_window": uniform_window_hf_field(config, type(self).__name__)}

    def mapping_registry(self) -> MegatronMappingRegistry:
        return MegatronMappingRegistry(
            *embedding_mappings(),
            *attention_mappings(),
            *pre_mlp_norm_mappings(),
            *router_mappings(f"{H}.block_sparse_moe.gate"),
            *routed_expert_mappings(PER_EXPERT, experts=f"{H}.block_sparse_moe.experts", gate="w1", up="w3",
                                    down="w2"),
        )
