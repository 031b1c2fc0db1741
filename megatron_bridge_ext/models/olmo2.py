"""OLMo 2 (``Olmo2ForCausalLM``) and Olmo 3 (``Olmo3ForCausalLM``): Llama's sizes, SwiGLU MLP and RoPE with two
differences in the norms.

- Post-norm placement: no norm before attention or before the MLP (megatron ``pre_layernorms=False``); an RMSNorm on
  the attention output and one on the MLP output, before each residual add (HF ``post_attention_layernorm`` /
  ``post_feedforward_layernorm``; megatron ``post_self_attn_layernorm`` / ``post_mlp_layernorm``, built by
  ``PostNormRowParallelLinear``; plain ``x * w`` norms, not Gemma's zero-centred ones).
- Query / key norms over the whole projection (HF ``q_norm`` ``[H*d]`` on ``q_proj``'s output, ``k_norm`` ``[G*d]``),
  not per head: megatron ``qk_layernorm`` with ``qk_layernorm_whole_projection`` (``WholeQueryRMSNorm`` /
  ``WholeKeyRMSNorm``, the weight split by heads over TP, the mean square all-reduced over the TP group). With fewer
  key heads than TP ranks megatron replicates key heads; that is refused, named, when the model is built or converted.

Olmo 3 adds sliding-window / full-attention layers (``layer_types``, ``sliding_window``) and per-layer-type RoPE
(``rope_parameters["full_attention"]`` / ``["sliding_attention"]``): the full layers' RoPE is the model's (default,
linear, or YaRN as the released checkpoints extend their context: megatron ``position_embedding_type="yarn"``), the
sliding layers rotate with their own unscaled base (``local_rotary_base``, ``LayerTypeRopeSelfAttention``, which
keeps YaRN's attention factor off them as HF does). Refused with named errors: ``attention_bias`` (q/k/v and o_proj
biases without MLP biases), sliding-layer RoPE other than a base, fewer key heads than TP ranks. A ``head_dim``
other than ``hidden_size // num_attention_heads`` converts (HF sizes the projections, the q / k norms and RoPE from
it); export writes it only then.
"""

from __future__ import annotations

from typing import Any, Dict, Mapping

from megatron_bridge_ext.engine import MegatronModelBridge
from megatron_bridge_ext.models.hf_config import (
    FULL,
    RMSNORM_GLU_NO_BIAS,
    SLIDING,
    activation_hf_fields,
    common_megatron_kwargs,
    config_get,
    gated_activation_kwargs,
    layer_type_rope_hf_fields,
    layer_type_rope_kwargs,
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
    whole_qk_norm_mappings,
)
from megatron_bridge_ext.registry import MegatronMappingRegistry

__all__ = ["Olmo2Bridge", "Olmo3Bridge", "WHOLE_QK_NORMS", "check_whole_qk_norms",
           "olmo3_config_as_transformers_reads_it"]

#: the GPTConfig fields of q / k norms over the whole projection (OLMo 2, Olmo 3, OLMoE)
WHOLE_QK_NORMS = {"qk_layernorm": True, "qk_layernorm_whole_projection": True}
#: OLMo 2 / Olmo 3's norm placement
POST_NORMS = {"pre_layernorms": False, "post_self_attn_layernorm": True, "post_mlp_layernorm": True}


def check_whole_qk_norms(config: Any, family: str) -> None:
    """A Megatron config normalises queries and keys over the whole projection, as HF OLMo models do.

    Raises:
        ValueError: naming ``qk_layernorm`` / ``qk_layernorm_whole_projection`` and their values.
    """
    if not (config.qk_layernorm and config.qk_layernorm_whole_projection):
        raise ValueError(f"{family}: qk_layernorm={config.qk_layernorm}, qk_layernorm_whole_projection="
                         f"{config.qk_layernorm_whole_projection}; the HF model normalises queries and keys over the "
                         "whole projection (both True)")


