"""DeepSeek-V3 (``DeepseekV3ForCausalLM``): multi-latent attention, the first ``first_k_dense_replace`` layers dense
and the rest routed experts with shared experts, sigmoid routing.

- MLA (megatron ``multi_latent_attention``): queries through a LoRA (``q_a_proj`` -> ``q_a_layernorm`` -> ``q_b_proj``;
  a plain ``q_proj`` when ``q_lora_rank`` is None), keys / values through ``kv_a_proj_with_mqa`` (the kv latent plus one
  shared rope key) -> ``kv_a_layernorm`` -> ``kv_b_proj``; per head ``qk_nope_head_dim`` channels without and
  ``qk_rope_head_dim`` with RoPE (megatron ``qk_head_dim`` / ``qk_pos_emb_head_dim``). HF's ``rope_interleave`` rotates
  interleaved pairs, which is what megatron's MLA rope does (it de-interleaves first); YaRN (the released
  checkpoints' ``rope_parameters``) with its mscale on the softmax. The local spec's core attention takes no
  ``k_channels`` / ``v_channels``: ``mcore/modules.MLADotProductAttention`` does; HF's latent norms use epsilon 1e-6
  whatever ``rms_norm_eps`` is (``latent_layernorm_epsilon``, ``mcore/modules.LatentRMSNorm`` when they differ).
- Routing: sigmoid scores, top-k on scores + ``e_score_correction_bias`` (megatron's fp32 ``router.expert_bias``)
  within the ``topk_group`` best of ``n_group`` groups, weights renormalised and scaled by ``routed_scaling_factor``.
- Routers: weight (and correction bias) kept in fp32 in bf16 models, as HF keeps them (``moe_router_fp32_weight``).
- Dense / MoE layers: megatron ``moe_layer_freq`` as a list, built as a heterogeneous block spec.
- Multi-token-prediction layers (HF layers ``num_hidden_layers + i``): converted when the checkpoint holds them
  (read from the keys, ``detect_hf_layout``; transformers' config says ``num_nextn_predict_layers = 1`` either way),
  as megatron-core's ``mtp.layers.i`` (see ``models.mtp.mtp_mappings``).

HF experts: one tensor per expert (what ``save_pretrained`` writes; the default) or fused, read from the keys.

Not converted: ``attention_bias=True``, ``rope_interleave=False``, YaRN with ``truncate=False``.
"""

from __future__ import annotations

from typing import Any, Dict

from megatron_bridge_ext.engine import MegatronModelBridge
from megatron_bridge_ext.models.hf_config import (
    RMSNORM_GLU_NO_BIAS,
    activation_hf_fields, config_get, dtype_kwargs, gated_activation_kwargs, model_size_hf_fields, model_size_kwargs,
    refuse_megatron_settings,
    rms_norm_hf_fields, rms_norm_kwargs, rope_settings, yarn_hf_fields,
)
from megatron_bridge_ext.models.moe import (
    PER_EXPERT, first_k_dense_hf_field, first_k_dense_pattern, moe_hf_fields, moe_runtime_kwargs,
    routed_expert_mappings, router_mappings, shared_expert_mappings, shared_expert_size, sigmoid_router_hf_fields,
    sigmoid_router_kwargs,
    ungated_shared_experts_hf_field,
)
from megatron_bridge_ext.models.mtp import RoutedExpertsWithMTP, mtp_kwargs, mtp_mappings
from megatron_bridge_ext.models.tables import GPT_MODEL, H, embedding_mappings, gated_mlp_mappings, mla_mappings
from megatron_bridge_ext.registry import MegatronMappingRegistry

__all__ = ["DeepseekV3Bridge", "mla_megatron_kwargs", "mla_hf_fields"]

#: HF DeepSeek-V3 builds ``q_a_layernorm`` / ``kv_a_layernorm`` with this epsilon, not ``rms_norm_eps``
HF_LATENT_NORM_EPS = 1e-6


