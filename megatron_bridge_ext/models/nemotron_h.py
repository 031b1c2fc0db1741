"""NemotronH (``NemotronHForCausalLM``): a hybrid of Mamba-2 layers ('M', HF ``linear_attention``), attention layers
('*', ``full_attention``, no positional embedding), squared-ReLU MLP layers ('-', ``mlp``: ``up_proj`` /
``down_proj``, not gated) and mixture-of-experts layers ('E', ``moe``: Nemotron 3), each a pre-norm block (HF
``backbone.layers.{i}.norm`` + ``mixer``) -> megatron-core's ``HybridModel`` (megatron-core >= 0.19;
``mcore.hybrid_builder``). The layer pattern is HF ``layers_block_type`` (transformers' saved form) or
``hybrid_override_pattern`` (the released configs'), megatron's ``hybrid_layer_pattern`` with the same letters;
export writes ``hybrid_override_pattern`` and ``num_hidden_layers``.

Per layer kind (Megatron ``decoder.layers.{i}.`` <- HF ``backbone.layers.{i}.``):

- Mamba: ``norm.weight`` <- ``norm.weight``; ``mixer.in_proj.weight`` <- ``mixer.in_proj.weight`` (``[z; x; B; C;
  dt]``, split per component over TP, ``mappings.mamba``); ``mixer.conv1d_weight`` / ``conv1d_bias`` <-
  ``mixer.conv1d.weight`` / ``.bias`` (``[x; B; C]`` channels, split per component); ``mixer.A_log`` / ``D`` /
  ``dt_bias`` (per head) and ``mixer.norm.weight`` (the gated group norm, whole groups per rank) column-split;
  ``mixer.out_proj.weight`` row-split.
- attention: ``input_layernorm.weight`` <- ``norm.weight``; ``self_attention.linear_qkv.weight`` <-
  ``mixer.q_proj`` / ``k_proj`` / ``v_proj``; ``self_attention.linear_proj.weight`` <- ``mixer.o_proj``.
- MLP: ``pre_mlp_layernorm.weight`` <- ``norm.weight``; ``mlp.linear_fc1`` / ``linear_fc2`` <- ``mixer.up_proj`` /
  ``down_proj``.
- MoE (megatron's ``MoETransformerLayer``): ``pre_mlp_layernorm.weight`` <- ``norm.weight``; ``mlp.router.weight``
  (fp32, as HF keeps ``gate.weight``) / ``mlp.router.expert_bias`` <- ``mixer.gate.weight`` /
  ``mixer.gate.e_score_correction_bias``; routed experts (local spec: ``mlp.experts.local_experts.{e}.linear_fc1`` /
  ``linear_fc2``; grouped ``linear_fc1.weight{e}`` alike) <- ``mixer.experts.{e}.up_proj`` / ``down_proj`` (one tensor
  per expert, what ``save_pretrained`` writes; non-gated: ``linear_fc1`` is ``up_proj``, rows over expert-TP,
  ``mappings.experts.ExpertUpMapping``); ``mlp.shared_experts.linear_fc1`` / ``linear_fc2`` <-
  ``mixer.shared_experts.up_proj`` / ``down_proj``. Routing is DeepSeek-V3's (``moe.sigmoid_router_kwargs``): sigmoid
  scores, top-k on scores + correction bias within the ``topk_group`` best of ``n_group`` groups (a group scored by
  its top-2), the plain scores of the chosen experts renormalised (``norm_topk_prob``) and multiplied by
  ``routed_scaling_factor``; the shared expert's output is added unscaled. Experts use the model's activation
  (``mlp_hidden_act="relu2"``) and megatron's ``gated_linear_unit=False``.

plus ``embedding.word_embeddings`` <- ``backbone.embeddings``, ``decoder.final_norm`` <- ``backbone.norm_f``,
``output_layer`` <- ``lm_head``.

These are the local spec's keys (``import --spec local``). The default ``--spec te`` writes (and export reads)
megatron-core's Transformer Engine hybrid spec's, where each layer's norm is fused into its first linear
(``mixer.in_proj.layer_norm_weight``, ``self_attention.linear_qkv.layer_norm_weight``,
``mlp.linear_fc1.layer_norm_weight``) and TE modules save ``_extra_state`` (``mcore.te_keys``); the stored
Megatron-LM ``args`` carry ``hybrid_layer_pattern``, the ``mamba_*`` sizes and (with 'E' layers) ``num_experts`` and the
``moe_*`` settings. An 'E' layer's TE keys are the local spec's (a standalone ``pre_mlp_layernorm``, ``TENorm``).

Refused with named errors: megatron-core < 0.19 (no hybrid model), latent MoE (``moe_latent_size``, Nemotron 3
Super: megatron-core 0.19's latent projections need Transformer Engine), MoE layers without a shared expert,
``norm_topk_prob=False`` with top-k > 1 and top-1 with ``norm_topk_prob=True`` (megatron renormalises sigmoid weights
exactly when top-k > 1), groups not scored by their top-2 (megatron scores by ``topk // topk_group``),
multi-token-prediction layers (``num_nextn_predict_layers``), biases (``use_bias``, ``mlp_bias``,
``attention_bias``), no convolution bias (``use_conv_bias=False``: megatron's mixer always has one), activations
other than ``mamba_hidden_act="silu"`` / ``mlp_hidden_act="relu2"``, ``layer_norm_epsilon`` other than 1e-5 with
Mamba layers (megatron's mixer fixes its gated norm's epsilon at 1e-5), a ``num_hidden_layers`` that contradicts the
pattern, head / group counts the mixer or TP cannot split. HF NemotronH never ties ``lm_head`` to the embedding
(``_tied_weights_keys`` is empty, whatever ``tie_word_embeddings`` says): the Megatron model is always untied and
export writes ``tie_word_embeddings=False``. Not carried: HF clamps the Mamba time step from below at
``time_step_min`` in its forward (``dt_limit``); megatron's kernels use no lower limit; the fields HF's model does not
read (``residual_in_fp32``, ``mamba_proj_bias``, ``sliding_window``, ``expand``, ``time_step_*``, ``n_shared_experts``:
HF builds one shared expert whatever it says, ``moe_shared_expert_overlap``) are not converted.
"""

