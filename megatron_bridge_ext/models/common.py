"""Mapping tables shared by the decoder families, as data: each family composes the pieces it has.

Names: ``L`` is a Megatron decoder layer, ``H`` an HF decoder layer (both with the layer index as a wildcard).
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import torch.nn.functional as F

from megatron_bridge_ext.mcore.config import SLIDING, config_get, window_hf_fields
from megatron_bridge_ext.mcore.versions import mtp_layer_module

from megatron_bridge_ext.mappings import (
    AutoMapping,
    ColumnParallelMapping,
    ConcatenatedQKVMapping,
    CopiesMapping,
    ExpertFC1Mapping,
    ExpertFC2Mapping,
    FusedGatedMLPMapping,
    GatedMLPMapping,
    MegatronParamMapping,
    QKVMapping,
    ReplicatedMapping,
)

__all__ = ["L", "H", "GPT_MODEL", "embedding_mappings", "attention_mappings", "fused_qkv_attention_mappings",
           "qk_norm_mappings", "pre_mlp_norm_mappings", "gated_mlp_mappings", "fused_gated_mlp_mappings",
           "post_norm_mappings", "ACTIVATIONS", "activation_func", "activation_name", "qwen_window_hf_fields",
           "ExpertLayout", "PER_EXPERT", "detect_expert_layout", "routed_expert_mappings", "router_mappings",
           "shared_expert_mappings", "mla_mappings", "sink_mappings", "moe_runtime_kwargs", "softmax_router_kwargs",
           "softmax_router_hf_fields", "sigmoid_router_kwargs", "sigmoid_router_hf_fields", "qwen_moe_pattern",
           "qwen_moe_pattern_hf_fields", "first_k_dense_pattern", "first_k_dense_hf_field", "shared_expert_size",
           "megatron_moe_pattern", "moe_hf_fields", "MTPLayers", "detect_mtp_layers", "mtp_layers_of_model",
           "layer_mappings_at", "mtp_mappings", "mtp_kwargs"]

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


def pre_mlp_norm_mappings(pre_norm: str = "post_attention_layernorm") -> List[MegatronParamMapping]:
    """The norm before the MLP alone (models whose every layer has routed experts and no dense MLP)."""
    return [_pre_mlp_norm(pre_norm)]


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


# ----------------------------------------------------------------------------------------------------------------------
# Mixture of experts
# ----------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ExpertLayout:
    """How an HF mixture-of-experts checkpoint stores a layer's routed experts (and, DeepSeek-V3 / GLM-4.5, its
    multi-token-prediction layers).

    Attributes:
        fused: one tensor per layer and role (``gate_up_proj``, ``down_proj``), else one tensor per expert.
        fc1_transposed: fused ``gate_up_proj`` is ``[E, D, 2F]`` (else ``[E, 2F, D]``).
        fc2_transposed: fused ``down_proj`` is ``[E, F, D]`` (else ``[E, D, F]``).
        mtp: the multi-token-prediction layers the checkpoint (or the model) holds; None: none.
    """

    fused: bool = False
    fc1_transposed: bool = False
    fc2_transposed: bool = False
    mtp: Optional["MTPLayers"] = None

    def describe(self) -> str:
        if not self.fused:
            text = "one tensor per expert"
        else:
            text = (f"fused expert tensors (gate_up_proj {'[E, D, 2F]' if self.fc1_transposed else '[E, 2F, D]'}, "
                    f"down_proj {'[E, F, D]' if self.fc2_transposed else '[E, D, F]'})")
        return text if self.mtp is None else f"{text}, {self.mtp.describe()}"


#: one HF tensor per expert (what transformers 5.24's save_pretrained writes for the Qwen / DeepSeek / GLM families)
PER_EXPERT = ExpertLayout()


def _shape(hf_state: Mapping[str, Any], key: str) -> Tuple[int, ...]:
    shape = getattr(hf_state, "shape", None)
    return tuple(shape(key)) if callable(shape) else tuple(hf_state[key].shape)


def _orientation(hf_state, keys: Sequence[str], normal: Tuple[int, int], transposed: Tuple[int, int],
                 default: bool, family: str, what: str, num_experts: Optional[int]) -> bool:
    """Whether the fused tensors ``keys`` (each ``[E, a, b]``) are stored transposed; ``default`` when the shapes
    cannot tell (``normal == transposed``, e.g. hidden_size == 2 * ffn)."""
    found = set()
    e = num_experts if num_experts is not None else "E"
    for key in keys:
        shape = _shape(hf_state, key)
        if len(shape) != 3 or shape[1:] not in (normal, transposed) or (
                num_experts is not None and shape[0] != num_experts):
            raise ValueError(f"{family}: fused expert tensor {key} has shape {list(shape)}; expected [{e}, "
                             f"{normal[0]}, {normal[1]}] or [{e}, {transposed[0]}, {transposed[1]}] ({what})")
        found.add(default if normal == transposed else shape[1:] == transposed)
    if len(found) > 1:
        raise ValueError(f"{family}: fused expert tensors {what} are stored in both orientations "
                         f"(e.g. {keys[0]} {list(_shape(hf_state, keys[0]))}); one orientation per checkpoint")
    return found.pop() if found else default


def detect_expert_layout(hf_state: Mapping[str, Any], family: str, *, hidden_size: int, expert_ffn: int,
                         num_experts: Optional[int] = None, default: ExpertLayout = PER_EXPERT,
                         experts: str = "mlp.experts", gate: str = "gate_proj", up: str = "up_proj",
                         down: str = "down_proj", gate_up: str = "gate_up_proj", fused_down: str = "down_proj"
                         ) -> ExpertLayout:
    """The expert layout of a checkpoint, from its keys (per-expert ``model.layers.L.<experts>.E.<gate>.weight``
    or fused ``model.layers.L.<experts>.<gate_up>``) and, for fused tensors, their shapes (orientation; with
    ``num_experts``, the expert count too). A checkpoint without expert tensors gets ``default``; so do orientations
    the shapes cannot tell apart.

    Raises:
        ValueError: a checkpoint holding both layouts (naming a tensor of each), or fused tensors of unexpected shape.
    """
    e = re.escape(experts)
    per_re = re.compile(rf"^model\.layers\.\d+\.{e}\.\d+\.(?:{gate}|{up}|{down})\.weight$")
    fc1_re = re.compile(rf"^model\.layers\.\d+\.{e}\.{re.escape(gate_up)}$")
    fc2_re = re.compile(rf"^model\.layers\.\d+\.{e}\.{re.escape(fused_down)}$")
    per, fc1, fc2 = [], [], []
    for key in hf_state.keys():
        if per_re.match(key):
            per.append(key)
        elif fc1_re.match(key):
            fc1.append(key)
        elif fc2_re.match(key):
            fc2.append(key)
    if per and (fc1 or fc2):
        raise ValueError(f"{family}: the checkpoint mixes expert layouts: one tensor per expert (e.g. {per[0]}) and "
                         f"fused expert tensors (e.g. {(fc1 or fc2)[0]}); convert it to one layout first")
    if per:
        return PER_EXPERT
    if not (fc1 or fc2):
        return default
    d, f = hidden_size, expert_ffn
    return ExpertLayout(
        fused=True,
        fc1_transposed=_orientation(hf_state, sorted(fc1), (2 * f, d), (d, 2 * f), default.fc1_transposed, family,
                                    f"{gate_up} (hidden_size {d}, expert ffn {f})", num_experts),
        fc2_transposed=_orientation(hf_state, sorted(fc2), (d, f), (f, d), default.fc2_transposed, family,
                                    f"{fused_down} (hidden_size {d}, expert ffn {f})", num_experts),
    )


def routed_expert_mappings(layout: ExpertLayout, *, experts: str = f"{H}.mlp.experts", gate: str = "gate_proj",
                           up: str = "up_proj", down: str = "down_proj", gate_up: str = "gate_up_proj",
                           fused_down: str = "down_proj", interleaved: bool = False, bias: bool = False
                           ) -> List[MegatronParamMapping]:
    """A layer's routed experts in ``layout``: sequential-expert names (``local_experts.{e}``, local spec) and
    grouped-GEMM names (``linear_fc1.weight{e}``, Transformer Engine spec), weights and (with ``bias``) biases.
    Fused biases are ``<gate_up>_bias`` ``[E, 2F]`` and ``<fused_down>_bias`` ``[E, D]`` (GPT-OSS)."""
    out: List[MegatronParamMapping] = []
    suffixes = ("weight", "bias") if bias else ("weight",)
    for suffix in suffixes:
        for fc1, fc2 in ((f"{L}.mlp.experts.local_experts.*.linear_fc1.{suffix}",
                          f"{L}.mlp.experts.local_experts.*.linear_fc2.{suffix}"),
                         (f"{L}.mlp.experts.linear_fc1.{suffix}*", f"{L}.mlp.experts.linear_fc2.{suffix}*")):
            if layout.fused:
                tail = "" if suffix == "weight" else "_bias"
                out.append(ExpertFC1Mapping(fc1, gate_up=f"{experts}.{gate_up}{tail}", interleaved=interleaved,
                                            transposed=layout.fc1_transposed))
                out.append(ExpertFC2Mapping(fc2, f"{experts}.{fused_down}{tail}", fused=True,
                                            transposed=layout.fc2_transposed))
            else:
                out.append(ExpertFC1Mapping(fc1, gate=f"{experts}.*.{gate}.{suffix}", up=f"{experts}.*.{up}.{suffix}"))
                out.append(ExpertFC2Mapping(fc2, f"{experts}.*.{down}.{suffix}"))
    return out


def router_mappings(gate: str = f"{H}.mlp.gate") -> List[MegatronParamMapping]:
    """The router (replicated): weight, bias (GPT-OSS) and the fp32 routing-correction bias (megatron
    ``router.expert_bias``, HF ``e_score_correction_bias``; kept in its dtype)."""
    return [
        ReplicatedMapping(f"{L}.mlp.router.weight", f"{gate}.weight"),
        ReplicatedMapping(f"{L}.mlp.router.bias", f"{gate}.bias"),
        ReplicatedMapping(f"{L}.mlp.router.expert_bias", f"{gate}.e_score_correction_bias"),
    ]


def shared_expert_mappings(shared: str = f"{H}.mlp.shared_experts", gate: Optional[str] = None
                           ) -> List[MegatronParamMapping]:
    """Shared experts (a dense gated MLP, TP-sharded) and, with ``gate``, their sigmoid gate ``[1, D]`` (Qwen2-MoE's
    ``shared_expert_gate``; megatron ``moe_shared_expert_gate``)."""
    out: List[MegatronParamMapping] = [
        GatedMLPMapping(f"{L}.mlp.shared_experts.linear_fc1.weight", gate=f"{shared}.gate_proj.weight",
                        up=f"{shared}.up_proj.weight"),
        AutoMapping(f"{L}.mlp.shared_experts.linear_fc2.weight", f"{shared}.down_proj.weight"),
    ]
    if gate is not None:
        out.append(ReplicatedMapping(f"{L}.mlp.shared_experts.gate_weight", gate))
    return out


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


def moe_runtime_kwargs(num_experts: int, topk: int, expert_ffn: int, pattern: Sequence[int]) -> Dict[str, Any]:
    """``GPTConfig`` fields of every routed-expert model: sizes, the dense / MoE layer pattern (``moe_layer_freq``,
    a list only when some layers are dense), no load-balancing loss (conversion and eval), sequential experts and the
    all-gather dispatcher (both run on CPU and GPU)."""
    return dict(
        num_moe_experts=int(num_experts),
        moe_router_topk=int(topk),
        moe_ffn_hidden_size=int(expert_ffn),
        moe_layer_freq=1 if all(pattern) else [int(bool(p)) for p in pattern],
        moe_router_load_balancing_type="none",
        moe_aux_loss_coeff=0.0,
        moe_grouped_gemm=False,
        moe_token_dispatcher_type="allgather",
    )


def moe_hf_fields(config: Any, experts_field: str, ffn_field: str = "moe_intermediate_size") -> Dict[str, Any]:
    """HF expert count (under the family's field name), top-k and expert ffn size of a Megatron config."""
    if not config.num_moe_experts:
        raise ValueError(f"the Megatron config has no routed experts (num_moe_experts={config.num_moe_experts})")
    return {experts_field: config.num_moe_experts, "num_experts_per_tok": config.moe_router_topk,
            ffn_field: config.moe_ffn_hidden_size}


def megatron_moe_pattern(config: Any) -> List[int]:
    """Per layer 1 (routed experts) or 0 (dense) of a Megatron config's ``moe_layer_freq``."""
    freq = config.moe_layer_freq
    if isinstance(freq, int):
        return [1 if i % freq == 0 else 0 for i in range(config.num_layers)]
    return [int(bool(x)) for x in freq]


def softmax_router_kwargs(norm_topk_prob: bool) -> Dict[str, Any]:
    """Softmax top-k routing: HF ``norm_topk_prob`` renormalises the top-k probabilities, which is megatron's
    softmax over the top-k logits (``moe_router_pre_softmax=False``); without it the probabilities of the softmax over
    every expert are kept (``pre_softmax=True``)."""
    return dict(moe_router_score_function="softmax", moe_router_pre_softmax=not norm_topk_prob)


def softmax_router_hf_fields(config: Any, family: str) -> Dict[str, Any]:
    """HF ``norm_topk_prob`` of a Megatron softmax router (the reverse of :func:`softmax_router_kwargs`).

    Raises:
        ValueError: another score function.
    """
    if config.moe_router_score_function != "softmax" or config.moe_router_enable_expert_bias:
        raise ValueError(f"{family}: moe_router_score_function={config.moe_router_score_function!r} (expert bias "
                         f"{config.moe_router_enable_expert_bias}); HF routes with a softmax over the router logits")
    return {"norm_topk_prob": not config.moe_router_pre_softmax}


def sigmoid_router_kwargs(hf_config: Any, family: str) -> Dict[str, Any]:
    """DeepSeek-V3 / GLM-4.5 routing: sigmoid scores, top-k chosen on scores + ``e_score_correction_bias`` (megatron
    ``moe_router_enable_expert_bias``, an fp32 buffer) within the ``topk_group`` best of ``n_group`` expert groups
    (a group's score: the sum of its two best), weights from the plain scores renormalised and multiplied by
    ``routed_scaling_factor``; router logits in fp32 (as HF computes them), and the router weight kept in fp32 in
    bf16 models, as HF keeps it (``mcore.modules.FP32WeightRouter``).

    Raises:
        ValueError: ``norm_topk_prob=False`` with top-k > 1 (megatron renormalises sigmoid weights always), or groups
            whose score is not the sum of top-2 (megatron sums the top ``topk / topk_group``).
    """
    topk = int(config_get(hf_config, "num_experts_per_tok"))
    if not config_get(hf_config, "norm_topk_prob", True) and topk > 1:
        raise ValueError(f"{family}: norm_topk_prob=False with sigmoid routing and num_experts_per_tok={topk} > 1 is "
                         "not supported (megatron-core 0.16.1 always renormalises the top-k sigmoid weights)")
    groups = int(config_get(hf_config, "n_group", 1) or 1)
    group_topk = int(config_get(hf_config, "topk_group", 1) or 1)
    kw: Dict[str, Any] = dict(
        moe_router_score_function="sigmoid",
        moe_router_enable_expert_bias=True,
        moe_router_topk_scaling_factor=float(config_get(hf_config, "routed_scaling_factor", 1.0) or 1.0),
        moe_router_dtype="fp32",
        moe_router_fp32_weight=True,  # HF keeps mlp.gate.weight in fp32 (_keep_in_fp32_modules_strict)
    )
    if groups > 1:
        if topk // group_topk != 2:
            raise ValueError(f"{family}: n_group={groups} with num_experts_per_tok={topk}, topk_group={group_topk}: "
                             "HF scores a group by its top-2 experts, megatron-core 0.16.1 by its top "
                             f"num_experts_per_tok // topk_group = {topk // group_topk}; only equal ones convert")
        kw.update(moe_router_num_groups=groups, moe_router_group_topk=group_topk)
    return kw


def sigmoid_router_hf_fields(config: Any, family: str) -> Dict[str, Any]:
    """HF fields of :func:`sigmoid_router_kwargs` (the reverse).

    Raises:
        ValueError: a Megatron router that HF's sigmoid router cannot express.
    """
    if config.moe_router_score_function != "sigmoid" or not config.moe_router_enable_expert_bias:
        raise ValueError(f"{family}: moe_router_score_function={config.moe_router_score_function!r}, "
                         f"moe_router_enable_expert_bias={config.moe_router_enable_expert_bias}; HF routes with "
                         "sigmoid scores and an e_score_correction_bias")
    groups = config.moe_router_num_groups or 1
    group_topk = config.moe_router_group_topk or 1
    if groups > 1 and config.moe_router_topk // group_topk != 2:
        raise ValueError(f"{family}: moe_router_topk // moe_router_group_topk = {config.moe_router_topk // group_topk}"
                         "; HF scores a group by its top-2 experts")
    return dict(n_group=groups, topk_group=group_topk, norm_topk_prob=True,
                routed_scaling_factor=float(config.moe_router_topk_scaling_factor or 1.0))


def qwen_moe_pattern(hf_config: Any) -> List[int]:
    """Qwen2-MoE / Qwen3-MoE layers with experts: not in ``mlp_only_layers`` and ``(i + 1) % decoder_sparse_step ==
    0``."""
    layers = int(config_get(hf_config, "num_hidden_layers"))
    step = int(config_get(hf_config, "decoder_sparse_step", 1) or 1)
    dense = set(config_get(hf_config, "mlp_only_layers", None) or [])
    return [0 if i in dense or (i + 1) % step else 1 for i in range(layers)]


def qwen_moe_pattern_hf_fields(config: Any) -> Dict[str, Any]:
    """HF ``decoder_sparse_step`` / ``mlp_only_layers`` for a Megatron layer pattern (a step when one fits)."""
    pattern = megatron_moe_pattern(config)
    for step in range(1, len(pattern) + 1):
        if pattern == [0 if (i + 1) % step else 1 for i in range(len(pattern))]:
            return {"decoder_sparse_step": step, "mlp_only_layers": []}
    return {"decoder_sparse_step": 1, "mlp_only_layers": [i for i, p in enumerate(pattern) if not p]}


def first_k_dense_pattern(hf_config: Any) -> List[int]:
    """DeepSeek-V3 / GLM-4.5 layers with experts: every layer from ``first_k_dense_replace`` on."""
    layers = int(config_get(hf_config, "num_hidden_layers"))
    k = int(config_get(hf_config, "first_k_dense_replace", 0) or 0)
    return [0 if i < k else 1 for i in range(layers)]


def first_k_dense_hf_field(config: Any, family: str) -> int:
    """HF ``first_k_dense_replace`` of a Megatron layer pattern.

    Raises:
        ValueError: dense layers that are not the leading ones.
    """
    pattern = megatron_moe_pattern(config)
    k = pattern.index(1) if 1 in pattern else len(pattern)
    if pattern != [0] * k + [1] * (len(pattern) - k):
        raise ValueError(f"{family}: moe_layer_freq={config.moe_layer_freq}: HF has dense layers only before the "
                         "first MoE layer (first_k_dense_replace)")
    return k


def shared_expert_size(hf_config: Any, family: str, field: str = "n_shared_experts") -> Optional[int]:
    """The shared experts' ffn size (``n_shared_experts * moe_intermediate_size``); None without shared experts."""
    n = int(config_get(hf_config, field, 0) or 0)
    return n * int(config_get(hf_config, "moe_intermediate_size")) if n else None


# ----------------------------------------------------------------------------------------------------------------------
# Multi-token prediction (DeepSeek-V3, GLM-4.5)
# ----------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MTPLayers:
    """Multi-token-prediction layers: MTP layer ``i`` (megatron ``mtp.layers.{i}``) is HF decoder layer
    ``first + i`` (``first`` = ``num_hidden_layers``), for ``i < count``.

    Attributes:
        first: HF index of the first MTP layer (the main model's layer count).
        count: number of MTP layers (megatron ``mtp_num_layers``, HF ``num_nextn_predict_layers``).
        tied: the model ties its output layer to the embedding (the MTP layers' head copies copy the embedding).
    """

    first: int
    count: int
    tied: bool = False

    def describe(self) -> str:
        return f"{self.count} multi-token-prediction layer(s) (HF model.layers.{self.first}" + (
            f"-{self.first + self.count - 1})" if self.count > 1 else ")")


_HF_LAYER = re.compile(r"^model\.layers\.(\d+)\.")


def detect_mtp_layers(hf_state: Mapping[str, Any], hf_config: Any, family: str,
                      field: str = "num_nextn_predict_layers") -> Optional[MTPLayers]:
    """The multi-token-prediction layers a checkpoint holds: HF decoder layers from ``num_hidden_layers`` on (read
    from the keys; transformers' configs say ``num_nextn_predict_layers = 1`` also for checkpoints without them, and
    transformers builds none). None when the checkpoint has none.

    Raises:
        ValueError: layers beyond ``num_hidden_layers`` that are not ``num_hidden_layers .. + k - 1`` with ``k`` the
            config's ``field``, naming a tensor, the layers found and the config's value.
    """
    layers = int(config_get(hf_config, "num_hidden_layers"))
    found: Dict[int, str] = {}
    for key in hf_state.keys():
        m = _HF_LAYER.match(key)
        if m is not None and int(m.group(1)) >= layers:
            found.setdefault(int(m.group(1)), key)
    if not found:
        return None
    declared = int(config_get(hf_config, field, 0) or 0)
    want = list(range(layers, layers + declared))
    if sorted(found) != want:
        example = found[max(found)]
        says = (f"{field}={declared}: multi-token-prediction layers are layers {layers}..{layers + declared - 1}"
                if declared else f"{field}=0 (no multi-token-prediction layers)")
        raise ValueError(f"{family}: the checkpoint holds tensors of HF layers {sorted(found)} beyond "
                         f"num_hidden_layers={layers} (e.g. {example}), but config.json says {says}")
    return MTPLayers(first=layers, count=declared, tied=bool(config_get(hf_config, "tie_word_embeddings", False)))


def mtp_layers_of_model(config: Any) -> Optional[MTPLayers]:
    """The multi-token-prediction layers of a Megatron model (its ``mtp_num_layers``); None without."""
    count = int(getattr(config, "mtp_num_layers", None) or 0)
    if not count:
        return None
    return MTPLayers(first=int(config.num_layers), count=count,
                     tied=bool(getattr(config, "share_embeddings_and_output_weights", False)))


def mtp_kwargs(mtp: Optional[MTPLayers], hf_config: Any, family: str) -> Dict[str, Any]:
    """``GPTConfig`` fields of a checkpoint's MTP layers (none without). megatron-core builds each MTP layer with
    the last decoder layer's spec; HF (DeepSeek-V3, GLM-4.5) makes layer ``n`` an MoE layer when
    ``n >= first_k_dense_replace``.

    Raises:
        ValueError: MTP layers of another kind (dense / MoE) than the last decoder layer.
    """
    if mtp is None:
        return {}
    k = int(config_get(hf_config, "first_k_dense_replace", 0) or 0)
    last_moe, mtp_moe = mtp.first - 1 >= k, mtp.first >= k
    if last_moe != mtp_moe:
        raise ValueError(f"{family}: first_k_dense_replace={k} makes the last of the {mtp.first} decoder layers dense "
                         "and the multi-token-prediction layers MoE layers; megatron-core builds them like the last "
                         "decoder layer")
    return {"mtp_num_layers": mtp.count}


def layer_mappings_at(mappings: Sequence[MegatronParamMapping], megatron_layer: str, hf_layer: str
                      ) -> List[MegatronParamMapping]:
    """The decoder-layer mappings (Megatron ``decoder.layers.*.X``, HF ``model.layers.*.Y``) re-addressed to one
    other layer: Megatron ``<megatron_layer>.X``, HF ``<hf_layer>.Y``, the layer wildcard gone on both sides
    (other wildcards, e.g. the expert index, stay). The registry has no index arithmetic; this spells out the few
    multi-token-prediction layers (megatron ``mtp.layers.{i}.transformer_layer`` = HF ``model.layers.{N + i}``;
    ``mtp_model_layer`` under megatron-core 0.19, see ``mcore.versions.mtp_layer_module``).
    Mappings that are not per decoder layer are left out.

    Raises:
        ValueError: a per-layer mapping with an HF name outside ``model.layers.*``.
    """
    out: List[MegatronParamMapping] = []
    meg_prefix, hf_prefix = f"{L}.", f"{H}."
    for m in mappings:
        if not m.megatron_param.startswith(meg_prefix):
            continue
        roles = m.hf_param if isinstance(m.hf_param, dict) else {None: m.hf_param}
        bad = [v for v in roles.values() if not v.startswith(hf_prefix)]
        if bad:
            raise ValueError(f"layer_mappings_at: {m!r} maps a decoder-layer parameter to {bad}, outside {hf_prefix}")
        moved = {r: f"{hf_layer}.{v[len(hf_prefix):]}" for r, v in roles.items()}
        out.append(m.with_names(f"{megatron_layer}.{m.megatron_param[len(meg_prefix):]}",
                                moved[None] if None in moved else moved))
    return out


def mtp_mappings(mtp: Optional[MTPLayers], layer: Sequence[MegatronParamMapping]) -> List[MegatronParamMapping]:
    """Mappings of multi-token-prediction layers (none without), to be registered before the main model's (the first
    match wins). MTP layer ``i`` (megatron-core ``MultiTokenPredictionLayer``, HF decoder layer ``n = first + i``):

    - ``enorm`` / ``hnorm`` (the norms of the shifted tokens' embedding and of the main model's hidden states),
      ``eh_proj`` (``[D, 2D]``, column-parallel, applied to ``[enorm(embedding); hnorm(hidden)]`` in both),
      ``final_layernorm`` = HF ``shared_head.norm``;
    - ``transformer_layer.*`` (0.19: ``mtp_model_layer.*``, ``mcore.versions.mtp_layer_module``) = the decoder
      layer's tensors of HF layer ``n`` (the family's per-layer ``layer`` table re-addressed, see
      :func:`layer_mappings_at`);
    - HF ``model.layers.n.embed_tokens`` and ``shared_head.head`` are copies of the embedding and the output head,
      which megatron-core shares with the main model: :class:`~megatron_bridge_ext.mappings.CopiesMapping` on the
      embedding and the output layer (on the embedding with tied embeddings) checks them on import and writes them
      on export.
    """
    if mtp is None:
        return []
    out: List[MegatronParamMapping] = []
    embed_copies = [f"model.layers.{mtp.first + i}.embed_tokens.weight" for i in range(mtp.count)]
    head_copies = [f"model.layers.{mtp.first + i}.shared_head.head.weight" for i in range(mtp.count)]
    if mtp.tied:
        out.append(CopiesMapping("embedding.word_embeddings.weight", "model.embed_tokens.weight",
                                 embed_copies + head_copies))
    else:
        out.append(CopiesMapping("embedding.word_embeddings.weight", "model.embed_tokens.weight", embed_copies))
        out.append(CopiesMapping("output_layer.weight", "lm_head.weight", head_copies))
    for i in range(mtp.count):
        meg, hf = f"mtp.layers.{i}", f"model.layers.{mtp.first + i}"
        out += [
            AutoMapping(f"{meg}.enorm.weight", f"{hf}.enorm.weight"),
            AutoMapping(f"{meg}.hnorm.weight", f"{hf}.hnorm.weight"),
            AutoMapping(f"{meg}.eh_proj.weight", f"{hf}.eh_proj.weight"),
            AutoMapping(f"{meg}.final_layernorm.weight", f"{hf}.shared_head.norm.weight"),
            *layer_mappings_at(layer, f"{meg}.{mtp_layer_module()}", hf),
        ]
    return out


def family_expert_layout(bridge: Any, hf_state: Mapping[str, Any], hf_config: Any, *, experts_field: str,
                         ffn_field: str = "moe_intermediate_size") -> ExpertLayout:
    """A family bridge's ``detect_hf_layout``: the expert layout from the checkpoint's keys, with the expert count and
    width read from the family's ``config.json`` fields."""
    return detect_expert_layout(hf_state, type(bridge).__name__, hidden_size=config_get(hf_config, "hidden_size"),
                                expert_ffn=config_get(hf_config, ffn_field),
                                num_experts=config_get(hf_config, experts_field), default=bridge.default_hf_layout)


class RoutedExpertsWithMTP:
    """Layout hooks of the families with ``n_routed_experts`` and multi-token-prediction layers (DeepSeek-V3,
    GLM-4.5): the expert layout and the MTP layers from the checkpoint, or from the model being exported. Listed
    before the bridge base class."""

    def detect_hf_layout(self, hf_state, hf_config):
        experts = family_expert_layout(self, hf_state, hf_config, experts_field="n_routed_experts")
        return dataclasses.replace(experts, mtp=detect_mtp_layers(hf_state, hf_config, type(self).__name__))

    def hf_layout_for_model(self, config):
        if config is None:
            return self.hf_layout
        return dataclasses.replace(self.hf_layout, mtp=mtp_layers_of_model(config))
