"""OLMo 2, Olmo 3 and OLMoE without a process group: the config translation both ways (transformers builds the same
model from the regenerated config: with the original weights its logits equal the original's within
``SAME_MODEL_ATOL``), the settings refused by name in each direction, the whole-projection q / k norm module against
transformers' own norm, and the head-sharded norm mapping's split and refusals."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("megatron.core")
transformers = pytest.importorskip("transformers")

import megatron_bridge_ext.models  # noqa: E402,F401  (registers the bridges)
from megatron_bridge_ext.dispatch import get_model_bridge  # noqa: E402
from megatron_bridge_ext.mappings import ConversionContext, HeadShardedNormMapping  # noqa: E402
from megatron_bridge_ext.testing.parity import config_round_trip  # noqa: E402
from megatron_bridge_ext.testing.tolerances import SAME_MODEL_ATOL  # noqa: E402

TINY = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=3e-6, initializer_range=0.03,
            pad_token_id=None, eos_token_id=None, bos_token_id=None)
SLIDING, FULL = "sliding_attention", "full_attention"
CASES = {
    "olmo2": ("Olmo2", dict(rope_parameters={"rope_type": "default", "rope_theta": 30000.0})),
    "olmo2_tied_head_dim_linear_rope": ("Olmo2", dict(tie_word_embeddings=True, head_dim=24, rope_parameters={
        "rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0})),
    "olmo3_defaults": ("Olmo3", dict(sliding_window=5)),  # 3 sliding : 1 full, one rope theta
    "olmo3_two_ropes": ("Olmo3", dict(sliding_window=5, layer_types=[SLIDING, FULL, FULL, SLIDING], rope_parameters={
        FULL: {"rope_type": "linear", "factor": 2.0, "rope_theta": 1000000.0},
        SLIDING: {"rope_type": "default", "rope_theta": 10000.0}})),
    "olmo3_yarn_full_layers": ("Olmo3", dict(sliding_window=5, rope_parameters={
        FULL: {"rope_type": "yarn", "factor": 4.0, "rope_theta": 500000.0, "original_max_position_embeddings": 32,
               "beta_fast": 32.0, "beta_slow": 1.0, "attention_factor": 0.1 * math.log(4.0) + 1.0},
        SLIDING: {"rope_type": "default", "rope_theta": 500000.0}})),
    "olmo3_full_only": ("Olmo3", dict(sliding_window=5, layer_types=[FULL] * 4)),
    "olmo3_sliding_only": ("Olmo3", dict(sliding_window=3, layer_types=[SLIDING] * 4)),
    "olmoe": ("Olmoe", dict(intermediate_size=32, num_experts=6, num_experts_per_tok=2)),
    "olmoe_norm_topk_tied": ("Olmoe", dict(intermediate_size=32, num_experts=4, num_experts_per_tok=2,
                                           norm_topk_prob=True, tie_word_embeddings=True, num_key_value_heads=4)),
}
FIELDS = ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups", "kv_channels",
          "layernorm_epsilon", "rotary_base", "seq_len_interpolation_factor", "share_embeddings_and_output_weights",
          "vocab_size", "add_bias_linear", "add_qkv_bias", "qk_layernorm", "qk_layernorm_whole_projection",
          "pre_layernorms", "post_self_attn_layernorm", "post_mlp_layernorm", "window_size", "window_attn_skip_freq",
          "local_rotary_base", "num_moe_experts", "moe_router_topk", "moe_ffn_hidden_size", "moe_layer_freq",
          "moe_router_pre_softmax", "moe_router_score_function", "position_embedding_type")


def _config(prefix: str, **overrides):
    return getattr(transformers, f"{prefix}Config")(**{**TINY, **overrides})


def _model(prefix: str, overrides: dict):
    torch.manual_seed(0)
    model = getattr(transformers, f"{prefix}ForCausalLM")(_config(prefix, **overrides)).float().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(1.0 if "norm" in name else 0.0, 0.2)
    return model


@pytest.mark.parametrize("case", sorted(CASES))
def test_hf_megatron_hf_config_gives_the_same_model(case):
    prefix, overrides = CASES[case]
    model = _model(prefix, overrides)
    rt = config_round_trip(model, get_model_bridge(f"{prefix}ForCausalLM"))
    assert rt.megatron.qk_layernorm and rt.megatron.qk_layernorm_whole_projection
    assert rt.megatron.pre_layernorms == (prefix == "Olmoe")
    assert rt.regenerated["architectures"] == [f"{prefix}ForCausalLM"]
    assert type(rt.config) is type(model.config)
    assert rt.logit_diff <= SAME_MODEL_ATOL, f"max |logit diff| {rt.logit_diff:.3e}"
    assert rt.changed(FIELDS) == []


def test_olmo3_raw_config_json_reads_as_transformers_does():
    """A released-style config.json dict (``rope_theta`` + YaRN ``rope_scaling``, no ``rope_parameters``; here no
    ``layer_types`` either) gives the Megatron config of transformers' Olmo3Config read from it: YaRN on the full
    layers, the theta unscaled on the sliding ones, every fourth layer a full one."""
    raw = {**TINY, "model_type": "olmo3", "sliding_window": 5, "rope_theta": 500000.0,
           "rope_scaling": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32,
                            "attention_factor": 0.1 * math.log(4.0) + 1.0, "beta_fast": 32.0, "beta_slow": 1.0}}
    bridge = get_model_bridge("Olmo3ForCausalLM")
    from_raw = bridge.transformer_config(raw)
    from_transformers = bridge.transformer_config(transformers.AutoConfig.for_model(**raw))
    assert (from_raw.position_embedding_type, from_raw.local_rotary_base) == ("yarn", 500000.0)
    for field in FIELDS + ("yarn_rotary_scaling_factor", "yarn_original_max_position_embeddings"):
        assert getattr(from_raw, field) == getattr(from_transformers, field), field


@pytest.mark.parametrize("prefix,extra", [("Olmo2", {}), ("Olmoe", dict(num_experts=4, num_experts_per_tok=2))])
def test_a_minimal_config_json_takes_transformers_defaults(prefix, extra):
    """A config.json dict without ``rms_norm_eps`` / rope fields reads as transformers' config of it does."""
    raw = {k: v for k, v in {**TINY, **extra, "model_type": prefix.lower()}.items() if k != "rms_norm_eps"}
    bridge = get_model_bridge(f"{prefix}ForCausalLM")
    from_raw = bridge.transformer_config(raw)
    from_transformers = bridge.transformer_config(transformers.AutoConfig.for_model(**raw))
    for field in FIELDS:
        assert getattr(from_raw, field) == getattr(from_transformers, field), field


