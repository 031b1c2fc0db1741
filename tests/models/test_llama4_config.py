"""Llama 4 text config translation both ways, without a process group: HF ``Llama4TextConfig`` -> Megatron
``GPTConfig`` -> HF ``config.json``. transformers builds a model from the regenerated config; with the original model's
weights its logits equal the original's (within ``SAME_MODEL_ATOL``), so every field that changes the forward survived
(NoPE / RoPE layers, chunks, temperature tuning, q/k norm, MoE / dense pattern, llama3 factors). The Megatron fields
are checked against the HF config's meaning, and every refusal is matched by its message."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("megatron.core")
transformers = pytest.importorskip("transformers")

from megatron_bridge_ext.dispatch import get_model_bridge  # noqa: E402
import megatron_bridge_ext.models  # noqa: E402,F401  (registers the bridges)
from megatron_bridge_ext.testing.parity import config_round_trip  # noqa: E402
from megatron_bridge_ext.testing.tolerances import SAME_MODEL_ATOL  # noqa: E402

ARCH = "Llama4ForCausalLM"
TINY = dict(vocab_size=97, hidden_size=64, intermediate_size=24, intermediate_size_mlp=80, num_hidden_layers=4,
            num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=64, rms_norm_eps=3e-6,
            num_local_experts=4, num_experts_per_tok=1, initializer_range=0.03)
SCOUT_ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 16.0, "low_freq_factor": 1.0,
              "high_freq_factor": 1.0, "original_max_position_embeddings": 16}
FIELDS = ("num_layers", "ffn_hidden_size", "moe_ffn_hidden_size", "moe_layer_freq", "no_rope_freq", "qk_l2_norm",
          "qk_norm_nope_layers", "qk_layernorm", "attention_chunk_size", "attn_temperature_floor_scale",
          "attn_temperature_scale", "rotary_interleaved", "rotary_base", "rope_scaling", "rope_scaling_factor",
          "rope_scaling_low_freq_factor", "rope_scaling_high_freq_factor",
          "rope_scaling_original_max_position_embeddings", "moe_router_score_function", "moe_router_topk",
          "moe_apply_probs_on_input", "moe_shared_expert_intermediate_size", "moe_shared_expert_gate",
          "num_moe_experts", "layernorm_epsilon", "share_embeddings_and_output_weights", "add_bias_linear",
          "add_qkv_bias")
CASES = {
    # Scout-like: MoE on every layer, a NoPE layer every 4th (HF's default), chunks, temperature, q/k norm
    "scout_like": dict(attention_chunk_size=5, floor_scale=3, attn_scale=0.3, rope_parameters=SCOUT_ROPE),
    # Maverick-like: MoE every other layer, no q/k norm, plain RoPE
    "maverick_like": dict(interleave_moe_layer_step=2, use_qk_norm=False, attention_chunk_size=7, floor_scale=2,
                          rope_parameters={"rope_type": "default", "rope_theta": 500000.0}),
    "explicit_layers_no_chunks_no_tuning": dict(moe_layers=[0, 3], no_rope_layers=[0, 1, 1, 0],
                                                attention_chunk_size=None, attn_temperature_tuning=False),
    "all_rope_megatron_llama3": dict(no_rope_layers=[1, 1, 1, 1], tie_word_embeddings=True, attention_chunk_size=6,
                                     rope_parameters={**SCOUT_ROPE, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                                      "original_max_position_embeddings": 8192}),
}


def _model(overrides: dict):
    config = transformers.Llama4TextConfig(**{**TINY, **overrides})
    torch.manual_seed(0)
    model = transformers.Llama4ForCausalLM(config).float().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(1.0 if "norm" in name else 0.0, 0.1 if "norm" in name else 0.2)
    return model


def _bridge():
    return get_model_bridge(ARCH)


@pytest.mark.parametrize("case", sorted(CASES))
def test_hf_megatron_hf_config_gives_the_same_model(case):
    model = _model(CASES[case])
    rt = config_round_trip(model, _bridge())
    assert rt.regenerated["architectures"] == [ARCH]
    assert type(rt.config) is type(model.config)
    for field in ("no_rope_layers", "moe_layers", "layer_types", "use_qk_norm", "attention_chunk_size",
                  "attn_temperature_tuning", "intermediate_size", "intermediate_size_mlp", "num_local_experts",
                  "rope_parameters", "tie_word_embeddings"):
        assert getattr(rt.config, field) == getattr(model.config, field), field
    if model.config.attn_temperature_tuning:
        assert (rt.config.floor_scale, rt.config.attn_scale) == (model.config.floor_scale, model.config.attn_scale)
    assert rt.logit_diff <= SAME_MODEL_ATOL, f"max |logit diff| {rt.logit_diff:.3e}"
    assert rt.changed(FIELDS) == []


def test_megatron_fields_say_what_hf_does():
    """The Megatron config of the Scout-like case, field by field against HF's meaning: no_rope_freq is HF's
    no_rope_layers inverted, the q/k L2 norm only on RoPE layers, chunks and temperature, experts of
    intermediate_size with a shared expert of the same size, dense layers of intermediate_size_mlp, top-1 sigmoid
    scores on the expert input, Scout's llama3 factors, interleaved RoPE pairs."""
    hf = _model(CASES["scout_like"]).config
    cfg = _bridge().transformer_config(hf)
    assert hf.no_rope_layers == [1, 1, 1, 0]
    assert list(cfg.no_rope_freq) == [0, 0, 0, 1]
    assert cfg.qk_l2_norm and not cfg.qk_norm_nope_layers and not cfg.qk_layernorm
    assert (cfg.attention_chunk_size, cfg.attn_temperature_floor_scale, cfg.attn_temperature_scale) == (5, 3.0, 0.3)
    assert (cfg.moe_ffn_hidden_size, cfg.moe_shared_expert_intermediate_size, cfg.ffn_hidden_size) == (24, 24, 80)
    assert cfg.moe_layer_freq == 1 and not cfg.moe_shared_expert_gate
    assert (cfg.moe_router_score_function, cfg.moe_router_topk, cfg.moe_apply_probs_on_input) == ("sigmoid", 1, True)
    assert cfg.rope_scaling and cfg.rope_scaling_factor == 16.0
    assert (cfg.rope_scaling_low_freq_factor, cfg.rope_scaling_high_freq_factor,
            cfg.rope_scaling_original_max_position_embeddings) == (None, 1.0, 16)
    assert cfg.rotary_interleaved and not cfg.add_bias_linear
    maverick = _bridge().transformer_config(_model(CASES["maverick_like"]).config)
    assert maverick.moe_layer_freq == [0, 1, 0, 1] and not maverick.qk_l2_norm


