"""Mixtral (``MixtralForCausalLM``): Llama attention with a routed mixture of SwiGLU experts (top-k softmax router).

HF checkpoints hold one tensor per expert (``block_sparse_moe.experts.{e}.w1/w3/w2``: gate, up, down). Megatron holds
sequential experts (``mlp.experts.local_experts.{e}``, local spec) or grouped-GEMM experts (``linear_fc1.weight{e}``);
with expert parallelism each EP rank holds E / ep of them. Each layer's experts convert with one fused op call per
rank (``ExpertFC1Mapping`` / ``ExpertFC2Mapping``).
"""

from __future__ import annotations

from typing import Any, Dict

from megatron_bridge_ext.mappings import ExpertFC1Mapping, ExpertFC2Mapping, ReplicatedMapping
from megatron_bridge_ext.mcore.config import config_get, uniform_window_hf_field, window_settings
from megatron_bridge_ext.models.common import GPT_MODEL, H, L, attention_mappings, embedding_mappings
from megatron_bridge_ext.models.llama import LlamaBridge
from megatron_bridge_ext.registry import MegatronMappingRegistry

__all__ = ["MixtralBridge"]

E = f"{H}.block_sparse_moe.experts.*"


@LlamaBridge.register_bridge(source="MixtralForCausalLM", target=GPT_MODEL)
class MixtralBridge(LlamaBridge):
    """HF MixtralForCausalLM <-> Megatron-Core GPTModel with MoE layers."""

    hf_model_type = "mixtral"
    required_hf_fields = LlamaBridge.required_hf_fields + ("num_local_experts", "num_experts_per_tok")

    def hf_config_to_megatron_kwargs(self, hf_config: Any) -> Dict[str, Any]:
        kw = super().hf_config_to_megatron_kwargs(hf_config)
        kw.update(
            num_moe_experts=int(config_get(hf_config, "num_local_experts")),
            moe_router_topk=int(config_get(hf_config, "num_experts_per_tok")),
            moe_ffn_hidden_size=int(config_get(hf_config, "intermediate_size")),
            moe_router_score_function="softmax",
            moe_router_pre_softmax=False,  # softmax over the top-k logits == HF's renormalised top-k probabilities
            moe_router_load_balancing_type="none",
            moe_aux_loss_coeff=0.0,
            moe_grouped_gemm=False,
            moe_token_dispatcher_type="allgather",
            **window_settings(hf_config, type(self).__name__),  # Mixtral's sliding_window applies to every layer
        )
        return kw

    def megatron_to_hf_config(self, config: Any) -> Dict[str, Any]:
        hf = super().megatron_to_hf_config(config)
        for key in ("attention_bias", "mlp_bias"):
            hf.pop(key)
        hf.update(num_local_experts=config.num_moe_experts, num_experts_per_tok=config.moe_router_topk,
                  intermediate_size=config.moe_ffn_hidden_size,
                  sliding_window=uniform_window_hf_field(config, type(self).__name__))
        return hf

    def mapping_registry(self) -> MegatronMappingRegistry:
        return MegatronMappingRegistry(
            *embedding_mappings(),
            *attention_mappings(),
            ReplicatedMapping(f"{L}.pre_mlp_layernorm.weight", f"{H}.post_attention_layernorm.weight"),
            ReplicatedMapping(f"{L}.mlp.router.weight", f"{H}.block_sparse_moe.gate.weight"),
            # sequential experts (local spec) and grouped-GEMM names (Transformer Engine spec)
            ExpertFC1Mapping(f"{L}.mlp.experts.local_experts.*.linear_fc1.weight", gate=f"{E}.w1.weight",
                             up=f"{E}.w3.weight"),
            ExpertFC2Mapping(f"{L}.mlp.experts.local_experts.*.linear_fc2.weight", f"{E}.w2.weight"),
            ExpertFC1Mapping(f"{L}.mlp.experts.linear_fc1.weight*", gate=f"{E}.w1.weight", up=f"{E}.w3.weight"),
            ExpertFC2Mapping(f"{L}.mlp.experts.linear_fc2.weight*", f"{E}.w2.weight"),
        )
