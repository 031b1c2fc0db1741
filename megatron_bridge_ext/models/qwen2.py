"""Qwen2 (``Qwen2ForCausalLM``): Llama's layout plus q/k/v biases (no o_proj / MLP biases), and optional
sliding-window layers (``use_sliding_window``, ``max_window_layers``, ``layer_types``) as in Qwen3."""

from __future__ import annotations

from typing import Any, Dict

from megatron_bridge_ext.models.hf_config import qwen_window_hf_fields, window_settings
from megatron_bridge_ext.models.llama import LlamaBridge
from megatron_bridge_ext.models.tables import GPT_MODEL

__all__ = ["Qwen2Bridge"]


@LlamaBridge.register_bridge(source="Qwen2ForCausalLM", target=GPT_MODEL)
class Qwen2Bridge(LlamaBridge):
    """HF Qwen2ForCausalLM <-> Megatron-Core GPTModel (the Llama mapping table covers the q/k/v biases)."""

    hf_model_type = "qwen2"

    def hf_config_to_megatron_kwargs(self, hf_config: Any) -> Dict[str, Any]:
        kw = self.dense_megatron_kwargs(hf_config)
        return {**kw, "add_qkv_bias": True, "add_bias_linear": False, **window_settings(hf_config, type(self).__name__)}

    def megatron_to_hf_config(self, config: Any) -> Dict[str, Any]:
        # Qwen2's q/k/v biases are implied by the architecture: no bias fields
        return {**self.dense_hf_fields(config), **qwen_window_hf_fields(config, type(self).__name__)}
