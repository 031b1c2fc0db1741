"""DeepSeek-V3.2 (``DeepseekV32ForCausalLM``) config translation without a process group: HF config -> Megatron
``GPTConfig`` (DeepSeek sparse attention, megatron-core >= 0.19) -> HF config.json gives the same transformers model
(logits within ``SAME_MODEL_ATOL`` with the original weights, the Megatron config of the regenerated HF config equal
again), the released sizes (transformers' defaults for the family) read as transformers builds them, and the named
errors for what either side cannot express. Under megatron-core < 0.19: the named refusal, both ways."""

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

ARCH = "DeepseekV32ForCausalLM"
TINY = dict(TINY_DSA, num_hidden_layers=3, n_group=1, topk_group=1)
YARN = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 16,
        "beta_fast": 32.0, "beta_slow": 1.0}
CASES = {
    "first_dense": dict(rope_parameters={"rope_type": "default", "rope_theta": 10000.0}),
    "all_sparse_grouped_eps": dict(first_k_dense_replace=0, n_group=2, topk_group=1, rms_norm_eps=1e-5,
                                   n_shared_experts=2, routed_scaling_factor=2.5),
    "yarn_mscale": dict(rope_parameters={**YARN, "mscale": 1.0, "mscale_all_dim": 1.0}, index_head_dim=8),
    "yarn_plain_tied": dict(rope_parameters=dict(YARN), tie_word_embeddings=True, index_topk=64),
}
DSA_FIELDS = ("experimental_attention_variant", "dsa_indexer_n_heads", "dsa_indexer_head_dim", "dsa_indexer_topk",
              "dsa_indexer_rope_interleaved", "dsa_indexer_rotate_activation", "dsa_indexer_scoring_relu",
              "dsa_indexer_k_norm_epsilon", "dsa_indexer_k_norm_fp32", "dsa_indexer_topk_freq")


def _config(**overrides):
    return transformers.DeepseekV32Config(**{**TINY, **overrides})


def _model(overrides):
    torch.manual_seed(0)
    model = transformers.DeepseekV32ForCausalLM(_config(**overrides)).float().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(1.0 if "norm.weight" in name or "layernorm" in name else 0.0, 0.1 if "norm" in name else 0.2)
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.normal_(0.0, 0.1)
    return model


@needs_dsa
@pytest.mark.parametrize("case", sorted(CASES))
def test_hf_megatron_hf_config_gives_the_same_model(case):
    model = _model(CASES[case])
    bridge = get_model_bridge(ARCH)
    megatron_config = bridge.transformer_config(model.config)
    assert megatron_config.experimental_attention_variant == "dsa" and megatron_config.multi_latent_attention
    regenerated = bridge.megatron_to_hf_config(megatron_config)
    assert regenerated["architectures"] == [ARCH] and "rope_interleave" not in regenerated
    config2 = transformers.AutoConfig.for_model(**regenerated)
    assert type(config2) is transformers.DeepseekV32Config
    assert config2.mlp_layer_types == model.config.mlp_layer_types
    assert config2.first_k_dense_replace == model.config.first_k_dense_replace
    assert (config2.index_topk, config2.index_head_dim, config2.index_n_heads) == (
        model.config.index_topk, model.config.index_head_dim, model.config.index_n_heads)
    model2 = transformers.AutoModelForCausalLM.from_config(config2).float().eval()
    model2.load_state_dict(model.state_dict(), strict=True)
    diff = max_abs_diff(_logits(model2), _logits(model))
    assert diff <= SAME_MODEL_ATOL, f"max |logit diff| {diff:.3e}"  # same class and weights (tolerances.py)
    again = bridge.transformer_config(config2)
    for field in ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups",
                  "layernorm_epsilon", "latent_layernorm_epsilon", "rotary_base", "share_embeddings_and_output_weights",
                  "q_lora_rank", "kv_lora_rank", "qk_head_dim", "qk_pos_emb_head_dim", "v_head_dim", "rope_type",
                  "rotary_scaling_factor", "mscale", "mscale_all_dim", "num_moe_experts", "moe_router_topk",
                  "moe_layer_freq", "moe_router_num_groups", "moe_router_group_topk",
                  "moe_shared_expert_intermediate_size", *DSA_FIELDS):
        assert getattr(again, field) == getattr(megatron_config, field), field


