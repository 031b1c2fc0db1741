"""GPT-OSS (``GptOssForCausalLM``): GQA attention with biases everywhere and a learnable attention sink per head,
sliding-window / full layers (``layer_types``), YaRN RoPE, and on every layer routed experts with biases behind a
biased router (top-k on the logits, softmax over the k), whose activation is a clamped SwiGLU:
``(clamp(up, -l, l) + 1) * g * sigmoid(alpha * g)`` with ``g = clamp(gate, max=l)``.

All of it is expressible in megatron-core 0.16.1: sinks are ``softmax_type="learnable"`` (``DotProductAttention``'s
``core_attention.softmax_offset``, split by heads over TP); the activation is ``quick_gelu`` (``x * sigmoid(1.702 x)``:
``swiglu_alpha`` must be 1.702) with ``glu_linear_offset=1`` and ``activation_func_clamp_value=swiglu_limit``; biases
are ``add_bias_linear`` (q/k/v, o_proj, router, experts); YaRN is ``position_embedding_type="yarn"`` with the
``yarn_*`` fields of ``mcore.config.YarnGPTConfig`` (megatron's attention multiplies in YaRN's concentration factor).

HF experts are fused: ``gate_up_proj`` ``[E, D, 2F]`` with gate / up interleaved along 2F, ``gate_up_proj_bias``
``[E, 2F]`` (interleaved), ``down_proj`` ``[E, F, D]``, ``down_proj_bias`` ``[E, D]`` (what transformers writes, and
the default when exporting without a source). The MXFP4 releases (``*_blocks`` / ``*_scales`` experts) are read as
their dequantized experts (:mod:`megatron_bridge_ext.io.quantized`). Expert-tensor parallelism is refused: megatron-core 0.16.1 supports expert biases only
with ``expert_tensor_parallel_size=1`` (TP > 1 works with an explicit ETP of 1).
"""

from __future__ import annotations

from typing import Any, Dict

from megatron_bridge_ext.engine import MegatronModelBridge
from megatron_bridge_ext.mcore.config import quick_gelu
from megatron_bridge_ext.models.hf_config import (
    common_hf_fields,
    common_megatron_kwargs,
    config_get,
    refuse_megatron_settings,
    rms_norm_hf_fields,
    rms_norm_kwargs,
    window_hf_fields,
    window_settings,
)
from megatron_bridge_ext.models.moe import (
    ExpertLayout, family_expert_layout, moe_hf_fields, moe_runtime_kwargs, routed_expert_mappings, router_mappings,
    softmax_router_hf_fields, softmax_router_kwargs,
)
from megatron_bridge_ext.models.tables import (
    GPT_MODEL, H, attention_mappings, embedding_mappings, pre_mlp_norm_mappings, sink_mappings,
)
from megatron_bridge_ext.registry import MegatronMappingRegistry

__all__ = ["GptOssBridge"]

#: the sigmoid slope of megatron's quick_gelu
QUICK_GELU_ALPHA = 1.702


@MegatronModelBridge.register_bridge(source="GptOssForCausalLM", target=GPT_MODEL)
class GptOssBridge(MegatronModelBridge):
    """HF GptOssForCausalLM <-> Megatron-Core GPTModel (sinks, clamped SwiGLU experts with biases, YaRN)."""

    hf_model_type = "gpt_oss"
    default_hf_layout = ExpertLayout(fused=True, fc1_transposed=True, fc2_transposed=True)

    def hf_config_to_megatron_kwargs(self, hf_config: Any) -> Dict[str, Any]:
        family = type(self).__name__
        alpha = float(config_get(hf_config, "swiglu_alpha", QUICK_GELU_ALPHA))
        if alpha != QUICK_GELU_ALPHA:
            raise ValueError(f"{family}: swiglu_alpha={alpha} is not supported (megatron-core 0.16.1's quick_gelu has "
                             f"the fixed slope {QUICK_GELU_ALPHA})")
        if not config_get(hf_config, "attention_bias", True):
            raise ValueError(f"{family}: attention_bias=False is not supported (megatron's add_bias_linear covers "
                             "the attention and the experts, which always have biases)")
        limit = config_get(hf_config, "swiglu_limit", 7.0)
        kw = common_megatron_kwargs(hf_config, yarn=True)
        kw.update(
            **rms_norm_kwargs(hf_config, default_eps=1e-5),
            gated_linear_unit=True,
            activation_func=quick_gelu,
            glu_linear_offset=1.0,
            activation_func_clamp_value=float(limit) if limit is not None else None,
            add_bias_linear=True,
            add_qkv_bias=True,
            softmax_type="learnable",
            **window_settings(hf_config, family),
            **moe_runtime_kwargs(config_get(hf_config, "num_local_experts"),
                                 config_get(hf_config, "num_experts_per_tok"),
                                 config_get(hf_config, "intermediate_size"),
                                 [1] * int(config_get(hf_config, "num_hidden_layers"))),
            **softmax_router_kwargs(True),  # softmax over the top-k logits
        )
        return kw

    def transformer_config(self, hf_config: Any, **overrides: Any):
        """As the base, refusing expert-tensor parallelism (megatron-core 0.16.1 asserts ``expert_tensor_parallel_size
        == 1`` for experts with biases; it defaults to the TP size)."""
        etp = overrides.get("expert_tensor_parallel_size") or overrides.get("tensor_model_parallel_size", 1) or 1
        if int(etp) > 1:
            raise ValueError(f"{type(self).__name__}: expert_tensor_parallel_size={etp}; megatron-core 0.16.1 supports "
                             "expert biases only with expert_tensor_parallel_size=1 (set it explicitly with TP > 1)")
        return super().transformer_config(hf_config, **overrides)

    def megatron_to_hf_config(self, config: Any) -> Dict[str, Any]:
        family = type(self).__name__
        refuse_megatron_settings(config, family, "GPT-OSS", (
            ("normalization", "RMSNorm"), ("gated_linear_unit", True), ("activation_func", quick_gelu),
            ("glu_linear_offset", 1.0), ("add_bias_linear", True), ("softmax_type", "learnable")))
        hf = {**super().megatron_to_hf_config(config), **common_hf_fields(config)}
        router = softmax_router_hf_fields(config, family)
        if not router["norm_topk_prob"]:
            raise ValueError(f"{family}: moe_router_pre_softmax=True; GPT-OSS takes a softmax over the top-k logits")
        hf.update(
            **rms_norm_hf_fields(config),
            attention_bias=True,
            swiglu_alpha=QUICK_GELU_ALPHA,
            swiglu_limit=config.activation_func_clamp_value,
            **moe_hf_fields(config, "num_local_experts", ffn_field="intermediate_size"),
            **window_hf_fields(config, family),
        )
        return hf

    def detect_hf_layout(self, hf_state, hf_config):
        return family_expert_layout(self, hf_state, hf_config, experts_field="num_local_experts", ffn_field="intermediate_size")

    def mapping_registry(self) -> MegatronMappingRegistry:
        return MegatronMappingRegistry(*embedding_mappings(), *attention_mappings(), *sink_mappings(),
                                       *pre_mlp_norm_mappings(), *router_mappings(f"{H}.mlp.router"),
                                       *routed_expert_mappings(self.hf_layout, interleaved=True, bias=True))