from __future__ import annotations

from typing import Any, Dict, List

from megatron_bridge_ext.engine import MegatronModelBridge
from megatron_bridge_ext.mappings import AutoMapping, ColumnParallelMapping, QKVMapping, RowParallelMapping
from megatron_bridge_ext.mappings.mamba import CONV_PARTS, IN_PROJ_PARTS, MambaSplitMapping
from megatron_bridge_ext.mcore.versions import MEGATRON_CORE_0_19
from megatron_bridge_ext.models.hf_config import config_get, dtype_kwargs, dtype_name
from megatron_bridge_ext.models.moe import (
    PER_EXPERT, moe_hf_fields, moe_runtime_kwargs, routed_expert_mappings, router_mappings, sigmoid_router_hf_fields,
    sigmoid_router_kwargs,
)
from megatron_bridge_ext.registry import MegatronMappingRegistry

__all__ = ["NemotronHBridge", "HYBRID_MODEL", "LAYER_SYMBOLS", "hf_layer_pattern", "moe_megatron_kwargs",
           "moe_hf_config"]

#: the Megatron model class hybrid families build (megatron-core >= 0.19)
HYBRID_MODEL = "megatron.core.models.hybrid.hybrid_model.HybridModel"
#: HF ``layers_block_type`` entries (and their legacy names) -> megatron's hybrid layer symbols
LAYER_SYMBOLS = {"linear_attention": "M", "mamba": "M", "full_attention": "*", "attention": "*", "mlp": "-",
                 "moe": "E"}
#: the symbols this family converts
CONVERTED = {"M": "Mamba", "*": "attention", "-": "MLP", "E": "mixture of experts"}
#: megatron's MambaMixer builds its gated norm with this epsilon whatever the config says
MIXER_NORM_EPS = 1e-5

L = "decoder.layers.*"
B = "backbone.layers.*"


