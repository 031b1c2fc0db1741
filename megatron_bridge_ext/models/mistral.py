"""Mistral (``MistralForCausalLM``): Llama's layout (no biases) with sliding-window attention on every layer.

HF ``sliding_window = W`` (the W most recent positions, the query's own included) is megatron's
``window_size = (W - 1, 0)``; ``sliding_window = None`` is full causal attention.
"""

from __future__ import annotations

from typing import Any, Dict

from megatron_bridge_ext.models.hf_config import refuse_biases, uniform_window_hf_field, window_settings
from megatron_bridge_ext.models.llama import LlamaBridge
from megatron_bridge_ext.models.tables import GPT_MODEL

__all__ = ["MistralBridge"]


@LlamaBridge.register_bridge(source="MistralForCausalLM", target=GPT_MODEL)
class MistralBridge(LlamaBridge):
    """HF MistralForCausalLM <-> Megatron-Core GPTModel (Llama's mapping table)."""

    hf_model_type = "mistral"

    def hf_config_to_megatron_kwargs(self, hf_config: Any) -> Dict[str, Any]:
        kw = super().hf_config_to_megatron_kwargs(hf_config)
        return {**kw, **window_settings(hf_config, type(self).__name__)}

    def megatron_to_hf_config(self, config: Any) -> Dict[str, Any]:
        family = type(self).__name__
        hf = self.dense_hf_fields(config)
        refuse_biases(config, family, "Mistral")
        return {**hf, "sliding_window": uniform_window_hf_field(config, family)}
