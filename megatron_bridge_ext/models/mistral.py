"""Mistral (``MistralForCausalLM``): Llama's layout (no biases) with sliding-window attention on every layer.

HF ``sliding_window = W`` (the W most recent positions, the query's own included) is megatron's
``window_size = (W - 1, 0)``; ``sliding_window = None`` is full causal attention.
"""

from __future__ import annotations

from typing import Any, Dict

from megatron_bridge_ext.mcore.config import uniform_window_hf_field, window_settings
from megatron_bridge_ext.models.common import GPT_MODEL
from megatron_bridge_ext.models.llama import LlamaBridge

__all__ = ["MistralBridge"]


@LlamaBridge.register_bridge(source="MistralForCausalLM", target=GPT_MODEL)
class MistralBridge(LlamaBridge):
    """HF MistralForCausalLM <-> Megatron-Core GPTModel (Llama's mapping table)."""

    hf_model_type = "mistral"

    def hf_config_to_megatron_kwargs(self, hf_config: Any) -> Dict[str, Any]:
        kw = super().hf_config_to_megatron_kwargs(hf_config)
        kw.update(window_settings(hf_config, type(self).__name__))
        return kw

    def megatron_to_hf_config(self, config: Any) -> Dict[str, Any]:
        hf = super().megatron_to_hf_config(config)
        family = type(self).__name__
        if config.add_bias_linear or config.add_qkv_bias:
            raise ValueError(f"{family}: add_bias_linear={config.add_bias_linear}, add_qkv_bias={config.add_qkv_bias}"
                             ": Mistral has no biases")
        for key in ("attention_bias", "mlp_bias"):
            hf.pop(key)
        hf["sliding_window"] = uniform_window_hf_field(config, family)
        return hf