def hf_layer_pattern(hf_config: Any, family: str) -> str:
    """The layer pattern of an HF NemotronH config: ``layers_block_type`` (or ``layer_types``) mapped to symbols,
    else ``hybrid_override_pattern``.

    Raises:
        ValueError: no pattern, an unknown layer type, or a ``num_hidden_layers`` that contradicts it (named).
    """
    types = config_get(hf_config, "layers_block_type") or config_get(hf_config, "layer_types")
    if types is not None:
        unknown = sorted({t for t in types if t not in LAYER_SYMBOLS})
        if unknown:
            raise ValueError(f"{family}: layers_block_type has unknown layer types {unknown} (known: "
                             f"{sorted(LAYER_SYMBOLS)})")
        pattern = "".join(LAYER_SYMBOLS[t] for t in types)
    else:
        pattern = config_get(hf_config, "hybrid_override_pattern")
        if not pattern:
            raise ValueError(f"{family}: the HF config has neither layers_block_type nor hybrid_override_pattern")
        unknown = sorted(set(pattern) - set(LAYER_SYMBOLS.values()))
        if unknown:
            raise ValueError(f"{family}: hybrid_override_pattern={pattern!r} has unknown symbols {unknown}")
    n = config_get(hf_config, "num_hidden_layers")
    if types is None and n is not None and int(n) != len(pattern):
        raise ValueError(f"{family}: num_hidden_layers={n} but hybrid_override_pattern={pattern!r} has "
                         f"{len(pattern)} layers")
    return pattern


#: the older config.json names of NemotronH fields (transformers' NemotronHConfig reads them too)
LEGACY_NAMES = {"n_groups": "mamba_n_groups", "conv_kernel": "mamba_d_conv", "chunk_size": "mamba_chunk_size",
                "use_conv_bias": "mamba_conv_bias"}


def _hf_field(hf_config: Any, field: str, default: Any) -> Any:
    """A field of an HF config object or config.json dict, read under its older name where only that is set."""
    value = config_get(hf_config, field)
    if value is None and field in LEGACY_NAMES:
        value = config_get(hf_config, LEGACY_NAMES[field])
    return default if value is None else value


def _refuse_unconverted(pattern: str, family: str, field: str) -> None:
    for i, s in enumerate(pattern):
        if s not in CONVERTED:
            what = f"a {s!r} layer"
            raise ValueError(f"{family}: {field}={pattern!r}: layer {i} is {what}, which is not converted "
                             f"(converted: {', '.join(f'{k!r} {v}' for k, v in CONVERTED.items())})")


