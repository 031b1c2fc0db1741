"""GLM-4.7-Flash (``Glm4MoeLiteForCausalLM``) config translation without a process group: HF config -> Megatron
``GPTConfig`` -> HF config.json gives the same transformers model (logits within ``SAME_MODEL_ATOL`` with the original
weights, the Megatron config of the regenerated HF config equal again), the released sizes (transformers' defaults for
the family) read as transformers builds them, the MTP layers read from the checkpoint's keys, and the named errors
for what megatron-core cannot express, both ways."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("megatron.core")
transformers = pytest.importorskip("transformers")

import megatron_bridge_ext.models  # noqa: E402,F401  (registers the bridges)
from megatron_bridge_ext.dispatch import get_model_bridge  # noqa: E402
from megatron_bridge_ext.models.moe import PER_EXPERT, ExpertLayout  # noqa: E402
from megatron_bridge_ext.models.mtp import MTPLayers  # noqa: E402
from megatron_bridge_ext.testing.parity import config_round_trip  # noqa: E402
from megatron_bridge_ext.testing.tolerances import SAME_MODEL_ATOL  # noqa: E402

ARCH = "Glm4MoeLiteForCausalLM"
TINY = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=4, max_position_embeddings=128, initializer_range=0.03, n_routed_experts=6,
            num_experts_per_tok=2, moe_intermediate_size=32, q_lora_rank=24, kv_lora_rank=16, qk_rope_head_dim=8,
            qk_nope_head_dim=16, v_head_dim=12)
YARN = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 16,
        "beta_fast": 32.0, "beta_slow": 1.0}
FIELDS = ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups", "kv_channels",
          "layernorm_epsilon", "latent_layernorm_epsilon", "rotary_base", "rotary_percent",
          "share_embeddings_and_output_weights", "vocab_size", "q_lora_rank", "kv_lora_rank", "qk_head_dim",
          "qk_pos_emb_head_dim", "v_head_dim", "rope_type", "rotary_scaling_factor", "mscale", "mscale_all_dim",
          "beta_fast", "beta_slow", "original_max_position_embeddings", "num_moe_experts", "moe_router_topk",
          "moe_ffn_hidden_size", "moe_layer_freq", "moe_router_score_function", "moe_router_enable_expert_bias",
          "moe_router_topk_scaling_factor", "moe_router_num_groups", "moe_router_group_topk",
          "moe_shared_expert_intermediate_size", "params_dtype")
CASES = {
    # transformers' defaults: first layer dense, rms_norm_eps 1e-5 (latent norms 1e-6), one shared expert
    "defaults": dict(rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}),
    "no_q_lora_tied": dict(q_lora_rank=None, tie_word_embeddings=True, rms_norm_eps=1e-6),
    "dense_in_the_middle": dict(mlp_layer_types=["sparse", "dense", "sparse"], n_shared_experts=2,
                                routed_scaling_factor=2.5),
    "all_sparse_grouped": dict(mlp_layer_types=["sparse"] * 3, n_group=2, topk_group=1),
    "yarn_mscale": dict(rope_parameters={**YARN, "mscale": 1.0, "mscale_all_dim": 1.0}, rms_norm_eps=3e-6),
    "yarn_plain": dict(rope_parameters=dict(YARN)),
}


def _config(**overrides):
    return transformers.Glm4MoeLiteConfig(**{**TINY, **overrides})


def _model(overrides):
    torch.manual_seed(0)
    model = transformers.Glm4MoeLiteForCausalLM(_config(**overrides)).float().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(1.0 if "norm" in name else 0.0, 0.1 if "norm" in name else 0.2)
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.normal_(0.0, 0.1)
    return model


@pytest.mark.parametrize("case", sorted(CASES))
def test_hf_megatron_hf_config_gives_the_same_model(case):
    model = _model(CASES[case])
    rt = config_round_trip(model, get_model_bridge(ARCH))
    assert rt.regenerated["architectures"] == [ARCH]
    assert type(rt.config) is transformers.Glm4MoeLiteConfig
    assert rt.config.mlp_layer_types == model.config.mlp_layer_types
    assert rt.logit_diff <= SAME_MODEL_ATOL, f"max |logit diff| {rt.logit_diff:.3e}"  # same class and weights
    assert rt.changed(FIELDS) == []


def test_the_released_sizes_read_as_transformers_builds_them():
    """transformers' defaults for the family are GLM-4.7-Flash's sizes; the released config.json also carries fields
    the class does not declare (DeepSeek-V3's first_k_dense_replace, partial_rotary_factor 1.0,
    num_nextn_predict_layers, topk_method), which agree. Every Megatron field is read off the HF config (and the
    module transformers builds from it)."""
    hf = transformers.Glm4MoeLiteConfig(first_k_dense_replace=1, partial_rotary_factor=1.0, num_nextn_predict_layers=1,
                                        topk_method="noaux_tc", rope_theta=1000000)
    got = get_model_bridge(ARCH).transformer_config(hf)
    assert got.multi_latent_attention and got.num_layers == hf.num_hidden_layers
    assert (got.q_lora_rank, got.kv_lora_rank, got.qk_head_dim, got.qk_pos_emb_head_dim, got.v_head_dim) == (
        hf.q_lora_rank, hf.kv_lora_rank, hf.qk_nope_head_dim, hf.qk_rope_head_dim, hf.v_head_dim)
    assert got.num_query_groups == got.num_attention_heads == hf.num_attention_heads
    assert got.layernorm_epsilon == hf.rms_norm_eps
    with torch.device("meta"):
        attn = transformers.models.glm4_moe_lite.modeling_glm4_moe_lite.Glm4MoeLiteAttention(hf, 0)
    assert got.latent_layernorm_epsilon == attn.q_a_layernorm.variance_epsilon == attn.kv_a_layernorm.variance_epsilon
    assert got.moe_layer_freq == [0 if t == "dense" else 1 for t in hf.mlp_layer_types]
    assert got.moe_layer_freq[:2] == [0, 1] and sum(got.moe_layer_freq) == hf.num_hidden_layers - 1
    assert (got.num_moe_experts, got.moe_router_topk, got.moe_ffn_hidden_size) == (
        hf.n_routed_experts, hf.num_experts_per_tok, hf.moe_intermediate_size)
    assert got.moe_shared_expert_intermediate_size == hf.n_shared_experts * hf.moe_intermediate_size
    assert got.moe_router_topk_scaling_factor == hf.routed_scaling_factor
    assert got.moe_router_score_function == "sigmoid" and got.moe_router_enable_expert_bias
    assert got.rope_type == "rope" and got.rotary_base == hf.rope_parameters["rope_theta"]


def _mtp_keys(layers=3, mtp=3, moe=True):
    """Meta tensors of a checkpoint's names: layers 0 .. layers-1 and an MTP layer at ``mtp`` (with a router when
    ``moe``, else a dense MLP)."""
    keys = {"model.embed_tokens.weight": (97, 64)}
    for layer in (*range(layers), mtp):
        keys[f"model.layers.{layer}.input_layernorm.weight"] = (64,)
    for name in ("eh_proj.weight", "enorm.weight", "hnorm.weight", "shared_head.norm.weight"):
        keys[f"model.layers.{mtp}.{name}"] = (64,)
    keys[f"model.layers.{mtp}.mlp.{'gate.weight' if moe else 'gate_proj.weight'}"] = (64,)
    return {k: torch.empty(v, device="meta") for k, v in keys.items()}


def test_mtp_layers_come_from_the_checkpoint_keys():
    """The family's config has no num_nextn_predict_layers field (transformers keeps one config.json carries): the
    keys decide, the declared count must agree, and the export writes the model's count."""
    bridge = get_model_bridge(ARCH)
    cfg = _config(num_nextn_predict_layers=1)
    assert bridge.detect_hf_layout({}, cfg) == PER_EXPERT
    assert bridge.use_hf_layout_of(_mtp_keys(), cfg) is True
    assert bridge.hf_layout == ExpertLayout(mtp=MTPLayers(first=3, count=1))
    got = bridge.transformer_config(cfg)
    assert got.mtp_num_layers == 1 and got.num_layers == 3
    assert bridge.megatron_to_hf_config(got)["num_nextn_predict_layers"] == 1
    with pytest.raises(ValueError, match=r"HF layers \[3\] beyond num_hidden_layers=3 .* config\.json says "
                                         r"num_nextn_predict_layers=0 \(no multi-token-prediction layers\)"):
        bridge.detect_hf_layout(_mtp_keys(), _config())
    bridge.use_hf_layout_of({}, cfg)
    assert bridge.transformer_config(cfg).mtp_num_layers is None