@pytest.mark.parametrize("overrides,match", [
    (dict(num_experts_per_tok=2), r"Llama4Bridge: num_experts_per_tok=2 is not supported: HF scales each of the "
                                  r"top-k experts' inputs by its unnormalised sigmoid score"),
    (dict(attention_bias=True), r"Llama4Bridge: attention_bias=True is not supported \(HF Llama 4 biases "
                                r"q/k/v/o_proj only"),
    (dict(attention_chunk_size=5, layer_types=["full_attention"] * 4),
     r"Llama4Bridge: layer_types=\['full_attention', 'full_attention', 'full_attention', 'full_attention'\] is not "
     r"supported: megatron chunks the attention of exactly the RoPE layers when attention_chunk_size is set "
     r"\(\['chunked_attention', 'chunked_attention', 'chunked_attention', 'full_attention'\]"),
    (dict(moe_layers=[1, 4]), r"Llama4Bridge: moe_layers \[4\] outside 0\.\.3"),
    (dict(rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 2.0}),
     r"unsupported rope type 'yarn'"),
])
def test_hf_settings_without_megatron_equivalent_are_refused(overrides, match):
    config = transformers.Llama4TextConfig(**{**TINY, **overrides})
    with pytest.raises(ValueError, match=match):
        _bridge().transformer_config(config)


