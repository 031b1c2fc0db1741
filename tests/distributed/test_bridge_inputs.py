"""Config and tensors of an HF checkpoint are checked before conversion, and every failure names both sides.

- config.json: required fields checked as written (transformers would fill in defaults), an unsupported
  architecture detected before transformers is asked, the config checked against the tensors' shapes.
- tensors: an unused HF tensor fails the import (named) unless allowed; an integer tensor where a float weight
  belongs is named; an error inside a mapping or an op carries the HF name(s), the Megatron name and the file, on
  import and on export.

Real transformers checkpoints (tiny configs, fixed seed) and real megatron-core in one spawned 1-rank gloo world.
"""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch

pytest.importorskip("megatron.core")
transformers = pytest.importorskip("transformers")

from safetensors.torch import load_file, save_file  # noqa: E402

from megatron_bridge_ext.launch import spawn_local  # noqa: E402
from megatron_bridge_ext.testing.tiny_models import tiny_hf_model  # noqa: E402

BASE = dict(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=8, max_position_embeddings=64, tie_word_embeddings=False)
WEIGHTS = "model.safetensors"


def _llama(path: str, **overrides) -> str:
    tiny_hf_model("Llama", {**BASE, **overrides}, seed=0).save_pretrained(path)
    return path


def _copy(src: str, dst: str) -> str:
    shutil.copytree(src, dst)
    return dst


def _edit_config(path: str, drop=(), **changes) -> str:
    p = os.path.join(path, "config.json")
    cfg = json.load(open(p))
    for k in drop:
        cfg.pop(k, None)
    cfg.update(changes)
    json.dump(cfg, open(p, "w"))
    return path


def _edit_tensors(path: str, drop=(), **changes) -> str:
    f = os.path.join(path, WEIGHTS)
    tensors = load_file(f)
    for k in drop:
        del tensors[k]
    tensors.update({k.replace("__", "."): v for k, v in changes.items()})
    save_file(tensors, f, metadata={"format": "pt"})
    return path


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    return _llama(str(tmp_path_factory.mktemp("inputs") / "good"))


def _open(path):
    from megatron_bridge_ext import AutoBridge

    return AutoBridge.from_hf_pretrained(path)


# ---- config.json, checked in the parent process (no Megatron model is built) ---------------------------------------


@pytest.mark.parametrize("field", ["num_attention_heads", "hidden_size", "num_hidden_layers", "vocab_size",
                                   "intermediate_size"])
def test_missing_required_field_is_named_before_transformers_defaults(good, tmp_path, field):
    path = _edit_config(_copy(good, str(tmp_path / "c")), drop=[field])
    with pytest.raises(ValueError) as e:
        _open(path)
    msg = str(e.value)
    assert os.path.join(path, "config.json") in msg and repr(field) in msg and "LlamaBridge" in msg


@pytest.mark.parametrize("value", ["32", 32.0, True, 0, -4])
def test_required_field_must_be_a_positive_integer(good, tmp_path, value):
    path = _edit_config(_copy(good, str(tmp_path / "c")), hidden_size=value)
    with pytest.raises(ValueError, match=r"positive integers for \['hidden_size'\], config.json has \{'hidden_size': "
                                         + repr(value).replace("(", r"\(")):
        _open(path)


def test_unsupported_architecture_is_detected_before_transformers(good, tmp_path):
    # model_type "foo" is unknown to transformers too: its own error would not list what the bridge supports
    path = _edit_config(_copy(good, str(tmp_path / "c")), architectures=["FooForCausalLM"], model_type="foo")
    with pytest.raises(ValueError) as e:
        _open(path)
    msg = str(e.value)
    assert "FooForCausalLM" in msg and "LlamaForCausalLM" in msg and "MixtralForCausalLM" in msg
    assert "config.json" in msg
    path = _edit_config(path, drop=["architectures"])
    with pytest.raises(ValueError, match=r"'architectures' is None"):
        _open(path)


def test_layer_count_disagreeing_with_the_tensors(good, tmp_path):
    path = _edit_config(_copy(good, str(tmp_path / "fewer")), num_hidden_layers=1)
    with pytest.raises(ValueError) as e:
        _open(path)
    msg = str(e.value)
    assert "num_hidden_layers = 1" in msg and "layers 0-1" in msg and "model.layers.1." in msg and WEIGHTS in msg
    path = _edit_config(_copy(good, str(tmp_path / "more")), num_hidden_layers=3)
    with pytest.raises(ValueError, match=r"num_hidden_layers = 3, but the tensors hold decoder layers 0-1 \(layers 2 "
                                         r"are missing\)"):
        _open(path)


def test_vocabulary_rows_disagreeing_with_the_tensors(good, tmp_path):
    path = _edit_config(_copy(good, str(tmp_path / "c")), vocab_size=100)
    with pytest.raises(ValueError) as e:
        _open(path)
    msg = str(e.value)
    assert "vocab_size = 100" in msg and "model.embed_tokens.weight" in msg and "[96, 32]" in msg and WEIGHTS in msg


