"""Mapping tables of the dense building blocks, as data: each family composes the pieces it has (embedding and
output layer, attention in its forms, q/k norms, MLPs, norms).

Names: ``L`` is a Megatron decoder layer, ``H`` an HF decoder layer (both with the layer index as a wildcard).
"""

from __future__ import annotations

from typing import List, Optional

from megatron_bridge_ext.mappings import (
    AutoMapping,
    ColumnParallelMapping,
    ConcatenatedQKVMapping,
    FusedGatedMLPMapping,
    GatedMLPMapping,
    HeadShardedNormMapping,
    MegatronParamMapping,
    QKVMapping,
)

__all__ = ["L", "H", "GPT_MODEL", "embedding_mappings", "attention_mappings", "fused_qkv_attention_mappings",
           "qk_norm_mappings", "whole_qk_norm_mappings", "pre_mlp_norm_mappings", "gated_mlp_mappings",
           "fused_gated_mlp_mappings", "post_norm_mappings", "layer_scalar_mappings", "mla_mappings", "sink_mappings"]

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


def attention_mappings(attn: str = "self_attn", input_norm: Optional[str] = "input_layernorm"
                       ) -> List[MegatronParamMapping]:
    """Input norm (HF ``input_norm``; None: the model has none, OLMo 2), fused q/k/v (weights and biases), output
    projection (weight and bias)."""
    a = f"{H}.{attn}"
    norm = [] if input_norm is None else [AutoMapping(f"{L}.input_layernorm.weight", f"{H}.{input_norm}.weight")]
    return [
        *norm,
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


def whole_qk_norm_mappings(attn: str = "self_attn", q: str = "q_norm", k: str = "k_norm"
                           ) -> List[MegatronParamMapping]:
    """Query / key norms over the whole projection (OLMo 2's ``q_norm`` ``[H*d]`` / ``k_norm`` ``[G*d]``; megatron
    ``WholeQueryRMSNorm`` / ``WholeKeyRMSNorm`` under the ``q_layernorm`` / ``k_layernorm`` names), split by heads
    over TP like the q / k rows."""
    a = f"{H}.{attn}"
    return [
        HeadShardedNormMapping(f"{L}.self_attention.q_layernorm.weight", f"{a}.{q}.weight", heads="q"),
        HeadShardedNormMapping(f"{L}.self_attention.k_layernorm.weight", f"{a}.{k}.weight", heads="k"),
    ]


def _pre_mlp_norm(pre_norm: str) -> MegatronParamMapping:
    return AutoMapping(f"{L}.pre_mlp_layernorm.weight", f"{H}.{pre_norm}.weight")


def pre_mlp_norm_mappings(pre_norm: str = "post_attention_layernorm") -> List[MegatronParamMapping]:
    """The norm before the MLP alone (models whose every layer has routed experts and no dense MLP)."""
    return [_pre_mlp_norm(pre_norm)]


def gated_mlp_mappings(mlp: str = "mlp", pre_norm: Optional[str] = "post_attention_layernorm"
                       ) -> List[MegatronParamMapping]:
    """Pre-MLP norm (HF ``pre_norm``; None: the model has none, OLMo 2), gated fc1 from gate/up (weights and
    biases), fc2 from down (weight, bias)."""
    m = f"{H}.{mlp}"
    return [
        *([] if pre_norm is None else [_pre_mlp_norm(pre_norm)]),
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


def layer_scalar_mappings(name: str = "layer_scalar") -> List[MegatronParamMapping]:
    """One learned number per layer multiplying its output (Gemma 4's ``layer_scalar``; megatron
    ``ScaledOutputTransformerLayer``), replicated."""
    return [AutoMapping(f"{L}.layer_scalar", f"{H}.{name}")]


def mla_mappings(attn: str = "self_attn") -> List[MegatronParamMapping]:
    """Multi-latent attention (DeepSeek-V3): input norm, q LoRA (``q_a_proj`` -> ``q_a_layernorm`` -> ``q_b_proj``)
    or a plain ``q_proj``, the kv LoRA (``kv_a_proj_with_mqa`` ``[kv_lora_rank + rope_dim, D]`` ->
    ``kv_a_layernorm`` -> ``kv_b_proj``, per head ``[k_nope; v]``), output projection. Megatron's local spec keeps
    the down projections column-parallel (gathered in the forward) and the norms separate; the Transformer Engine
    spec fuses the norms into the up projections (``layer_norm_weight``)."""
    a = f"{H}.{attn}"
    s = f"{L}.self_attention"
    return [
        AutoMapping(f"{L}.input_layernorm.weight", f"{H}.input_layernorm.weight"),
        AutoMapping(f"{s}.linear_q_proj.weight", f"{a}.q_proj.weight"),
        AutoMapping(f"{s}.linear_q_down_proj.weight", f"{a}.q_a_proj.weight"),
        AutoMapping(f"{s}.q_layernorm.weight", f"{a}.q_a_layernorm.weight"),
        AutoMapping(f"{s}.linear_q_up_proj.layer_norm_weight", f"{a}.q_a_layernorm.weight"),
        AutoMapping(f"{s}.linear_q_up_proj.weight", f"{a}.q_b_proj.weight"),
        AutoMapping(f"{s}.linear_kv_down_proj.weight", f"{a}.kv_a_proj_with_mqa.weight"),
        AutoMapping(f"{s}.kv_layernorm.weight", f"{a}.kv_a_layernorm.weight"),
        AutoMapping(f"{s}.linear_kv_up_proj.layer_norm_weight", f"{a}.kv_a_layernorm.weight"),
        AutoMapping(f"{s}.linear_kv_up_proj.weight", f"{a}.kv_b_proj.weight"),
        AutoMapping(f"{s}.linear_proj.weight", f"{a}.o_proj.weight"),
    ]


def sink_mappings(attn: str = "self_attn") -> List[MegatronParamMapping]:
    """Learnable attention sinks, one logit per head (GPT-OSS ``sinks``; megatron ``softmax_type="learnable"``:
    ``core_attention.softmax_offset``, split by heads over TP)."""
    return [ColumnParallelMapping(f"{L}.self_attention.core_attention.softmax_offset", f"{H}.{attn}.sinks")]
