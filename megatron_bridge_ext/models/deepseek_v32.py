"""DeepSeek-V3.2 (``DeepseekV32ForCausalLM``): DeepSeek-V3 (MLA, sigmoid-routed MoE with shared experts, MTP) plus
DeepSeek sparse attention (DSA): a lightning indexer per layer picks the ``index_topk`` keys each query attends to.

- Megatron: megatron-core >= 0.19's ``experimental_attention_variant="dsa"`` (``AbsorbedMLASelfAttention`` around
  ``DSAttention`` and its ``DSAIndexer``, built from local modules by ``mcore.sparse_attention``); under an older
  megatron-core the family is refused by name (its ``min_megatron_core``, see
  ``MegatronModelBridge.require_megatron_core``).
- Indexer (HF ``self_attn.indexer.*``, megatron ``self_attention.core_attention.indexer.*``): ``wq_b``
  ``[index_n_heads * index_head_dim, q_lora_rank]`` (``linear_wq_b``), ``wk`` ``[index_head_dim, hidden]``
  (``linear_wk``), ``k_norm`` a LayerNorm with bias at epsilon 1e-6 (``dsa_indexer_k_norm_epsilon``),
  ``weights_proj`` ``[index_n_heads, hidden]`` (``linear_weights_proj``). megatron-core builds them
  ``parallel_mode="duplicated"``: every TP rank holds the whole tensor (replicated mappings).
- Indexer RoPE: HF rotates the first ``qk_rope_head_dim`` channels of each indexer head in halves (not interleaved,
  unlike the MLA rope): ``dsa_indexer_rope_interleaved=False``. Scores: ``relu(q.k)`` per head weighted by
  ``weights_proj`` (``dsa_indexer_scoring_relu=True``). HF skips the reference's Hadamard rotation of q / k (an
  orthogonal map: the scores do not change) and so does the converted model (``dsa_indexer_rotate_activation=False``;
  megatron's rotation needs ``fast_hadamard_transform`` and bf16 inputs).
- MLP pattern: ``mlp_layer_types`` (what transformers builds), which must agree with ``first_k_dense_replace``
  (``glm4_moe_lite.mlp_layer_types_pattern``); MTP layers read from the keys, each of the last decoder layer's kind.
- AbsorbedMLA needs sequence parallelism at TP > 1: ``mcore.config.build_gpt_config`` turns it on for DSA configs.

Not converted: megatron-core < 0.19, ``index_topk`` sharing across layers (GLM-MoE-DSA's), an indexer loss
(training only), the MLA refusals of DeepSeek-V3 (``attention_bias``, YaRN ``truncate=False``). transformers keeps
``indexer.weights_proj`` fp32 in fp16 models only (``_keep_in_fp32_modules``; bf16 models hold it bf16, as the
converted model does); an fp16 conversion gives it the model's dtype.
"""

from __future__ import annotations

from typing import Any, Dict, List

from megatron_bridge_ext.engine import MegatronModelBridge
from megatron_bridge_ext.mappings import MegatronParamMapping, ReplicatedMapping
from megatron_bridge_ext.mcore.versions import MEGATRON_CORE_0_19
from megatron_bridge_ext.models.glm4_moe_lite import Glm4MoeLiteBridge
from megatron_bridge_ext.models.hf_config import config_get
from megatron_bridge_ext.models.moe import first_k_dense_hf_field, router_mappings, routed_expert_mappings, \
    shared_expert_mappings
from megatron_bridge_ext.models.mtp import mtp_mappings
from megatron_bridge_ext.models.tables import GPT_MODEL, H, L, embedding_mappings, gated_mlp_mappings, mla_mappings
from megatron_bridge_ext.registry import MegatronMappingRegistry

__all__ = ["DeepseekV32Bridge", "HF_INDEXER_K_NORM_EPS", "dsa_hf_fields", "dsa_megatron_kwargs", "indexer_mappings"]

#: HF builds the indexer's ``k_norm`` (a LayerNorm) with this epsilon, whatever ``rms_norm_eps`` is
HF_INDEXER_K_NORM_EPS = 1e-6


def dsa_megatron_kwargs(hf_config: Any, family: str, *, rope_interleaved: bool) -> Dict[str, Any]:
    """``TransformerConfig`` DSA fields of an HF DSA config (indexer heads, head size, top-k; HF's scoring).

    Raises:
        ValueError: an indexer head smaller than the rope channels, or a missing / non-positive size (named).
    """
    kw: Dict[str, Any] = {}
    for hf, mc in (("index_n_heads", "dsa_indexer_n_heads"), ("index_head_dim", "dsa_indexer_head_dim"),
                   ("index_topk", "dsa_indexer_topk")):
        value = config_get(hf_config, hf)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{family}: {hf}={value!r} must be a positive integer")
        kw[mc] = value
    rope = int(config_get(hf_config, "qk_rope_head_dim"))
    if kw["dsa_indexer_head_dim"] < rope:
        raise ValueError(f"{family}: index_head_dim={kw['dsa_indexer_head_dim']} is smaller than "
                         f"qk_rope_head_dim={rope} (the indexer rotates its first qk_rope_head_dim channels)")
    kw.update(experimental_attention_variant="dsa", dsa_indexer_rope_interleaved=rope_interleaved,
              dsa_indexer_rotate_activation=False, dsa_indexer_scoring_relu=True,
              dsa_indexer_k_norm_epsilon=HF_INDEXER_K_NORM_EPS, dsa_indexer_k_norm_fp32=False)
    return kw


