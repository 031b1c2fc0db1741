"""Llama (``LlamaForCausalLM``): GQA attention, SwiGLU MLP, RMSNorm, RoPE (with HF rope scaling), tied or untied
embeddings."""

from __future__ import annotations

from typing import Any

from megatron_bridge_ext.bridge import MegatronModelBridge
from megatron_bridge_ext.config import hf_to_transformer_config
from megatron_bridge_ext.mappings import AutoMapping, GatedMLPMapping, QKVMapping
from megatron_bridge_ext.registry import MegatronMappingRegistry

__all__ = ["LlamaBridge"]

L = "decoder.layers.*"
H = "model.layers.*"


def _gpt_model_class():
    try:
        from megatron.core.models.gpt import GPTModel
    except ImportError:  # megatron-core absent: register by name only
        return "GPTModel"
    return GPTModel


@MegatronModelBridge.register_bridge(source="LlamaForCausalLM", target=_gpt_model_class())
class LlamaBridge(MegatronModelBridge):
    """HF LlamaForCausalLM <-> Megatron-Core GPTModel."""

    def transformer_config(self, hf_config: Any, **overrides: Any):
        return hf_to_transformer_config(hf_config, **overrides)

    def mapping_registry(self) -> MegatronMappingRegistry:
        return MegatronMappingRegistry(
            AutoMapping("embedding.word_embeddings.weight", "model.embed_tokens.weight"),
            AutoMapping("output_layer.weight", "lm_head.weight"),
            AutoMapping("decoder.final_layernorm.weight", "model.norm.weight"),
            AutoMapping(f"{L}.input_layernorm.weight", f"{H}.input_layernorm.weight"),
            AutoMapping(f"{L}.pre_mlp_layernorm.weight", f"{H}.post_attention_layernorm.weight"),
            QKVMapping(f"{L}.self_attention.linear_qkv.weight", q=f"{H}.self_attn.q_proj.weight",
                       k=f"{H}.self_attn.k_proj.weight", v=f"{H}.self_attn.v_proj.weight"),
            QKVMapping(f"{L}.self_attention.linear_qkv.bias", q=f"{H}.self_attn.q_proj.bias",
                       k=f"{H}.self_attn.k_proj.bias", v=f"{H}.self_attn.v_proj.bias"),
            AutoMapping(f"{L}.self_attention.linear_proj.weight", f"{H}.self_attn.o_proj.weight"),
            AutoMapping(f"{L}.self_attention.linear_proj.bias", f"{H}.self_attn.o_proj.bias"),
            GatedMLPMapping(f"{L}.mlp.linear_fc1.weight", gate=f"{H}.mlp.gate_proj.weight", up=f"{H}.mlp.up_proj.weight"),
            GatedMLPMapping(f"{L}.mlp.linear_fc1.bias", gate=f"{H}.mlp.gate_proj.bias", up=f"{H}.mlp.up_proj.bias"),
            AutoMapping(f"{L}.mlp.linear_fc2.weight", f"{H}.mlp.down_proj.weight"),
            AutoMapping(f"{L}.mlp.linear_fc2.bias", f"{H}.mlp.down_proj.bias"),
        )