@MegatronModelBridge.register_bridge(source="NemotronHForCausalLM", target=HYBRID_MODEL)
class NemotronHBridge(MegatronModelBridge):
    """HF NemotronHForCausalLM <-> Megatron-Core HybridModel (Mamba-2 / attention / squared-ReLU MLP / MoE layers)."""

    min_megatron_core = MEGATRON_CORE_0_19
    min_megatron_core_feature = "the hybrid Mamba / attention model (megatron.core.models.hybrid.HybridModel)"

    hf_model_type = "nemotron_h"
    required_hf_fields = ("hidden_size", "num_attention_heads", "vocab_size")

    def hf_config_to_megatron_kwargs(self, hf_config: Any) -> Dict[str, Any]:
        family = type(self).__name__
        self.require_megatron_core()
        pattern = hf_layer_pattern(hf_config, family)
        _refuse_unconverted(pattern, family, "layer pattern")
        refused = {
            "num_nextn_predict_layers": (0, "multi-token-prediction layers are not converted"),
            "use_bias": (False, "megatron's MambaMixer has no in_proj / out_proj biases"),
            "mlp_bias": (False, "megatron's MLP layers here have no biases"),
            "attention_bias": (False, "megatron's attention layers here have no biases"),
            "use_conv_bias": (True, "megatron's MambaMixer always has a convolution bias"),
            "mamba_hidden_act": ("silu", "megatron's MambaMixer applies SiLU"),
            "mlp_hidden_act": ("relu2", "the MLP layers are converted with squared ReLU"),
        }
        defaults = {"num_nextn_predict_layers": 0, "use_bias": False, "mlp_bias": False, "attention_bias": False,
                    "use_conv_bias": True, "mamba_hidden_act": "silu", "mlp_hidden_act": "relu2"}
        for field, (want, why) in refused.items():
            value = _hf_field(hf_config, field, defaults[field])
            if field == "num_nextn_predict_layers":
                value = int(value or 0)
            if value != want:
                raise ValueError(f"{family}: {field}={value!r} is not supported ({want!r} only: {why})")
        eps = float(config_get(hf_config, "layer_norm_epsilon", 1e-5))
        if "M" in pattern and eps != MIXER_NORM_EPS:
            raise ValueError(f"{family}: layer_norm_epsilon={eps} is not supported with Mamba layers: megatron's "
                             f"MambaMixer fixes its gated norm's epsilon at {MIXER_NORM_EPS}")
        heads, groups = int(config_get(hf_config, "mamba_num_heads", 128)), int(_hf_field(hf_config, "n_groups", 8))
        if heads % groups:
            raise ValueError(f"{family}: mamba_num_heads={heads} is not a multiple of n_groups={groups}")
        from megatron.core.activations import squared_relu

        hidden = int(config_get(hf_config, "hidden_size"))
        attn_heads = int(config_get(hf_config, "num_attention_heads"))
        # a config.json without these fields gets transformers' NemotronHConfig defaults (5.24)
        kv_heads, head_dim = config_get(hf_config, "num_key_value_heads", 8), config_get(hf_config, "head_dim", 128)
        kw: Dict[str, Any] = dict(
            num_layers=len(pattern),
            hybrid_layer_pattern=pattern,
            is_hybrid_model=True,
            hidden_size=hidden,
            ffn_hidden_size=int(config_get(hf_config, "intermediate_size", 21504)),
            num_attention_heads=attn_heads,
            num_query_groups=int(kv_heads) if kv_heads is not None else attn_heads,
            kv_channels=int(head_dim),
            init_method_std=float(config_get(hf_config, "initializer_range", 0.02)),
            hidden_dropout=0.0,
            attention_dropout=float(config_get(hf_config, "attention_dropout", 0.0) or 0.0),
            vocab_size=int(config_get(hf_config, "vocab_size")),
            seq_length=int(config_get(hf_config, "max_position_embeddings", 4096)),
            position_embedding_type="none",
            # HF NemotronH never ties lm_head to the embedding (its _tied_weights_keys is empty), whatever
            # tie_word_embeddings says: lm_head.weight is always a tensor of its own
            share_embeddings_and_output_weights=False,
            normalization="RMSNorm",
            layernorm_epsilon=eps,
            activation_func=squared_relu,
            gated_linear_unit=False,
            add_bias_linear=False,
            add_qkv_bias=False,
            mamba_state_dim=int(config_get(hf_config, "ssm_state_size", 128)),
            mamba_head_dim=int(config_get(hf_config, "mamba_head_dim", 64)),
            mamba_num_groups=groups,
            mamba_num_heads=heads,
            mamba_conv_kernel=int(_hf_field(hf_config, "conv_kernel", 4)),
            mamba_chunk_size=int(_hf_field(hf_config, "chunk_size", 128)),
        )
        if "E" in pattern:
            kw.update(moe_megatron_kwargs(hf_config, family))
        return {**kw, **dtype_kwargs(hf_config)}

    def transformer_config(self, hf_config: Any, **overrides: Any):
        """The ``HybridGPTConfig``, after checking that TP splits the Mamba heads and groups (megatron asserts it).

        Raises:
            ValueError: naming ``mamba_num_heads`` / ``n_groups`` and ``tensor_model_parallel_size``.
        """
        config = super().transformer_config(hf_config, **overrides)
        tp = config.tensor_model_parallel_size
        if "M" in config.hybrid_layer_pattern:
            for field, hf_field in (("mamba_num_heads", "mamba_num_heads"), ("mamba_num_groups", "n_groups")):
                if getattr(config, field) % tp:
                    raise ValueError(f"{type(self).__name__}: {hf_field}={getattr(config, field)} is not divisible "
                                     f"by tensor_model_parallel_size={tp} (megatron's MambaMixer gives each TP rank "
                                     "whole heads and groups)")
        return config

    def megatron_to_hf_config(self, config: Any) -> Dict[str, Any]:
        from megatron.core.activations import squared_relu

        family = type(self).__name__
        pattern = getattr(config, "hybrid_layer_pattern", None)
        if not pattern:
            raise ValueError(f"{family}: the Megatron config has no hybrid_layer_pattern (not a hybrid model)")
        _refuse_unconverted(pattern, family, "hybrid_layer_pattern")
        wrong = {}
        for field, want in (("normalization", "RMSNorm"), ("gated_linear_unit", False), ("add_bias_linear", False),
                            ("add_qkv_bias", False), ("position_embedding_type", "none"),
                            ("layernorm_zero_centered_gamma", False), ("qk_layernorm", False)):
            if getattr(config, field) != want:
                wrong[field] = (getattr(config, field), want)
        if config.share_embeddings_and_output_weights:  # HF NemotronH has no tied output layer
            wrong["share_embeddings_and_output_weights"] = (True, False)
        if config.activation_func is not squared_relu:
            wrong["activation_func"] = (getattr(config.activation_func, "__name__", config.activation_func),
                                        "squared_relu")
        if "M" in pattern and config.layernorm_epsilon != MIXER_NORM_EPS:
            wrong["layernorm_epsilon"] = (config.layernorm_epsilon, MIXER_NORM_EPS)
        if not config.mamba_num_heads:
            wrong["mamba_num_heads"] = (config.mamba_num_heads, "set")
        if wrong:
            raise ValueError(f"{family}: these Megatron settings have no NemotronH equivalent "
                             f"(field: (got, expected)): {wrong}")
        if config.vocab_size is None:
            raise ValueError(f"{family}: the config carries no (unpadded) vocab_size")
        d_inner = config.mamba_num_heads * config.mamba_head_dim
        hf = {
            **super().megatron_to_hf_config(config),
            "vocab_size": config.vocab_size,
            "hidden_size": config.hidden_size,
            "hybrid_override_pattern": pattern,
            "num_hidden_layers": len(pattern),
            "num_attention_heads": config.num_attention_heads,
            "num_key_value_heads": config.num_query_groups or config.num_attention_heads,
            "head_dim": config.kv_channels,
            "intermediate_size": config.ffn_hidden_size,
            "max_position_embeddings": config.seq_length,
            "initializer_range": config.init_method_std,
            "attention_dropout": config.attention_dropout,
            "tie_word_embeddings": False,
            "layer_norm_epsilon": config.layernorm_epsilon,
            "mlp_hidden_act": "relu2",
            "mamba_hidden_act": "silu",
            "ssm_state_size": config.mamba_state_dim,
            "mamba_num_heads": config.mamba_num_heads,
            "mamba_head_dim": config.mamba_head_dim,
            "n_groups": config.mamba_num_groups,
            "conv_kernel": config.mamba_conv_kernel,
            "chunk_size": config.mamba_chunk_size,
            "use_bias": False,
            "use_conv_bias": True,
            "mlp_bias": False,
            "attention_bias": False,
            "num_nextn_predict_layers": 0,
            "dtype": dtype_name(config.params_dtype),
        }
        if d_inner % config.hidden_size == 0:
            hf["expand"] = d_inner // config.hidden_size
        if "E" in pattern:
            hf.update(moe_hf_config(config, family))
        return hf

    def mapping_registry(self) -> MegatronMappingRegistry:
        return MegatronMappingRegistry(*nemotron_h_mappings())


