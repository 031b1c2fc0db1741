"""Bad inputs to the conversion engine raise errors that name the tensor, the file or the setting; a failed export
leaves no index that looks complete. Real megatron-core and transformers, one spawned 1-rank gloo world."""

from __future__ import annotations

import json
import os
import shutil
import warnings

import pytest
import torch

pytest.importorskip("megatron.core")
transformers = pytest.importorskip("transformers")

from megatron_bridge_ext.launch import spawn_local  # noqa: E402
from megatron_bridge_ext.testing.tiny_models import tiny_hf_model  # noqa: E402

BASE = dict(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=8, max_position_embeddings=64, tie_word_embeddings=False)


# the opt-in layouts of megatron-core 0.17-0.19 (mcore/versions.py): setting -> a value that turns it on
OPT_IN = {
    "moe_single_grouped_weight": True,
    "moe_single_grouped_bias": True,
    "moe_mlp_glu_interleave_size": 32,
    "moe_shared_expert_glu_interleave_size": 32,
    "mla_down_proj_fusion": True,
    "tensor_parallel_num_weight_shards": 2,
    "expert_tensor_parallel_num_weight_shards": 2,
    "use_grouped_gemm_for_dense_mlp": True,
    "mtp_use_repeated_layer": True,  # with mtp_num_layers=2 (below): one layer per depth in HF
}


def _make(path: str, **overrides) -> str:
    tiny_hf_model("Llama", {**BASE, **overrides}, seed=0).save_pretrained(path)
    return path


def _rewrite_config(path: str, **changes) -> None:
    cfg_path = os.path.join(path, "config.json")
    cfg = json.load(open(cfg_path))
    cfg.update(changes)
    json.dump(cfg, open(cfg_path, "w"))


def _drop_tensor(path: str, key: str) -> None:
    from safetensors.torch import load_file, save_file

    f = os.path.join(path, "model.safetensors")
    tensors = load_file(f)
    del tensors[key]
    save_file(tensors, f, metadata={"format": "pt"})


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
    from megatron_bridge_ext.mcore.model_builder import destroy_parallel, init_parallel

    init_parallel(tp=1, pp=1)
    res = {}
    res["missing_key"] = _capture(lambda: AutoBridge.from_hf_pretrained(paths["missing"]).to_megatron_model(
        params_dtype=torch.float32))
    res["unsupported"] = _capture(lambda: AutoBridge.from_hf_pretrained(paths["unsupported"]))
    res["truncated"] = _capture(lambda: AutoBridge.from_hf_pretrained(paths["truncated"]).to_megatron_model(
        params_dtype=torch.float32))
    res["corrupt_header"] = _capture(lambda: AutoBridge.from_hf_pretrained(paths["corrupt"]).to_megatron_model(
        params_dtype=torch.float32))

    # shape mismatch: the model is built for a larger MLP than the checkpoint holds
    good = AutoBridge.from_hf_pretrained(paths["good"])
    res["shape"] = _capture(lambda: good.to_megatron_model(params_dtype=torch.float32, ffn_hidden_size=96))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        chunks = good.to_megatron_model(params_dtype=torch.float32, ffn_hidden_size=96,
                                        allowed_mismatched_params=["decoder.layers.*.mlp.linear_fc*.weight"])
    res["allowed_warnings"] = [str(w.message) for w in caught if "allowed_mismatched_params" in str(w.message)]
    del chunks

    # heads not divisible by TP (setting named)
    res["heads_tp"] = _capture(lambda: good.transformer_config(tensor_model_parallel_size=4, num_attention_heads=6))
    res["groups_tp"] = _capture(lambda: good.transformer_config(tensor_model_parallel_size=4, num_query_groups=3,
                                                                num_attention_heads=12, kv_channels=4))
    # layers the pipeline stages cannot share evenly (megatron-core asserts at the build, naming neither size)
    res["layers_pp"] = _capture(lambda: good.transformer_config(pipeline_model_parallel_size=3))
    res["layers_vpp"] = _capture(lambda: good.transformer_config(pipeline_model_parallel_size=2,
                                                                 virtual_pipeline_model_parallel_size=4))

    # the opt-in layouts of megatron-core 0.17-0.19 this package does not convert: refused at import (the override)
    # and at export (a model whose config carries the setting), naming it and what to do instead
    chunks = good.to_megatron_model(params_dtype=torch.float32)
    config = chunks[0].config
    for name, value in OPT_IN.items():
        extra = {"mtp_num_layers": 2} if name == "mtp_use_repeated_layer" else {}
        res[f"optin_import_{name}"] = _capture(lambda: good.to_megatron_model(params_dtype=torch.float32,
                                                                              **{name: value}, **extra))
        saved = {k: (hasattr(config, k), getattr(config, k, None)) for k in (name, *extra)}
        for k, v in {name: value, **extra}.items():
            setattr(config, k, v)
        res[f"optin_export_{name}"] = _capture(lambda: list(good.export_hf_weights(chunks)))
        for k, (had, before) in saved.items():
            if had:
                setattr(config, k, before)
            else:
                delattr(config, k)
    res["optin_export_after"] = len(list(good.export_hf_weights(chunks)))  # the model itself still exports

    # a failed export: a hook raises in the middle; no index / complete checkpoint may remain
    calls = {"n": 0}
    original = good.model_bridge.maybe_modify_converted_hf_weight

    def failing(task, converted):
        calls["n"] += 1
        if calls["n"] == 6:
            raise RuntimeError("simulated failure while exporting " + task.global_param_name)
        return original(task, converted)

    good.model_bridge.maybe_modify_converted_hf_weight = failing
    out = os.path.join(out_root, "failed_export")
    res["failed_export"] = _capture(lambda: good.save_hf_pretrained(chunks, out, max_shard_bytes=16 * 1024))
    res["failed_export_files"] = sorted(os.listdir(out)) if os.path.isdir(out) else []
    good.model_bridge.maybe_modify_converted_hf_weight = original
    destroy_parallel()
    return res