@needs_dsa
def test_the_released_sizes_read_as_transformers_builds_them():
    """transformers' defaults for the family are DeepSeek-V3.2's sizes; every DSA field is read off the HF config and
    the indexer transformers builds from it (its k_norm epsilon, its head geometry)."""
    hf = transformers.DeepseekV32Config()
    got = get_model_bridge(ARCH).transformer_config(hf)
    with torch.device("meta"):
        indexer = transformers.models.deepseek_v32.modeling_deepseek_v32.DeepseekV32Indexer(hf, 0)
    assert got.experimental_attention_variant == "dsa"
    assert (got.dsa_indexer_n_heads, got.dsa_indexer_head_dim, got.dsa_indexer_topk) == (
        indexer.n_heads, indexer.head_dim, indexer.index_topk) == (64, 128, 2048)
    assert tuple(indexer.wq_b.weight.shape) == (got.dsa_indexer_n_heads * got.dsa_indexer_head_dim, got.q_lora_rank)
    assert got.dsa_indexer_k_norm_epsilon == indexer.k_norm.eps and not got.dsa_indexer_rope_interleaved
    assert got.dsa_indexer_topk_freq == 1 and got.dsa_indexer_scoring_relu and not got.dsa_indexer_rotate_activation
    assert got.moe_layer_freq == [0, 0, 0] + [1] * 58 and got.num_layers == 61
    assert not got.sequence_parallel  # TP 1 here; the bridge turns it on at TP > 1 (test_deepseek_v32.py)


@needs_dsa
@pytest.mark.parametrize("overrides,match", [
    (dict(index_head_dim=4), r"DeepseekV32Bridge: index_head_dim=4 is smaller than qk_rope_head_dim=8"),
    (dict(index_topk=0), r"DeepseekV32Bridge: index_topk=0 must be a positive integer"),
    (dict(mlp_layer_types=["dense", "sparse", "dense"]), r"first_k_dense_replace=1 contradicts mlp_layer_types"),
    (dict(attention_bias=True), r"DeepseekV32Bridge: attention_bias=True is not supported"),
])
def test_hf_settings_without_a_megatron_equivalent_are_refused(overrides, match):
    with pytest.raises(ValueError, match=match):
        get_model_bridge(ARCH).transformer_config(_config(**overrides))


@needs_dsa
@pytest.mark.parametrize("changes,match", [
    (dict(dsa_indexer_rope_interleaved=True), r"dsa_indexer_rope_interleaved': True"),
    (dict(dsa_indexer_scoring_relu=False), r"dsa_indexer_scoring_relu': False"),
    (dict(dsa_indexer_k_norm_epsilon=1e-5), r"dsa_indexer_k_norm_epsilon': 1e-05"),
    (dict(dsa_indexer_k_norm_fp32=True), r"dsa_indexer_k_norm_fp32': True"),
    (dict(moe_layer_freq=[1, 0, 1]), r"HF has dense layers only before the first MoE layer"),
    (dict(add_qkv_bias=True), r"no DeepSeek-V3\.2 equivalent: \{'add_qkv_bias': True\}"),
])
def test_megatron_settings_without_an_hf_equivalent_are_refused(changes, match):
    bridge = get_model_bridge(ARCH)
    config = bridge.transformer_config(_config())
    with pytest.raises(ValueError, match=match):
        bridge.megatron_to_hf_config(dataclasses.replace(config, **changes))


@needs_dsa
def test_a_megatron_model_without_dsa_is_refused():
    bridge = get_model_bridge(ARCH)
    config = bridge.transformer_config(_config())
    with pytest.raises(ValueError, match=r"DeepseekV32Bridge: the Megatron config has "
                                         r"experimental_attention_variant=None, not 'dsa'"):
        bridge.megatron_to_hf_config(dataclasses.replace(config, experimental_attention_variant=None))


@pytest.mark.skipif(HAS_DSA, reason="megatron-core >= 0.19 converts the family (the tests above)")
def test_refused_before_megatron_core_0_19():
    assert_refused_before_megatron_core_0_19(ARCH, _config)


@needs_dsa
def test_megatron_lm_args_carry_the_dsa_settings_and_read_back():
    """The Megatron-LM ``args`` stored with an imported checkpoint carry the DSA fields (what
    ``--use-checkpoint-args`` rebuilds the model from), and a config read back from them (``--hf-architecture``)
    is the same config."""
    from megatron_bridge_ext.mcore.checkpoint import config_from_megatron_lm_args
    from megatron_bridge_ext.mcore.config import config_to_dict
    from megatron_bridge_ext.mcore.megatron_lm_args import megatron_lm_namespace

    bridge = get_model_bridge(ARCH)
    config = bridge.transformer_config(_config(rms_norm_eps=1e-6))
    args = megatron_lm_namespace(config, {"tp": 1, "pp": 1, "world": 1})
    assert args.experimental_attention_variant == "dsa"
    assert (args.dsa_indexer_n_heads, args.dsa_indexer_head_dim, args.dsa_indexer_topk) == (4, 16, 7)
    assert not args.dsa_indexer_rotate_activation and args.dsa_indexer_k_norm_epsilon == 1e-6
    back = config_from_megatron_lm_args(args, bridge, where="deepseek_v32")
    a, b = config_to_dict(config), config_to_dict(back)
    diff = {k: (a.get(k), b.get(k)) for k in set(a) | set(b) if a.get(k) != b.get(k)
            and k not in ("init_method", "output_layer_init_method", "embedding_init_method")}
    assert not diff, diff
