"""GLM-5 (``GlmMoeDsaForCausalLM``) config translation without a process group: HF config -> Megatron ``GPTConfig``
(DeepSeek sparse attention, megatron-core >= 0.19) -> HF config.json gives the same transformers model (logits within
``SAME_MODEL_ATOL`` with the original weights; the same ``indexer_types``), top-k sharing patterns read as megatron's
``dsa_indexer_topk_freq`` / ``dsa_indexer_skip_topk_offset`` (checked against megatron-core's own
``is_dsa_skip_topk_layer``), the released sizes, and the named errors both ways. Under megatron-core < 0.19: the
named refusal."""

from __future__ import annotations

import dataclasses

import pytest
import torch

pytest.importorskip("megatron.core")
transformers = pytest.importorskip("transformers")

import megatron_bridge_ext.models  # noqa: E402,F401  (registers the bridges)
from megatron_bridge_ext.dispatch import get_model_bridge  # noqa: E402
from megatron_bridge_ext.testing.tolerances import SAME_MODEL_ATOL, max_abs_diff  # noqa: E402

from dsa_config_shared import HAS_DSA, TINY_DSA, assert_refused_before_megatron_core_0_19, needs_dsa  # noqa: E402
from dsa_config_shared import logits as _logits  # noqa: E402

ARCH = "GlmMoeDsaForCausalLM"
TINY = dict(TINY_DSA, num_hidden_layers=6)
CASES = {
    # transformers' default schedule: index_topk_freq 1 (every layer full)
    "all_full": ({}, (1, 0)),
    "freq2_offset1": (dict(index_topk_freq=2, index_skip_topk_offset=1), (2, 1)),
    "freq3_default_offset": (dict(index_topk_freq=3), (3, 2)),  # transformers' default offset 2
    "pattern_fssfss": (dict(index_topk_pattern="FSSFSS"), (3, 1)),
    "freq2_offset3_eps": (dict(index_topk_freq=2, index_skip_topk_offset=3, rms_norm_eps=1e-6), (2, 3)),
}


def _config(**overrides):
    return transformers.GlmMoeDsaConfig(**{**TINY, **overrides})


@needs_dsa
@pytest.mark.parametrize("case", sorted(CASES))
def test_hf_megatron_hf_config_gives_the_same_model(case):
    from megatron.core.transformer.experimental_attention_variant.dsa import is_dsa_skip_topk_layer

    overrides, sharing = CASES[case]
    torch.manual_seed(0)
    model = transformers.GlmMoeDsaForCausalLM(_config(**overrides)).float().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(1.0 if name.endswith("norm.weight") else 0.0, 0.1 if "norm" in name else 0.2)
    bridge = get_model_bridge(ARCH)
    megatron_config = bridge.transformer_config(model.config)
    freq, offset = megatron_config.dsa_indexer_topk_freq, megatron_config.dsa_indexer_skip_topk_offset
    assert (freq, offset) == sharing and megatron_config.dsa_indexer_rope_interleaved
    skips = ["shared" if is_dsa_skip_topk_layer(n, offset, freq) else "full" for n in range(1, 7)]
    assert skips == model.config.indexer_types  # megatron's own reading of the two fields
    regenerated = bridge.megatron_to_hf_config(megatron_config)
    config2 = transformers.AutoConfig.for_model(**regenerated)
    assert type(config2) is transformers.GlmMoeDsaConfig
    assert config2.indexer_types == model.config.indexer_types
    assert config2.mlp_layer_types == model.config.mlp_layer_types
    model2 = transformers.AutoModelForCausalLM.from_config(config2).float().eval()
    model2.load_state_dict(model.state_dict(), strict=True)
    diff = max_abs_diff(_logits(model2), _logits(model))
    assert diff <= SAME_MODEL_ATOL, f"max |logit diff| {diff:.3e}"
    again = bridge.transformer_config(config2)
    for field in ("num_layers", "layernorm_epsilon", "latent_layernorm_epsilon", "q_lora_rank", "kv_lora_rank",
                  "moe_layer_freq", "dsa_indexer_n_heads", "dsa_indexer_head_dim", "dsa_indexer_topk",
                  "dsa_indexer_topk_freq", "dsa_indexer_skip_topk_offset", "dsa_indexer_rope_interleaved",
                  "dsa_indexer_k_norm_epsilon"):
        assert getattr(again, field) == getattr(megatron_config, field), field


