"""OLMoE (``OlmoeForCausalLM``): Llama's pre-norm layout and RoPE with every MLP a mixture of SwiGLU experts
behind a softmax top-k router (``norm_topk_prob`` renormalises the top-k probabilities; no shared experts, no dense
layers) and OLMo 2's query / key norms over the whole projection (``q_norm`` ``[hidden_size]``, ``k_norm``
``[G * hidden_size / H]``; megatron ``qk_layernorm_whole_projection``, see ``models/olmo2.py``).

HF experts are one tensor per expert (the released checkpoints and transformers' ``save_pretrained``; the default
when exporting without a source) or fused ``gate_up_proj`` ``[E, 2F, D]`` / ``down_proj`` ``[E, D, F]`` (either
orientation), read from the checkpoint's keys.

Refused with named errors: ``clip_qkv`` (HF clamps q / k / v after the norms; megatron has no such clamp),
``attention_bias`` (q/k/v and o_proj biases without MLP biases), a ``sliding_window`` (HF OLMoE passes it to
flash attention only: its eager / sdpa masks ignore it), a ``head_dim`` other than ``hidden_size //
num_attention_heads`` (HF sizes ``q_norm`` by ``hidden_size``).
"""

from __future__ import annotations

from typing import Any, Dict

from megatron_bridge_ext.models.hf_config import config_get, rms_norm_kwargs
from megatron_bridge_ext.models.llama import LlamaBridge
from megatron_bridge_ext.models.moe import (
    PER_EXPERT,
    family_expert_layout,
    moe_hf_fields,
    moe_runtime_kwargs,
    routed_expert_mappings,
    router_mappings,
    softmax_router_hf_fields,
    softmax_router_kwargs,
)
from megatron_bridge_ext.models.olmo2 import WHOLE_QK_NORMS, check_whole_qk_norms
from megatron_bridge_ext.models.tables import (
    GPT_MODEL,
    attention_mappings,
    embedding_mappings,
    pre_mlp_norm_mappings,
    whole_qk_norm_mappings,
)
from megatron_bridge_ext.registry import MegatronMappingRegistry

__all__ = ["OlmoeBridge"]


def _check_hf_head_dim(hf_config: Any, family: str) -> None:
    """HF OLMoE sizes ``q_norm`` by ``hidden_size`` and ``k_norm`` by ``hidden_size // num_attention_heads``-wide
    heads while its projections read ``head_dim`` when a config carries one: another ``head_dim`` gives no model.

    Raises:
        ValueError: naming ``head_dim`` and the width the family implies.
    """
    head_dim = config_get(hf_config, "head_dim")
    derived = int(config_get(hf_config, "hidden_size")) // int(config_get(hf_config, "num_attention_heads"))
    if head_dim is not None and int(head_dim) != derived:
        raise ValueError(f"{family}: head_dim={head_dim} is not supported: OLMoE's q / k norms are sized for "
                         f"hidden_size // num_attention_heads = {derived}-wide heads")


@LlamaBridge.register_bridge(source="OlmoeForCausalLM", target=GPT_MODEL)
class OlmoeBridge(LlamaBridge):
    """HF OlmoeForCausalLM <-> Megatron-Core GPTModel with whole-projection q/k norms and MoE layers."""

    hf_model_type = "olmoe"
    default_hf_layout = PER_EXPERT
    required_hf_fields = LlamaBridge.required_hf_fields + ("num_experts", "num_experts_per_tok")

    def hf_config_to_megatron_kwargs(self, hf_config: Any) -> Dict[str, Any]:
        family = type(self).__name__
        for field in ("clip_qkv", "sliding_window"):
            value = config_get(hf_config, field)
            if value is not None:
                raise ValueError(f"{family}: {field}={value!r} is not supported (None: "
                                 + ("no clamping of q / k / v" if field == "clip_qkv" else
                                    "HF OLMoE applies a window with flash attention only") + ")")
        _check_hf_head_dim(hf_config, family)
        kw = super().hf_config_to_megatron_kwargs(hf_config)  # attention_bias needs MLP biases OLMoE lacks: refused
        return {
            **kw,
            **rms_norm_kwargs(hf_config, default_eps=1e-5),  # OlmoeConfig's default (Llama's is 1e-6)
            **WHOLE_QK_NORMS,
            **moe_runtime_kwargs(config_get(hf_config, "num_experts"), config_get(hf_config, "num_experts_per_tok"),
                                 config_get(hf_config, "intermediate_size"),
                                 [1] * int(config_get(hf_config, "num_hidden_layers"))),
            **softmax_router_kwargs(bool(config_get(hf_config, "norm_topk_prob", False))),
        }

    def megatron_to_hf_config(self, config: Any) -> Dict[str, Any]:
        family = type(self).__name__
        check_whole_qk_norms(config, family)
        derived = config.hidden_size // config.num_attention_heads
        if config.kv_channels != derived:
            raise ValueError(f"{family}: kv_channels={config.kv_channels} has no OLMoE equivalent (HF derives "
                             f"head_dim = hidden_size // num_attention_heads = {derived})")
        if config.window_size:
            raise ValueError(f"{family}: window_size={tuple(config.window_size)} has no OLMoE equivalent")
        if config.add_bias_linear or config.add_qkv_bias:
            raise ValueError(f"{family}: add_bias_linear={config.add_bias_linear}, add_qkv_bias="
                             f"{config.add_qkv_bias}: OLMoE's attention_bias covers q/k/v and o_proj only, its experts "
                             "have no biases")
        if config.moe_layer_freq != 1 or config.moe_shared_expert_intermediate_size:
            raise ValueError(f"{family}: moe_layer_freq={config.moe_layer_freq}, moe_shared_expert_intermediate_size="
                             f"{config.moe_shared_expert_intermediate_size}: OLMoE has routed experts on every layer "
                             "and no shared experts")
        hf = self.dense_hf_fields(config, head_dim=False)
        hf.update(attention_bias=False, clip_qkv=None,
                  **moe_hf_fields(config, "num_experts", ffn_field="intermediate_size"),
                  **softmax_router_hf_fields(config, family))
        return hf

    def detect_hf_layout(self, hf_state, hf_config):
        return family_expert_layout(self, hf_state, hf_config, experts_field="num_experts",
                                    ffn_field="intermediate_size")

    def mapping_registry(self) -> MegatronMappingRegistry:
        return MegatronMappingRegistry(*embedding_mappings(), *attention_mappings(), *whole_qk_norm_mappings(),
                                       *pre_mlp_norm_mappings(), *router_mappings(),
                                       *routed_expert_mappings(self.hf_layout))
