"""Qwen2 (``Qwen2ForCausalLM``): Llama's layout plus q/k/v biases (no o_proj / MLP biases), and optional
sliding-window layers (``use_sliding_window``, ``max_window_layers``, ``layer_types``) as in Qwen3."""

from __future__ import annotations

from typing import Any, Dict

from megatron_bridge_ext.mcore.config import window_settings
from megatron_bridge_ext.models.common import GPT_MODEL, qwen_window_hf_fields
from megatron_bridge_ext.models.llama import LlamaBridge

__all__ = ["Qwen2Bridge"]


@LlamaBridge.register_bridge(source="Qwen2ForCausalLM", target=GPT_MODEL)
class Qwen2Bridge(LlamaBridge):
    """HF Qwen2ForCausalLM <-> Megatron-Core GPTModel (the Llama mapping table covers the q/k/v biases)."""

    hf_model_type = "qwen2"

    def hf_config_to_megatron_kwargs(self, hf_config: Any) -> Dict[str, Any]:
        kw = super().hf_config_to_megatron_kwargs(hf_config)
        kw.update(add_qkv_bias=True, add_bias_linear=False, **window_settings(hf_config, type(self).__name__))
        return kw

    def megatron_to_hf_config(self, config: Any) -> Dict[str, Any]:
        hf = super().megatron_to_hf_config(config)
        for key in ("attention_bias", "mlp_bias"):  # Qwen2's q/k/v biases are implied by the architecture
            hf.pop(key)
        hf.update(qwen_window_hf_fields(config, type(self).__name__))
        return hf
