"""Gemma 2 (``Gemma2ForCausalLM``): GeGLU MLP (``hidden_activation``), zero-centred RMSNorms (``x * (1 + w)``, ``w``
stored as on disk: megatron ``layernorm_zero_centered_gamma``), norms before *and* after attention and the MLP,
embeddings scaled by sqrt(hidden_size), attention scaled by ``query_pre_attn_scalar ** -0.5`` (``softmax_scale``),
alternating sliding-window / full-attention layers (``layer_types`` -> ``window_attn_skip_freq``), tied embeddings.

The post-attention / post-MLP norms, the zero-centred norms, the embedding scale and the soft-capping of the
attention scores (``attn_logit_softcapping``) and of the output logits (``final_logit_softcapping``; every released
Gemma 2 checkpoint sets 50.0 and 30.0) are built by the modules of ``mcore/modules.py`` (megatron-core 0.16.1's local
spec has none of them).

Refused with named errors: what megatron-core 0.16.1 cannot express, ``attention_bias`` (o_proj bias without MLP
biases) and ``use_bidirectional_attention``; soft-caps that are not positive numbers (HF divides by them).
"""

from __future__ import annotations

import math
from typing import Any, Dict

from megatron_bridge_ext.engine import MegatronModelBridge
from megatron_bridge_ext.models.hf_config import (
    RMSNORM_GLU_NO_BIAS,
    activation_hf_fields,
    common_megatron_kwargs,
    config_get,
    gated_activation_kwargs,
    model_size_hf_fields,
    refuse_megatron_settings,
    rms_norm_hf_fields,
    rms_norm_kwargs,
    rope_hf_fields,
    window_hf_fields,
    window_settings,
)
from megatron_bridge_ext.models.tables import (
    GPT_MODEL,
    attention_mappings,
    embedding_mappings,
    gated_mlp_mappings,
    post_norm_mappings,
)
from megatron_bridge_ext.registry import MegatronMappingRegistry

__all__ = ["Gemma2Bridge"]

GELU_ACTIVATIONS = ("gelu_pytorch_tanh", "gelu")
#: HF config fields that are ``GPTConfig`` fields of the same name
SOFTCAP_FIELDS = ("attn_logit_softcapping", "final_logit_softcapping")


@MegatronModelBridge.register_bridge(source="Gemma2ForCausalLM", target=GPT_MODEL)
class Gemma2Bridge(MegatronModelBridge):
    """HF Gemma2ForCausalLM <-> Megatron-Core GPTModel (with the local-spec modules of ``mcore/modules.py``)."""

    hf_model_type = "gemma2"

    def _refuse_unsupported(self, hf_config: Any) -> None:
        family = type(self).__name__
        if config_get(hf_config, "attention_bias", False):
            raise ValueError(f"{family}: attention_bias=True cannot be expressed (q/k/v and o_proj biases without MLP "
                             "biases; megatron's add_bias_linear covers both)")
        if config_get(hf_config, "use_bidirectional_attention", False):
            raise ValueError(f"{family}: use_bidirectional_attention=True is not supported (GPTModel is causal)")

    def _softcap_settings(self, hf_config: Any) -> Dict[str, float]:
        """``attn_logit_softcapping`` / ``final_logit_softcapping`` as ``GPTConfig`` fields (absent when None)."""
        out = {}
        for name in SOFTCAP_FIELDS:
            value = config_get(hf_config, name)
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                    or value <= 0:
                raise ValueError(f"{type(self).__name__}: {name}={value!r} is not a positive number (None: no "
                                 "capping)")
            out[name] = float(value)
        return out

    def _common_kwargs(self, hf_config: Any) -> Dict[str, Any]:
        """Sizes, RoPE and dtype (Gemma 3: its per-layer-type RoPE)."""
        return common_megatron_kwargs(hf_config)

    def _rope_hf_fields(self, config: Any) -> Dict[str, Any]:
        """The reverse of :meth:`_common_kwargs`' RoPE."""
        return rope_hf_fields(config)

    def hf_config_to_megatron_kwargs(self, hf_config: Any) -> Dict[str, Any]:
        self._refuse_unsupported(hf_config)
        family = type(self).__name__
        kw = self._common_kwargs(hf_config)
        kw.update(
            **rms_norm_kwargs(hf_config),
            layernorm_zero_centered_gamma=True,
            post_self_attn_layernorm=True,
            post_mlp_layernorm=True,
            **gated_activation_kwargs(hf_config, family, field="hidden_activation", default="gelu_pytorch_tanh",
                                      allowed=GELU_ACTIVATIONS),
            add_bias_linear=False,
            add_qkv_bias=False,
            softmax_scale=float(config_get(hf_config, "query_pre_attn_scalar", kw["kv_channels"])) ** -0.5,
            embedding_scale=kw["hidden_size"] ** 0.5,
            **window_settings(hf_config, family),
            **self._softcap_settings(hf_config),
        )
        return kw

    def _check_megatron(self, config: Any) -> None:
        family = type(self).__name__
        refuse_megatron_settings(config, family, self.hf_architecture, (
            *RMSNORM_GLU_NO_BIAS, ("layernorm_zero_centered_gamma", True), ("post_self_attn_layernorm", True),
            ("post_mlp_layernorm", True), ("embedding_scale", config.hidden_size ** 0.5)), show_expected=True)

    def megatron_to_hf_config(self, config: Any) -> Dict[str, Any]:
        self._check_megatron(config)
        family = type(self).__name__
        hf = {**super().megatron_to_hf_config(config), **model_size_hf_fields(config), **self._rope_hf_fields(config)}
        scale = config.softmax_scale if config.softmax_scale is not None else config.kv_channels ** -0.5
        scalar = 1.0 / (scale * scale)
        if abs(scalar - round(scalar)) > 1e-6 * scalar:
            raise ValueError(f"{family}: softmax_scale={scale} is not 1/sqrt(n) for an integer query_pre_attn_scalar "
                             f"(1/scale^2 = {scalar})")
        activation = activation_hf_fields(config, "hidden_activation")
        window = window_hf_fields(config, family)
        if window["sliding_window"] is None:  # HF Gemma builds a sliding-window mask even when no layer uses it
            window = {**window, "sliding_window": config.seq_length}
        hf.update(
            **rms_norm_hf_fields(config),
            **activation,
            attention_bias=False,
            query_pre_attn_scalar=int(round(scalar)),
            # written also when None: HF Gemma 2's defaults (50.0 / 30.0) would change the model
            attn_logit_softcapping=config.attn_logit_softcapping,
            final_logit_softcapping=config.final_logit_softcapping,
            **window,
        )
        return hf

    def mapping_registry(self) -> MegatronMappingRegistry:
        return MegatronMappingRegistry(*embedding_mappings(), *attention_mappings(),
                                       *gated_mlp_mappings(pre_norm="pre_feedforward_layernorm"),
                                       *post_norm_mappings())