@pytest.mark.parametrize("types,moe", [(["dense", "sparse", "dense"], True), (["dense", "sparse", "sparse"], False)])
def test_an_mtp_layer_of_another_kind_than_the_last_layer_is_refused_by_name(types, moe):
    """megatron-core builds MTP layers like the last decoder layer; transformers' config does not say what HF's MTP
    layer is, its keys do."""
    bridge = get_model_bridge(ARCH)
    cfg = _config(mlp_layer_types=types, num_nextn_predict_layers=1)
    kind, last = ("sparse", "dense") if moe else ("dense", "sparse")
    with pytest.raises(ValueError, match=rf"Glm4MoeLiteBridge: the checkpoint's multi-token-prediction layer "
                                         rf"model\.layers\.3 is {kind} \(mlp\.gate\.weight "
                                         rf"{'present' if moe else 'absent'}\) but the last decoder layer is {last}"):
        bridge.detect_hf_layout(_mtp_keys(moe=moe), cfg)
    assert bridge.detect_hf_layout(_mtp_keys(moe=not moe), cfg).mtp == MTPLayers(first=3, count=1)


@pytest.mark.parametrize("overrides,match", [
    (dict(attention_bias=True), r"Glm4MoeLiteBridge: attention_bias=True is not supported"),
    (dict(rope_interleave=False), r"Glm4MoeLiteBridge: rope_interleave=False is not supported"),
    (dict(num_key_value_heads=2), r"Glm4MoeLiteBridge: num_key_value_heads=2 != num_attention_heads=4"),
    (dict(partial_rotary_factor=0.5), r"Glm4MoeLiteBridge: partial_rotary_factor=0\.5 is not supported"),
    (dict(rope_parameters={"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.25}),
     r"partial_rotary_factor=0\.25 is not supported"),
    (dict(norm_topk_prob=False), r"Glm4MoeLiteBridge: norm_topk_prob=False with sigmoid routing and "
                                 r"num_experts_per_tok=2"),
    (dict(n_group=2, topk_group=2), r"Glm4MoeLiteBridge: n_group=2 with num_experts_per_tok=2, topk_group=2"),
    (dict(rope_parameters={**YARN, "truncate": False}), r"Glm4MoeLiteBridge: yarn truncate=False is not supported"),
    (dict(rope_parameters={"rope_type": "linear", "rope_theta": 1e4, "factor": 2.0}),
     r"llama3 / linear rope scaling is not supported with multi-latent attention"),
    (dict(hidden_act="gelu"), r"hidden_act='gelu'"),
    (dict(mlp_layer_types=["dense", "sparse"]), r"Glm4MoeLiteBridge: mlp_layer_types has 2 entries for "
                                                r"num_hidden_layers=3"),
    (dict(mlp_layer_types=["dense", "moe", "sparse"]), r"Glm4MoeLiteBridge: mlp_layer_types entries \['moe'\] are "
                                                       r"neither 'dense' nor 'sparse'"),
    (dict(first_k_dense_replace=2), r"Glm4MoeLiteBridge: first_k_dense_replace=2 contradicts mlp_layer_types="
                                    r"\['dense', 'sparse', 'sparse'\]"),
])
def test_unsupported_hf_settings_are_refused_by_name(overrides, match):
    with pytest.raises(ValueError, match=match):
        get_model_bridge(ARCH).transformer_config(_config(**overrides))


def test_a_first_k_dense_replace_that_agrees_converts():
    """config.json may carry DeepSeek-V3's first_k_dense_replace next to mlp_layer_types; transformers reads only the
    latter; one that says the same is accepted."""
    got = get_model_bridge(ARCH).transformer_config(_config(first_k_dense_replace=1))
    assert got.moe_layer_freq == [0, 1, 1]


@pytest.mark.parametrize("change,match", [
    (dict(rotary_percent=0.5), r"no GLM-4\.7-Flash equivalent: \{'rotary_percent': 0\.5\}"),
    (dict(add_qkv_bias=True), r"no GLM-4\.7-Flash equivalent: \{'add_qkv_bias': True\}"),
    (dict(moe_shared_expert_gate=True), r"shared experts of 32 \(gate True\) are not a whole number of ungated "
                                        r"experts of 32"),
    (dict(moe_shared_expert_intermediate_size=48), r"shared experts of 48 \(gate False\)"),
    (dict(moe_router_score_function="softmax"), r"moe_router_score_function='softmax'"),
    (dict(latent_layernorm_epsilon=1e-5), r"latent_layernorm_epsilon=1e-05 .* HF fixes the q / kv latent norms' "
                                          r"epsilon at 1e-06"),
])
def test_megatron_settings_without_hf_equivalent_are_refused_by_name(change, match):
    bridge = get_model_bridge(ARCH)
    config = bridge.transformer_config(_config())
    for field, value in change.items():
        setattr(config, field, value)
    with pytest.raises(ValueError, match=r"Glm4MoeLiteBridge: .*" + match):
        bridge.megatron_to_hf_config(config)
