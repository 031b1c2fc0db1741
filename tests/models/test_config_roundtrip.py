"""Config translation both ways: HF config -> Megatron GPTConfig -> HF config.json. transformers builds a model from
the regenerated config; with the original model's weights its logits equal the original model's (within
``SAME_MODEL_ATOL``: same class, same weights, only the kernels' reduction order may differ), so every field that
changes the forward survived the round trip. The smallest such change, a norm epsilon off by 2x, moves the logits by
far more than that tolerance (``test_the_tolerance_sees_a_changed_norm_epsilon``)."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("megatron.core")
transformers = pytest.importorskip("transformers")

from megatron_bridge_ext.dispatch import get_model_bridge  # noqa: E402
from megatron_bridge_ext.mcore.versions import MEGATRON_CORE_0_19, unmet_megatron_core  # noqa: E402
import megatron_bridge_ext.models  # noqa: E402,F401  (registers the bridges)
from megatron_bridge_ext.testing.parity import config_round_trip  # noqa: E402
from megatron_bridge_ext.testing.tolerances import SAME_MODEL_ATOL, max_abs_diff  # noqa: E402

TINY = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, max_position_embeddings=128, rms_norm_eps=3e-6,
            initializer_range=0.03)
LLAMA3 = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
          "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
CASES = {
    "llama": ("Llama", dict(rope_parameters={"rope_type": "default", "rope_theta": 30000.0})),
    "llama_tied_llama3": ("Llama", dict(tie_word_embeddings=True, rope_parameters=LLAMA3)),
    "llama_linear_rope_bias": ("Llama", dict(attention_bias=True, mlp_bias=True,
                                             rope_parameters={"rope_type": "linear", "factor": 2.0,
                                                              "rope_theta": 10000.0})),
    "qwen2": ("Qwen2", dict(rope_parameters={"rope_type": "default", "rope_theta": 1000000.0})),
    "qwen2_sliding_layers": ("Qwen2", dict(use_sliding_window=True, sliding_window=5, max_window_layers=1)),
    "mixtral": ("Mixtral", dict(num_local_experts=4, num_experts_per_tok=2)),
    "mixtral_window": ("Mixtral", dict(num_local_experts=4, num_experts_per_tok=2, sliding_window=5)),
    "mistral_window": ("Mistral", dict(sliding_window=5, rope_parameters={"rope_type": "default",
                                                                          "rope_theta": 20000.0})),
    "mistral_no_window": ("Mistral", dict(sliding_window=None)),
    "qwen3": ("Qwen3", dict(head_dim=24)),
    "qwen3_sliding_layers": ("Qwen3", dict(head_dim=24, use_sliding_window=True, sliding_window=5,
                                           max_window_layers=1)),
    "gemma2": ("Gemma2", dict(attn_logit_softcapping=None, final_logit_softcapping=None, query_pre_attn_scalar=24,
                              sliding_window=5)),
    "gemma2_untied_gelu": ("Gemma2", dict(attn_logit_softcapping=None, final_logit_softcapping=None,
                                          tie_word_embeddings=False, hidden_activation="gelu", sliding_window=5,
                                          layer_types=["full_attention"] * 2)),
    # Gemma 2's defaults: attention / final soft-caps 50.0 / 30.0, as every released checkpoint
    "gemma2_released_caps": ("Gemma2", dict(query_pre_attn_scalar=24, sliding_window=5)),
    "gemma2_small_caps_untied": ("Gemma2", dict(attn_logit_softcapping=2.5, final_logit_softcapping=1.25,
                                                tie_word_embeddings=False, sliding_window=5)),
    # transformers runs Gemma 3's attention capping only in eager / flex attention (sdpa refuses a softcap)
    "gemma3_caps": ("Gemma3Text", dict(sliding_window=5, layer_types=["sliding_attention", "full_attention"],
                                       attn_logit_softcapping=4.0, final_logit_softcapping=2.0,
                                       attn_implementation="eager")),
    "gemma3": ("Gemma3Text", dict(sliding_window=5, query_pre_attn_scalar=20,
                                  layer_types=["sliding_attention", "full_attention"],
                                  rope_parameters={"full_attention": {"rope_type": "linear", "factor": 2.0,
                                                                      "rope_theta": 1000000.0},
                                                   "sliding_attention": {"rope_type": "default",
                                                                         "rope_theta": 10000.0}})),
    "gemma3_one_rope": ("Gemma3Text", dict(sliding_window=5, layer_types=["full_attention", "sliding_attention"],
                                           rope_parameters={"full_attention": {"rope_type": "default",
                                                                               "rope_theta": 10000.0},
                                                            "sliding_attention": {"rope_type": "default",
                                                                                  "rope_theta": 10000.0}})),
    "phi3_partial_rotary_window": ("Phi3", dict(head_dim=None, sliding_window=7, pad_token_id=None,
                                                rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                                                 "partial_rotary_factor": 0.5})),
    "phi3": ("Phi3", dict(head_dim=None, pad_token_id=None)),
    "qwen3_moe": ("Qwen3Moe", dict(num_experts=6, num_experts_per_tok=2, moe_intermediate_size=32,
                                   norm_topk_prob=True, mlp_only_layers=[1])),
    "qwen3_moe_window_sparse_step": ("Qwen3Moe", dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                                                      decoder_sparse_step=2, use_sliding_window=True,
                                                      sliding_window=5)),
    "qwen2_moe": ("Qwen2Moe", dict(num_experts=6, num_experts_per_tok=2, moe_intermediate_size=32,
                                   shared_expert_intermediate_size=48)),
    "qwen2_moe_norm_topk_no_bias": ("Qwen2Moe", dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                                                     shared_expert_intermediate_size=48, norm_topk_prob=True,
                                                     qkv_bias=False)),
    "deepseek_v3_yarn": ("DeepseekV3", dict(
        head_dim=None, num_key_value_heads=4, n_routed_experts=6, num_experts_per_tok=2, moe_intermediate_size=32,
        n_group=2, topk_group=1, first_k_dense_replace=1, q_lora_rank=24, kv_lora_rank=16, qk_rope_head_dim=8,
        qk_nope_head_dim=16, v_head_dim=12, n_shared_experts=2, routed_scaling_factor=2.5,
        rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                         "original_max_position_embeddings": 16, "beta_fast": 32.0, "beta_slow": 1.0,
                         "mscale": 1.0, "mscale_all_dim": 1.0})),
    "deepseek_v3_no_q_lora": ("DeepseekV3", dict(
        head_dim=None, num_key_value_heads=4, n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
        n_group=1, topk_group=1, first_k_dense_replace=0, q_lora_rank=None, kv_lora_rank=16, qk_rope_head_dim=8,
        qk_nope_head_dim=16, v_head_dim=16, n_shared_experts=1, rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "default", "rope_theta": 50000.0})),
    "glm4_moe": ("Glm4Moe", dict(n_routed_experts=6, num_experts_per_tok=2, moe_intermediate_size=32,
                                 first_k_dense_replace=1, attention_bias=True, use_qk_norm=True, n_shared_experts=1,
                                 routed_scaling_factor=1.5,
                                 rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                                  "partial_rotary_factor": 0.5})),
    # MLA + GLM-4.5's router, an MoE layer before a dense one; norms at the latent norms' 1e-6 (Megatron-LM's args
    # read it back: tests/mcore/test_megatron_lm_args.py)
    "glm4_moe_lite": ("Glm4MoeLite", dict(
        head_dim=None, num_key_value_heads=4, n_routed_experts=6, num_experts_per_tok=2, moe_intermediate_size=32,
        q_lora_rank=24, kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=16, v_head_dim=12, n_shared_experts=1,
        routed_scaling_factor=1.8, rms_norm_eps=1e-6, mlp_layer_types=["sparse", "dense"],
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0})),
    "gpt_oss": ("GptOss", dict(intermediate_size=32, num_local_experts=6, num_experts_per_tok=2, sliding_window=4,
                               swiglu_limit=1.5,
                               rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                                                "beta_fast": 32.0, "beta_slow": 1.0, "truncate": False,
                                                "original_max_position_embeddings": 16})),
}
# gated delta-net families (megatron-core >= 0.19; below it they are refused: tests/distributed/test_qwen3_next.py)
GDN = dict(layer_types=["linear_attention", "full_attention"], linear_conv_kernel_dim=3, linear_key_head_dim=8,
           linear_value_head_dim=12, linear_num_key_heads=2, linear_num_value_heads=4,
           rope_parameters={"rope_type": "default", "rope_theta": 50000.0, "partial_rotary_factor": 0.5})
if unmet_megatron_core(MEGATRON_CORE_0_19) is None:
    CASES.update({
        "qwen3_next": ("Qwen3Next", dict(GDN, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                                         shared_expert_intermediate_size=48, mlp_only_layers=[1],
                                         norm_topk_prob=False)),
        "qwen3_5": ("Qwen3_5Text", dict(GDN)),
        "qwen3_5_moe": ("Qwen3_5MoeText", dict(GDN, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                                               shared_expert_intermediate_size=48)),
    })
# HF class prefix -> architecture (Gemma 3's text-only config class is Gemma3TextConfig)
ARCH = {"Gemma3Text": "Gemma3", "Qwen3_5Text": "Qwen3_5", "Qwen3_5MoeText": "Qwen3_5Moe"}


FIELDS = ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups", "kv_channels",
          "layernorm_epsilon", "rotary_base", "rope_scaling", "rope_scaling_factor", "seq_len_interpolation_factor",
          "share_embeddings_and_output_weights", "vocab_size", "add_bias_linear", "add_qkv_bias", "num_moe_experts",
          "moe_router_topk", "params_dtype", "window_size", "window_attn_skip_freq", "qk_layernorm",
          "layernorm_zero_centered_gamma", "softmax_scale", "embedding_scale", "post_self_attn_layernorm",
          "post_mlp_layernorm", "local_rotary_base", "rotary_percent", "activation_func", "gated_linear_unit",
          "moe_ffn_hidden_size", "moe_layer_freq", "moe_router_score_function", "moe_router_pre_softmax",
          "moe_router_enable_expert_bias", "moe_router_topk_scaling_factor", "moe_router_num_groups",
          "moe_router_group_topk", "moe_shared_expert_intermediate_size", "moe_shared_expert_gate", "softmax_type",
          "glu_linear_offset", "activation_func_clamp_value", "position_embedding_type", "attn_logit_softcapping",
          "final_logit_softcapping")
# compared where the Megatron config has them
MLA_YARN_FIELDS = ("q_lora_rank", "kv_lora_rank", "qk_head_dim", "qk_pos_emb_head_dim", "v_head_dim", "rope_type",
                   "rotary_scaling_factor", "mscale", "mscale_all_dim", "beta_fast", "beta_slow",
                   "original_max_position_embeddings", "latent_layernorm_epsilon", "yarn_rotary_scaling_factor",
                   "yarn_original_max_position_embeddings", "yarn_beta_fast", "yarn_beta_slow", "yarn_mscale",
                   "yarn_mscale_all_dim", "yarn_correction_range_round_to_int", "attention_output_gate",
                   "experimental_attention_variant", "linear_attention_freq", "linear_conv_kernel_dim",
                   "linear_key_head_dim", "linear_value_head_dim", "linear_num_key_heads", "linear_num_value_heads")


def _model(arch: str, overrides: dict):
    config = getattr(transformers, f"{arch}Config")(**{k: v for k, v in {**TINY, **overrides}.items()
                                                       if v is not None or k != "head_dim"})
    torch.manual_seed(0)
    model = getattr(transformers, f"{ARCH.get(arch, arch)}ForCausalLM")(config).float().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(1.0 if "norm" in name else 0.0, 0.1 if "norm" in name or name.endswith("bias") else 0.2)
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):  # routing depends on it (DeepSeek-V3 / GLM-4.5)
                b.normal_(0.0, 0.1)
    return model


def _logits(model) -> torch.Tensor:
    ids = torch.randint(0, TINY["vocab_size"], (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return model(ids, use_cache=False).logits


def test_the_tolerance_sees_a_changed_norm_epsilon():
    """The negative control of the comparison below: the same weights under a config whose only change is the norm
    epsilon (3e-6 -> 6e-6), the least visible field a round trip could get wrong, differ by more than 10x
    SAME_MODEL_ATOL."""
    model = _model("Llama", CASES["llama"][1])
    config2 = transformers.AutoConfig.for_model(**{**model.config.to_dict(), "rms_norm_eps": 6e-6})
    model2 = transformers.LlamaForCausalLM(config2).float().eval()
    model2.load_state_dict(model.state_dict(), strict=True)
    assert model.config.rms_norm_eps == 3e-6
    diff = max_abs_diff(_logits(model2), _logits(model))
    assert diff > 10 * SAME_MODEL_ATOL, f"max |logit diff| {diff:.3e}"


@pytest.mark.parametrize("case", sorted(CASES))
def test_hf_megatron_hf_config_gives_the_same_model(case):
    arch, overrides = CASES[case]
    model = _model(arch, overrides)
    rt = config_round_trip(model, get_model_bridge(f"{ARCH.get(arch, arch)}ForCausalLM"),
                           attn_implementation=model.config._attn_implementation)
    assert rt.regenerated["architectures"] == [f"{ARCH.get(arch, arch)}ForCausalLM"]
    assert type(rt.config) is type(model.config)
    assert rt.logit_diff <= SAME_MODEL_ATOL, f"max |logit diff| {rt.logit_diff:.3e}"  # same class and weights
    # and the Megatron config of the regenerated HF config is the same again (MLA / YaRN fields included)
    assert rt.changed(FIELDS) == []
    assert rt.changed([f for f in MLA_YARN_FIELDS if hasattr(rt.megatron, f)]) == []


def test_megatron_config_without_vocab_size_is_refused():
    bridge = get_model_bridge("LlamaForCausalLM")
    cfg = bridge.transformer_config(_model("Llama", {}).config)
    cfg.vocab_size = None
    with pytest.raises(ValueError, match="vocab_size"):
        bridge.megatron_to_hf_config(cfg)
