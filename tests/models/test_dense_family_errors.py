"""What the dense families refuse, with named errors, instead of building a different model; the list of supported
architectures; the zero-centred norm module against transformers' Gemma norm; the soft-capped attention softmax
against transformers' Gemma 2 eager attention, and the soft-caps of released Gemma 2 configs both ways. No process
group needed."""

from __future__ import annotations

from types import SimpleNamespace

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
        "DeepseekV32ForCausalLM",
        "DeepseekV3ForCausalLM",
        "Gemma2ForCausalLM",
        "Gemma3ForCausalLM",
        "Gemma4ForCausalLM",
        "Glm4MoeForCausalLM",
        "Glm4MoeLiteForCausalLM",
        "GlmMoeDsaForCausalLM",
        "GptOssForCausalLM",
        "Llama4ForCausalLM",
        "LlamaForCausalLM",
        "MiniMaxM2ForCausalLM",
        "MistralForCausalLM",
        "MixtralForCausalLM",
        "NemotronHForCausalLM",
        "Olmo2ForCausalLM",
        "Olmo3ForCausalLM",
        "OlmoeForCausalLM",
        "Phi3ForCausalLM",
        "Qwen2ForCausalLM",
        "Qwen2MoeForCausalLM",
        "Qwen3ForCausalLM",
        "Qwen3MoeForCausalLM",
        "Qwen3NextForCausalLM",
        "Qwen3_5ForCausalLM",
        "Qwen3_5ForConditionalGeneration",
        "Qwen3_5MoeForCausalLM",
        "Qwen3_5MoeForConditionalGeneration",
    ]


@pytest.mark.parametrize("arch,prefix,overrides,match", [
    # soft-caps convert (test_released_gemma2_soft_caps_convert_both_ways); a cap that is no positive number has no
    # model (HF divides by it)
    ("Gemma2ForCausalLM", "Gemma2", dict(attn_logit_softcapping=0.0),
     r"Gemma2Bridge: attn_logit_softcapping=0\.0 is not a positive number"),
    ("Gemma3ForCausalLM", "Gemma3Text", dict(final_logit_softcapping=-30.0),
     r"Gemma3Bridge: final_logit_softcapping=-30\.0 is not a positive number"),
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


def test_released_gemma2_soft_caps_convert_both_ways():
    """Gemma 2's config defaults, which every released checkpoint sets (attention 50.0, final 30.0), become
    GPTConfig fields that put the soft-capping attention into every layer's spec, and export writes them back;
    without caps the spec keeps megatron's own DotProductAttention."""
    from megatron.core.transformer.dot_product_attention import DotProductAttention

    from megatron_bridge_ext.mcore.model_builder import _layer_spec  # gpt_layer_spec slices by pipeline stage
    from megatron_bridge_ext.mcore.modules import SoftCapDotProductAttention

    bridge = get_model_bridge("Gemma2ForCausalLM")
    for overrides, caps, core in (({}, (50.0, 30.0), SoftCapDotProductAttention),
                                  (NO_SOFTCAP, (None, None), DotProductAttention)):
        cfg = bridge.transformer_config(_config("Gemma2", **overrides))
        assert (cfg.attn_logit_softcapping, cfg.final_logit_softcapping) == caps
        assert _layer_spec(cfg, None).submodules.self_attention.submodules.core_attention is core
        hf = bridge.megatron_to_hf_config(cfg)
        assert (hf["attn_logit_softcapping"], hf["final_logit_softcapping"]) == caps


@pytest.mark.parametrize("dtype,layer_scaling", [(torch.float32, False), (torch.float32, True),
                                                 (torch.bfloat16, False)])
def test_soft_capped_softmax_matches_gemma2_eager_attention(dtype, layer_scaling, monkeypatch):
    """SoftCapScaleMaskSoftmax on the scores DotProductAttention computes (q.k^T * softmax_scale in one baddbmm;
    with apply_query_key_layer_scaling the scale is divided by the layer number and the softmax multiplies it back)
    gives transformers' Gemma 2 eager attention probabilities: cap after the full scaling, then the sliding-window
    causal mask, then the softmax."""
    from megatron.core.fusions import fused_softmax
    from megatron.core.transformer.enums import AttnMaskType
    from megatron.core.transformer.utils import attention_mask_func
    from transformers.models.gemma2.modeling_gemma2 import eager_attention_forward

    from megatron_bridge_ext.mcore import cpu_compat
    from megatron_bridge_ext.mcore.modules import SoftCapScaleMaskSoftmax

    # megatron builds the window mask on "cuda"; cpu_compat's CPU version, for this test only
    monkeypatch.setattr(fused_softmax, "get_sliding_window_causal_mask", cpu_compat._cpu_sliding_window_causal_mask)
    b, h, s, d, window, cap, scaling = 2, 3, 10, 16, 4, 3.0, 24 ** -0.5
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(b, h, s, d, generator=gen).mul(2.0).to(dtype) for _ in range(3))
    pos = torch.arange(s)
    allowed = (pos[None, :] <= pos[:, None]) & (pos[None, :] > pos[:, None] - window)
    hf_mask = torch.zeros(s, s, dtype=dtype).masked_fill(~allowed, torch.finfo(dtype).min)[None, None]
    module = SimpleNamespace(num_key_value_groups=1, training=False, head_dim=d)
    _, want = eager_attention_forward(module, q, k, v, hf_mask, scaling=scaling, softcap=cap)
    _, uncapped = eager_attention_forward(module, q, k, v, hf_mask, scaling=scaling, softcap=None)

    layer = 3 if layer_scaling else 1
    qm, km = q.reshape(b * h, s, d), k.reshape(b * h, s, d)  # DotProductAttention's [b * np, sq, hn] views
    scores = torch.baddbmm(torch.empty(b * h, s, s, dtype=dtype), qm, km.transpose(1, 2), beta=0.0,
                           alpha=scaling / layer).view(b, h, s, s)
    softmax = SoftCapScaleMaskSoftmax(input_in_fp16=False, input_in_bf16=dtype == torch.bfloat16,
                                      attn_mask_type=AttnMaskType.causal, scaled_masked_softmax_fusion=True,
                                      mask_func=attention_mask_func, softmax_in_fp32=True,
                                      scale=layer if layer_scaling else None, window_size=(window - 1, 0),
                                      softcap=cap)
    got = softmax(scores, None)
    assert got.dtype == dtype
    atol = 1e-6 if dtype == torch.float32 else 2e-2  # HF caps bf16 scores in bf16, megatron in fp32
    assert torch.allclose(got.float(), want.float(), rtol=0, atol=atol), (got.float() - want.float()).abs().max()
    assert (uncapped.float() - want.float()).abs().max() > 0.1  # the cap bites on these scores


def test_soft_cap_must_be_positive_in_the_modules():
    from megatron.core.transformer.enums import AttnMaskType
    from megatron.core.transformer.utils import attention_mask_func

    from megatron_bridge_ext.mcore.modules import SoftCapScaleMaskSoftmax, softcap_output_logits

    with pytest.raises(ValueError, match=r"config\.attn_logit_softcapping=0\.0 must be a positive finite number"):
        SoftCapScaleMaskSoftmax(input_in_fp16=False, input_in_bf16=False, attn_mask_type=AttnMaskType.causal,
                                scaled_masked_softmax_fusion=False, mask_func=attention_mask_func,
                                softmax_in_fp32=True, scale=None, softcap=0.0)
    with pytest.raises(ValueError, match=r"config\.final_logit_softcapping=inf must be a positive finite number"):
        softcap_output_logits(torch.nn.Module(), float("inf"))