def test_heads_times_head_dim_disagreeing_with_the_tensors(good, tmp_path):
    path = _edit_config(_copy(good, str(tmp_path / "c")), head_dim=16)
    with pytest.raises(ValueError) as e:
        _open(path)
    msg = str(e.value)
    assert "num_attention_heads 4 x head_dim 16 = 64 rows" in msg and "q_proj.weight" in msg and "[32, 32]" in msg
    path = _edit_config(_copy(good, str(tmp_path / "kv")), num_key_value_heads=4)
    with pytest.raises(ValueError, match=r"num_key_value_heads 4 x head_dim 8 = 32 rows .*k_proj.weight .*\[16, 32\]"):
        _open(path)


@pytest.fixture(scope="module")
def mixtral(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("inputs") / "mixtral")
    tiny_hf_model("Mixtral", {**BASE, "num_local_experts": 2, "num_experts_per_tok": 1}, seed=0).save_pretrained(path)
    return path


def test_expert_count_disagreeing_with_the_tensors(mixtral, tmp_path):
    path = _edit_config(_copy(mixtral, str(tmp_path / "c")), num_local_experts=4)
    with pytest.raises(ValueError) as e:
        _open(path)
    msg = str(e.value)
    assert "4 experts per layer" in msg and "experts 0-1" in msg and "block_sparse_moe.experts.1." in msg


def test_mixtral_needs_its_expert_fields(mixtral, tmp_path):
    path = _edit_config(_copy(mixtral, str(tmp_path / "c")), drop=["num_experts_per_tok"])
    with pytest.raises(ValueError, match=r"MixtralBridge needs \['num_experts_per_tok'\]"):
        _open(path)


# ---- tensors: one spawned world ------------------------------------------------------------------------------------


def _capture(fn):
    try:
        fn()
    except Exception as e:  # the parent asserts on type and message
        return type(e).__name__, str(e)
    return None, None


def _worker(rank: int, world: int, paths: dict, out_root: str) -> dict:
    from megatron_bridge_ext.mcore.cpu_compat import apply_cpu_patches

    apply_cpu_patches()
    from megatron_bridge_ext.auto_bridge import AutoBridge
    from megatron_bridge_ext.mappings import GatedMLPMapping
    from megatron_bridge_ext.mcore.model_builder import destroy_parallel, init_parallel

    init_parallel(tp=1, pp=1)
    fp32 = dict(params_dtype=torch.float32)
    res = {}
    extra = AutoBridge.from_hf_pretrained(paths["extra"])
    res["extra"] = _capture(lambda: extra.to_megatron_model(**fp32))
    res["extra_allowed"] = _capture(lambda: extra.to_megatron_model(allowed_unused_hf_params=["*.extra.weight"],
                                                                    **fp32))
    inv = AutoBridge.from_hf_pretrained(paths["inv_freq"])
    res["inv_freq_default"] = _capture(lambda: inv.to_megatron_model(**fp32))
    res["inv_freq_strict"] = _capture(lambda: inv.to_megatron_model(allowed_unused_hf_params=[], **fp32))
    edited = AutoBridge.from_hf_pretrained(paths["inv_freq_edited"])
    res["inv_freq_edited"] = _capture(lambda: edited.to_megatron_model(**fp32))
    res["inv_freq_edited_allowed"] = _capture(lambda: edited.to_megatron_model(
        allowed_unused_hf_params=["*.rotary_emb.inv_freq"], **fp32))
    res["inv_freq_edited_bf16"] = _capture(lambda: AutoBridge.from_hf_pretrained(paths["inv_freq_bf16"])
                                           .to_megatron_model(**fp32))
    res["bias_unused"] = _capture(lambda: AutoBridge.from_hf_pretrained(paths["bias"]).to_megatron_model(**fp32))
    res["int_weight"] = _capture(lambda: AutoBridge.from_hf_pretrained(paths["int"]).to_megatron_model(**fp32))
    res["int_stream"] = _capture(lambda: list(AutoBridge.from_hf_pretrained(paths["int"]).model_bridge
                                              .stream_weights_hf_to_megatron(
                                                  AutoBridge.from_hf_pretrained(paths["int"]).hf_pretrained,
                                                  extra.to_megatron_model(load_weights=False, **fp32))))

    # an op / mapping raising mid-conversion: the error carries HF names, the Megatron name and the file
    good = AutoBridge.from_hf_pretrained(paths["good"])
    original_in, original_out = GatedMLPMapping.hf_to_megatron, GatedMLPMapping.megatron_to_hf

    def failing_in(self, hf, ctx, out=None):
        if ".1." in self.megatron_param:
            raise RuntimeError("injected op failure")
        return original_in(self, hf, ctx, out=out)

    GatedMLPMapping.hf_to_megatron = failing_in
    try:
        res["op_import"] = _capture(lambda: good.to_megatron_model(**fp32))
    finally:
        GatedMLPMapping.hf_to_megatron = original_in
    chunks = good.to_megatron_model(**fp32)

    def failing_out(self, shards, ctx):
        raise ValueError("injected unpack failure")

    GatedMLPMapping.megatron_to_hf = failing_out
    try:
        res["op_export"] = _capture(lambda: list(good.export_hf_weights(chunks, show_progress=False)))
    finally:
        GatedMLPMapping.megatron_to_hf = original_out
    destroy_parallel()
    return res


