"""Llama 4 text (``Llama4ForCausalLM``, ``model_type`` ``llama4_text``): GQA attention without biases, RMSNorm,
SwiGLU, RoPE on interleaved channel pairs (HF rotates complex pairs: megatron ``rotary_interleaved``), and per layer:

- RoPE / NoPE layers: HF ``no_rope_layers`` (1: RoPE) is megatron's ``no_rope_freq`` inverted (1: no RoPE);
- RoPE layers: queries and keys L2-normalised (``use_qk_norm``; ``x * rsqrt(mean(x^2) + rms_norm_eps)``, no weight)
  after RoPE in HF, before it in megatron (a rotation keeps the mean square, so both give the same values): megatron's
  ``qk_l2_norm`` with ``qk_norm_nope_layers=False`` (``mcore/modules.RopeLayerQKNormSelfAttention`` drops the norm on
  NoPE layers), and attention causal within chunks of ``attention_chunk_size`` positions (HF
  ``chunked_attention`` layers; ``mcore/modules.LayerTypeDotProductAttention``);
- NoPE layers: with ``attn_temperature_tuning`` the query at position ``p`` is scaled by ``1 + attn_scale *
  log1p(floor((p + 1) / floor_scale))`` (``attn_temperature_floor_scale`` / ``attn_temperature_scale``, the same
  module);
- MoE layers (``moe_layers``, else every ``interleave_moe_layer_step``-th): routed SwiGLU experts of
  ``intermediate_size`` behind a top-1 router whose score ``sigmoid(logit)`` multiplies the expert's *input*
  (megatron ``moe_router_score_function="sigmoid"``, ``moe_apply_probs_on_input``), plus an ungated shared expert of
  the same size; dense layers are a SwiGLU MLP of ``intermediate_size_mlp``.

HF experts are fused: ``feed_forward.experts.gate_up_proj`` ``[E, D, 2F]`` (``[gate | up]`` along 2F) and
``down_proj`` ``[E, F, D]`` (what transformers writes, and the default when exporting without a source).

Refused by name: ``num_experts_per_tok`` other than 1 (HF keeps the top-k sigmoid scores as they are and scales the
expert inputs by them; megatron-core applies probabilities to the input only with top-1 and renormalises top-k > 1
sigmoid scores), ``attention_bias=True`` (megatron's ``add_bias_linear`` would add o_proj and MLP biases too),
``layer_types`` other than the ones HF derives (chunked exactly on the RoPE layers when ``attention_chunk_size`` is
set).

llama3 RoPE scaling converts with any ``low_freq_factor`` / ``high_freq_factor`` / ``original_max_position_embeddings``
(the released Scout config has 1 / 1 / 8192; megatron-core's ``RotaryEmbedding`` fixes 1 / 4 / 8192): the
``rope_scaling_*`` fields of ``GPTConfig``, applied after the model is built
(``mcore/modules.set_llama3_rope_parameters``).
"""

from __future__ import annotations

from typing import Any, Dict, List, Mapping, Tuple

from megatron_bridge_ext.models.hf_config import config_get, refuse_megatron_settings
from megatron_bridge_ext.models.llama import LlamaBridge
from megatron_bridge_ext.models.moe import (
    ExpertLayout, detect_expert_layout, megatron_moe_pattern, moe_runtime_kwargs, routed_expert_mappings,
    router_mappings, shared_expert_mappings,
)
from megatron_bridge_ext.models.tables import GPT_MODEL, H, attention_mappings, embedding_mappings, gated_mlp_mappings
from megatron_bridge_ext.registry import MegatronMappingRegistry

__all__ = ["Llama4Bridge", "llama4_nope_pattern", "llama4_moe_pattern"]

CHUNKED, FULL_ATTENTION = "chunked_attention", "full_attention"


def llama4_nope_pattern(hf_config: Any) -> List[int]:
    """Per layer 1 (NoPE) or 0 (RoPE): HF ``no_rope_layers`` (1: RoPE; the first ``num_hidden_layers`` entries), else
    a NoPE layer every ``no_rope_layer_interval`` layers (HF's default)."""
    layers = int(config_get(hf_config, "num_hidden_layers"))
    use_rope = config_get(hf_config, "no_rope_layers")
    if not use_rope:
        interval = int(config_get(hf_config, "no_rope_layer_interval", 4))
        use_rope = [int((i + 1) % interval != 0) for i in range(layers)]
    if len(use_rope) < layers:
        raise ValueError(f"Llama4Bridge: no_rope_layers has {len(use_rope)} entries for num_hidden_layers={layers}")
    return [0 if use_rope[i] else 1 for i in range(layers)]


def llama4_moe_pattern(hf_config: Any) -> List[int]:
    """Per layer 1 (routed experts) or 0 (dense MLP): HF ``moe_layers``, else every ``interleave_moe_layer_step``-th
    layer from layer ``step - 1`` on (HF's default)."""
    layers = int(config_get(hf_config, "num_hidden_layers"))
    moe = config_get(hf_config, "moe_layers")
    if moe is None:
        step = int(config_get(hf_config, "interleave_moe_layer_step", 1))
        moe = list(range(step - 1, layers, step))
    bad = [i for i in moe if not 0 <= int(i) < layers]
    if bad:
        raise ValueError(f"Llama4Bridge: moe_layers {bad} outside 0..{layers - 1}")
    moe = {int(i) for i in moe}
    return [1 if i in moe else 0 for i in range(layers)]


