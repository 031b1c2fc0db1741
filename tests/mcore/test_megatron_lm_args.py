"""Megatron-LM's ``args`` namespace, both ways (``megatron_bridge_ext.mcore.megatron_lm_args``).

- The generated table of Megatron-LM's argument defaults equals what the live parser of ``megatron.training`` gives
  (run in an interpreter whose megatron-core ships it: this one or one of ``MBE_MCORE_PYTHONS``; Python 3.11 gets
  ``typing.override`` from ``typing_extensions`` there, as megatron.training needs it).
- The stored namespace holds every argument the parser defines, with the model's values where the model decides.
- A NemotronH (hybrid) model's args carry its layer pattern and Mamba sizes under Megatron-LM's names, which
  Megatron-LM's own ``core_transformer_config_from_args`` reads back as the model's (where ``megatron.training``
  imports).
- Every family's config (the config round-trip test's cases) written as args and read back (``--hf-architecture``)
  is the same config, field for field; a family with features no Megatron-LM argument carries (Gemma's post norms and
  soft-caps, GPT-OSS's YaRN factor, DeepSeek-V3's latent-norm epsilon) is refused, naming the feature and
  ``--hf-source``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("megatron.core")
transformers = pytest.importorskip("transformers")

from megatron_bridge_ext.mcore.versions import MEGATRON_CORE_0_19, unmet_megatron_core  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
_LIVE = r"""
import json, sys, typing, enum
if not hasattr(typing, "override"):
    import typing_extensions
    typing.override = typing_extensions.override
