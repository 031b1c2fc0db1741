"""GLM-4.7-Flash (``Glm4MoeLiteForCausalLM``): DeepSeek-V3's multi-latent attention in front of GLM-4.5's MoE.

- Attention: transformers' ``Glm4MoeLiteAttention`` is DeepSeek-V3's MLA (``deepseek_v3.mla_megatron_kwargs`` /
  ``mla_hf_fields`` / ``tables.mla_mappings``): q LoRA (``q_a_proj`` -> ``q_a_layernorm`` -> ``q_b_proj``, a plain
  ``q_proj`` when ``q_lora_rank`` is None), kv LoRA with one shared rope key, interleaved RoPE on the
  ``qk_rope_head_dim`` channels, YaRN with its mscale; the latent norms at epsilon 1e-6 whatever ``rms_norm_eps``
  (1e-5 by default here, so the local spec builds ``LatentRMSNorm`` latent norms).
- RoPE: GLM-4.5's rotary embedding, which takes ``partial_rotary_factor`` from the rope parameters; with interleaved
  MLA rope HF's forward only runs at factor 1 (the cos / sin would be narrower than the rope channels).
- Dense / MoE layers: ``mlp_layer_types`` (``"dense"`` / ``"sparse"`` per layer; transformers' default: the first
  layer dense, the rest sparse), megatron's ``moe_layer_freq`` list, any pattern. A ``first_k_dense_replace`` that
  config.json may carry is not read by transformers; one that contradicts ``mlp_layer_types`` is refused.
- MoE: GLM-4.5's (DeepSeek-V3's) sigmoid router with fp32 ``e_score_correction_bias``, grouped top-k, routed scaling,
  ``n_shared_experts`` ungated shared experts; router weights fp32 in bf16 models.
- Multi-token-prediction layers (HF layers ``num_hidden_layers + i``; the released checkpoint holds layer 47, which
  transformers skips on load): converted when the checkpoint holds them, read from the keys
  (``num_nextn_predict_layers``, a field transformers keeps as written). HF's config says nothing of their MLP kind
  (the keys do: a router ``mlp.gate.weight`` or not); megatron-core builds them like the last decoder layer, so an
  MTP layer of the other kind is refused by name.

HF experts: one tensor per expert (what ``save_pretrained`` writes; the default) or fused, read from the keys.

Not converted: ``attention_bias=True``, ``rope_interleave=False``, ``partial_rotary_factor`` other than 1, YaRN with
``truncate=False``, ``norm_topk_prob=False`` (with top-k > 1), group scores other than the top-2 sum.
"""

from __future__ import annotations

from typing import Any, Dict, List, Mapping

from megatron_bridge_ext.engine import MegatronModelBridge
from megatron_bridge_ext.models.deepseek_v3 import mla_hf_fields, mla_megatron_kwargs
from megatron_bridge_ext.models.hf_config import (
    RMSNORM_GLU_NO_BIAS,
    activation_hf_fields, config_get, gated_activation_kwargs, model_size_hf_fields, rms_norm_hf_fields,
    refuse_megatron_settings,
    rms_norm_kwargs,
)
from megatron_bridge_ext.models.moe import (
    PER_EXPERT, megatron_moe_pattern, moe_hf_fields, moe_runtime_kwargs, routed_expert_mappings, router_mappings,
    shared_expert_mappings, shared_expert_size, sigmoid_router_hf_fields, sigmoid_router_kwargs,
    ungated_shared_experts_hf_field,
)
from megatron_bridge_ext.models.mtp import RoutedExpertsWithMTP, mtp_mappings
from megatron_bridge_ext.models.tables import GPT_MODEL, H, embedding_mappings, gated_mlp_mappings, mla_mappings
from megatron_bridge_ext.registry import MegatronMappingRegistry

__all__ = ["Glm4MoeLiteBridge", "mlp_layer_types_pattern", "mlp_layer_types_hf_field"]

_KINDS = {"dense": 0, "sparse": 1}


def mlp_layer_types_pattern(hf_config: Any, family: str) -> List[int]:
    """Per layer 1 (routed experts) or 0 (dense) of HF ``mlp_layer_types``; transformers' default (the first layer
    dense) when the config has none.

    Raises:
        ValueError: a list of another length than ``num_hidden_layers``, an entry other than ``"dense"`` /
            ``"sparse"``, or a ``first_k_dense_replace`` that says otherwise (each named with its value).
    """
    layers = int(config_get(hf_config, "num_hidden_layers"))
    types = config_get(hf_config, "mlp_layer_types")
    if types is None:
        types = ["dense"] + ["sparse"] * (layers - 1)
    types = list(types)
    if len(types) != layers:
        raise ValueError(f"{family}: mlp_layer_types has {len(types)} entries for num_hidden_layers={layers}: "
                         f"{types}")
    bad = sorted({t for t in types if t not in _KINDS}, key=str)
    if bad:
        raise ValueError(f"{family}: mlp_layer_types entries {bad} are neither 'dense' nor 'sparse' ({types})")
    pattern = [_KINDS[t] for t in types]
    k = config_get(hf_config, "first_k_dense_replace")
    if k is not None and pattern != [0 if i < int(k) else 1 for i in range(layers)]:
        raise ValueError(f"{family}: first_k_dense_replace={k} contradicts mlp_layer_types={types} (transformers "
                         "builds the layers mlp_layer_types names)")
    return pattern