def moe_megatron_kwargs(hf_config: Any, family: str) -> Dict[str, Any]:
    """``HybridGPTConfig`` fields of the MoE layers ('E'): HF ``NemotronHMoE`` is ``n_routed_experts`` non-gated
    squared-ReLU experts of ``moe_intermediate_size`` (the model's ``gated_linear_unit=False`` and activation),
    DeepSeek-V3's sigmoid router (``moe.sigmoid_router_kwargs``: top-k on scores + ``e_score_correction_bias`` within
    the ``topk_group`` best of ``n_group`` groups, weights renormalised, times ``routed_scaling_factor``; the gate
    weight kept in fp32) and one shared expert of ``moe_shared_expert_intermediate_size`` added unscaled.

    Raises:
        ValueError: latent MoE (``moe_latent_size``), no shared expert, or a router megatron cannot express (named).
    """
    latent = config_get(hf_config, "moe_latent_size")
    if latent is not None:
        raise ValueError(f"{family}: moe_latent_size={latent} is not supported (latent MoE projections, Nemotron 3 "
                         "Super: megatron-core 0.19's fc1_latent_proj / fc2_latent_proj need Transformer Engine and "
                         "are not converted)")
    shared = config_get(hf_config, "moe_shared_expert_intermediate_size", 7688)
    if not shared:
        raise ValueError(f"{family}: moe_shared_expert_intermediate_size={shared!r}: HF NemotronHMoE always has a "
                         "shared expert of that width")
    topk = int(config_get(hf_config, "num_experts_per_tok", 2))
    experts = config_get(hf_config, "n_routed_experts", 8)
    # the router fields with transformers' NemotronHConfig defaults where config.json leaves them out
    router = {"num_experts_per_tok": topk}
    for field in ("norm_topk_prob", "n_group", "topk_group", "routed_scaling_factor"):
        if config_get(hf_config, field) is not None:
            router[field] = config_get(hf_config, field)
    return dict(
        **moe_runtime_kwargs(experts, topk, config_get(hf_config, "moe_intermediate_size", 7688), [1]),
        **sigmoid_router_kwargs(router, family),
        moe_shared_expert_intermediate_size=int(shared),
    )