@MegatronModelBridge.register_bridge(source="Olmo2ForCausalLM", target=GPT_MODEL)
class Olmo2Bridge(MegatronModelBridge):
    """HF Olmo2ForCausalLM <-> Megatron-Core GPTModel (post norms and whole-projection q/k norms of
    ``mcore/modules.py``)."""

    hf_model_type = "olmo2"

    def _common_kwargs(self, hf_config: Any) -> Dict[str, Any]:
        """Sizes, RoPE and dtype (Olmo 3: its per-layer-type RoPE)."""
        return common_megatron_kwargs(hf_config)

    def _rope_hf_fields(self, config: Any) -> Dict[str, Any]:
        """The reverse of :meth:`_common_kwargs`' RoPE."""
        return rope_hf_fields(config)

    def hf_config_to_megatron_kwargs(self, hf_config: Any) -> Dict[str, Any]:
        family = type(self).__name__
        if config_get(hf_config, "attention_bias", False):
            raise ValueError(f"{family}: attention_bias=True cannot be expressed (q/k/v and o_proj biases without MLP "
                             "biases; megatron's add_bias_linear covers both)")
        kw = self._common_kwargs(hf_config)
        kw.update(**rms_norm_kwargs(hf_config, default_eps=1e-5), **POST_NORMS, **WHOLE_QK_NORMS,
                  **gated_activation_kwargs(hf_config, family), add_bias_linear=False, add_qkv_bias=False)
        return kw

    def _check_megatron(self, config: Any) -> None:
        family = type(self).__name__
        scale = config.softmax_scale
        refuse_megatron_settings(config, family, self.hf_architecture, (
            *RMSNORM_GLU_NO_BIAS, ("layernorm_zero_centered_gamma", False), ("embedding_scale", None),
            ("attn_logit_softcapping", None), ("final_logit_softcapping", None), *POST_NORMS.items()),
            also={"softmax_scale": (None if scale == config.kv_channels ** -0.5 else scale, None)},
            show_expected=True)
        check_whole_qk_norms(config, family)

    def _window_hf_fields(self, config: Any) -> Dict[str, Any]:
        """HF window fields of the config (Olmo 3); OLMo 2 has no sliding window."""
        if config.window_size:
            raise ValueError(f"{type(self).__name__}: window_size={tuple(config.window_size)} has no OLMo 2 "
                             "equivalent (no sliding-window attention)")
        return {}

    def megatron_to_hf_config(self, config: Any) -> Dict[str, Any]:
        self._check_megatron(config)
        # HF derives head_dim (hidden_size // num_attention_heads) unless the config carries one
        derived = config.kv_channels == config.hidden_size // config.num_attention_heads
        return {**super().megatron_to_hf_config(config), **model_size_hf_fields(config, head_dim=not derived),
                **self._rope_hf_fields(config), **rms_norm_hf_fields(config), **activation_hf_fields(config),
                "attention_bias": False, **self._window_hf_fields(config)}

    def mapping_registry(self) -> MegatronMappingRegistry:
        return MegatronMappingRegistry(*embedding_mappings(), *attention_mappings(input_norm=None),
                                       *whole_qk_norm_mappings(), *gated_mlp_mappings(pre_norm=None),
                                       *post_norm_mappings())


#: HF Olmo3Config's defaults of the fields below (transformers 5.24)
OLMO3_DEFAULT_THETA, OLMO3_DEFAULT_WINDOW = 500000.0, 4096


def olmo3_config_as_transformers_reads_it(hf_config: Any) -> Any:
    """A raw Olmo 3 ``config.json`` dict with what transformers' ``Olmo3Config`` derives from it: without
    ``rope_parameters`` its ``rope_theta`` / ``rope_scaling`` (the released files' form) are the full-attention layers'
    RoPE and the sliding layers get the same theta unscaled (``convert_rope_params_to_dict``); without
    ``layer_types`` every fourth layer is a full-attention one, the others slide; ``sliding_window`` defaults to
    4096. Config objects (transformers has derived them) are returned as they are."""
    if not isinstance(hf_config, Mapping):
        return hf_config
    out = dict(hf_config)
    if config_get(hf_config, "rope_parameters") is None:
        theta = float(config_get(hf_config, "rope_theta", OLMO3_DEFAULT_THETA))
        full = {"rope_type": "default", **dict(config_get(hf_config, "rope_scaling") or {}), "rope_theta": theta}
        out["rope_parameters"] = {FULL: full, SLIDING: {"rope_type": "default", "rope_theta": theta}}
    if config_get(hf_config, "layer_types") is None:
        out["layer_types"] = [SLIDING if (i + 1) % 4 else FULL for i in range(int(hf_config["num_hidden_layers"]))]
    out.setdefault("sliding_window", OLMO3_DEFAULT_WINDOW)
    return out


@Olmo2Bridge.register_bridge(source="Olmo3ForCausalLM", target=GPT_MODEL)
class Olmo3Bridge(Olmo2Bridge):
    """HF Olmo3ForCausalLM <-> Megatron-Core GPTModel: OLMo 2 with sliding / full layers and per-layer-type RoPE."""

    hf_model_type = "olmo3"

    def _common_kwargs(self, hf_config: Any) -> Dict[str, Any]:
        # released Olmo 3 checkpoints extend their context with YaRN on the full-attention layers only
        return layer_type_rope_kwargs(hf_config, type(self).__name__, yarn=True)

    def _rope_hf_fields(self, config: Any) -> Dict[str, Any]:
        return layer_type_rope_hf_fields(config)

    def hf_config_to_megatron_kwargs(self, hf_config: Any) -> Dict[str, Any]:
        hf_config = olmo3_config_as_transformers_reads_it(hf_config)
        return {**super().hf_config_to_megatron_kwargs(hf_config),
                **window_settings(hf_config, type(self).__name__)}

    def _window_hf_fields(self, config: Any) -> Dict[str, Any]:
        window = window_hf_fields(config, type(self).__name__)
        if window["sliding_window"] is None:  # HF Olmo 3 builds a sliding-window mask even when no layer uses it
            window = {**window, "sliding_window": config.seq_length}
        return window
