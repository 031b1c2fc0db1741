"""The pieces of Megatron checkpoints that need no world: the stored model config (GPTConfig <-> plain data) and the
reading of a checkpoint root (tracker, iteration directory) with its errors."""

from __future__ import annotations

import dataclasses
import json
import os
import sys

import pytest
import torch

pytest.importorskip("megatron.core")
transformers = pytest.importorskip("transformers")

from megatron_bridge_ext.io import megatron_checkpoint as ckpt_io  # noqa: E402

CONFIGS = {
    "LlamaForCausalLM": transformers.LlamaConfig(
        vocab_size=1003, hidden_size=128, intermediate_size=352, num_hidden_layers=4, num_attention_heads=8,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=256, tie_word_embeddings=True,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 8192}, dtype="bfloat16"),
    "Qwen2ForCausalLM": transformers.Qwen2Config(
        vocab_size=151, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64),
    "MixtralForCausalLM": transformers.MixtralConfig(
        vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, num_local_experts=4, num_experts_per_tok=2),
}
DERIVED = {"init_method", "output_layer_init_method", "embedding_init_method"}


def _family_configs():
    """Our three configs and every case of the config round-trip test (all supported families and features)."""
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "models"))
    from test_config_roundtrip import ARCH, CASES, TINY  # tests/models/test_config_roundtrip.py

    out = {f"{arch}": (arch, cfg) for arch, cfg in CONFIGS.items()}
    for case, (prefix, overrides) in CASES.items():
        kw = {k: v for k, v in {**TINY, **overrides}.items() if v is not None or k != "head_dim"}
        out[case] = (f"{ARCH.get(prefix, prefix)}ForCausalLM", getattr(transformers, f"{prefix}Config")(**kw))
    return out


FAMILY_CONFIGS = _family_configs()


@pytest.mark.parametrize("case", sorted(FAMILY_CONFIGS))
def test_config_round_trips_through_plain_data(case):
    from megatron_bridge_ext.auto_bridge import AutoBridge
    from megatron_bridge_ext.mcore.config import config_from_dict, config_to_dict

    arch, hf_config = FAMILY_CONFIGS[case]
    bridge = AutoBridge.from_architecture(arch).model_bridge
    # GPT-OSS's expert biases need expert-TP 1 (megatron-core 0.16.1), which otherwise follows TP
    layout = {"tensor_model_parallel_size": 2, **({"expert_tensor_parallel_size": 1}
                                                  if arch == "GptOssForCausalLM" else {})}
    config = bridge.transformer_config(hf_config, **layout)
    data = config_to_dict(config)
    data = json.loads(json.dumps(data))  # plain data: survives JSON (and torch.load(weights_only=True))
    assert "tensor_model_parallel_size" not in data
    back = config_from_dict(data, layout)
    for f in dataclasses.fields(config):
        if f.name not in DERIVED:
            assert getattr(back, f.name) == getattr(config, f.name), f.name
    at_tp1 = config_from_dict(data, {"tensor_model_parallel_size": 1})
    assert at_tp1.tensor_model_parallel_size == 1 and at_tp1.num_layers == config.num_layers


def test_config_from_dict_refuses_unknown_fields_and_foreign_functions():
    from megatron_bridge_ext.mcore.config import config_from_dict

    with pytest.raises(ValueError, match="no_such_field"):
        config_from_dict({"num_layers": 2, "hidden_size": 8, "num_attention_heads": 2, "no_such_field": 1})
    with pytest.raises(ValueError, match="refusing to import"):
        config_from_dict({"num_layers": 2, "hidden_size": 8, "num_attention_heads": 2,
                          "activation_func": {"__callable__": "os:system"}})


