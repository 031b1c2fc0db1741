"""Qwen2 (``Qwen2ForCausalLM``): Llama's layout plus q/k/v biases (no o_proj / MLP biases)."""

from __future__ import annotations

from typing import Any

from megatron_bridge_ext.config import hf_to_transformer_config
from megatron_bridge_ext.models.llama import LlamaBridge, _gpt_model_class

__all__ = ["Qwen2Bridge"]


@LlamaBridge.register_bridge(source="Qwen2ForCausalLM", target=_gpt_model_class())
class Qwen2Bridge(LlamaBridge):
    """HF Qwen2ForCausalLM <-> Megatron-Core GPTModel (the Llama mapping table covers the q/k/v biases)."""

    def transformer_config(self, hf_config: Any, **overrides: Any):
        overrides.setdefault("add_qkv_bias", True)
        overrides.setdefault("add_bias_linear", False)
        return hf_to_transformer_config(hf_config, **overrides)
