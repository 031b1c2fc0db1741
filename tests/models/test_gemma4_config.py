"""Gemma 4 text's config translation both ways, and what it refuses by name.

Round trip: HF config -> Megatron GPTConfig -> HF config.json; transformers builds a model from the regenerated
config, which with the original model's weights gives the original logits (within ``SAME_MODEL_ATOL``), and whose
Megatron config is the same again. The proportional frequencies and the value norm equal transformers' bit for bit.
Full-attention layers of their own head size / kv heads and k=v (the released dense shape) convert both ways; k=v
export checks the value rows. Refusals: every Gemma 4 feature megatron's GPTModel cannot hold (see the docstring of
``megatron_bridge_ext/models/gemma4.py``), each named with its value. No process group needed."""

from __future__ import annotations

import dataclasses

import pytest
import torch

pytest.importorskip("megatron.core")
transformers = pytest.importorskip("transformers")

import megatron_bridge_ext.models  # noqa: E402,F401  (registers the bridges)
from megatron_bridge_ext.dispatch import get_model_bridge  # noqa: E402
from megatron_bridge_ext.testing.parity import config_round_trip  # noqa: E402
from megatron_bridge_ext.testing.tolerances import SAME_MODEL_ATOL  # noqa: E402

ARCH = "Gemma4ForCausalLM"
# one head size for every layer (global_head_dim = head_dim) and no per-layer input embeddings: what converts
TINY = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, global_head_dim=16, hidden_size_per_layer_input=0,
            max_position_embeddings=128, rms_norm_eps=3e-6, initializer_range=0.03, sliding_window=5,
            layer_types=["sliding_attention", "full_attention"])
SLIDING_DEFAULT = {"rope_type": "default", "rope_theta": 10000.0}
PROPORTIONAL = {"rope_type": "proportional", "partial_rotary_factor": 0.5, "rope_theta": 1e5}
CASES = {
    # HF's default rope_parameters: proportional RoPE (0.25, theta 1e6) on full layers, theta 1e4 on sliding ones
    "default_rope": dict(final_logit_softcapping=30.0),
    "proportional_factor": dict(rope_parameters={
        "full_attention": {"rope_type": "proportional", "partial_rotary_factor": 0.5, "rope_theta": 1e5,
                           "factor": 2.0},
        "sliding_attention": {"rope_type": "default", "rope_theta": 100.0}}),
    "one_rope_untied_gelu": dict(tie_word_embeddings=False, hidden_activation="gelu", rope_parameters={
        "full_attention": SLIDING_DEFAULT, "sliding_attention": SLIDING_DEFAULT}),
    "linear_rope_full_layers_only": dict(layer_types=["full_attention"] * 2, rope_parameters={
        "full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e6},
        "sliding_attention": SLIDING_DEFAULT}),
    # doubles the MLP of kv-shared layers only: no layer is one here, so the model is Gemma 4's without it
    "double_wide_mlp_without_kv_sharing": dict(use_double_wide_mlp=True),
    # bidirectional among image tokens only: the text model is causal with it
    "bidirectional_vision": dict(use_bidirectional_attention="vision"),
    # the released dense shape: full-attention layers of their own head size and kv heads, keys used as values
    "released_shape": dict(num_hidden_layers=3, layer_types=["sliding_attention", "sliding_attention",
                                                             "full_attention"],
                           global_head_dim=32, num_global_key_value_heads=1, attention_k_eq_v=True),
    # another head size alone (without k=v, HF ignores num_global_key_value_heads)
    "global_head_dim_only": dict(global_head_dim=32, num_global_key_value_heads=1),
    # k=v with one head size
    "k_eq_v_one_head_size": dict(attention_k_eq_v=True),
}
MEGATRON_FIELDS = ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups",
                   "kv_channels", "layernorm_epsilon", "normalization", "layernorm_zero_centered_gamma",
                   "rotary_base", "rotary_percent", "rotary_proportion", "seq_len_interpolation_factor",
                   "rope_scaling", "local_rotary_base", "share_embeddings_and_output_weights", "vocab_size",
                   "window_size", "window_attn_skip_freq", "qk_layernorm", "value_rms_norm", "layer_output_scalar",
                   "softmax_scale", "embedding_scale", "post_self_attn_layernorm", "post_mlp_layernorm",
                   "activation_func", "gated_linear_unit", "add_bias_linear", "add_qkv_bias",
                   "final_logit_softcapping", "attn_logit_softcapping", "params_dtype", "full_attention_kv_channels",
                   "full_attention_num_query_groups", "full_attention_k_eq_v")


