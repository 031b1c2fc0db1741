"""What the dense families refuse, with named errors, instead of building a different model; the list of supported
architectures; the zero-centred norm module against transformers' Gemma norm. No process group needed."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("megatron.core")
transformers = pytest.importorskip("transformers")

import megatron_bridge_ext.models  # noqa: E402,F401  (registers the bridges)
from megatron_bridge_ext.auto_bridge import AutoBridge  # noqa: E402
from megatron_bridge_ext.dispatch import get_model_bridge  # noqa: E402

TINY = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=128)
NO_SOFTCAP = dict(attn_logit_softcapping=None, final_logit_softcapping=None)


def _config(prefix: str, **overrides):
    return getattr(transformers, f"{prefix}Config")(**{**TINY, **overrides})


def test_supported_models_are_the_proven_families():
    assert AutoBridge.list_supported_models() == [
        "Gemma2ForCausalLM", "Gemma3ForCausalLM", "LlamaForCausalLM", "MistralForCausalLM", "MixtralForCausalLM",
        "Phi3ForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM",
    ]


@pytest.mark.parametrize("arch,prefix,overrides,match", [
    # Gemma 2's defaults (50.0 / 30.0): megatron-core 0.16.1 has no soft-capping
    ("Gemma2ForCausalLM", "Gemma2", {}, r"attn_logit_softcapping=50\.0 is not supported by megatron-core 0\.16\.1"),
    ("Gemma2ForCausalLM", "Gemma2", dict(attn_logit_softcapping=None),
     r"final_logit_softcapping=30\.0 is not supported by megatron-core 0\.16\.1 \(GPTModel's output layer"),
    ("Gemma3ForCausalLM", "Gemma3Text", dict(attn_logit_softcapping=20.0), r"attn_logit_softcapping=20\.0"),
    ("Gemma2ForCausalLM", "Gemma2", dict(attention_bias=True, **NO_SOFTCAP), r"attention_bias=True"),
    ("Gemma3ForCausalLM", "Gemma3Text", dict(use_bidirectional_attention=True), r"use_bidirectional_attention"),
    ("Gemma3ForCausalLM", "Gemma3Text", dict(rope_parameters={
        "full_attention": {"rope_type": "default", "rope_theta": 1e6},
        "sliding_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4}}),
     r"rope_parameters\['sliding_attention'\]"),
    ("Gemma2ForCausalLM", "Gemma2", dict(hidden_activation="silu", **NO_SOFTCAP), r"hidden_activation='silu' is not supported \(supported: gelu_pytorch_tanh, gelu\)"),
    ("Phi3ForCausalLM", "Phi3", dict(pad_token_id=None, rope_parameters={
        "rope_type": "longrope", "rope_theta": 10000.0, "short_factor": [1.0] * 8, "long_factor": [2.0] * 8,
        "original_max_position_embeddings": 64}), r"rope_type='longrope'"),
    ("Qwen3ForCausalLM", "Qwen3", dict(attention_bias=True), r"attention_bias=True with mlp_bias=False"),
])
def test_settings_megatron_cannot_express_are_refused(arch, prefix, overrides, match):
    bridge = get_model_bridge(arch)
    with pytest.raises(ValueError, match=match):
        bridge.transformer_config(_config(prefix, **overrides))


def test_unknown_layer_type_is_refused():
    cfg = {**TINY, "head_dim": 16, "sliding_window": 4, "layer_types": ["sliding_attention", "chunked_attention"]}
    with pytest.raises(ValueError, match=r"layer_types \['chunked_attention'\] are not supported"):
        get_model_bridge("Qwen3ForCausalLM").transformer_config(cfg)


def test_sliding_pattern_without_window_is_refused():
    cfg = {**TINY, "head_dim": 16, "sliding_window": None, "layer_types": ["sliding_attention", "full_attention"]}
    with pytest.raises(ValueError, match="sliding_window is None"):
        get_model_bridge("Qwen3ForCausalLM").transformer_config(cfg)


def test_export_refuses_what_the_hf_family_cannot_express():
    mistral = get_model_bridge("MistralForCausalLM")
    cfg = mistral.transformer_config(_config("Mistral", sliding_window=4), window_attn_skip_freq=[1, 0])
    with pytest.raises(ValueError, match="sliding window on some layers only"):
        mistral.megatron_to_hf_config(cfg)
    cfg = mistral.transformer_config(_config("Mistral", sliding_window=4), window_size=(3, 2))
    with pytest.raises(ValueError, match=r"window_size=\(3, 2\) has no HF equivalent"):
        mistral.megatron_to_hf_config(cfg)
    gemma = get_model_bridge("Gemma2ForCausalLM")
    cfg = gemma.transformer_config(_config("Gemma2", **NO_SOFTCAP), embedding_scale=1.0)
    with pytest.raises(ValueError, match="embedding_scale"):
        gemma.megatron_to_hf_config(cfg)
    cfg = gemma.transformer_config(_config("Gemma2", **NO_SOFTCAP), softmax_scale=0.3)
    with pytest.raises(ValueError, match="query_pre_attn_scalar"):
        gemma.megatron_to_hf_config(cfg)
    phi3 = get_model_bridge("Phi3ForCausalLM")
    cfg = phi3.transformer_config(_config("Phi3", pad_token_id=None), kv_channels=24)
    with pytest.raises(ValueError, match="kv_channels=24"):
        phi3.megatron_to_hf_config(cfg)


def test_zero_centred_norm_matches_gemma_norm():
    from transformers.models.gemma2.modeling_gemma2 import Gemma2RMSNorm

    from megatron_bridge_ext.mcore.modules import LocalRMSNorm

    cfg = get_model_bridge("Gemma2ForCausalLM").transformer_config(_config("Gemma2", **NO_SOFTCAP))
    torch.manual_seed(0)
    ours, ref = LocalRMSNorm(cfg, 64, eps=1e-6), Gemma2RMSNorm(64, eps=1e-6)
    assert torch.equal(ours.weight, torch.zeros(64))  # zero-centred: starts at gamma = 1
    with torch.no_grad():
        ours.weight.normal_(0.0, 0.5)
        ref.weight.copy_(ours.weight)
    x = torch.randn(3, 5, 64)
    assert torch.allclose(ours(x), ref(x), rtol=0, atol=1e-6)
    xb = x.bfloat16()
    assert ours(xb).dtype == torch.bfloat16 and torch.allclose(ours(xb).float(), ref(xb).float(), atol=1e-2)


def test_zero_centred_layernorm_is_refused():
    from megatron_bridge_ext.mcore.model_builder import gpt_layer_spec

    cfg = get_model_bridge("Gemma2ForCausalLM").transformer_config(_config("Gemma2", **NO_SOFTCAP))
    cfg.normalization = "LayerNorm"
    with pytest.raises(ValueError, match="normalization='RMSNorm'"):
        gpt_layer_spec(cfg)
