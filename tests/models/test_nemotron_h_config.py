"""NemotronH without a process group: the config translation both ways (transformers' own NemotronHConfig read back
from the exported fields; a Megatron config rebuilt from the export equals the first), the released config form
(``hybrid_override_pattern`` / ``num_hidden_layers``, legacy layer-type names), the settings refused by name in each
direction, and the refusal under a megatron-core without ``HybridModel`` (0.16.1: every test here asserts it)."""

from __future__ import annotations

import pytest

pytest.importorskip("megatron.core")
transformers = pytest.importorskip("transformers")

import megatron_bridge_ext.models  # noqa: E402,F401  (registers the bridges)
from megatron_bridge_ext.dispatch import get_model_bridge  # noqa: E402
from megatron_bridge_ext.mcore import versions  # noqa: E402

TINY = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2,
            head_dim=16, mamba_num_heads=8, mamba_head_dim=8, n_groups=2, ssm_state_size=8, conv_kernel=3,
            chunk_size=16, max_position_embeddings=256, initializer_range=0.03, layer_norm_epsilon=1e-5,
            layers_block_type=["linear_attention", "mlp", "full_attention", "mlp", "linear_attention", "mlp"])
PATTERN = "M-*-M-"
#: MoE layers (Nemotron 3): 8 experts in 4 groups, 4 per token from the best 2 groups, a shared expert
MOE = dict(layers_block_type=["linear_attention", "moe", "full_attention", "moe", "linear_attention", "mlp"],
           n_routed_experts=8, num_experts_per_tok=4, n_group=4, topk_group=2, moe_intermediate_size=24,
           moe_shared_expert_intermediate_size=40, routed_scaling_factor=2.5, norm_topk_prob=True)
MOE_PATTERN = "ME*EM-"
#: the MoE fields the Megatron config carries
MOE_CARRIED = ("n_routed_experts", "num_experts_per_tok", "n_group", "topk_group", "moe_intermediate_size",
               "moe_shared_expert_intermediate_size", "routed_scaling_factor", "norm_topk_prob", "moe_latent_size")
#: HF fields the Megatron config carries (the rest are HF-only: time steps, caches, MoE sizes of absent layers)
CARRIED = ("vocab_size", "hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads", "head_dim",
           "mamba_num_heads", "mamba_head_dim", "n_groups", "ssm_state_size", "conv_kernel", "chunk_size",
           "max_position_embeddings", "initializer_range", "layer_norm_epsilon", "layers_block_type", "mlp_hidden_act",
           "mamba_hidden_act", "use_bias", "use_conv_bias", "mlp_bias", "attention_bias", "num_hidden_layers")


def _bridge():
    return get_model_bridge("NemotronHForCausalLM")


def _hf(**overrides):
    return transformers.NemotronHConfig(**{**TINY, **overrides})


def _refused_here(call) -> bool:
    """Under a megatron-core without HybridModel every conversion is refused by name (True: asserted, done)."""
    if not versions.unmet_megatron_core(versions.MEGATRON_CORE_0_19):
        return False
    with pytest.raises(ValueError, match=r"NemotronHForCausalLM: the hybrid Mamba / attention model .*HybridModel\) "
                                         r"needs megatron-core >= 0\.19\.0; megatron-core 0\.16\.\d+ is installed"):
        call()
    return True


def test_refusal_names_the_architecture_and_the_installed_version(monkeypatch):
    """Whatever is installed: with megatron-core 0.16.1 reported, the family refuses, naming both versions."""
    monkeypatch.setattr(versions, "megatron_core_version", lambda: (0, 16, 1))
    monkeypatch.setattr(versions, "installed_megatron_core", lambda: "0.16.1")
    with pytest.raises(ValueError, match=r"^NemotronHForCausalLM: the hybrid Mamba / attention model "
                                         r"\(megatron\.core\.models\.hybrid\.HybridModel\) needs megatron-core >= "
                                         r"0\.19\.0; megatron-core 0\.16\.1 is installed$"):
        _bridge().hf_config_to_megatron_kwargs(_hf())