def test_olmo3_sliding_base_becomes_local_rotary_base():
    cfg = get_model_bridge("Olmo3ForCausalLM").transformer_config(_config("Olmo3", **CASES["olmo3_two_ropes"][1]))
    assert (cfg.rotary_base, cfg.seq_len_interpolation_factor, cfg.local_rotary_base) == (1e6, 2.0, 1e4)
    assert cfg.window_size == (4, 0) and cfg.window_attn_skip_freq == [1, 0, 0, 1]


@pytest.mark.parametrize("arch,prefix,overrides,match", [
    ("Olmo2ForCausalLM", "Olmo2", dict(attention_bias=True), r"Olmo2Bridge: attention_bias=True cannot be expressed"),
    ("Olmo3ForCausalLM", "Olmo3", dict(attention_bias=True), r"Olmo3Bridge: attention_bias=True"),
    ("Olmo3ForCausalLM", "Olmo3", dict(sliding_window=5, rope_parameters={
        FULL: {"rope_type": "default", "rope_theta": 1e6},
        SLIDING: {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4}}), r"rope_parameters\['sliding_attention'\]"),
    ("Olmo3ForCausalLM", "Olmo3", dict(sliding_window=5, rope_parameters={
        FULL: {"rope_type": "default", "rope_theta": 1e6},
        SLIDING: {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e6, "original_max_position_embeddings": 32}}),
     r"Olmo3Bridge: rope_parameters\['sliding_attention'\] = .* is not supported"),
    ("Olmo3ForCausalLM", "Olmo3", dict(sliding_window=5, rope_parameters={
        FULL: {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e6, "original_max_position_embeddings": 32,
               "attention_factor": 1.5},
        SLIDING: {"rope_type": "default", "rope_theta": 1e6}}), r"yarn attention_factor=1\.5 differs"),
    ("Olmo3ForCausalLM", "Olmo3", dict(sliding_window=None, layer_types=[SLIDING, FULL, FULL, FULL]),
     r"sliding_window is None"),
    ("OlmoeForCausalLM", "Olmoe", dict(num_experts=4, num_experts_per_tok=2, clip_qkv=8.0),
     r"OlmoeBridge: clip_qkv=8\.0 is not supported"),
    ("OlmoeForCausalLM", "Olmoe", dict(num_experts=4, num_experts_per_tok=2, sliding_window=16),
     r"OlmoeBridge: sliding_window=16 is not supported"),
    ("OlmoeForCausalLM", "Olmoe", dict(num_experts=4, num_experts_per_tok=2, head_dim=24),
     r"OlmoeBridge: head_dim=24 is not supported: .* = 16-wide heads"),
    ("OlmoeForCausalLM", "Olmoe", dict(num_experts=4, num_experts_per_tok=2, attention_bias=True),
     r"attention_bias=True with mlp_bias=False"),
])
def test_settings_megatron_cannot_express_are_refused(arch, prefix, overrides, match):
    with pytest.raises(ValueError, match=match):
        get_model_bridge(arch).transformer_config(_config(prefix, **overrides))


