"""Qwen3-Next (``Qwen3NextForCausalLM``): gated delta-net (linear attention) layers and gated softmax-attention
layers in HF's ``layer_types`` pattern (``models.gated_delta_net``), zero-centred RMSNorms, partial RoPE, and MoE
MLPs: routed SwiGLU experts behind a softmax top-k router (``norm_topk_prob``) plus a shared expert scaled by
``sigmoid(shared_expert_gate(x))`` (megatron ``moe_shared_expert_gate``), dense layers where ``mlp_only_layers`` /
``decoder_sparse_step`` say so. Needs megatron-core >= 0.19 (refused by name below it).

HF's gated delta-net projections are ``in_proj_qkvz`` / ``in_proj_ba``, grouped by key head
(``mappings.gated_delta_net.GDNInProjMapping``). HF experts: one tensor per expert (``save_pretrained``; the default)
or fused, read from the keys.

Not converted: the released checkpoints' multi-token-prediction tensors (``mtp.*``; transformers skips them) are not
mapped, so such a checkpoint is refused by the engine naming them.
"""

from __future__ import annotations

from typing import Any, Dict

from megatron_bridge_ext.models.gated_delta_net import (
    GatedDeltaNetFamily, check_gdn_config, gated_attention_mappings, gdn_hf_fields, gdn_mappings, gdn_megatron_kwargs,
)
from megatron_bridge_ext.models.hf_config import config_get
from megatron_bridge_ext.models.llama import LlamaBridge
from megatron_bridge_ext.models.moe import (
    PER_EXPERT, family_expert_layout, moe_hf_fields, moe_runtime_kwargs, qwen_moe_pattern, qwen_moe_pattern_hf_fields,
    routed_expert_mappings, router_mappings, shared_expert_mappings, softmax_router_hf_fields, softmax_router_kwargs,
)
from megatron_bridge_ext.models.tables import GPT_MODEL, H, embedding_mappings, gated_mlp_mappings
from megatron_bridge_ext.registry import MegatronMappingRegistry

__all__ = ["Qwen3NextBridge"]


def shared_expert_kwargs(hf_config: Any, family: str) -> Dict[str, Any]:
    """The gated shared expert of the Qwen MoE families (``shared_expert_intermediate_size`` > 0)."""
    shared = int(config_get(hf_config, "shared_expert_intermediate_size", 0) or 0)
    if shared <= 0:
        raise ValueError(f"{family}: shared_expert_intermediate_size={shared}; the family's shared expert needs a "
                         "positive size")
    return {"moe_shared_expert_intermediate_size": shared, "moe_shared_expert_gate": True}


def check_shared_expert(config: Any, family: str) -> Dict[str, Any]:
    """HF ``shared_expert_intermediate_size`` of a Megatron config with a gated shared expert."""
    if not config.moe_shared_expert_intermediate_size or not config.moe_shared_expert_gate:
        raise ValueError(f"{family}: moe_shared_expert_intermediate_size={config.moe_shared_expert_intermediate_size}"
                         f", moe_shared_expert_gate={config.moe_shared_expert_gate}; the family has a gated shared "
                         "expert")
    return {"shared_expert_intermediate_size": config.moe_shared_expert_intermediate_size}


def gdn_moe_kwargs(hf_config: Any, family: str, moe_pattern: Any, norm_topk_prob: bool) -> Dict[str, Any]:
    """The MoE fields of the gated delta-net MoE families (Qwen3-Next, Qwen3.5 MoE): routed experts where
    ``moe_pattern`` says, behind a softmax top-k router (``norm_topk_prob``: renormalised top-k), and a gated shared
    expert."""
    return {
        **moe_runtime_kwargs(config_get(hf_config, "num_experts"), config_get(hf_config, "num_experts_per_tok"),
                             config_get(hf_config, "moe_intermediate_size"), moe_pattern),
        **softmax_router_kwargs(norm_topk_prob),
        **shared_expert_kwargs(hf_config, family),
    }


def gdn_moe_hf_fields(config: Any, family: str) -> Dict[str, Any]:
    """HF fields of a Megatron config's gated delta-net layers, routed experts and gated shared expert (the families
    write the router and the MoE pattern each in their own way)."""
    return {**gdn_hf_fields(config), **moe_hf_fields(config, "num_experts"), **check_shared_expert(config, family)}


@LlamaBridge.register_bridge(source="Qwen3NextForCausalLM", target=GPT_MODEL)
class Qwen3NextBridge(GatedDeltaNetFamily, LlamaBridge):
    """HF Qwen3NextForCausalLM <-> Megatron-Core GPTModel with gated delta-net layers and MoE MLPs."""

    hf_model_type = "qwen3_next"
    default_hf_layout = PER_EXPERT
    split_in_proj = False  # in_proj_qkvz / in_proj_ba

    def hf_config_to_megatron_kwargs(self, hf_config: Any) -> Dict[str, Any]:
        family = type(self).__name__
        self.require_megatron_core()
        gdn = gdn_megatron_kwargs(hf_config, family)
        kw = super().hf_config_to_megatron_kwargs(hf_config)
        return {**kw, **gdn, **gdn_moe_kwargs(hf_config, family, qwen_moe_pattern(hf_config),
                                              bool(config_get(hf_config, "norm_topk_prob", False)))}

    def megatron_to_hf_config(self, config: Any) -> Dict[str, Any]:
        family = type(self).__name__
        check_gdn_config(config, family)
        return {**self.dense_hf_fields(config), **gdn_moe_hf_fields(config, family),
                **softmax_router_hf_fields(config, family), **qwen_moe_pattern_hf_fields(config)}

    def detect_hf_layout(self, hf_state, hf_config):
        return family_expert_layout(self, hf_state, hf_config, experts_field="num_experts")

    def mapping_registry(self) -> MegatronMappingRegistry:
        return MegatronMappingRegistry(
            *embedding_mappings(), *gated_attention_mappings(), *gdn_mappings(self.split_in_proj),
            *gated_mlp_mappings(), *router_mappings(), *routed_expert_mappings(self.hf_layout),
            *shared_expert_mappings(f"{H}.mlp.shared_expert", gate=f"{H}.mlp.shared_expert_gate.weight"),
        )