def mlp_layer_types_hf_field(config: Any) -> List[str]:
    """HF ``mlp_layer_types`` of a Megatron layer pattern (the reverse of :func:`mlp_layer_types_pattern`)."""
    return ["sparse" if p else "dense" for p in megatron_moe_pattern(config)]


def _partial_rotary_factor(hf_config: Any) -> float:
    params = config_get(hf_config, "rope_parameters")
    partial = params.get("partial_rotary_factor") if isinstance(params, Mapping) else None
    if partial is None:
        partial = config_get(hf_config, "partial_rotary_factor")
    return 1.0 if partial is None else float(partial)


@MegatronModelBridge.register_bridge(source="Glm4MoeLiteForCausalLM", target=GPT_MODEL)
class Glm4MoeLiteBridge(RoutedExpertsWithMTP, MegatronModelBridge):
    """HF Glm4MoeLiteForCausalLM <-> Megatron-Core GPTModel with multi-latent attention and MoE layers."""

    hf_model_type = "glm4_moe_lite"
    hf_model_name = "GLM-4.7-Flash"  # in the export's refusals
    #: whether the HF config has ``rope_interleave`` (written True: the MLA rope rotates interleaved pairs)
    hf_rope_interleave_field = True
    default_hf_layout = PER_EXPERT

    def detect_hf_layout(self, hf_state, hf_config):
        """The expert layout and MTP layers (``RoutedExpertsWithMTP``), each MTP layer of the last decoder layer's
        kind.

        Raises:
            ValueError: an MTP layer with routed experts after a dense last layer, or the reverse (named).
        """
        layout = super().detect_hf_layout(hf_state, hf_config)
        if layout.mtp is not None:
            family = type(self).__name__
            last = "sparse" if mlp_layer_types_pattern(hf_config, family)[-1] else "dense"
            keys = set(hf_state.keys())
            for n in range(layout.mtp.first, layout.mtp.first + layout.mtp.count):
                kind = "sparse" if f"model.layers.{n}.mlp.gate.weight" in keys else "dense"
                if kind != last:
                    raise ValueError(f"{family}: the checkpoint's multi-token-prediction layer model.layers.{n} is "
                                     f"{kind} (mlp.gate.weight {'present' if kind == 'sparse' else 'absent'}) but the "
                                     f"last decoder layer is {last} (mlp_layer_types[-1]); megatron-core builds the "
                                     "MTP layers like the last decoder layer")
        return layout

    def hf_config_to_megatron_kwargs(self, hf_config: Any) -> Dict[str, Any]:
        family = type(self).__name__
        partial = _partial_rotary_factor(hf_config)
        if partial != 1.0:
            raise ValueError(f"{family}: partial_rotary_factor={partial} is not supported (with interleaved MLA rope "
                             "transformers' Glm4MoeLite rotates every qk_rope_head_dim channel; other factors do not "
                             "run there)")
        kw = mla_megatron_kwargs(hf_config, family)
        shared = shared_expert_size(hf_config, family)
        pattern = mlp_layer_types_pattern(hf_config, family)
        kw.update(
            **rms_norm_kwargs(hf_config, default_eps=1e-5),
            **gated_activation_kwargs(hf_config, family),
            add_bias_linear=False,
            add_qkv_bias=False,
            **moe_runtime_kwargs(config_get(hf_config, "n_routed_experts"),
                                 config_get(hf_config, "num_experts_per_tok"),
                                 config_get(hf_config, "moe_intermediate_size"), pattern),
            **sigmoid_router_kwargs(hf_config, family),
        )
        if self.hf_layout.mtp is not None:  # of the last decoder layer's kind (detect_hf_layout)
            kw["mtp_num_layers"] = self.hf_layout.mtp.count
        if shared:
            kw["moe_shared_expert_intermediate_size"] = shared
        return kw

    def megatron_to_hf_config(self, config: Any) -> Dict[str, Any]:
        family = type(self).__name__
        refuse_megatron_settings(config, family, self.hf_model_name, (*RMSNORM_GLU_NO_BIAS, ("rotary_percent", 1.0)))
        n_shared = ungated_shared_experts_hf_field(config, family)
        # Glm4MoeLiteConfig maps head_dim to qk_rope_head_dim itself; MLA writes its own rope_parameters
        hf = {**super().megatron_to_hf_config(config), **model_size_hf_fields(config, head_dim=False)}
        hf.update(
            **rms_norm_hf_fields(config),
            **activation_hf_fields(config),
            n_shared_experts=n_shared,
            mlp_layer_types=mlp_layer_types_hf_field(config),
            num_nextn_predict_layers=config.mtp_num_layers or 0,
            **mla_hf_fields(config, family, rope_interleave_field=self.hf_rope_interleave_field),
            **moe_hf_fields(config, "n_routed_experts"),
            **sigmoid_router_hf_fields(config, family),
        )
        return hf

    def mapping_registry(self) -> MegatronMappingRegistry:
        layer = [*mla_mappings(), *gated_mlp_mappings(), *router_mappings(), *routed_expert_mappings(self.hf_layout),
                 *shared_expert_mappings(f"{H}.mlp.shared_experts")]
        return MegatronMappingRegistry(*mtp_mappings(self.hf_layout.mtp, layer), *embedding_mappings(), *layer)