@pytest.mark.parametrize("arch,prefix,extra,overrides,match", [
    ("Olmo2ForCausalLM", "Olmo2", {}, dict(pre_layernorms=True), r"'pre_layernorms': \(True, False\)"),
    ("Olmo2ForCausalLM", "Olmo2", {}, dict(post_mlp_layernorm=False), r"'post_mlp_layernorm': \(False, True\)"),
    ("Olmo2ForCausalLM", "Olmo2", {}, dict(qk_layernorm_whole_projection=False),
     r"qk_layernorm=True, qk_layernorm_whole_projection=False"),
    ("Olmo2ForCausalLM", "Olmo2", {}, dict(window_size=(4, 0)), r"window_size=\(4, 0\) has no OLMo 2 equivalent"),
    ("Olmo3ForCausalLM", "Olmo3", dict(sliding_window=5), dict(layernorm_zero_centered_gamma=True),
     r"'layernorm_zero_centered_gamma': \(True, False\)"),
    ("OlmoeForCausalLM", "Olmoe", dict(num_experts=4, num_experts_per_tok=2), dict(qk_layernorm_whole_projection=False),
     r"qk_layernorm_whole_projection=False"),
    ("OlmoeForCausalLM", "Olmoe", dict(num_experts=4, num_experts_per_tok=2), dict(kv_channels=24),
     r"kv_channels=24 has no OLMoE equivalent"),
    ("OlmoeForCausalLM", "Olmoe", dict(num_experts=4, num_experts_per_tok=2), dict(moe_layer_freq=[1, 0, 1, 1]),
     r"moe_layer_freq=\[1, 0, 1, 1\]"),
])
def test_export_refuses_what_the_hf_family_cannot_express(arch, prefix, extra, overrides, match):
    bridge = get_model_bridge(arch)
    cfg = bridge.transformer_config(_config(prefix, **extra), **overrides)
    with pytest.raises(ValueError, match=match):
        bridge.megatron_to_hf_config(cfg)


@pytest.mark.parametrize("cls_name,field,heads", [("WholeQueryRMSNorm", "q_norm", 4), ("WholeKeyRMSNorm", "k_norm", 2)])
def test_whole_projection_norm_matches_transformers(cls_name, field, heads):
    """At TP1 (no process group) on the split heads [s, b, heads, d], as megatron's SelfAttention calls it, the
    module equals transformers' Olmo2RMSNorm on the unsplit projection [s, b, heads * d]; a per-head norm of the same
    weight does not (the negative control)."""
    from megatron_bridge_ext.mcore import modules

    cfg = get_model_bridge("Olmo2ForCausalLM").transformer_config(_config("Olmo2"))
    hf = transformers.Olmo2ForCausalLM(_config("Olmo2")).model.layers[0].self_attn
    ref = getattr(hf, field)
    ours = getattr(modules, cls_name)(cfg, 16, eps=cfg.layernorm_epsilon)
    assert ours.weight.shape == ref.weight.shape == (heads * 16,)
    assert getattr(ours.weight, "tensor_model_parallel", False) and ours.weight.partition_dim == 0
    torch.manual_seed(0)
    with torch.no_grad():
        ours.weight.normal_(1.0, 0.3)
        ref.weight.copy_(ours.weight)
    x = 3.0 * torch.randn(5, 2, heads, 16) + torch.linspace(0, 2, heads)[:, None]  # heads of different scales
    want = ref(x.reshape(5, 2, heads * 16)).reshape(5, 2, heads, 16)
    assert torch.allclose(ours(x), want, rtol=0, atol=1e-6)
    per_head = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 3e-6) * ours.weight.view(heads, 16)
    assert (per_head - want).abs().max() > 0.1
    assert ours(x.bfloat16()).dtype == torch.bfloat16


def _ctx(tp: int, tp_rank: int = 0, groups: int = 2) -> ConversionContext:
    cfg = SimpleNamespace(num_attention_heads=4, num_query_groups=groups, kv_channels=16, hidden_size=64)
    return ConversionContext(tp_size=tp, tp_rank=tp_rank, config=cfg)


def test_head_sharded_norm_mapping_splits_by_heads():
    q = HeadShardedNormMapping("decoder.layers.0.self_attention.q_layernorm.weight", "q_norm", heads="q")
    k = HeadShardedNormMapping("decoder.layers.0.self_attention.k_layernorm.weight", "k_norm", heads="k")
    qw, kw = torch.randn(64), torch.randn(32)
    shards = [q.hf_to_megatron(qw, _ctx(2, r)) for r in range(2)]
    assert [torch.equal(s, qw[r * 32:(r + 1) * 32]) for r, s in enumerate(shards)] == [True, True]
    assert torch.equal(q.megatron_to_hf(shards, _ctx(2))["q_norm"], qw)
    assert torch.equal(k.hf_to_megatron(kw, _ctx(2, 1)), kw[16:])
    with pytest.raises(ValueError, match=r"num_query_groups = 2 is not a multiple of tensor_model_parallel_size = 4"):
        k.hf_to_megatron(kw, _ctx(4, 1))
    with pytest.raises(ValueError, match=r"num_query_groups = 2 is not a multiple of tensor_model_parallel_size = 4"):
        k.megatron_shape((32,), _ctx(4))
    with pytest.raises(ValueError, match=r"HF tensor k_norm has shape \[64\], expected \[32\]"):
        k.hf_to_megatron(qw, _ctx(2))
    with pytest.raises(ValueError, match=r"heads must be 'q' or 'k'"):
        HeadShardedNormMapping("x", "y", heads="v")