def test_hf_to_megatron_fields():
    bridge = _bridge()
    if _refused_here(lambda: bridge.transformer_config(_hf())):
        return
    from megatron.core.activations import squared_relu

    config = bridge.transformer_config(_hf())
    assert type(config).__name__ == "HybridGPTConfig"
    assert (config.hybrid_layer_pattern, config.num_layers, config.is_hybrid_model) == (PATTERN, 6, True)
    assert (config.mamba_num_heads, config.mamba_head_dim, config.mamba_num_groups, config.mamba_state_dim) == \
        (8, 8, 2, 8)
    assert (config.mamba_conv_kernel, config.mamba_chunk_size) == (3, 16)
    assert (config.num_query_groups, config.kv_channels, config.ffn_hidden_size) == (2, 16, 96)
    assert config.activation_func is squared_relu and not config.gated_linear_unit
    assert config.position_embedding_type == "none" and config.normalization == "RMSNorm"
    assert config.share_embeddings_and_output_weights is False


def test_round_trip_both_ways():
    """HF -> Megatron -> HF: transformers' NemotronHConfig built from the exported fields has the source's values;
    Megatron -> HF -> Megatron: the rebuilt config equals the first (as stored data)."""
    from megatron_bridge_ext.mcore.config import config_to_dict

    bridge = _bridge()
    source = _hf()
    if _refused_here(lambda: bridge.transformer_config(source)):
        return
    config = bridge.transformer_config(source)
    exported = bridge.megatron_to_hf_config(config)
    assert exported["architectures"] == ["NemotronHForCausalLM"] and exported["model_type"] == "nemotron_h"
    assert exported["hybrid_override_pattern"] == PATTERN and exported["num_hidden_layers"] == 6
    fields = {k: v for k, v in exported.items() if k not in ("architectures", "model_type")}
    back = transformers.NemotronHConfig(**fields)
    for field in CARRIED:
        assert getattr(back, field) == getattr(source, field), field
    assert config_to_dict(bridge.transformer_config(back)) == config_to_dict(config)
    assert config_to_dict(bridge.transformer_config(exported)) == config_to_dict(config)  # the raw dict form too


def test_moe_fields_both_ways():
    """'E' layers (HF ``moe``): the sizes, the sigmoid group-limited router with correction bias (fp32 router weight
    and logits, as HF keeps ``gate.weight``), non-gated squared-ReLU experts; exported back into transformers'
    NemotronHConfig with the source's values, and the Megatron config rebuilt from the export equals the first."""
    from megatron.core.activations import squared_relu

    from megatron_bridge_ext.mcore.config import config_to_dict

    bridge = _bridge()
    source = _hf(**MOE)
    if _refused_here(lambda: bridge.transformer_config(source)):
        return
    config = bridge.transformer_config(source)
    assert config.hybrid_layer_pattern == MOE_PATTERN
    assert (config.num_moe_experts, config.moe_router_topk, config.moe_ffn_hidden_size,
            config.moe_shared_expert_intermediate_size) == (8, 4, 24, 40)
    assert (config.moe_router_score_function, config.moe_router_enable_expert_bias, config.moe_router_num_groups,
            config.moe_router_group_topk, config.moe_router_topk_scaling_factor) == ("sigmoid", True, 4, 2, 2.5)
    assert config.moe_router_fp32_weight and config.moe_router_dtype == "fp32"
    assert config.activation_func is squared_relu and not config.gated_linear_unit
    assert config.moe_latent_size is None and not config.moe_shared_expert_gate
    exported = bridge.megatron_to_hf_config(config)
    assert exported["hybrid_override_pattern"] == MOE_PATTERN
    back = transformers.NemotronHConfig(**{k: v for k, v in exported.items() if k not in ("architectures",
                                                                                          "model_type")})
    for field in CARRIED + MOE_CARRIED:
        assert getattr(back, field) == getattr(source, field), field
    assert config_to_dict(bridge.transformer_config(back)) == config_to_dict(config)
    # without groups (the released Nano's n_group=1): no group-limited routing
    plain = bridge.transformer_config(_hf(**{**MOE, "n_group": 1, "topk_group": 1}))
    assert not plain.moe_router_num_groups and not plain.moe_router_group_topk
    assert bridge.megatron_to_hf_config(plain)["n_group"] == 1