@needs_dsa
def test_the_released_sizes_read_as_transformers_builds_them():
    hf = transformers.GlmMoeDsaConfig()
    got = get_model_bridge(ARCH).transformer_config(hf)
    with torch.device("meta"):
        attn = transformers.models.glm_moe_dsa.modeling_glm_moe_dsa.GlmMoeDsaAttention(hf, 0)
    assert (got.dsa_indexer_n_heads, got.dsa_indexer_head_dim, got.dsa_indexer_topk) == (
        attn.indexer.n_heads, attn.indexer.head_dim, attn.indexer.index_topk) == (32, 128, 2048)
    assert got.dsa_indexer_k_norm_epsilon == attn.indexer.k_norm.eps
    assert got.latent_layernorm_epsilon == attn.q_a_layernorm.variance_epsilon != got.layernorm_epsilon
    assert got.dsa_indexer_topk_freq == 1 and hf.indexer_types == ["full"] * 78 and got.num_layers == 78


@needs_dsa
@pytest.mark.parametrize("overrides,match", [
    (dict(indexer_types=["full", "shared", "shared", "full", "full", "full"]),
     r"GlmMoeDsaBridge: indexer_types=\['full', 'shared', 'shared', 'full', 'full', 'full'\] is not a periodic"),
    (dict(indexer_types=["full", "sparse", "full", "full", "full", "full"]),
     r"GlmMoeDsaBridge: indexer_types entries \['sparse'\] are neither 'full' nor 'shared'"),
])
def test_hf_settings_without_a_megatron_equivalent_are_refused(overrides, match):
    with pytest.raises(ValueError, match=match):
        get_model_bridge(ARCH).transformer_config(_config(**overrides))


@needs_dsa
def test_a_pipeline_stage_starting_on_a_shared_layer_is_refused():
    """freq 2, offset 1 (full, shared, ...): PP2 starts its stages on layers 0 and 3 (layer 3 shared); PP3 on 0, 2,
    4 (all full) is fine."""
    bridge = get_model_bridge(ARCH)
    hf = _config(index_topk_freq=2, index_skip_topk_offset=1)
    assert bridge.transformer_config(hf, pipeline_model_parallel_size=3).dsa_indexer_topk_freq == 2
    with pytest.raises(ValueError, match=r"GlmMoeDsaBridge: pipeline_model_parallel_size=2 x "
                                         r"virtual_pipeline_model_parallel_size=None starts \(virtual\) stages at the "
                                         r"shared layers \[3\]"):
        bridge.transformer_config(hf, pipeline_model_parallel_size=2)
    with pytest.raises(ValueError, match=r"GlmMoeDsaBridge: cross-layer top-k sharing \(dsa_indexer_topk_freq=2\) "
                                         r"with an uneven pipeline split \{'num_layers_in_first_pipeline_stage': 2\}"):
        bridge.transformer_config(hf, pipeline_model_parallel_size=2, num_layers_in_first_pipeline_stage=2)


@needs_dsa
@pytest.mark.parametrize("changes,match", [
    (dict(dsa_indexer_rope_interleaved=False), r"dsa_indexer_rope_interleaved': False"),
    (dict(mtp_num_layers=1), r"multi-token-prediction layers with cross-layer top-k sharing "
                             r"\(dsa_indexer_topk_freq=2\) are not converted"),
    (dict(add_qkv_bias=True), r"no GLM-5 equivalent: \{'add_qkv_bias': True\}"),
])
def test_megatron_settings_without_an_hf_equivalent_are_refused(changes, match):
    bridge = get_model_bridge(ARCH)
    config = bridge.transformer_config(_config(index_topk_freq=2, index_skip_topk_offset=1))
    with pytest.raises(ValueError, match=match):
        bridge.megatron_to_hf_config(dataclasses.replace(config, **changes))


@pytest.mark.skipif(HAS_DSA, reason="megatron-core >= 0.19 converts the family (the tests above)")
def test_refused_before_megatron_core_0_19():
    assert_refused_before_megatron_core_0_19(ARCH, _config)
