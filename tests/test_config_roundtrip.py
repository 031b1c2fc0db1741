"""Config translation both ways: HF config -> Megatron GPTConfig -> HF config.json. transformers builds a model from
the regenerated config; with the original model's weights its logits equal the original model's (torch.equal), so
every field that changes the forward survived the round trip."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("megatron.core")
transformers = pytest.importorskip("transformers")

from megatron_bridge_ext.dispatch import get_model_bridge  # noqa: E402
import megatron_bridge_ext.models  # noqa: E402,F401  (registers the bridges)

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
    "mixtral": ("Mixtral", dict(num_local_experts=4, num_experts_per_tok=2)),
}


def _model(arch: str, overrides: dict):
    config = getattr(transformers, f"{arch}Config")(**{**TINY, **overrides})
    torch.manual_seed(0)
    model = getattr(transformers, f"{arch}ForCausalLM")(config).float().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(1.0 if "norm" in name else 0.0, 0.1 if "norm" in name or name.endswith("bias") else 0.2)
    return model


@pytest.mark.parametrize("case", sorted(CASES))
def test_hf_megatron_hf_config_gives_the_same_model(case):
    arch, overrides = CASES[case]
    model = _model(arch, overrides)
    bridge = get_model_bridge(f"{arch}ForCausalLM")
    megatron_config = bridge.transformer_config(model.config)
    regenerated = bridge.megatron_to_hf_config(megatron_config)
    assert regenerated["architectures"] == [f"{arch}ForCausalLM"]
    config2 = transformers.AutoConfig.for_model(**regenerated)
    assert type(config2) is type(model.config)
    model2 = transformers.AutoModelForCausalLM.from_config(config2).float().eval()
    missing, unexpected = model2.load_state_dict(model.state_dict(), strict=True)
    ids = torch.randint(0, TINY["vocab_size"], (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = model(ids, use_cache=False).logits
        got = model2(ids, use_cache=False).logits
    assert torch.equal(got, want), (got - want).abs().max().item()
    # and the Megatron config of the regenerated HF config is the same again
    again = bridge.transformer_config(config2)
    for field in ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups",
                  "kv_channels", "layernorm_epsilon", "rotary_base", "rope_scaling", "rope_scaling_factor",
                  "seq_len_interpolation_factor", "share_embeddings_and_output_weights", "vocab_size",
                  "add_bias_linear", "add_qkv_bias", "num_moe_experts", "moe_router_topk", "params_dtype"):
        assert getattr(again, field) == getattr(megatron_config, field), field


def test_megatron_config_without_vocab_size_is_refused():
    bridge = get_model_bridge("LlamaForCausalLM")
    cfg = bridge.transformer_config(_model("Llama", {}).config)
    cfg.vocab_size = None
    with pytest.raises(ValueError, match="vocab_size"):
        bridge.megatron_to_hf_config(cfg)
