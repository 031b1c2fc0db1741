"""Mapping tables shared by the decoder families, as data: each family composes the pieces it has.

Names: ``L`` is a Megatron decoder layer, ``H`` an HF decoder layer (both with the layer index as a wildcard).
"""

from __future__ import annotations

from typing import Any, Callable, Dict, List

import torch.nn.functional as F

from megatron_bridge_ext.mcore.config import SLIDING, window_hf_fields

from megatron_bridge_ext.mappings import (
    AutoMapping,
    ConcatenatedQKVMapping,
    FusedGatedMLPMapping,
    GatedMLPMapping,
    MegatronParamMapping,
    QKVMapping,
)

__all__ = ["L", "H", "GPT_MODEL", "embedding_mappings", "attention_mappings", "fused_qkv_attention_mappings",
           "qk_norm_mappings", "gated_mlp_mappings", "fused_gated_mlp_mappings", "post_norm_mappings", "ACTIVATIONS",
           "activation_func", "activation_name", "qwen_window_hf_fields"]

L = "decoder.layers.*"
H = "model.layers.*"
#: the Megatron model class every decoder family builds (imported when asked for)
GPT_MODEL = "megatron.core.models.gpt.GPTModel"


def embedding_mappings() -> List[MegatronParamMapping]:
    """Token embedding, output layer (untied checkpoints), final norm."""
    return [
        AutoMapping("embedding.word_embeddings.weight", "model.embed_tokens.weight"),
        AutoMapping("output_layer.weight", "lm_head.weight"),
        AutoMapping("decoder.final_layernorm.weight", "model.norm.weight"),
    ]


def attention_mappings(attn: str = "self_attn") -> List[MegatronParamMapping]:
    """Input norm, fused q/k/v (weights and biases), output projection (weight and bias)."""
    a = f"{H}.{attn}"
    return [
        AutoMapping(f"{L}.input_layernorm.weight", f"{H}.input_layernorm.weight"),
        QKVMapping(f"{L}.self_attention.linear_qkv.weight", q=f"{a}.q_proj.weight", k=f"{a}.k_proj.weight",
                   v=f"{a}.v_proj.weight"),
        QKVMapping(f"{L}.self_attention.linear_qkv.bias", q=f"{a}.q_proj.bias", k=f"{a}.k_proj.bias",
                   v=f"{a}.v_proj.bias"),
        AutoMapping(f"{L}.self_attention.linear_proj.weight", f"{a}.o_proj.weight"),
        AutoMapping(f"{L}.self_attention.linear_proj.bias", f"{a}.o_proj.bias"),
    ]


def fused_qkv_attention_mappings(attn: str = "self_attn", qkv: str = "qkv_proj") -> List[MegatronParamMapping]:
    """Input norm, fused q/k/v from one HF ``[q; k; v]`` tensor (Phi-3's ``qkv_proj``), output projection."""
    a = f"{H}.{attn}"
    return [
        AutoMapping(f"{L}.input_layernorm.weight", f"{H}.input_layernorm.weight"),
        ConcatenatedQKVMapping(f"{L}.self_attention.linear_qkv.weight", f"{a}.{qkv}.weight"),
        ConcatenatedQKVMapping(f"{L}.self_attention.linear_qkv.bias", f"{a}.{qkv}.bias"),
        AutoMapping(f"{L}.self_attention.linear_proj.weight", f"{a}.o_proj.weight"),
        AutoMapping(f"{L}.self_attention.linear_proj.bias", f"{a}.o_proj.bias"),
    ]


def qk_norm_mappings(attn: str = "self_attn", q: str = "q_norm", k: str = "k_norm") -> List[MegatronParamMapping]:
    """Per-head query / key norms (megatron ``qk_layernorm``: ``self_attention.q_layernorm`` / ``k_layernorm``)."""
    a = f"{H}.{attn}"
    return [
        AutoMapping(f"{L}.self_attention.q_layernorm.weight", f"{a}.{q}.weight"),
        AutoMapping(f"{L}.self_attention.k_layernorm.weight", f"{a}.{k}.weight"),
    ]


def _pre_mlp_norm(pre_norm: str) -> MegatronParamMapping:
    return AutoMapping(f"{L}.pre_mlp_layernorm.weight", f"{H}.{pre_norm}.weight")


