"""MiniMax-M2 without a process group: the config translation both ways (transformers builds the same model from the
regenerated config: with the original weights its logits equal the original's within ``SAME_MODEL_ATOL``), a raw
release-style config.json read as transformers reads it, and the settings refused by name in each direction."""

from __future__ import annotations

import re

import pytest
import torch

pytest.importorskip("megatron.core")
transformers = pytest.importorskip("transformers")

import megatron_bridge_ext.models  # noqa: E402,F401  (registers the bridges)
from megatron_bridge_ext.dispatch import get_model_bridge  # noqa: E402
from megatron_bridge_ext.testing.parity import config_round_trip  # noqa: E402
from megatron_bridge_ext.testing.tolerances import SAME_MODEL_ATOL  # noqa: E402

ARCH = "MiniMaxM2ForCausalLM"
TINY = dict(vocab_size=97, hidden_size=64, intermediate_size=32, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=2, head_dim=24, max_position_embeddings=128, rms_norm_eps=3e-6,
            initializer_range=0.03, num_local_experts=6, num_experts_per_tok=2, rotary_dim=12, pad_token_id=None,
            eos_token_id=None, bos_token_id=None)
CASES = {
    "partial_rope": {},
    "full_rope_tied": dict(rotary_dim=24, tie_word_embeddings=True, num_key_value_heads=4),
    "linear_rope_top3": dict(num_experts_per_tok=3, rope_parameters={"rope_type": "linear", "factor": 2.0,
                                                                      "rope_theta": 10000.0}),
}
FIELDS = ("num_layers", "hidden_size", "num_attention_heads", "num_query_groups", "kv_channels", "layernorm_epsilon",
          "rotary_base", "rotary_percent", "seq_len_interpolation_factor", "share_embeddings_and_output_weights",
          "vocab_size", "add_bias_linear", "add_qkv_bias", "qk_layernorm", "qk_layernorm_whole_projection",
          "window_size", "num_moe_experts", "moe_router_topk", "moe_ffn_hidden_size", "moe_layer_freq",
          "moe_router_score_function", "moe_router_enable_expert_bias", "moe_router_topk_scaling_factor",
          "moe_router_num_groups", "moe_router_dtype", "moe_router_fp32_weight", "position_embedding_type")


def _config(**overrides):
    return transformers.MiniMaxM2Config(**{**TINY, **overrides})


def _model(overrides: dict):
    torch.manual_seed(0)
    model = transformers.MiniMaxM2ForCausalLM(_config(**overrides)).float().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(1.0 if "norm" in name else 0.0, 0.2)
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.normal_(0.0, 0.5)
    return model


@pytest.mark.parametrize("case", sorted(CASES))
def test_hf_megatron_hf_config_gives_the_same_model(case):
    model = _model(CASES[case])
    rt = config_round_trip(model, get_model_bridge(ARCH))
    cfg = rt.megatron
    assert cfg.qk_layernorm and cfg.qk_layernorm_whole_projection and cfg.pre_layernorms
    assert int(cfg.kv_channels * cfg.rotary_percent) == model.config.rotary_dim
    assert (cfg.moe_router_score_function, cfg.moe_router_enable_expert_bias) == ("sigmoid", True)
    assert not cfg.moe_router_fp32_weight and not cfg.add_bias_linear
    assert rt.regenerated["architectures"] == [ARCH]
    assert rt.regenerated["rotary_dim"] == model.config.rotary_dim
    assert type(rt.config) is type(model.config)
    assert rt.logit_diff <= SAME_MODEL_ATOL, f"max |logit diff| {rt.logit_diff:.3e}"
    assert rt.changed(FIELDS) == []


def test_release_style_config_json_reads_as_transformers_does():
    """A config.json dict as MiniMax ships it (``rope_theta`` and ``rotary_dim`` at the top level, MiniMax's own
    fields at their released values, MTP fields included) gives the Megatron config of transformers' MiniMaxM2Config
    read from it."""
    raw = {**TINY, "model_type": "minimax_m2", "rope_theta": 5000000.0, "use_qk_norm": True,
           "qk_norm_type": "per_layer", "scoring_func": "sigmoid", "use_routing_bias": True, "use_grouped_topk": True,
           "num_expert_group": None, "topk_group": None, "routed_scaling_factor": 1.0, "shared_intermediate_size": 0,
           "attn_type_list": [1, 1, 1], "layernorm_full_attention_beta": 1.0, "layernorm_mlp_beta": 1.0,
           "sliding_window": None, "use_mtp": True, "num_mtp_modules": 3, "mtp_transformer_layers": 1}
    bridge = get_model_bridge(ARCH)
    from_raw = bridge.transformer_config(raw)
    from_transformers = bridge.transformer_config(transformers.AutoConfig.for_model(**raw))
    assert (from_raw.rotary_base, from_raw.rotary_percent) == (5000000.0, 0.5)
    for field in FIELDS:
        assert getattr(from_raw, field) == getattr(from_transformers, field), field
    minimal = {k: v for k, v in TINY.items() if k not in ("rms_norm_eps",)}  # no rope fields: MiniMaxM2's theta
    from_min = bridge.transformer_config({**minimal, "model_type": "minimax_m2"})
    want = bridge.transformer_config(transformers.AutoConfig.for_model(model_type="minimax_m2", **minimal))
    for field in FIELDS:
        assert getattr(from_min, field) == getattr(want, field), field