def moe_hf_config(config: Any, family: str) -> Dict[str, Any]:
    """HF NemotronH MoE fields of a Megatron config with 'E' layers (the reverse of :func:`moe_megatron_kwargs`).

    Raises:
        ValueError: settings HF's ``NemotronHMoE`` cannot express (named).
    """
    wrong = {}
    # (a router weight that is not fp32, e.g. from Megatron-LM args, exports in its dtype: transformers widens it)
    for field, want in (("moe_shared_expert_gate", False), ("moe_latent_size", None)):
        if getattr(config, field, want) != want:
            wrong[field] = (getattr(config, field), want)
    if not config.moe_shared_expert_intermediate_size:
        wrong["moe_shared_expert_intermediate_size"] = (config.moe_shared_expert_intermediate_size, "set")
    if wrong:
        raise ValueError(f"{family}: these Megatron MoE settings have no NemotronH equivalent "
                         f"(field: (got, expected)): {wrong}")
    router = sigmoid_router_hf_fields(config, family)
    return {**moe_hf_fields(config, "n_routed_experts"), **router, "moe_latent_size": None,
            "moe_shared_expert_intermediate_size": config.moe_shared_expert_intermediate_size}


def nemotron_h_mappings() -> List:
    """Embedding, final norm and output layer, then the Mamba, attention, MLP and MoE layers' tensors."""
    mixer = f"{L}.mixer"
    return [
        AutoMapping("embedding.word_embeddings.weight", "backbone.embeddings.weight"),
        AutoMapping("output_layer.weight", "lm_head.weight"),
        AutoMapping("decoder.final_norm.weight", "backbone.norm_f.weight"),
        # Mamba layers
        AutoMapping(f"{L}.norm.weight", f"{B}.norm.weight"),
        MambaSplitMapping(f"{mixer}.in_proj.weight", f"{B}.mixer.in_proj.weight", IN_PROJ_PARTS),
        MambaSplitMapping(f"{mixer}.conv1d_weight", f"{B}.mixer.conv1d.weight", CONV_PARTS),
        MambaSplitMapping(f"{mixer}.conv1d_bias", f"{B}.mixer.conv1d.bias", CONV_PARTS),
        ColumnParallelMapping(f"{mixer}.A_log", f"{B}.mixer.A_log"),
        ColumnParallelMapping(f"{mixer}.D", f"{B}.mixer.D"),
        ColumnParallelMapping(f"{mixer}.dt_bias", f"{B}.mixer.dt_bias"),
        ColumnParallelMapping(f"{mixer}.norm.weight", f"{B}.mixer.norm.weight"),
        RowParallelMapping(f"{mixer}.out_proj.weight", f"{B}.mixer.out_proj.weight"),
        # attention layers
        AutoMapping(f"{L}.input_layernorm.weight", f"{B}.norm.weight"),
        QKVMapping(f"{L}.self_attention.linear_qkv.weight", q=f"{B}.mixer.q_proj.weight",
                   k=f"{B}.mixer.k_proj.weight", v=f"{B}.mixer.v_proj.weight"),
        RowParallelMapping(f"{L}.self_attention.linear_proj.weight", f"{B}.mixer.o_proj.weight"),
        # MLP layers
        AutoMapping(f"{L}.pre_mlp_layernorm.weight", f"{B}.norm.weight"),
        ColumnParallelMapping(f"{L}.mlp.linear_fc1.weight", f"{B}.mixer.up_proj.weight"),
        RowParallelMapping(f"{L}.mlp.linear_fc2.weight", f"{B}.mixer.down_proj.weight"),
        # MoE layers (their pre_mlp_layernorm above): router, non-gated routed experts, one shared expert
        *router_mappings(f"{B}.mixer.gate"),
        *routed_expert_mappings(PER_EXPERT, experts=f"{B}.mixer.experts", gated=False),
        ColumnParallelMapping(f"{L}.mlp.shared_experts.linear_fc1.weight", f"{B}.mixer.shared_experts.up_proj.weight"),
        RowParallelMapping(f"{L}.mlp.shared_experts.linear_fc2.weight",
                           f"{B}.mixer.shared_experts.down_proj.weight"),
    ]