@pytest.fixture(scope="module")
def tensor_results(good, tmp_path_factory):
    root = tmp_path_factory.mktemp("inputs_tensors")
    paths = {"good": good}
    paths["extra"] = _edit_tensors(_copy(good, str(root / "extra")),
                                   model__layers__0__mlp__extra__weight=torch.ones(4))
    # what the config's rope settings give (rope_theta 10000, head_dim 8), written out independently of transformers
    inv_freq = (1.0 / (10000.0 ** (torch.arange(0, 8, 2, dtype=torch.float64) / 8))).to(torch.float32)
    paths["inv_freq"] = _edit_tensors(_copy(good, str(root / "inv_freq")),
                                      model__layers__0__self_attn__rotary_emb__inv_freq=inv_freq)
    edited = inv_freq.clone()
    edited[3] *= 1.5  # the lowest frequency edited
    paths["inv_freq_edited"] = _edit_tensors(_copy(good, str(root / "inv_freq_edited")),
                                             model__layers__0__self_attn__rotary_emb__inv_freq=edited)
    paths["inv_freq_bf16"] = _edit_tensors(_copy(good, str(root / "inv_freq_bf16")),
                                           model__rotary_emb__inv_freq=(inv_freq * 2).to(torch.bfloat16))
    paths["bias"] = _edit_tensors(_copy(good, str(root / "bias")), model__layers__1__self_attn__q_proj__bias=torch.ones(32))
    norm = load_file(os.path.join(good, WEIGHTS))["model.norm.weight"]
    paths["int"] = _edit_tensors(_copy(good, str(root / "int")), model__norm__weight=norm.to(torch.int32))
    return spawn_local(_worker, 1, (paths, str(root / "out")), timeout=300)[0]


def test_unused_hf_tensor_fails_the_import_by_name(tensor_results):
    kind, msg = tensor_results["extra"]
    assert kind == "ValueError"
    assert "model.layers.0.mlp.extra.weight" in msg and WEIGHTS in msg and "allowed_unused_hf_params" in msg
    assert tensor_results["extra_allowed"] == (None, None)


def test_known_non_weights_are_allowed_by_default_and_can_be_refused(tensor_results):
    """A stored inv_freq equal to the config's is dropped silently; allowed_unused_hf_params=[] refuses it."""
    assert tensor_results["inv_freq_default"] == (None, None)
    kind, msg = tensor_results["inv_freq_strict"]
    assert kind == "ValueError" and "model.layers.0.self_attn.rotary_emb.inv_freq" in msg


def test_edited_rotary_frequencies_are_named_with_the_largest_deviation(tensor_results):
    """An inv_freq that differs from what the config's rope settings give would convert into another model: the
    import fails naming it, its file and the largest deviation (the edited entry: 1e-3 * 0.5); an explicit pattern
    drops it on purpose. A bf16 one (all entries doubled) is named as well."""
    kind, msg = tensor_results["inv_freq_edited"]
    assert kind == "ValueError", msg
    assert "model.layers.0.self_attn.rotary_emb.inv_freq" in msg and WEIGHTS in msg, msg
    deviation = float(msg.split("largest deviation ")[1].split(" ")[0])
    assert deviation == pytest.approx(0.5 * 10000.0 ** -0.75, rel=1e-6), msg
    assert tensor_results["inv_freq_edited_allowed"] == (None, None)
    kind, msg = tensor_results["inv_freq_edited_bf16"]
    assert kind == "ValueError" and "model.rotary_emb.inv_freq" in msg and "largest deviation 1 " in msg, msg


def test_bias_the_config_does_not_use_is_named(tensor_results):
    kind, msg = tensor_results["bias_unused"]
    assert kind == "ValueError" and "model.layers.1.self_attn.q_proj.bias" in msg


def test_integer_tensor_for_a_float_weight_is_named(tensor_results):
    for key in ("int_weight", "int_stream"):
        kind, msg = tensor_results[key]
        assert kind == "ValueError", (key, msg)
        assert "model.norm.weight" in msg and "int32 (integer)" in msg and "decoder.final_layernorm.weight" in msg
        assert "float32 (floating)" in msg and WEIGHTS in msg


def test_error_inside_an_op_names_hf_megatron_and_file(tensor_results):
    kind, msg = tensor_results["op_import"]
    assert kind == "RuntimeError" and "injected op failure" in msg
    assert "model.layers.1.mlp.gate_proj.weight" in msg and "model.layers.1.mlp.up_proj.weight" in msg
    assert "decoder.layers.1.mlp.linear_fc1.weight" in msg and WEIGHTS in msg
    kind, msg = tensor_results["op_export"]
    assert kind == "ValueError" and "injected unpack failure" in msg
    assert "decoder.layers.0.mlp.linear_fc1.weight" in msg and "model.layers.0.mlp.gate_proj.weight" in msg
