"""Llama (``LlamaForCausalLM``): GQA attention, SwiGLU MLP, RMSNorm, RoPE (with HF rope scaling), tied or untied
embeddings. The base of the Llama-like families, which share its mapping table and compose their configs from the
same pieces (``models.hf_config``)."""

from __future__ import annotations

from typing import Any, Dict

from megatron_bridge_ext.engine import MegatronModelBridge
from megatron_bridge_ext.models.hf_config import (
    activation_hf_fields,
    check_linear_biases,
    common_megatron_kwargs,
    gated_activation_kwargs,
    linear_bias_hf_fields,
    linear_bias_kwargs,
    model_size_hf_fields,
    rms_norm_hf_fields,
    rms_norm_kwargs,
    rope_hf_fields,
)
from megatron_bridge_ext.models.tables import GPT_MODEL, attention_mappings, embedding_mappings, gated_mlp_mappings
from megatron_bridge_ext.registry import MegatronMappingRegistry

__all__ = ["LlamaBridge"]


@MegatronModelBridge.register_bridge(source="LlamaForCausalLM", target=GPT_MODEL)
class LlamaBridge(MegatronModelBridge):
    """HF LlamaForCausalLM <-> Megatron-Core GPTModel."""

    hf_model_type = "llama"

    def dense_megatron_kwargs(self, hf_config: Any) -> Dict[str, Any]:
        """What the Llama-like families read alike: sizes, RoPE, dtype, RMSNorm and the gated activation (HF
        ``hidden_act``); each adds its biases, windows, q/k norms or experts.

        Raises:
            ValueError: ``attention_bias`` != ``mlp_bias`` (megatron's ``add_bias_linear`` covers both), an
                unsupported activation or RoPE (named).
        """
        family = type(self).__name__
        kw = common_megatron_kwargs(hf_config)
        check_linear_biases(hf_config, family)
        return {**kw, **rms_norm_kwargs(hf_config), **gated_activation_kwargs(hf_config, family)}

    def dense_hf_fields(self, config: Any, *, head_dim: bool = True) -> Dict[str, Any]:
        """The reverse of :meth:`dense_megatron_kwargs`, with the architecture and model type (``head_dim``: write
        HF ``head_dim``)."""
        return {**super().megatron_to_hf_config(config), **model_size_hf_fields(config, head_dim=head_dim),
                **rope_hf_fields(config), **rms_norm_hf_fields(config), **activation_hf_fields(config)}

    def hf_config_to_megatron_kwargs(self, hf_config: Any) -> Dict[str, Any]:
        return {**self.dense_megatron_kwargs(hf_config), **linear_bias_kwargs(hf_config, type(self).__name__)}

    def megatron_to_hf_config(self, config: Any) -> Dict[str, Any]:
        return {**self.dense_hf_fields(config), **linear_bias_hf_fields(config)}

    def mapping_registry(self) -> MegatronMappingRegistry:
        return MegatronMappingRegistry(*embedding_mappings(), *attention_mappings(), *gated_mlp_mappings())