def test_reading_a_checkpoint_root_names_what_is_wrong(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ckpt_io.resolve_checkpoint(str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match="latest_checkpointed_iteration.txt"):
        ckpt_io.resolve_checkpoint(str(tmp_path))
    (tmp_path / "latest_checkpointed_iteration.txt").write_text("seven\n")
    with pytest.raises(ValueError, match="'seven'"):
        ckpt_io.read_tracker(str(tmp_path))
    (tmp_path / "latest_checkpointed_iteration.txt").write_text("12\n")
    assert ckpt_io.read_tracker(str(tmp_path)) == (12, False)
    with pytest.raises(FileNotFoundError, match="iter_0000012 does not exist"):
        ckpt_io.resolve_checkpoint(str(tmp_path))
    (tmp_path / "iter_0000012").mkdir()
    with pytest.raises(FileNotFoundError, match="not a distributed"):
        ckpt_io.resolve_checkpoint(str(tmp_path))
    (tmp_path / "iter_0000012" / "metadata.json").write_text('{"sharded_backend": "torch_dist"}')
    assert ckpt_io.resolve_checkpoint(str(tmp_path)) == (str(tmp_path / "iter_0000012"), 12)
    assert ckpt_io.resolve_checkpoint(str(tmp_path / "iter_0000012")) == (str(tmp_path / "iter_0000012"), 12)
    (tmp_path / "latest_checkpointed_iteration.txt").write_text("release")
    assert ckpt_io.read_tracker(str(tmp_path)) == (0, True)


def test_megatron_lm_args_carry_what_training_checks():
    from megatron_bridge_ext.auto_bridge import AutoBridge
    from megatron_bridge_ext.mcore.checkpoint import megatron_lm_args

    bridge = AutoBridge.from_architecture("MixtralForCausalLM").model_bridge
    config = bridge.transformer_config(CONFIGS["MixtralForCausalLM"], params_dtype=torch.bfloat16)
    args = megatron_lm_args(config, {"tp": 2, "pp": 1, "ep": 2, "world": 4})
    assert (args.num_layers, args.hidden_size, args.num_attention_heads, args.num_query_groups) == (2, 64, 4, 2)
    assert args.num_experts == 4 and args.moe_router_topk == 2 and args.moe_ffn_hidden_size == 96
    assert args.expert_model_parallel_size == 2 and args.data_parallel_size == 2 and args.bf16
    assert args.make_vocab_size_divisible_by == 32 and args.padded_vocab_size == 128  # 96 up to a multiple of 32*tp
    assert args.no_save_optim and args.no_save_rng and args.ckpt_format == "torch_dist"
    assert args.swiglu and args.group_query_attention and args.transformer_impl == "transformer_engine"
    # what Megatron-LM stores for a rope model trained without --no-position-embedding (its Llama 3 example)
    assert args.add_position_embedding and args.position_embedding_type == "rope"


def test_export_checks_that_the_hf_source_describes_the_checkpoint():
    from megatron_bridge_ext.auto_bridge import AutoBridge
    from megatron_bridge_ext.cli.export import check_source_agrees
    from megatron_bridge_ext.mcore.config import config_to_dict

    bridge = AutoBridge.from_architecture("LlamaForCausalLM").model_bridge
    stored = config_to_dict(bridge.transformer_config(CONFIGS["LlamaForCausalLM"]))
    info = ckpt_io.MegatronCheckpointInfo(path="/ckpt/iter_0000000", iteration=0, checkpoint_version=3.0,
                                          model_keys=["model"], architecture="LlamaForCausalLM",
                                          model_config=stored, parallel={}, hf_config=None, args=None)
    same = dict(stored, params_dtype={"__dtype__": "float32"})  # another dtype is fine: export casts
    check_source_agrees(info, same, "LlamaForCausalLM", "/src")
    other = transformers.LlamaConfig(**{**CONFIGS["LlamaForCausalLM"].to_dict(), "num_hidden_layers": 3})
    with pytest.raises(ValueError, match=r"num_layers: checkpoint 4, source 3"):
        check_source_agrees(info, config_to_dict(bridge.transformer_config(other)), "LlamaForCausalLM", "/src")
    with pytest.raises(ValueError, match="is a MixtralForCausalLM"):
        check_source_agrees(info, stored, "MixtralForCausalLM", "/src")