@pytest.fixture(scope="module")
def errors(tmp_path_factory):
    root = tmp_path_factory.mktemp("bridge_errors")
    good = _make(str(root / "good"))
    paths = {"good": good}
    paths["missing"] = str(root / "missing")
    shutil.copytree(good, paths["missing"])
    _drop_tensor(paths["missing"], "model.layers.1.mlp.up_proj.weight")
    paths["unsupported"] = str(root / "unsupported")
    shutil.copytree(good, paths["unsupported"])
    _rewrite_config(paths["unsupported"], architectures=["FooForCausalLM"])
    paths["truncated"] = str(root / "truncated")
    shutil.copytree(good, paths["truncated"])
    f = os.path.join(paths["truncated"], "model.safetensors")
    os.truncate(f, os.path.getsize(f) - 1000)
    paths["corrupt"] = str(root / "corrupt")
    shutil.copytree(good, paths["corrupt"])
    with open(os.path.join(paths["corrupt"], "model.safetensors"), "r+b") as fh:
        fh.seek(8)
        fh.write(b"#not json#")
    return spawn_local(_worker, 1, (paths, str(root / "out")), timeout=300)[0]


def test_missing_hf_tensor_is_named(errors):
    kind, msg = errors["missing_key"]
    assert kind == "ValueError" and "model.layers.1.mlp.up_proj.weight" in msg


def test_unsupported_architecture_lists_supported(errors):
    kind, msg = errors["unsupported"]
    assert kind == "ValueError" and "FooForCausalLM" in msg and "LlamaForCausalLM" in msg


def test_truncated_file_is_named(errors):
    kind, msg = errors["truncated"]
    assert kind is not None and "model.safetensors" in msg


def test_corrupt_header_is_named(errors):
    kind, msg = errors["corrupt_header"]
    assert kind is not None and "model.safetensors" in msg


def test_shape_mismatch_names_both_shapes(errors):
    kind, msg = errors["shape"]
    assert kind == "ValueError"
    assert "linear_fc1.weight" in msg and "(192, 32)" in msg and "(128, 32)" in msg


def test_allowed_mismatch_warns_and_skips(errors):
    assert len(errors["allowed_warnings"]) == 4  # fc1 and fc2 of two layers
    assert all("allowed" in w for w in errors["allowed_warnings"])


def test_heads_not_divisible_by_tp(errors):
    kind, msg = errors["heads_tp"]
    assert kind == "ValueError" and "num_attention_heads (6)" in msg and "tensor_model_parallel_size (4)" in msg
    kind, msg = errors["groups_tp"]
    assert kind == "ValueError" and "num_query_groups (3" in msg and "tensor_model_parallel_size (4)" in msg


def test_layers_not_divisible_by_pipeline_stages(errors):
    kind, msg = errors["layers_pp"]
    assert kind == "ValueError" and "num_layers (2, HF num_hidden_layers)" in msg and \
        "pipeline_model_parallel_size (3) x virtual_pipeline_model_parallel_size (1)" in msg, msg
    kind, msg = errors["layers_vpp"]
    assert kind == "ValueError" and "pipeline_model_parallel_size (2) x virtual_pipeline_model_parallel_size (4)" in \
        msg, msg


def test_failed_export_leaves_no_complete_looking_checkpoint(errors):
    kind, msg = errors["failed_export"]
    assert kind == "RuntimeError" and "simulated failure" in msg
    files = errors["failed_export_files"]
    assert "model.safetensors.index.json" not in files
    assert "model.safetensors" not in files
    assert not any(f.endswith(".tmp") or ".tmp-" in f for f in files), files


@pytest.mark.parametrize("name", sorted(OPT_IN))
def test_opt_in_layouts_are_refused_at_import_and_export(errors, name):
    """Each opt-in layout of megatron-core 0.17-0.19 that renames or reshapes parameters is refused, naming the setting
    and what to do instead, whether the installed megatron-core has the setting or not: at import (an override of
    to_megatron_model) and at export (a model whose config carries it)."""
    for where in ("import", "export"):
        kind, msg = errors[f"optin_{where}_{name}"]
        assert kind == "ValueError", (where, kind, msg)
        assert name in msg and "does not convert" in msg and "convert with" in msg, (where, msg)
    assert errors["optin_export_after"] == 3 + 9 * 2