from megatron_bridge_ext.mcore.megatron_lm_args import _live_defaults
from megatron_bridge_ext.mcore.versions import megatron_core_minor
live = _live_defaults()
assert live is not None, "megatron.training.arguments does not import"
enc = lambda v: v.name if isinstance(v, enum.Enum) else v
print(json.dumps({"version": megatron_core_minor(), "defaults": {k: enc(v) for k, v in live.items()}}))
"""


def _python_with_training():
    code = "import importlib.util, sys; sys.exit(0 if importlib.util.find_spec('megatron.training') else 1)"
    for python in [sys.executable] + os.environ.get("MBE_MCORE_PYTHONS", "").split():
        if python and os.path.exists(python) and subprocess.run([python, "-c", code]).returncode == 0:
            return python
    return None


def test_the_table_equals_the_live_megatron_lm_parser():
    from megatron_bridge_ext.mcore.megatron_lm_arg_defaults import DEFAULTS
    from megatron_bridge_ext.mcore.megatron_lm_args import _Enum

    python = _python_with_training()
    if python is None:
        pytest.skip("no interpreter with megatron.training (megatron-core >= 0.19) here or in MBE_MCORE_PYTHONS")
    proc = subprocess.run([python, "-c", _LIVE], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    live = json.loads(proc.stdout.strip().splitlines()[-1])
    table = DEFAULTS[live["version"]]
    got = {k: (v.name if isinstance(v, _Enum) else v) for k, v in table.items()}
    assert got == live["defaults"]


def _configs():
    sys.path.insert(0, HERE)
    from test_megatron_checkpoint_io import _family_configs

    return _family_configs()


def test_the_stored_namespace_has_every_argument_and_the_models_values():
    from megatron_bridge_ext.auto_bridge import AutoBridge
    from megatron_bridge_ext.mcore.megatron_lm_args import megatron_lm_defaults, megatron_lm_namespace

    arch, hf = _configs()["qwen3_moe"]
    config = AutoBridge.from_architecture(arch).model_bridge.transformer_config(hf, params_dtype=torch.bfloat16)
    defaults, source = megatron_lm_defaults()
    for spec, impl in (("te", "transformer_engine"), ("local", "local")):
        args = vars(megatron_lm_namespace(config, {"tp": 2, "pp": 1, "ep": 2, "world": 4}, spec=spec))
        assert set(defaults) <= set(args), (source, sorted(set(defaults) - set(args))[:10])
        assert args["transformer_impl"] == impl
    assert (args["num_layers"], args["hidden_size"], args["num_attention_heads"]) == (
        config.num_layers, config.hidden_size, config.num_attention_heads)
    assert args["num_experts"] == config.num_moe_experts and args["moe_ffn_hidden_size"] == config.moe_ffn_hidden_size
    assert args["moe_layer_freq"] == list(config.moe_layer_freq) and args["qk_layernorm"] is True
    assert args["bf16"] and args["params_dtype"] == torch.bfloat16 and args["swiglu"]
    assert args["expert_model_parallel_size"] == 2 and args["data_parallel_size"] == 2
    assert args["no_save_optim"] and args["no_save_rng"] and args["iteration"] == 0
    # defaults where the model does not decide, as Megatron-LM's parser gives them
    assert args["global_batch_size"] == defaults["global_batch_size"]
    assert args["data_parallel_random_init"] is False and args["tokenizer_type"] is None


MUST_READ_BACK = ("llama", "llama_tied_llama3", "qwen2", "mixtral", "mistral_window", "qwen3_sliding_layers", "phi3",
                  "qwen3_moe", "qwen2_moe", "deepseek_v3_no_q_lora", "glm4_moe", "glm4_moe_lite")


def test_every_family_reads_back_from_its_args_or_is_refused_by_name():
    from megatron_bridge_ext.auto_bridge import AutoBridge
    from megatron_bridge_ext.mcore.checkpoint import config_from_megatron_lm_args
    from megatron_bridge_ext.mcore.config import config_to_dict
    from megatron_bridge_ext.mcore.megatron_lm_args import megatron_lm_namespace

    read, refused = [], {}
    for case, (arch, hf) in _configs().items():
        bridge = AutoBridge.from_architecture(arch).model_bridge
        config = bridge.transformer_config(hf)
        args = megatron_lm_namespace(config, {"tp": 1, "pp": 1, "world": 1})
        try:
            back = config_from_megatron_lm_args(args, bridge, where=case)
        except ValueError as e:
            refused[case] = str(e)
            continue
        a, b = config_to_dict(config), config_to_dict(back)
        diff = {k: (a.get(k), b.get(k)) for k in set(a) | set(b)
                if a.get(k) != b.get(k) and k not in ("init_method", "output_layer_init_method",
                                                      "embedding_init_method")}
        assert not diff, (case, diff)
        read.append(case)
    assert set(MUST_READ_BACK) <= set(read), sorted(set(MUST_READ_BACK) - set(read))
    for case, message in refused.items():
        assert "--hf-source" in message and case.split("_")[0] in ("gemma2", "gemma3", "gpt", "deepseek"), message
    assert any("post_self_attn_layernorm" in m for m in refused.values())
    assert any("YaRN" in m for m in refused.values()) and any("latent_layernorm_epsilon" in m for m in refused.values())


def test_args_that_disagree_with_the_family_are_refused_naming_both():
    from megatron_bridge_ext.auto_bridge import AutoBridge
    from megatron_bridge_ext.mcore.checkpoint import args_disagreements, config_from_megatron_lm_args
    from megatron_bridge_ext.mcore.megatron_lm_args import megatron_lm_namespace

    arch, hf = _configs()["llama"]
    bridge = AutoBridge.from_architecture(arch).model_bridge
    config = bridge.transformer_config(hf)
    args = megatron_lm_namespace(config, {"tp": 1, "pp": 1, "world": 1})
    args.qk_layernorm = True  # a Llama has no q/k norms: the family cannot say it
    with pytest.raises(ValueError, match=r"describe different models: qk_layernorm: args True, config False"):
        config_from_megatron_lm_args(args, bridge, where="ckpt")
    args.qk_layernorm, args.num_query_groups = False, config.num_query_groups * 2
    assert args_disagreements(args, config) == [
        f"num_query_groups: args {config.num_query_groups * 2}, config {config.num_query_groups}"]


# NemotronH's Megatron-LM reference: megatron.training's own translation of the stored args (run where it imports; no
# Transformer Engine here, so its RoPE fusion, a run-time switch its config checks for TE, is turned off)
_HYBRID_LIVE = r"""
import pickle, sys, typing
if not hasattr(typing, "override"):
    import typing_extensions
    typing.override = typing_extensions.override
from megatron.training.argument_utils import core_transformer_config_from_args
from megatron.training.utils import is_hybrid_model
with open(sys.argv[1], "rb") as f:
    args = pickle.load(f)
args.apply_rope_fusion = False
tc = core_transformer_config_from_args(args)
fields = ("is_hybrid_model", "mamba_state_dim", "mamba_head_dim", "mamba_num_groups", "mamba_num_heads", "num_layers",
          "hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups", "kv_channels", "normalization",
          "layernorm_epsilon", "gated_linear_unit", "add_bias_linear")