def dsa_hf_fields(config: Any, family: str, *, rope_interleaved: bool) -> Dict[str, Any]:
    """HF DSA fields of a Megatron DSA config (the reverse of :func:`dsa_megatron_kwargs`).

    Raises:
        ValueError: a Megatron DSA setting HF's indexer does not compute (named with its value).
    """
    if getattr(config, "experimental_attention_variant", None) != "dsa":
        raise ValueError(f"{family}: the Megatron config has experimental_attention_variant="
                         f"{getattr(config, 'experimental_attention_variant', None)!r}, not 'dsa'")
    eps = config.dsa_indexer_k_norm_epsilon
    eps = config.layernorm_epsilon if eps is None else eps
    wrong = {f: v for f, v, want in (
        ("dsa_indexer_rope_interleaved", config.dsa_indexer_rope_interleaved, rope_interleaved),
        ("dsa_indexer_scoring_relu", config.dsa_indexer_scoring_relu, True),
        ("dsa_indexer_k_norm_epsilon", eps, HF_INDEXER_K_NORM_EPS),
        ("dsa_indexer_k_norm_fp32", config.dsa_indexer_k_norm_fp32, False)) if v != want}
    if wrong:
        raise ValueError(f"{family}: these Megatron DSA settings have no HF equivalent: {wrong}")
    # the Hadamard rotation (dsa_indexer_rotate_activation) leaves the scores as they are: HF's indexer omits it
    return dict(index_n_heads=config.dsa_indexer_n_heads, index_head_dim=config.dsa_indexer_head_dim,
                index_topk=config.dsa_indexer_topk)


def indexer_mappings(attn: str = "self_attn") -> List[MegatronParamMapping]:
    """The lightning indexer's tensors, replicated on every TP rank (megatron builds them duplicated)."""
    m, h = f"{L}.self_attention.core_attention.indexer", f"{H}.{attn}.indexer"
    return [ReplicatedMapping(f"{m}.linear_wq_b.weight", f"{h}.wq_b.weight"),
            ReplicatedMapping(f"{m}.linear_wk.weight", f"{h}.wk.weight"),
            ReplicatedMapping(f"{m}.k_norm.weight", f"{h}.k_norm.weight"),
            ReplicatedMapping(f"{m}.k_norm.bias", f"{h}.k_norm.bias"),
            ReplicatedMapping(f"{m}.linear_weights_proj.weight", f"{h}.weights_proj.weight")]


class DSABridgeMixin:
    """Config hook of the DSA families: the megatron-core version check on export, before the MLA families' checks
    read the config (``transformer_config`` checks it on import; sequence parallelism at TP > 1, which megatron's
    ``AbsorbedMLASelfAttention`` asserts, is set by ``mcore.config.build_gpt_config`` for every DSA config, a stored
    one included). Listed before the bridge classes."""

    min_megatron_core = MEGATRON_CORE_0_19
    min_megatron_core_feature = "DeepSeek sparse attention (experimental_attention_variant='dsa')"

    def megatron_to_hf_config(self, config: Any) -> Dict[str, Any]:
        self.require_megatron_core()
        return super().megatron_to_hf_config(config)


@MegatronModelBridge.register_bridge(source="DeepseekV32ForCausalLM", target=GPT_MODEL)
class DeepseekV32Bridge(DSABridgeMixin, Glm4MoeLiteBridge):
    """HF DeepseekV32ForCausalLM <-> Megatron-Core GPTModel with DSA (MLA + indexer) and MoE layers."""

    hf_model_type = "deepseek_v32"
    hf_model_name = "DeepSeek-V3.2"
    hf_rope_interleave_field = False  # DeepseekV32Config has no such field: the MLA rope is always interleaved
    indexer_rope_interleaved = False

    def hf_config_to_megatron_kwargs(self, hf_config: Any) -> Dict[str, Any]:
        family = type(self).__name__
        self.require_megatron_core()
        kw = super().hf_config_to_megatron_kwargs(hf_config)
        kw.update(dsa_megatron_kwargs(hf_config, family, rope_interleaved=self.indexer_rope_interleaved))
        return kw

    def megatron_to_hf_config(self, config: Any) -> Dict[str, Any]:
        family = type(self).__name__
        hf = super().megatron_to_hf_config(config)
        hf.update(first_k_dense_replace=first_k_dense_hf_field(config, family),
                  **dsa_hf_fields(config, family, rope_interleaved=self.indexer_rope_interleaved))
        return hf

    def mapping_registry(self) -> MegatronMappingRegistry:
        layer = [*mla_mappings(), *indexer_mappings(), *gated_mlp_mappings(), *router_mappings(),
                 *routed_expert_mappings(self.hf_layout), *shared_expert_mappings(f"{H}.mlp.shared_experts")]
        return MegatronMappingRegistry(*mtp_mappings(self.hf_layout.mtp, layer), *embedding_mappings(), *layer)