def test_released_moe_config_form():
    """A config.json of the released Nemotron 3 Nano's form (its sizes: ``hybrid_override_pattern`` of Mamba / MoE /
    attention layers, 128 experts of 1856, top-6 without expert groups, a shared expert of 3712, scaling 2.5, the
    HF-only ``n_shared_experts`` / ``moe_shared_expert_overlap``) translates with no groups and back."""
    bridge = _bridge()
    pattern = ("ME" * 5 + "*") * 4 + "ME" * 4  # 52 layers: 24 Mamba, 24 MoE, 4 attention
    released = dict(vocab_size=131072, hidden_size=2688, num_attention_heads=32, num_key_value_heads=2, head_dim=128,
                    intermediate_size=1856, mamba_num_heads=64, mamba_head_dim=64, n_groups=8, ssm_state_size=128,
                    conv_kernel=4, chunk_size=128, layer_norm_epsilon=1e-5, hybrid_override_pattern=pattern,
                    num_hidden_layers=len(pattern), n_routed_experts=128, num_experts_per_tok=6, n_group=1,
                    topk_group=1, moe_intermediate_size=1856, moe_shared_expert_intermediate_size=3712,
                    routed_scaling_factor=2.5, norm_topk_prob=True, n_shared_experts=1, moe_shared_expert_overlap=False,
                    num_nextn_predict_layers=0, mlp_hidden_act="relu2", dtype="bfloat16")
    if _refused_here(lambda: bridge.hf_config_to_megatron_kwargs(released)):
        return
    kw = bridge.hf_config_to_megatron_kwargs(released)
    assert kw["hybrid_layer_pattern"] == pattern and kw["num_layers"] == 52
    assert (kw["num_moe_experts"], kw["moe_router_topk"], kw["moe_ffn_hidden_size"],
            kw["moe_shared_expert_intermediate_size"], kw["moe_router_topk_scaling_factor"]) == (128, 6, 1856, 3712, 2.5)
    assert "moe_router_num_groups" not in kw and kw["moe_router_score_function"] == "sigmoid"
    exported = bridge.megatron_to_hf_config(bridge.transformer_config(released))
    for field in ("n_routed_experts", "num_experts_per_tok", "n_group", "topk_group", "moe_intermediate_size",
                  "moe_shared_expert_intermediate_size", "routed_scaling_factor", "norm_topk_prob",
                  "hybrid_override_pattern"):
        assert exported[field] == released[field], field


def test_released_config_form():
    """The released config.json form: ``hybrid_override_pattern`` with ``num_hidden_layers``; legacy layer-type
    names (``mamba`` / ``attention``) and field names (``mamba_n_groups``, ``mamba_d_conv``, ...) read as
    transformers reads them."""
    bridge = _bridge()
    raw = {k: v for k, v in TINY.items() if k != "layers_block_type"}
    released = {**raw, "hybrid_override_pattern": PATTERN, "num_hidden_layers": 6}
    if _refused_here(lambda: bridge.hf_config_to_megatron_kwargs(released)):
        return
    assert bridge.hf_config_to_megatron_kwargs(released)["hybrid_layer_pattern"] == PATTERN
    legacy = {**raw, "layers_block_type": ["mamba", "mlp", "attention", "mlp", "mamba", "mlp"]}
    assert bridge.hf_config_to_megatron_kwargs(legacy)["hybrid_layer_pattern"] == PATTERN
    older = {k: v for k, v in released.items() if k not in ("n_groups", "conv_kernel", "chunk_size")}
    older.update(mamba_n_groups=2, mamba_d_conv=3, mamba_chunk_size=16)  # the older field names
    kw = bridge.hf_config_to_megatron_kwargs(older)
    assert (kw["mamba_num_groups"], kw["mamba_conv_kernel"], kw["mamba_chunk_size"]) == (2, 3, 16)
    with pytest.raises(ValueError, match=r"use_conv_bias=False is not supported"):
        bridge.hf_config_to_megatron_kwargs({**older, "mamba_conv_bias": False})
    with pytest.raises(ValueError, match=r"num_hidden_layers=5 but hybrid_override_pattern='M-\*-M-' has 6 layers"):
        bridge.hf_config_to_megatron_kwargs({**released, "num_hidden_layers": 5})
    with pytest.raises(ValueError, match=r"hybrid_override_pattern='M-X' has unknown symbols \['X'\]"):
        bridge.hf_config_to_megatron_kwargs({**raw, "hybrid_override_pattern": "M-X"})


