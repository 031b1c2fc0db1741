"""Mixtral (``MixtralForCausalLM``): Llama attention with a routed mixture of SwiGLU experts (top-k softmax router).

HF checkpoints hold one tensor per expert (``block_sparse_moe.experts.{e}.w1/w3/w2``: gate, up, down). Megatron holds
sequential experts (``mlp.experts.local_experts.{e}``, local spec) or grouped-GEMM experts (``linear_fc1.weight{e}``);
with expert parallelism each EP rank holds E / ep of them, and the engine rewrites local expert indices to global.
"""

from __future__ import annotations

from typing import Any

from megatron_bridge_ext.config import _get, hf_to_transformer_config
from megatron_bridge_ext.mappings import AutoMapping, GatedMLPMapping, ReplicatedMapping
from megatron_bridge_ext.models.llama import H, L, LlamaBridge, _gpt_model_class
from megatron_bridge_ext.registry import MegatronMappingRegistry

__all__ = ["MixtralBridge"]

E = f"{H}.block_sparse_moe.experts.*"


@LlamaBridge.register_bridge(source="MixtralForCausalLM", target=_gpt_model_class())
class MixtralBridge(LlamaBridge):
    """HF MixtralForCausalLM <-> Megatron-Core GPTModel with MoE layers."""

    def transformer_config(self, hf_config: Any, **overrides: Any):
        moe = dict(
            num_moe_experts=int(_get(hf_config, "num_local_experts")),
            moe_router_topk=int(_get(hf_config, "num_experts_per_tok")),
            moe_ffn_hidden_size=int(_get(hf_config, "intermediate_size")),
            moe_router_score_function="softmax",
            moe_router_pre_softmax=False,  # softmax over the top-k logits == HF's renormalised top-k probabilities
            moe_router_load_balancing_type="none",
            moe_aux_loss_coeff=0.0,
            moe_grouped_gemm=False,
            moe_token_dispatcher_type="allgather",
        )
        for key, value in moe.items():
            overrides.setdefault(key, value)
        return hf_to_transformer_config(hf_config, **overrides)

    def mapping_registry(self) -> MegatronMappingRegistry:
        dense = [m for m in super().mapping_registry() if ".mlp.linear_fc" not in m.megatron_param]
        return MegatronMappingRegistry(
            *dense,
            ReplicatedMapping(f"{L}.mlp.router.weight", f"{H}.block_sparse_moe.gate.weight"),
            # sequential experts (local spec)
            GatedMLPMapping(f"{L}.mlp.experts.local_experts.*.linear_fc1.weight", gate=f"{E}.w1.weight",
                            up=f"{E}.w3.weight"),
            AutoMapping(f"{L}.mlp.experts.local_experts.*.linear_fc2.weight", f"{E}.w2.weight"),
            # grouped-GEMM experts (Transformer Engine spec)
            GatedMLPMapping(f"{L}.mlp.experts.linear_fc1.weight*", gate=f"{E}.w1.weight", up=f"{E}.w3.weight"),
            AutoMapping(f"{L}.mlp.experts.linear_fc2.weight*", f"{E}.w2.weight"),
        )
