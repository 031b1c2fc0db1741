"""Kimi-K2's released config.json through the DeepSeek-V3 family (``tests/kimi_k2_checkpoints.py``).

transformers has no ``kimi_k2`` config class, and the release's ``auto_map`` points at Python files in the checkpoint,
which this package never runs: ``io.hf_checkpoint.hf_config_of`` reads the config.json with DeepSeek-V3's class
(``CONFIG_ALIASES``). The Megatron config made from it is checked field by field against the released values (the
expected numbers are the release's, read from :data:`RELEASED`, not computed by the code under test), and the reverse
translation gives back every field the forward depends on.
"""

from __future__ import annotations

import json
import os

import pytest

pytest.importorskip("megatron.core")
transformers = pytest.importorskip("transformers")

import sys  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from kimi_k2_checkpoints import RELEASED, TRAP  # noqa: E402

from megatron_bridge_ext.dispatch import get_model_bridge  # noqa: E402
from megatron_bridge_ext.io.hf_checkpoint import hf_config_of  # noqa: E402
import megatron_bridge_ext.models  # noqa: E402,F401  (registers the bridges)


@pytest.fixture
def released(tmp_path):
    """A directory holding Kimi-K2-Instruct's config.json and trapped copies of its code files (no weights)."""
    with open(tmp_path / "config.json", "w") as f:
        json.dump(RELEASED, f)
    for name in ("configuration_deepseek.py", "modeling_deepseek.py"):
        (tmp_path / name).write_text(TRAP.format(name=name))
    return str(tmp_path)


def test_transformers_alone_does_not_read_the_release(released):
    """Without the alias, transformers refuses the config (unknown model type, remote code not trusted)."""
    with pytest.raises(ValueError, match="custom code|trust_remote_code"):
        transformers.AutoConfig.from_pretrained(released, local_files_only=True, trust_remote_code=False)


def test_release_reads_as_deepseek_v3_without_its_code(released):
    config = hf_config_of(released)
    assert type(config) is transformers.DeepseekV3Config
    for field in ("n_routed_experts", "num_experts_per_tok", "n_shared_experts", "first_k_dense_replace",
                  "q_lora_rank", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim",
                  "routed_scaling_factor", "num_hidden_layers", "hidden_size", "vocab_size", "rms_norm_eps"):
        assert getattr(config, field) == RELEASED[field], field
    rope = config.rope_parameters
    assert rope["rope_type"] == "yarn" and rope["rope_theta"] == RELEASED["rope_theta"]
    for field in ("factor", "original_max_position_embeddings", "beta_fast", "beta_slow", "mscale",
                  "mscale_all_dim"):
        assert rope[field] == RELEASED["rope_scaling"][field], field
    assert not hasattr(config, "auto_map") or not config.auto_map  # nothing points at the checkpoint's code


def test_release_to_megatron_and_back(released):
    bridge = get_model_bridge("DeepseekV3ForCausalLM")
    cfg = bridge.transformer_config(hf_config_of(released))
    r, yarn = RELEASED, RELEASED["rope_scaling"]
    want = dict(
        num_layers=r["num_hidden_layers"], hidden_size=r["hidden_size"], num_attention_heads=r["num_attention_heads"],
        ffn_hidden_size=r["intermediate_size"], moe_ffn_hidden_size=r["moe_intermediate_size"],
        num_moe_experts=r["n_routed_experts"], moe_router_topk=r["num_experts_per_tok"],
        moe_shared_expert_intermediate_size=r["n_shared_experts"] * r["moe_intermediate_size"],
        moe_layer_freq=[0] * r["first_k_dense_replace"] + [1] * (r["num_hidden_layers"] - r["first_k_dense_replace"]),
        moe_router_score_function=r["scoring_func"], moe_router_enable_expert_bias=True,
        moe_router_topk_scaling_factor=r["routed_scaling_factor"], multi_latent_attention=True,
        q_lora_rank=r["q_lora_rank"], kv_lora_rank=r["kv_lora_rank"], qk_head_dim=r["qk_nope_head_dim"],
        qk_pos_emb_head_dim=r["qk_rope_head_dim"], v_head_dim=r["v_head_dim"], rotary_base=r["rope_theta"],
        rope_type="yarn", rotary_scaling_factor=yarn["factor"],
        original_max_position_embeddings=yarn["original_max_position_embeddings"], beta_fast=yarn["beta_fast"],
        beta_slow=yarn["beta_slow"], mscale=yarn["mscale"], mscale_all_dim=yarn["mscale_all_dim"],
        layernorm_epsilon=r["rms_norm_eps"], normalization="RMSNorm", gated_linear_unit=True, add_bias_linear=False,
        mtp_num_layers=None,
    )
    got = {k: getattr(cfg, k) for k in want}
    assert got == want
    assert getattr(cfg, "moe_router_num_groups", None) in (None, 1)  # n_group = topk_group = 1: no group routing
    back = bridge.megatron_to_hf_config(cfg)
    for field in ("n_routed_experts", "num_experts_per_tok", "n_shared_experts", "first_k_dense_replace",
                  "q_lora_rank", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim",
                  "routed_scaling_factor", "num_hidden_layers", "hidden_size", "intermediate_size",
                  "moe_intermediate_size", "num_attention_heads", "rms_norm_eps", "tie_word_embeddings"):
        assert back[field] == r[field], (field, back[field], r[field])
    params = back["rope_parameters"]
    assert params["rope_type"] == "yarn" and params["rope_theta"] == r["rope_theta"]
    for field in ("factor", "original_max_position_embeddings", "beta_fast", "beta_slow", "mscale",
                  "mscale_all_dim"):
        assert params[field] == yarn[field], field