out = {f: getattr(tc, f) for f in fields}
out.update(activation=tc.activation_func.__name__, is_hybrid_model_args=is_hybrid_model(args))
print("RESULT", repr(out))
"""


def _nemotron_h_config(chunk_size: int = 128):
    sys.path.insert(0, os.path.join(os.path.dirname(HERE), "distributed"))
    import test_nemotron_h as nemotron_h

    from megatron_bridge_ext.auto_bridge import AutoBridge

    hf = transformers.NemotronHConfig(**{**nemotron_h._config("hybrid"), "chunk_size": chunk_size})
    bridge = AutoBridge.from_architecture("NemotronHForCausalLM").model_bridge
    return bridge, bridge.transformer_config(hf), nemotron_h.CHECKPOINTS["hybrid"]["pattern"]


HYBRID_ARGS = ("hybrid_layer_pattern", "is_hybrid_model", "mamba_state_dim", "mamba_head_dim", "mamba_num_groups",
               "mamba_num_heads")


@pytest.mark.skipif(bool(unmet_megatron_core(MEGATRON_CORE_0_19)),
                    reason="megatron-core < 0.19 has no HybridModel (NemotronH is refused by name there)")
def test_hybrid_args_describe_the_nemotron_h_model(tmp_path):
    """The stored args of a NemotronH model: every argument Megatron-LM's parser defines, the hybrid ones
    (``hybrid_layer_pattern``, which makes Megatron-LM build a ``HybridModel``, and the Mamba sizes) among them with
    the model's values; Megatron-LM's own ``core_transformer_config_from_args`` reads them as the model's sizes; the
    config reads back from them (``--hf-architecture``), the scan chunk aside (no Megatron-LM argument: megatron's
    default, 128)."""
    import pickle

    from megatron_bridge_ext.mcore.checkpoint import args_disagreements, config_from_megatron_lm_args
    from megatron_bridge_ext.mcore.config import config_to_dict
    from megatron_bridge_ext.mcore.megatron_lm_args import megatron_lm_defaults, megatron_lm_namespace

    bridge, config, pattern = _nemotron_h_config()
    defaults, source = megatron_lm_defaults()
    args = megatron_lm_namespace(config, {"tp": 1, "pp": 1, "world": 1})
    assert set(HYBRID_ARGS) <= set(defaults), (source, sorted(set(HYBRID_ARGS) - set(defaults)))
    assert set(defaults) <= set(vars(args))
    assert args.hybrid_layer_pattern == pattern and args.is_hybrid_model is True and args.num_layers == len(pattern)
    assert args.hybrid_override_pattern is None and args.squared_relu and not args.swiglu
    assert (args.mamba_state_dim, args.mamba_head_dim, args.mamba_num_groups, args.mamba_num_heads) == (
        config.mamba_state_dim, config.mamba_head_dim, config.mamba_num_groups, config.mamba_num_heads)
    assert (args.mamba_num_heads, args.mamba_num_groups) != (defaults["mamba_num_heads"], defaults["mamba_num_groups"])

    python = _python_with_training()
    if python is not None:
        with open(tmp_path / "args.pkl", "wb") as f:
            pickle.dump(args, f)
        proc = subprocess.run([python, "-c", _HYBRID_LIVE, str(tmp_path / "args.pkl")], capture_output=True,
                              text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        got = eval(proc.stdout.split("RESULT", 1)[1].strip())  # noqa: S307  (our own subprocess's repr of plain data)
        assert got.pop("activation") == "squared_relu" and got.pop("is_hybrid_model_args") is True
        assert got == {k: getattr(config, k) for k in got}, got

    back = config_from_megatron_lm_args(args, bridge, where="ckpt")
    a, b = config_to_dict(config), config_to_dict(back)
    diff = {k: (a.get(k), b.get(k)) for k in set(a) | set(b) if a.get(k) != b.get(k)}
    assert diff == {}, diff
    _, chunk8, _ = _nemotron_h_config(chunk_size=8)
    assert config_from_megatron_lm_args(megatron_lm_namespace(chunk8, {"tp": 1, "pp": 1, "world": 1}), bridge,
                                        where="ckpt").mamba_chunk_size == 128

    args.mamba_num_heads = config.mamba_num_heads * 2
    assert args_disagreements(args, config) == [
        f"mamba_num_heads: args {config.mamba_num_heads * 2}, config {config.mamba_num_heads}"]
    args.mamba_num_heads, args.hybrid_layer_pattern = config.mamba_num_heads, None  # a GPT's args
    assert f"hybrid_layer_pattern: args None, config {pattern!r}" in args_disagreements(args, config)
    args.hybrid_override_pattern = pattern  # the older Megatron-LM name is read too
    assert args_disagreements(args, config) == []