@pytest.mark.parametrize("overrides,match", [
    (dict(layers_block_type=["linear_attention", "moe", "full_attention", "mlp"], moe_latent_size=32),
     r"moe_latent_size=32 is not supported \(latent MoE projections, Nemotron 3 Super"),
    (dict(layers_block_type=["moe", "mlp"], moe_shared_expert_intermediate_size=0),
     r"moe_shared_expert_intermediate_size=0: HF NemotronHMoE always has a shared expert"),
    (dict(layers_block_type=["moe", "mlp"], num_experts_per_tok=1),
     r"num_experts_per_tok=1 with norm_topk_prob=True is not supported"),
    (dict(layers_block_type=["moe", "mlp"], num_experts_per_tok=2, norm_topk_prob=False),
     r"norm_topk_prob=False with sigmoid routing and num_experts_per_tok=2 > 1 is not supported"),
    (dict(layers_block_type=["moe", "mlp"], n_routed_experts=8, num_experts_per_tok=6, n_group=4, topk_group=2),
     r"n_group=4 with num_experts_per_tok=6, topk_group=2: HF scores a group by its top-2 experts"),
    (dict(num_nextn_predict_layers=1), r"num_nextn_predict_layers=1 is not supported \(0 only: multi-token"),
    (dict(use_bias=True), r"use_bias=True is not supported \(False only: megatron's MambaMixer has no in_proj"),
    (dict(mlp_bias=True), r"mlp_bias=True is not supported"),
    (dict(attention_bias=True), r"attention_bias=True is not supported"),
    (dict(use_conv_bias=False), r"use_conv_bias=False is not supported \(True only"),
    (dict(mamba_hidden_act="gelu"), r"mamba_hidden_act='gelu' is not supported \('silu' only"),
    (dict(mlp_hidden_act="silu"), r"mlp_hidden_act='silu' is not supported \('relu2' only"),
    (dict(layer_norm_epsilon=1e-6), r"layer_norm_epsilon=1e-06 is not supported with Mamba layers: megatron's "
                                    r"MambaMixer fixes its gated norm's epsilon at 1e-05"),
    (dict(mamba_num_heads=6, n_groups=4), r"mamba_num_heads=6 is not a multiple of n_groups=4"),
], ids=["moe_latent", "moe_no_shared", "moe_top1_norm", "moe_no_norm", "moe_group_score", "mtp", "use_bias",
        "mlp_bias", "attention_bias", "no_conv_bias", "mamba_act", "mlp_act",
        "eps", "heads_groups"])
def test_hf_settings_refused_by_name(overrides, match):
    bridge = _bridge()
    hf = {**TINY, **overrides}  # as config.json (transformers would reject some before the bridge sees them)
    if _refused_here(lambda: bridge.hf_config_to_megatron_kwargs(hf)):
        return
    with pytest.raises(ValueError, match=r"^NemotronHBridge: .*" + match):
        bridge.hf_config_to_megatron_kwargs(hf)


def test_tp_that_cannot_split_the_mamba_heads_is_refused_by_name():
    bridge = _bridge()
    if _refused_here(lambda: bridge.transformer_config(_hf())):
        return
    with pytest.raises(ValueError, match=r"n_groups=2 is not divisible by tensor_model_parallel_size=4 \(megatron's "
                                         r"MambaMixer gives each TP rank whole heads and groups\)"):
        bridge.transformer_config(_hf(), tensor_model_parallel_size=4)


@pytest.mark.parametrize("overrides,match", [
    (dict(share_embeddings_and_output_weights=True), r"'share_embeddings_and_output_weights': \(True, False\)"),
    (dict(normalization="LayerNorm"), r"'normalization': \('LayerNorm', 'RMSNorm'\)"),
    (dict(gated_linear_unit=True), r"'gated_linear_unit': \(True, False\)"),
    (dict(add_bias_linear=True), r"'add_bias_linear': \(True, False\)"),
    (dict(position_embedding_type="rope"), r"'position_embedding_type': \('rope', 'none'\)"),
    (dict(hybrid_layer_pattern="M-*G-M"), r"hybrid_layer_pattern='M-\*G-M': layer 3 is a 'G' layer"),
    (dict(moe_shared_expert_gate=True), r"'moe_shared_expert_gate': \(True, False\)"),
    (dict(moe_shared_expert_intermediate_size=None), r"'moe_shared_expert_intermediate_size': \(None, 'set'\)"),
    (dict(moe_router_score_function="softmax", moe_router_enable_expert_bias=False),
     r"moe_router_score_function='softmax'.*HF routes with sigmoid scores"),
], ids=["tied", "layernorm", "gated", "bias", "rope", "gated_delta_net", "shared_gate", "no_shared_expert",
        "softmax_router"])
def test_megatron_settings_without_an_hf_equivalent_are_refused(overrides, match):
    bridge = _bridge()
    if _refused_here(lambda: bridge.transformer_config(_hf())):
        return
    source = _hf(**MOE) if any(k.startswith("moe_") for k in overrides) else _hf()
    config = bridge.transformer_config(source, **overrides)
    with pytest.raises(ValueError, match=match):
        bridge.megatron_to_hf_config(config)