@pytest.mark.parametrize("overrides,match", [
    (dict(use_qk_norm=False), r"MiniMaxM2Bridge: use_qk_norm=False is not supported"),
    (dict(qk_norm_type="per_head"), r"MiniMaxM2Bridge: qk_norm_type='per_head' is not supported"),
    (dict(scoring_func="softmax"), r"MiniMaxM2Bridge: scoring_func='softmax' is not supported"),
    (dict(use_routing_bias=False), r"MiniMaxM2Bridge: use_routing_bias=False is not supported"),
    (dict(norm_topk_prob=False), r"MiniMaxM2Bridge: norm_topk_prob=False is not supported"),
    (dict(num_experts_per_tok=1), r"MiniMaxM2Bridge: num_experts_per_tok=1 with norm_topk_prob=True is not "
                                  r"supported \(HF divides the one sigmoid weight by itself"),
    (dict(num_expert_group=2), r"MiniMaxM2Bridge: num_expert_group=2 is not supported"),
    (dict(n_group=2), r"MiniMaxM2Bridge: n_group=2 is not supported"),
    (dict(topk_group=2), r"MiniMaxM2Bridge: topk_group=2 is not supported"),
    (dict(routed_scaling_factor=2.5), r"MiniMaxM2Bridge: routed_scaling_factor=2\.5 is not supported"),
    (dict(shared_intermediate_size=64), r"MiniMaxM2Bridge: shared_intermediate_size=64 is not supported"),
    (dict(attn_type_list=[1, 0, 1]), r"MiniMaxM2Bridge: attn_type_list=\[1, 0, 1\] is not supported"),
    (dict(sliding_window=16), r"MiniMaxM2Bridge: sliding_window=16 is not supported"),
    (dict(attn_window_size=16), r"MiniMaxM2Bridge: attn_window_size=16 is not supported"),
    (dict(layernorm_full_attention_beta=2.0), r"layernorm_full_attention_beta=2\.0 is not supported"),
    (dict(layernorm_mlp_beta=0.5), r"MiniMaxM2Bridge: layernorm_mlp_beta=0\.5 is not supported"),
    (dict(partial_rotary_factor=0.25), r"MiniMaxM2Bridge: rotary_dim=12 disagrees with partial_rotary_factor=0\.25"),
])
def test_settings_megatron_cannot_express_are_refused(overrides, match):
    """Refused from a raw config.json dict (the fields transformers' MiniMaxM2Config does not read)."""
    raw = {**TINY, "model_type": "minimax_m2", "rope_theta": 5000000.0, **overrides}
    with pytest.raises(ValueError, match=match):
        get_model_bridge(ARCH).transformer_config(raw)


@pytest.mark.parametrize("key", ["model.mtp_modules.0.eh_proj.weight", "model.layers.3.self_attn.q_proj.weight"])
def test_checkpoint_with_mtp_tensors_is_refused(key):
    """MiniMax's own config code has use_mtp / num_mtp_modules; transformers builds no MTP layers, so a checkpoint
    holding their tensors (a name with ``mtp``, or a layer past ``num_hidden_layers`` = 3; the names here are
    stand-ins) is refused by name rather than converted without them. Without such tensors the per-expert layout is
    used."""
    bridge = get_model_bridge(ARCH)
    raw = {**TINY, "model_type": "minimax_m2", "use_mtp": True, "num_mtp_modules": 3}
    ok = {"model.layers.2.block_sparse_moe.experts.0.w1.weight": None, "lm_head.weight": None}
    assert bridge.detect_hf_layout(ok, raw) is bridge.default_hf_layout
    with pytest.raises(ValueError, match=r"MiniMaxM2Bridge: use_mtp=True, num_mtp_modules=3: the checkpoint holds 1 "
                                         rf"multi-token-prediction tensor\(s\) \(e\.g\. {re.escape(key)}\)"):
        bridge.detect_hf_layout({**ok, key: None}, raw)


def test_refused_from_a_transformers_config_object_too():
    """transformers keeps the release's extra fields as attributes of MiniMaxM2Config: refused the same way."""
    with pytest.raises(ValueError, match=r"MiniMaxM2Bridge: scoring_func='softmax' is not supported"):
        get_model_bridge(ARCH).transformer_config(_config(scoring_func="softmax"))


@pytest.mark.parametrize("overrides,match", [
    (dict(qk_layernorm_whole_projection=False), r"qk_layernorm=True, qk_layernorm_whole_projection=False"),
    (dict(moe_router_score_function="softmax", moe_router_enable_expert_bias=False),
     r"moe_router_score_function='softmax'"),
    (dict(add_bias_linear=True), r"no MiniMax-M2 equivalent: \{'add_bias_linear': True\}"),
    (dict(add_qkv_bias=True), r"no MiniMax-M2 equivalent: \{'add_qkv_bias': True\}"),
    (dict(window_size=(4, 0)), r"no MiniMax-M2 equivalent: \{'window_size': \(4, 0\)\}"),
    (dict(moe_layer_freq=[1, 0, 1]), r"'moe_layer_freq': \[1, 0, 1\]"),
    (dict(moe_shared_expert_intermediate_size=64), r"'moe_shared_expert_intermediate_size': 64"),
    (dict(moe_router_num_groups=2, moe_router_group_topk=1), r"'moe_router_num_groups': 2"),
    (dict(moe_router_topk_scaling_factor=2.5), r"'moe_router_topk_scaling_factor': 2\.5"),
    (dict(moe_router_topk=1), r"moe_router_topk=1: MiniMax-M2 always renormalises its top-k weights"),
])
def test_export_refuses_what_minimax_m2_cannot_express(overrides, match):
    bridge = get_model_bridge(ARCH)
    cfg = bridge.transformer_config(_config(), **overrides)
    with pytest.raises(ValueError, match=match):
        bridge.megatron_to_hf_config(cfg)