def mla_megatron_kwargs(hf_config: Any, family: str) -> Dict[str, Any]:
    """``MLAGPTConfig`` fields of an HF DeepSeek-style MLA config (ranks, head dims, rope).

    Raises:
        ValueError: settings megatron's MLA cannot express (named).
    """
    heads = int(config_get(hf_config, "num_attention_heads"))
    kv_heads = config_get(hf_config, "num_key_value_heads")
    if kv_heads is not None and int(kv_heads) != heads:
        raise ValueError(f"{family}: num_key_value_heads={kv_heads} != num_attention_heads={heads}; multi-latent "
                         "attention expands keys and values to every head")
    if config_get(hf_config, "attention_bias", False):
        raise ValueError(f"{family}: attention_bias=True is not supported (megatron's MLA projections have no "
                         "biases)")
    if not config_get(hf_config, "rope_interleave", True):
        raise ValueError(f"{family}: rope_interleave=False is not supported (megatron-core 0.16.1's MLA always rotates "
                         "interleaved pairs of the rope channels)")
    size = model_size_kwargs(hf_config)  # position_embedding_type "rope": GPTModel builds no RoPE for MLA
    rope = rope_settings(hf_config, yarn=True)
    dtype = dtype_kwargs(hf_config)
    if rope.get("rope_scaling", False) or rope.get("seq_len_interpolation_factor") is not None:
        raise ValueError(f"{family}: llama3 / linear rope scaling is not supported with multi-latent attention "
                         f"(rope parameters {config_get(hf_config, 'rope_parameters')})")
    # the attention's own RoPE: the base and partial rotation here, YaRN as MLA's fields below
    rotary = {k: v for k, v in rope.items() if k in ("rotary_base", "rotary_percent")}
    yarn = {k: v for k, v in rope.items() if k.startswith("yarn_")}
    kw = {**size, **rotary, **dtype}
    v_head_dim = int(config_get(hf_config, "v_head_dim"))
    q_lora = config_get(hf_config, "q_lora_rank")
    kw.update(
        multi_latent_attention=True,
        q_lora_rank=int(q_lora) if q_lora is not None else None,
        kv_lora_rank=int(config_get(hf_config, "kv_lora_rank")),
        qk_head_dim=int(config_get(hf_config, "qk_nope_head_dim")),
        qk_pos_emb_head_dim=int(config_get(hf_config, "qk_rope_head_dim")),
        v_head_dim=v_head_dim,
        kv_channels=v_head_dim,
        num_query_groups=heads,
        qk_layernorm=True,  # the q / kv latent norms
        latent_layernorm_epsilon=HF_LATENT_NORM_EPS,
    )
    if yarn:
        if not yarn["yarn_correction_range_round_to_int"]:
            raise ValueError(f"{family}: yarn truncate=False is not supported with multi-latent attention (megatron's "
                             "MLA YaRN rounds the correction range)")
        kw.update(rope_type="yarn", rotary_scaling_factor=yarn["yarn_rotary_scaling_factor"],
                  original_max_position_embeddings=yarn["yarn_original_max_position_embeddings"],
                  beta_fast=yarn["yarn_beta_fast"], beta_slow=yarn["yarn_beta_slow"],
                  mscale=yarn["yarn_mscale"] if yarn["yarn_mscale"] is not None else 1.0,
                  mscale_all_dim=yarn["yarn_mscale_all_dim"] if yarn["yarn_mscale_all_dim"] is not None else 0.0)
    else:  # plain RoPE: no mscale (megatron derives the softmax mscale from rotary_scaling_factor / mscale_all_dim)
        kw.update(rope_type="rope", rotary_scaling_factor=1.0, mscale=1.0, mscale_all_dim=0.0)
    return kw