#: megatron-core's RotaryEmbedding builds llama3 scaling with these (GPTConfig's rope_scaling_* fields: None)
MCORE_LLAMA3 = {"low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
_LLAMA3_FIELDS = {"low_freq_factor": "rope_scaling_low_freq_factor",
                  "high_freq_factor": "rope_scaling_high_freq_factor",
                  "original_max_position_embeddings": "rope_scaling_original_max_position_embeddings"}


class _Overridden:
    """An HF config object with some fields replaced (read through ``config_get``)."""

    def __init__(self, base: Any, fields: Mapping[str, Any]) -> None:
        self._base, self._fields = base, dict(fields)

    def __getattr__(self, name: str) -> Any:
        fields = self.__dict__["_fields"]
        return fields[name] if name in fields else getattr(self.__dict__["_base"], name)


def llama3_rope_factors(hf_config: Any) -> Tuple[Any, Dict[str, Any]]:
    """``(config, fields)``: for llama3 RoPE whose factors differ from megatron-core's fixed ones, the HF config
    with megatron's factors (for the shared rope translation, which refuses others) and the ``GPTConfig``
    ``rope_scaling_*`` fields holding the real ones; otherwise the config as it is and no fields."""
    key = "rope_parameters"
    params = config_get(hf_config, key)
    if not isinstance(params, Mapping):
        key, params = "rope_scaling", config_get(hf_config, "rope_scaling")
    if not isinstance(params, Mapping) or params.get("rope_type", params.get("type")) != "llama3":
        return hf_config, {}
    fields = {_LLAMA3_FIELDS[k]: type(v)(params[k]) for k, v in MCORE_LLAMA3.items()
              if params.get(k) is not None and float(params[k]) != float(v)}
    if not fields:
        return hf_config, {}
    fixed = {key: {**params, **MCORE_LLAMA3}}
    return ({**hf_config, **fixed} if isinstance(hf_config, Mapping) else _Overridden(hf_config, fixed)), fields


def _int_field(value: Any, field: str, family: str) -> int:
    if isinstance(value, bool) or not float(value).is_integer():
        raise ValueError(f"{family}: {field}={value!r}; HF Llama 4 takes an integer")
    return int(value)


@LlamaBridge.register_bridge(source="Llama4ForCausalLM", target=GPT_MODEL)
class Llama4Bridge(LlamaBridge):
    """HF Llama4ForCausalLM <-> Megatron-Core GPTModel (NoPE / chunked RoPE layers, top-1 sigmoid MoE with a shared
    expert interleaved with dense layers)."""

    hf_model_type = "llama4_text"
    # Megatron-LM's args say qk_l2_norm and no_rope_freq, not the chunked attention or the query temperature
    not_in_megatron_lm_args = ("attention_chunk_size (chunked attention, set or not)",
                               "attn_temperature_floor_scale / attn_temperature_scale (temperature tuning, set or not)")
    default_hf_layout = ExpertLayout(fused=True, fc1_transposed=True, fc2_transposed=True)

    def hf_config_to_megatron_kwargs(self, hf_config: Any) -> Dict[str, Any]:
        family = type(self).__name__
        if config_get(hf_config, "attention_bias", False):
            raise ValueError(f"{family}: attention_bias=True is not supported (HF Llama 4 biases q/k/v/o_proj only; "
                             "megatron's add_bias_linear would bias o_proj, the MLPs and the experts too)")
        topk = int(config_get(hf_config, "num_experts_per_tok", 1))
        if topk != 1:
            raise ValueError(f"{family}: num_experts_per_tok={topk} is not supported: HF scales each of the top-k "
                             "experts' inputs by its unnormalised sigmoid score; megatron-core applies router "
                             "probabilities to the expert input only with top-1 (moe_apply_probs_on_input) and "
                             "renormalises top-k > 1 sigmoid scores")
        nope = llama4_nope_pattern(hf_config)
        chunk = config_get(hf_config, "attention_chunk_size")
        want_types = [FULL_ATTENTION if n or chunk is None else CHUNKED for n in nope]
        types = config_get(hf_config, "layer_types")
        if types is not None and list(types)[:len(nope)] != want_types:
            raise ValueError(f"{family}: layer_types={list(types)} is not supported: megatron chunks the attention of "
                             f"exactly the RoPE layers when attention_chunk_size is set ({want_types} for "
                             f"no_rope_layers={[1 - n for n in nope]}, attention_chunk_size={chunk})")
        rope_config, llama3 = llama3_rope_factors(hf_config)
        kw = self.dense_megatron_kwargs(rope_config)  # sizes, RoPE, RMSNorm, SwiGLU
        kw.update(llama3)
        experts = int(config_get(hf_config, "num_local_experts"))
        expert_ffn = int(config_get(hf_config, "intermediate_size"))
        kw.update(
            ffn_hidden_size=int(config_get(hf_config, "intermediate_size_mlp")),
            add_bias_linear=False,
            add_qkv_bias=False,
            rotary_interleaved=True,  # HF rotates complex pairs (adjacent channels)
            no_rope_freq=nope if any(nope) else None,
            **moe_runtime_kwargs(experts, topk, expert_ffn, llama4_moe_pattern(hf_config)),
            moe_router_score_function="sigmoid",
            moe_router_pre_softmax=False,
            moe_apply_probs_on_input=True,
            moe_shared_expert_intermediate_size=expert_ffn,
        )
        if config_get(hf_config, "use_qk_norm", True):
            kw.update(qk_l2_norm=True, qk_norm_nope_layers=False)
        if chunk is not None:
            kw["attention_chunk_size"] = _int_field(chunk, "attention_chunk_size", family)
        if config_get(hf_config, "attn_temperature_tuning", True):
            kw.update(attn_temperature_floor_scale=float(config_get(hf_config, "floor_scale", 8192)),
                      attn_temperature_scale=float(config_get(hf_config, "attn_scale", 0.1)))
        return kw

    def megatron_to_hf_config(self, config: Any) -> Dict[str, Any]:
        family = type(self).__name__
        wrong = {}
        if not config.num_moe_experts:
            wrong["num_moe_experts"] = config.num_moe_experts
        elif config.moe_shared_expert_intermediate_size != config.moe_ffn_hidden_size:
            wrong["moe_shared_expert_intermediate_size"] = config.moe_shared_expert_intermediate_size
        scaling = config.moe_router_topk_scaling_factor
        if scaling not in (None, 1.0):
            wrong["moe_router_topk_scaling_factor"] = scaling
        refuse_megatron_settings(config, family, "Llama 4", (
            ("normalization", "RMSNorm"), ("gated_linear_unit", True), ("add_bias_linear", False),
            ("add_qkv_bias", False), ("rotary_interleaved", True), ("qk_layernorm", False),
            ("moe_router_score_function", "sigmoid"), ("moe_router_topk", 1), ("moe_apply_probs_on_input", True),
            ("moe_router_enable_expert_bias", False), ("moe_shared_expert_gate", False)), wrong=wrong)
        layers = config.num_layers
        freq = config.no_rope_freq
        nope = ([1 if (i + 1) % freq == 0 else 0 for i in range(layers)] if isinstance(freq, int)
                else [int(bool(x)) for x in freq] if freq else [0] * layers)
        if config.qk_l2_norm and any(nope) and config.qk_norm_nope_layers:
            raise ValueError(f"{family}: qk_l2_norm with qk_norm_nope_layers=True; HF Llama 4 normalises queries and "
                             "keys on RoPE layers only")
        pattern = megatron_moe_pattern(config)
        step = next((s for s in range(1, layers + 1)
                     if pattern == [1 if i in range(s - 1, layers, s) else 0 for i in range(layers)]), 1)
        floor = config.attn_temperature_floor_scale
        chunk = config.attention_chunk_size
        hf = self.dense_hf_fields(config)
        rope = hf["rope_parameters"]
        if rope.get("rope_type") == "llama3":
            rope.update({k: type(v)(getattr(config, _LLAMA3_FIELDS[k])) for k, v in MCORE_LLAMA3.items()
                         if getattr(config, _LLAMA3_FIELDS[k]) is not None})
        hf.update(
            intermediate_size=config.moe_ffn_hidden_size,
            intermediate_size_mlp=config.ffn_hidden_size,
            num_local_experts=config.num_moe_experts,
            num_experts_per_tok=1,
            interleave_moe_layer_step=step,
            moe_layers=[i for i, p in enumerate(pattern) if p],
            no_rope_layers=[0 if n else 1 for n in nope],
            use_qk_norm=bool(config.qk_l2_norm),
            attention_chunk_size=None if chunk is None else _int_field(chunk, "attention_chunk_size", family),
            attn_temperature_tuning=floor is not None,
            attention_bias=False,
        )
        if floor is not None:
            hf.update(floor_scale=_int_field(floor, "attn_temperature_floor_scale", family),
                      attn_scale=float(config.attn_temperature_scale))
        return hf

    def detect_hf_layout(self, hf_state, hf_config):
        return detect_expert_layout(hf_state, type(self).__name__,
                                    hidden_size=config_get(hf_config, "hidden_size"),
                                    expert_ffn=config_get(hf_config, "intermediate_size"),
                                    num_experts=config_get(hf_config, "num_local_experts"),
                                    default=self.default_hf_layout, experts="feed_forward.experts")

    def mapping_registry(self) -> MegatronMappingRegistry:
        ff = f"{H}.feed_forward"
        return MegatronMappingRegistry(
            *embedding_mappings(), *attention_mappings(), *gated_mlp_mappings(mlp="feed_forward"),
            *router_mappings(f"{ff}.router"), *routed_expert_mappings(self.hf_layout, experts=f"{ff}.experts"),
            *shared_expert_mappings(f"{ff}.shared_expert"),
        )