def _geometry(config):
    """Per layer (head_dim, num_key_value_heads) of a Gemma4TextConfig."""
    return [(config.per_layer_config[i].head_dim, config.per_layer_config[i].num_key_value_heads)
            for i in range(config.num_hidden_layers)]


def _config(**overrides):
    return transformers.Gemma4TextConfig(**{**TINY, **overrides})


def _model(config):
    torch.manual_seed(0)
    model = transformers.Gemma4ForCausalLM(config).float().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.normal_(1.0, 0.3)
        for layer in model.model.layers:
            layer.layer_scalar.uniform_(0.5, 1.5)
    return model


@pytest.mark.parametrize("case", sorted(CASES))
def test_hf_megatron_hf_config_gives_the_same_model(case):
    model = _model(_config(**CASES[case]))
    rt = config_round_trip(model, get_model_bridge(ARCH))
    assert rt.megatron.value_rms_norm and rt.megatron.layer_output_scalar
    assert rt.megatron.softmax_scale == 1.0
    assert rt.regenerated["architectures"] == [ARCH]
    assert type(rt.config) is transformers.Gemma4TextConfig
    # the per-layer geometry survives (one head size: an empty per_layer_config), and k=v
    assert rt.config.per_layer_attributes == model.config.per_layer_attributes
    assert _geometry(rt.config) == _geometry(model.config)
    assert rt.config.attention_k_eq_v == model.config.attention_k_eq_v
    assert type(rt.model) is transformers.Gemma4ForCausalLM
    assert rt.logit_diff <= SAME_MODEL_ATOL, f"max |logit diff| {rt.logit_diff:.3e}"
    assert rt.changed(MEGATRON_FIELDS) == []


def test_transformers_default_rope_reads_as_proportional():
    """HF's default Gemma 4 RoPE: proportional on full layers (0.25 of the pairs, theta 1e6), base 1e4 on sliding
    layers."""
    cfg = get_model_bridge(ARCH).transformer_config(_config())
    assert (cfg.rotary_proportion, cfg.rotary_base, cfg.local_rotary_base) == (0.25, 1e6, 1e4)
    assert cfg.rotary_percent == 1.0 and cfg.seq_len_interpolation_factor is None


def test_dict_form_reads_like_the_config_object():
    bridge = get_model_bridge(ARCH)
    config = _config(**CASES["proportional_factor"])
    a = bridge.transformer_config(config)
    b = bridge.transformer_config(config.to_dict())
    for field in MEGATRON_FIELDS:
        assert getattr(a, field) == getattr(b, field), field