def mla_hf_fields(config: Any, family: str, *, rope_interleave_field: bool = True) -> Dict[str, Any]:
    """HF MLA fields (ranks, head dims, ``rope_parameters``) of an ``MLAGPTConfig`` (the reverse);
    ``rope_interleave=True`` among them unless ``rope_interleave_field`` is False (configs without the field, whose
    MLA rope always rotates interleaved pairs: DeepSeek-V3.2).

    Raises:
        ValueError: a Megatron setting HF cannot express (named).
    """
    if not getattr(config, "multi_latent_attention", False):
        raise ValueError(f"{family}: the Megatron config has no multi-latent attention")
    latent_eps = config.latent_layernorm_epsilon
    if (latent_eps if latent_eps is not None else config.layernorm_epsilon) != HF_LATENT_NORM_EPS:
        raise ValueError(f"{family}: latent_layernorm_epsilon={latent_eps} (layernorm_epsilon="
                         f"{config.layernorm_epsilon}); HF fixes the q / kv latent norms' epsilon at "
                         f"{HF_LATENT_NORM_EPS}")
    params: Dict[str, Any] = {"rope_type": "default", "rope_theta": float(config.rotary_base)}
    if config.rope_type == "yarn":
        mscale, mscale_all_dim = config.mscale, config.mscale_all_dim
        both = bool(mscale) and bool(mscale_all_dim)
        if not both and mscale != 1.0:
            raise ValueError(f"{family}: mscale={mscale} with mscale_all_dim={mscale_all_dim} has no HF equivalent "
                             "(HF applies mscale only together with mscale_all_dim)")
        params.update(yarn_hf_fields(dict(
            yarn_rotary_scaling_factor=config.rotary_scaling_factor,
            yarn_original_max_position_embeddings=config.original_max_position_embeddings,
            yarn_beta_fast=config.beta_fast, yarn_beta_slow=config.beta_slow, yarn_mscale=mscale if both else None,
            yarn_mscale_all_dim=mscale_all_dim if both else None, yarn_correction_range_round_to_int=True)))
    elif config.rope_type != "rope":
        raise ValueError(f"{family}: MLA rope_type={config.rope_type!r} has no HF equivalent")
    if config.rotary_percent != 1.0:
        params["partial_rotary_factor"] = float(config.rotary_percent)
    return dict(q_lora_rank=config.q_lora_rank, kv_lora_rank=config.kv_lora_rank,
                qk_nope_head_dim=config.qk_head_dim, qk_rope_head_dim=config.qk_pos_emb_head_dim,
                v_head_dim=config.v_head_dim, num_key_value_heads=config.num_attention_heads,
                rope_parameters=params, attention_bias=False,
                **({"rope_interleave": True} if rope_interleave_field else {}))


@MegatronModelBridge.register_bridge(source="DeepseekV3ForCausalLM", target=GPT_MODEL)
class DeepseekV3Bridge(RoutedExpertsWithMTP, MegatronModelBridge):
    """HF DeepseekV3ForCausalLM <-> Megatron-Core GPTModel with multi-latent attention and MoE layers."""

    hf_model_type = "deepseek_v3"
    default_hf_layout = PER_EXPERT

    def hf_config_to_megatron_kwargs(self, hf_config: Any) -> Dict[str, Any]:
        family = type(self).__name__
        kw = mla_megatron_kwargs(hf_config, family)
        shared = shared_expert_size(hf_config, family)
        pattern = first_k_dense_pattern(hf_config)
        kw.update(
            **rms_norm_kwargs(hf_config),
            **gated_activation_kwargs(hf_config, family),
            add_bias_linear=False,
            add_qkv_bias=False,
            **moe_runtime_kwargs(config_get(hf_config, "n_routed_experts"),
                                 config_get(hf_config, "num_experts_per_tok"),
                                 config_get(hf_config, "moe_intermediate_size"), pattern),
            **sigmoid_router_kwargs(hf_config, family),
            **mtp_kwargs(self.hf_layout.mtp, hf_config, family),
        )
        if shared:
            kw["moe_shared_expert_intermediate_size"] = shared
        return kw

    def megatron_to_hf_config(self, config: Any) -> Dict[str, Any]:
        family = type(self).__name__
        refuse_megatron_settings(config, family, "DeepSeek-V3", RMSNORM_GLU_NO_BIAS)
        n_shared = ungated_shared_experts_hf_field(config, family)
        # DeepseekV3Config sets head_dim = qk_rope_head_dim itself; MLA writes its own rope_parameters
        hf = {**super().megatron_to_hf_config(config), **model_size_hf_fields(config, head_dim=False)}
        hf.update(
            **rms_norm_hf_fields(config),
            **activation_hf_fields(config),
            n_shared_experts=n_shared,
            first_k_dense_replace=first_k_dense_hf_field(config, family),
            num_nextn_predict_layers=config.mtp_num_layers or 0,
            **mla_hf_fields(config, family),
            **moe_hf_fields(config, "n_routed_experts"),
            **sigmoid_router_hf_fields(config, family),
        )
        return hf

    def mapping_registry(self) -> MegatronMappingRegistry:
        layer = [*mla_mappings(), *gated_mlp_mappings(), *router_mappings(), *routed_expert_mappings(self.hf_layout),
                 *shared_expert_mappings(f"{H}.mlp.shared_experts")]
        return MegatronMappingRegistry(*mtp_mappings(self.hf_layout.mtp, layer), *embedding_mappings(), *layer)