def gated_mlp_mappings(mlp: str = "mlp", pre_norm: str = "post_attention_layernorm") -> List[MegatronParamMapping]:
    """Pre-MLP norm (HF ``pre_norm``), gated fc1 from gate/up (weights and biases), fc2 from down (weight, bias)."""
    m = f"{H}.{mlp}"
    return [
        _pre_mlp_norm(pre_norm),
        GatedMLPMapping(f"{L}.mlp.linear_fc1.weight", gate=f"{m}.gate_proj.weight", up=f"{m}.up_proj.weight"),
        GatedMLPMapping(f"{L}.mlp.linear_fc1.bias", gate=f"{m}.gate_proj.bias", up=f"{m}.up_proj.bias"),
        AutoMapping(f"{L}.mlp.linear_fc2.weight", f"{m}.down_proj.weight"),
        AutoMapping(f"{L}.mlp.linear_fc2.bias", f"{m}.down_proj.bias"),
    ]


def fused_gated_mlp_mappings(mlp: str = "mlp", gate_up: str = "gate_up_proj",
                             pre_norm: str = "post_attention_layernorm") -> List[MegatronParamMapping]:
    """Pre-MLP norm, gated fc1 from one HF ``[gate; up]`` tensor (Phi-3's ``gate_up_proj``), fc2 from down."""
    m = f"{H}.{mlp}"
    return [
        _pre_mlp_norm(pre_norm),
        FusedGatedMLPMapping(f"{L}.mlp.linear_fc1.weight", f"{m}.{gate_up}.weight"),
        FusedGatedMLPMapping(f"{L}.mlp.linear_fc1.bias", f"{m}.{gate_up}.bias"),
        AutoMapping(f"{L}.mlp.linear_fc2.weight", f"{m}.down_proj.weight"),
        AutoMapping(f"{L}.mlp.linear_fc2.bias", f"{m}.down_proj.bias"),
    ]


def post_norm_mappings(post_attn: str = "post_attention_layernorm",
                       post_mlp: str = "post_feedforward_layernorm") -> List[MegatronParamMapping]:
    """Norms on the attention and MLP outputs (Gemma's sandwich norms; megatron ``PostNormRowParallelLinear``)."""
    return [
        AutoMapping(f"{L}.self_attention.linear_proj.post_layernorm.weight", f"{H}.{post_attn}.weight"),
        AutoMapping(f"{L}.mlp.linear_fc2.post_layernorm.weight", f"{H}.{post_mlp}.weight"),
    ]


def _gelu_tanh(x):
    return F.gelu(x, approximate="tanh")


#: HF ``hidden_act`` -> the activation megatron applies (to the gate, with a gated MLP)
ACTIVATIONS: Dict[str, Callable[..., Any]] = {
    "silu": F.silu,
    "swish": F.silu,
    "gelu": F.gelu,
    "gelu_pytorch_tanh": _gelu_tanh,
}


def activation_func(hidden_act: str, family: str, allowed=("silu", "swish"), field: str = "hidden_act"
                    ) -> Callable[..., Any]:
    """The megatron activation for an HF ``hidden_act`` (config field ``field``) that the family supports.

    Raises:
        ValueError: naming the field, the activation and the supported ones.
    """
    if hidden_act not in allowed or hidden_act not in ACTIVATIONS:
        raise ValueError(f"{family}: {field}={hidden_act!r} is not supported (supported: {', '.join(allowed)})")
    return ACTIVATIONS[hidden_act]


def activation_name(func: Callable[..., Any]) -> str:
    """The HF ``hidden_act`` of a megatron activation function."""
    for name, f in ACTIVATIONS.items():
        if f is func:
            return name
    raise ValueError(f"no HF hidden_act for activation function {func!r}")


def qwen_window_hf_fields(config: Any, family: str) -> Dict[str, Any]:
    """Qwen2 / Qwen3 window fields: ``sliding_window``, ``layer_types``, ``use_sliding_window`` and
    ``max_window_layers`` (the first sliding layer; HF slides the layers from there on unless ``layer_types`` says
    otherwise)."""
    window = window_hf_fields(config, family)
    sliding = [i for i, t in enumerate(window["layer_types"]) if t == SLIDING]
    return {**window, "use_sliding_window": bool(sliding),
            "max_window_layers": sliding[0] if sliding else config.num_layers}