def test_short_no_rope_layers_is_refused():
    config = {**transformers.Llama4TextConfig(**TINY).to_dict(), "no_rope_layers": [1, 0]}
    with pytest.raises(ValueError, match=r"Llama4Bridge: no_rope_layers has 2 entries for num_hidden_layers=4"):
        _bridge().hf_config_to_megatron_kwargs(config)


@pytest.mark.parametrize("field,value,match", [
    ("moe_router_topk", 2, r"no Llama 4 equivalent: \{'moe_router_topk': 2\}"),
    ("rotary_interleaved", False, r"no Llama 4 equivalent: \{'rotary_interleaved': False\}"),
    ("moe_apply_probs_on_input", False, r"no Llama 4 equivalent: \{'moe_apply_probs_on_input': False\}"),
    ("moe_router_score_function", "softmax", r"no Llama 4 equivalent: \{'moe_router_score_function': 'softmax'\}"),
    ("moe_shared_expert_intermediate_size", 48,
     r"no Llama 4 equivalent: \{'moe_shared_expert_intermediate_size': 48\}"),
    ("add_bias_linear", True, r"no Llama 4 equivalent: \{'add_bias_linear': True\}"),
    ("qk_norm_nope_layers", True, r"qk_l2_norm with qk_norm_nope_layers=True; HF Llama 4 normalises queries and "
                                  r"keys on RoPE layers only"),
    ("attn_temperature_floor_scale", 2.5, r"attn_temperature_floor_scale=2\.5; HF Llama 4 takes an integer"),
])
def test_megatron_settings_without_llama4_equivalent_are_refused(field, value, match):
    cfg = _bridge().transformer_config(_model(CASES["scout_like"]).config)
    setattr(cfg, field, value)
    with pytest.raises(ValueError, match=match):
        _bridge().megatron_to_hf_config(cfg)


def test_megatron_lm_args_carry_the_layer_pattern_and_are_not_enough_alone():
    """The Megatron-LM ``args`` a checkpoint stores say what Megatron-LM's arguments can (``--qk-l2-norm``,
    ``--no-rope-freq``, ``--moe-apply-probs-on-input``), and a config read back with the HF source agrees with them;
    without the source a Llama 4 is refused (chunked attention and temperature tuning are in no argument), naming
    ``--hf-source``; args whose NoPE layers differ are named (an int ``--no-rope-freq`` compared as megatron-core
    expands it)."""
    from megatron_bridge_ext.mcore.checkpoint import args_disagreements, config_from_megatron_lm_args
    from megatron_bridge_ext.mcore.megatron_lm_args import megatron_lm_namespace

    for case in ("scout_like", "maverick_like"):
        hf = transformers.Llama4TextConfig(**{**TINY, **CASES[case]})
        config = _bridge().transformer_config(hf)
        args = megatron_lm_namespace(config, {"tp": 1, "pp": 1, "world": 1})
        assert args.qk_l2_norm is (case == "scout_like") and args.moe_apply_probs_on_input is True
        assert args.no_rope_freq == [0, 0, 0, 1] == list(config.no_rope_freq)
        assert args_disagreements(args, config) == []
        with pytest.raises(ValueError, match=r"give the HF config with --hf-source"):
            config_from_megatron_lm_args(args, _bridge(), where=case)
        back = config_from_megatron_lm_args(args, _bridge(), hf_config=hf, where=case)
        assert back.attention_chunk_size == config.attention_chunk_size and back.no_rope_freq == config.no_rope_freq
    with pytest.raises(ValueError, match=r"attention_chunk_size \(chunked attention, set or not\)"):
        config_from_megatron_lm_args(args, _bridge(), where="maverick_like")
    args.no_rope_freq = 2
    assert args_disagreements(args, config) == ["no_rope_freq: args [0, 1, 0, 1], config [0, 0, 0, 1]"]
    args.no_rope_freq, args.qk_l2_norm = 4, True
    assert args_disagreements(args, config) == ["qk_l2_norm: args True, config False"]
