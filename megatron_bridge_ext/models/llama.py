"""Llama (``LlamaForCausalLM``): GQA attention, SwiGLU MLP, RMSNorm, RoPE (with HF rope scaling), tied or untied
embeddings. The base of the Llama-like families."""

from __future__ import annotations

from typing import Any, Dict

from megatron_bridge_ext.engine import MegatronModelBridge
from megatron_bridge_ext.mcore.config import config_get
from megatron_bridge_ext.models.common import (
    GPT_MODEL,
    activation_func,
    activation_name,
    attention_mappings,
    embedding_mappings,
    gated_mlp_mappings,
)
from megatron_bridge_ext.registry import MegatronMappingRegistry

__all__ = ["LlamaBridge"]


@MegatronModelBridge.register_bridge(source="LlamaForCausalLM", target=GPT_MODEL)
class LlamaBridge(MegatronModelBridge):
    """HF LlamaForCausalLM <-> Megatron-Core GPTModel."""

    hf_model_type = "llama"

    def hf_config_to_megatron_kwargs(self, hf_config: Any) -> Dict[str, Any]:
        kw = super().hf_config_to_megatron_kwargs(hf_config)
        family = type(self).__name__
        attn_bias = bool(config_get(hf_config, "attention_bias", False))
        mlp_bias = bool(config_get(hf_config, "mlp_bias", False))
        if attn_bias != mlp_bias:
            raise ValueError(
                f"{family}: attention_bias={attn_bias} with mlp_bias={mlp_bias} cannot be expressed (megatron's "
                "add_bias_linear covers q/k/v, o_proj and the MLP together)"
            )
        kw.update(
            normalization="RMSNorm",
            layernorm_epsilon=float(config_get(hf_config, "rms_norm_eps", 1e-6)),
            gated_linear_unit=True,
            activation_func=activation_func(config_get(hf_config, "hidden_act", "silu"), family),
            add_bias_linear=attn_bias,
            add_qkv_bias=attn_bias,
        )
        return kw

    def megatron_to_hf_config(self, config: Any) -> Dict[str, Any]:
        hf = super().megatron_to_hf_config(config)
        hf.update(
            rms_norm_eps=config.layernorm_epsilon,
            hidden_act=activation_name(config.activation_func),
            attention_bias=bool(config.add_bias_linear),
            mlp_bias=bool(config.add_bias_linear),
        )
        return hf

    def mapping_registry(self) -> MegatronMappingRegistry:
        return MegatronMappingRegistry(*embedding_mappings(), *attention_mappings(), *gated_mlp_mappings())