@pytest.mark.parametrize("overrides,match", [
    (dict(num_hidden_layers=3, layer_types=["sliding_attention", "sliding_attention", "full_attention"],
          per_layer_config={0: {"head_dim": 32}}),
     r"Gemma4Bridge: per_layer_config gives the sliding_attention layers different \(head_dim, num_key_value_heads\) "
     r"\[\(16, 2\), \(32, 2\)\]: megatron builds one geometry per layer type"),
    (dict(per_layer_config={1: {"intermediate_size": 128}}),
     r"Gemma4Bridge: per_layer_config overrides \['intermediate_size'\] per layer: only head_dim and "
     r"num_key_value_heads"),
    (dict(global_head_dim=32, num_global_key_value_heads=3, attention_k_eq_v=True),
     r"full_attention_num_query_groups \(3, HF num_global_key_value_heads\) must be a multiple or a divisor of "
     r"tensor_model_parallel_size \(2\)"),
    (dict(hidden_size_per_layer_input=256), r"Gemma4Bridge: hidden_size_per_layer_input=256 is not supported: "
                                            r"per-layer input embeddings"),
    (dict(num_kv_shared_layers=1), r"Gemma4Bridge: num_kv_shared_layers=1 is not supported: layers that reuse"),
    (dict(enable_moe_block=True, num_experts=4, top_k_experts=2, moe_intermediate_size=32),
     r"Gemma4Bridge: enable_moe_block=True is not supported: a dense MLP and routed experts side by side"),
    (dict(use_bidirectional_attention="all"),
     r"use_bidirectional_attention='all' is not supported: GPTModel is causal"),
    (dict(attention_bias=True), r"Gemma4Bridge: attention_bias=True is not supported"),
    (dict(final_logit_softcapping=-30.0), r"Gemma4Bridge: final_logit_softcapping=-30\.0 is not a positive number"),
    (dict(hidden_activation="silu"), r"hidden_activation='silu' is not supported \(supported: gelu_pytorch_tanh, "
                                     r"gelu\)"),
    (dict(rope_parameters={"full_attention": SLIDING_DEFAULT,
                           "sliding_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4}}),
     r"rope_parameters\['sliding_attention'\] = .* sliding layers take a rope base only"),
    (dict(rope_parameters={"full_attention": {**SLIDING_DEFAULT, "partial_rotary_factor": 0.5},
                           "sliding_attention": SLIDING_DEFAULT}),
     r"rope_parameters\['full_attention'\] = .*partial_rotary_factor is read by proportional RoPE only"),
    (dict(rope_parameters={"full_attention": {"rope_type": "yarn", "factor": 2.0, "rope_theta": 1e4,
                                              "original_max_position_embeddings": 64},
                           "sliding_attention": SLIDING_DEFAULT}), r"unsupported rope type 'yarn'"),
    (dict(rope_parameters={"full_attention": {**PROPORTIONAL, "beta_fast": 32.0},
                           "sliding_attention": SLIDING_DEFAULT}),
     r"rope_parameters\['full_attention'\] = .* has keys \['beta_fast'\] that proportional RoPE does not read"),
])
def test_settings_megatron_cannot_express_are_refused(overrides, match):
    with pytest.raises(ValueError, match=match):
        get_model_bridge(ARCH).transformer_config(_config(**overrides), tensor_model_parallel_size=2)


def test_transformers_default_config_is_refused_by_name():
    """A Gemma4TextConfig left at transformers' defaults (the shape of the released E2B model: per-layer input
    embeddings of 256, full layers with head_dim 512) names the first feature GPTModel cannot hold."""
    with pytest.raises(ValueError, match=r"hidden_size_per_layer_input=256"):
        get_model_bridge(ARCH).transformer_config(transformers.Gemma4TextConfig(num_hidden_layers=2))


@pytest.mark.parametrize("k_eq_v", [False, True])
def test_transformers_defaults_without_ple_convert(k_eq_v):
    """transformers' defaults less the per-layer input embeddings (kv sharing and the MoE block are off by default):
    sliding layers of head_dim 256 and 4 kv heads, every 6th layer full with head_dim 512 (with k=v also
    num_global_key_value_heads); the layout (the full layers' q/k/v table entries) reads the same from either side."""
    bridge = get_model_bridge(ARCH)
    hf = transformers.Gemma4TextConfig(num_hidden_layers=12, hidden_size_per_layer_input=0,
                                       **(dict(attention_k_eq_v=True, num_global_key_value_heads=2) if k_eq_v else {}))
    cfg = bridge.transformer_config(hf)
    assert (cfg.kv_channels, cfg.num_query_groups, cfg.full_attention_kv_channels) == (256, 4, 512)
    assert cfg.full_attention_num_query_groups == (2 if k_eq_v else None) and cfg.full_attention_k_eq_v == k_eq_v
    assert bridge.hf_layout_for_model(cfg) == bridge.detect_hf_layout(None, hf) == (
        "per_layer_attention", (5, 11), (8, 2 if k_eq_v else 4, 512), k_eq_v)
    assert bridge.megatron_to_hf_config(cfg)["per_layer_config"] == {
        str(i): {"head_dim": 512, **({"num_key_value_heads": 2} if k_eq_v else {})} for i in (5, 11)}


def test_key_as_value_export_refuses_value_rows_apart_from_keys():
    """k=v layers: import packs k_proj as the key and the value rows (any TP split); export gives q / k back bit for
    bit and no v_proj, and names the parameter once the value rows differ from the key rows (a Megatron model
    trained apart has no HF equivalent)."""
    from megatron_bridge_ext.mappings import ConversionContext, KeyAsValueQKVMapping

    g = torch.Generator().manual_seed(0)
    heads, groups, d, hidden = 4, 1, 8, 16
    q, k = torch.randn(heads * d, hidden, generator=g), torch.randn(groups * d, hidden, generator=g)
    m = KeyAsValueQKVMapping("decoder.layers.2.self_attention.linear_qkv.weight", q="q", k="k",
                             dims=(heads, groups, d))
    shards = [m.hf_to_megatron({"q": q, "k": k}, ConversionContext(tp_size=2, tp_rank=r)) for r in range(2)]
    assert tuple(shards[0].shape) == m.megatron_shape({"q": q.shape, "k": k.shape},
                                                      ConversionContext(tp_size=2, tp_rank=0))
    back = m.megatron_to_hf(shards, ConversionContext(tp_size=2))
    assert set(back) == {"q", "k"} and torch.equal(back["q"], q) and torch.equal(back["k"], k)
    assert m.hf_shapes(tuple(shards[0].shape), 2, ConversionContext(tp_size=2)) == {"q": tuple(q.shape),
                                                                                     "k": tuple(k.shape)}
    shards[1][-1, 0] += 1.0  # a value row (the last rows of the group block)
    with pytest.raises(ValueError, match=r"decoder\.layers\.2\.self_attention\.linear_qkv\.weight: the value rows "
                                         r"differ from the key rows .* no HF equivalent"):
        m.megatron_to_hf(shards, ConversionContext(tp_size=2))


@pytest.mark.parametrize("change,match", [
    (dict(value_rms_norm=False), r"'value_rms_norm': \(False, True\)"),
    (dict(layer_output_scalar=False), r"'layer_output_scalar': \(False, True\)"),
    (dict(softmax_scale=0.25), r"'softmax_scale': \(0\.25, 1\.0\)"),
    (dict(layernorm_zero_centered_gamma=True), r"'layernorm_zero_centered_gamma': \(True, False\)"),
    (dict(window_attn_skip_freq=[0, 1]), r"the last layer slides \(window_attn_skip_freq=\[0, 1\]\)"),
])
def test_megatron_settings_without_gemma4_equivalent_are_refused(change, match):
    bridge = get_model_bridge(ARCH)
    config = dataclasses.replace(bridge.transformer_config(_config()), **change)
    with pytest.raises(ValueError, match=match):
        bridge.megatron_to_hf_config(config)


@pytest.mark.parametrize("head_dim,proportion", [(16, 0.25), (24, 0.25), (24, 0.5), (16, 1.0), (512, 0.25)])
def test_proportional_frequencies_are_transformers(head_dim, proportion):
    """``proportional_rotary_inv_freq`` (what ``proportional_rope`` gives megatron's rotary embedding) equals the
    full-attention inverse frequencies of transformers' Gemma 4 rotary embedding, bit for bit."""
    from megatron_bridge_ext.mcore.modules import proportional_rotary_inv_freq

    config = _config(head_dim=head_dim, global_head_dim=head_dim, rope_parameters={
        "full_attention": {"rope_type": "proportional", "partial_rotary_factor": proportion, "rope_theta": 1e6},
        "sliding_attention": SLIDING_DEFAULT})
    hf = transformers.models.gemma4.modeling_gemma4.Gemma4TextRotaryEmbedding(config).full_attention_inv_freq
    assert torch.equal(proportional_rotary_inv_freq(head_dim, 1e6, proportion), hf)


def test_value_norm_is_transformers_v_norm():
    """The value norm of ``ValueNormSelfAttention`` equals transformers' weightless ``Gemma4RMSNorm``, bit for bit."""
    from megatron_bridge_ext.mcore.modules import _unit_rms_norm

    v = torch.randn(5, 2, 3, 16, generator=torch.Generator().manual_seed(0)) * 3
    hf = transformers.models.gemma4.modeling_gemma4.Gemma4RMSNorm(16, eps=1e-6, with_scale=False)
    assert torch.equal(_unit_rms_norm(v, 1e-6), hf(v))
    assert torch.equal(_unit_rms_norm(v.bfloat16(), 1e-6), hf(v.bfloat16()))


def test_full_layer_config_against_its_tensors_is_checked(tmp_path):
    """Loading a checkpoint checks each full-attention layer's q/k against its own geometry (per_layer_config), and
    names that layer's head size when they disagree."""
    import json

    from megatron_bridge_ext.auto_bridge import AutoBridge

    _model(_config(**CASES["released_shape"])).save_pretrained(tmp_path, safe_serialization=True)
    AutoBridge.from_hf_pretrained(str(tmp_path))  # agrees
    path = tmp_path / "config.json"
    raw = json.loads(path.read_text())
    raw["per_layer_config"]["2"]["head_dim"] = 24
    path.write_text(json.dumps(raw))
    with pytest.raises(ValueError, match=r"num_attention_heads 4 x head_dim 24 = 96 rows of hidden_size 64, but "
                                         r"model\.layers\.2\.self_attn\.q_proj\.weight .*has shape \[128, 64\]"):
        AutoBridge.from_hf_pretrained(str(tmp_path))
