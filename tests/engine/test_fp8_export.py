"""FP8 export settings and their refusals, without a world: ``quantization`` / ``quantization_rule`` /
``quantization_block_size`` on ``save_hf_pretrained``, ``WeightSyncPlan``, ``export_checkpoint`` and the ``export``
command are checked before anything is read, exchanged or written, and each refusal names the setting and the value;
which HF tensors are quantized; the refusal of a weight that cannot be quantized. The exports themselves are tested in
``tests/distributed/test_bridge_fp8_export.py`` and ``tests/cli/test_converter_cli.py``."""

from __future__ import annotations

import os

import pytest
import torch

from megatron_bridge_ext.engine.quantize import FP8Export, export_quantization

BAD = [
    (dict(quantization="int4"), "quantization='int4'"),
    (dict(quantization="FP8"), "quantization='FP8'"),
    (dict(quantization="fp8", quantization_rule="nearest"), "quantization_rule='nearest'"),
    (dict(quantization="fp8", quantization_block_size=(0, 128)), "quantization_block_size=(0, 128)"),
    (dict(quantization="fp8", quantization_block_size=(128,)), "quantization_block_size=(128,)"),
    (dict(quantization="fp8", quantization_block_size=(128, 128, 1)), "quantization_block_size=(128, 128, 1)"),
    (dict(quantization="fp8", quantization_block_size=(128, -1)), "quantization_block_size=(128, -1)"),
    (dict(quantization="fp8", quantization_block_size=(128.0, 128)), "quantization_block_size=(128.0, 128)"),
    (dict(quantization_rule="deepseek"), "'quantization_rule': 'deepseek'"),
]
IDS = [m.split("=")[-1].strip("'") if "=" in m else "rule-alone" for _, m in BAD]


def _args(kw):
    return kw.get("quantization"), kw.get("quantization_rule"), kw.get("quantization_block_size")


@pytest.mark.parametrize("kw,message", BAD, ids=IDS)
def test_bad_settings_are_refused_naming_the_value(kw, message):
    with pytest.raises(ValueError) as e:
        export_quantization(*_args(kw), where="somewhere")
    assert message in str(e.value) and str(e.value).startswith("somewhere:")


def test_the_defaults():
    assert export_quantization(None) is None
    q = export_quantization("fp8")
    assert (q.rule, q.block_size, q.dtype) == ("transformers", (128, 128), torch.float8_e4m3fn)
    assert export_quantization("fp8", "deepseek", [64, 32]).block_size == (64, 32)


@pytest.mark.parametrize("kw,message", BAD[:1] + BAD[2:4], ids=IDS[:1] + IDS[2:4])
def test_save_hf_pretrained_refuses_before_writing(tmp_path, kw, message):
    pytest.importorskip("megatron.core")
    from megatron_bridge_ext.auto_bridge import AutoBridge

    bridge = AutoBridge.from_architecture("LlamaForCausalLM")
    out = tmp_path / "out"
    with pytest.raises(ValueError, match="save_hf_pretrained") as e:
        bridge.save_hf_pretrained([], out, **kw)  # refused before the model is looked at
    assert message in str(e.value)
    with pytest.raises(ValueError, match="export_hf_weights"):
        bridge.export_hf_weights([], **kw)
    assert os.listdir(tmp_path) == []  # no output, no staging directory


@pytest.mark.parametrize("kw,message", BAD[:1] + BAD[2:4], ids=IDS[:1] + IDS[2:4])
def test_weight_sync_plan_refuses_before_building(kw, message):
    pytest.importorskip("megatron.core")
    from megatron_bridge_ext.auto_bridge import AutoBridge
    from megatron_bridge_ext.engine import WeightSyncPlan

    with pytest.raises(ValueError, match="WeightSyncPlan") as e:
        WeightSyncPlan(AutoBridge.from_architecture("LlamaForCausalLM").model_bridge, [], **kw)
    assert message in str(e.value)


def test_export_command_refuses_before_reading(tmp_path, capsys):
    pytest.importorskip("megatron.core")
    from megatron_bridge_ext.cli import main
    from megatron_bridge_ext.cli.export import export_checkpoint

    meg, out = str(tmp_path / "no_such_checkpoint"), str(tmp_path / "out")
    with pytest.raises(ValueError, match="quantization='int4'"):  # before the missing checkpoint is noticed
        export_checkpoint(meg, out, quantization="int4")
    with pytest.raises(SystemExit) as e:
        main(["export", meg, out, "--quantize", "int4"])
    assert e.value.code == 2 and "'int4'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["export", meg, out, "--quantize", "fp8", "--quantize-rule", "nearest"])
    assert "'nearest'" in capsys.readouterr().err
    assert main(["export", meg, out, "--quantize", "fp8", "--quantize-block-size", "0", "128"]) != 0
    assert "quantization_block_size=(0, 128)" in capsys.readouterr().err
    assert main(["export", meg, out, "--quantize-rule", "deepseek"]) != 0  # a rule without --quantize
    assert "without a quantization" in capsys.readouterr().err
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("name,shape,quantized", [
    ("model.layers.0.self_attn.q_proj.weight", (64, 64), True),
    ("model.layers.0.self_attn.kv_a_proj_with_mqa.weight", (576, 7168), True),
    ("model.layers.3.mlp.experts.17.down_proj.weight", (64, 24), True),
    ("model.layers.3.mlp.shared_experts.gate_proj.weight", (24, 64), True),
    ("model.layers.61.eh_proj.weight", (64, 128), True),
    ("model.embed_tokens.weight", (97, 64), False),
    ("model.layers.61.embed_tokens.weight", (97, 64), False),
    ("lm_head.weight", (97, 64), False),
    ("model.layers.61.shared_head.head.weight", (97, 64), False),
    ("model.layers.0.input_layernorm.weight", (64,), False),
    ("model.layers.0.self_attn.kv_a_layernorm.weight", (16,), False),
    ("model.layers.3.mlp.gate.weight", (8, 64), False),
    ("model.layers.3.mlp.gate.e_score_correction_bias", (8,), False),
    ("model.layers.0.block_sparse_moe.gate.weight", (8, 64), False),
    ("model.layers.0.mlp.router.weight", (8, 64), False),
    ("model.layers.0.mlp.shared_expert_gate.weight", (1, 64), False),
    ("model.layers.0.self_attn.q_proj.bias", (64,), False),
    ("model.layers.3.mlp.experts.gate_up_proj", (8, 48, 64), False),
    ("model.layers.0.self_attn.sinks", (4,), False),
])
def test_which_tensors_are_quantized(name, shape, quantized):
    q = FP8Export()
    assert q.quantizes(name, shape) is quantized
    specs = q.expand_specs({name: (shape, torch.bfloat16)})
    if quantized:
        scales = (-(-shape[0] // 128), -(-shape[1] // 128))
        assert specs == {name: (shape, torch.float8_e4m3fn), name + "_scale_inv": (scales, torch.float32)}
    else:
        assert specs == {name: (shape, torch.bfloat16)}


def test_deepseeks_partial_edge_blocks():
    assert FP8Export().scale_shape((576, 7168)) == (5, 56)  # DeepSeek-V3's kv_a_proj_with_mqa


def test_modules_to_not_convert_names_the_kept_modules():
    kept = [("model.embed_tokens.weight", (97, 64)), ("model.norm.weight", (64,)),
            ("model.layers.3.mlp.gate.weight", (8, 64)), ("model.layers.4.mlp.gate.weight", (8, 64)),
            ("model.layers.3.mlp.experts.gate_up_proj", (8, 48, 64)),
            ("model.layers.0.self_attn.q_proj.weight", (64, 64))]
    qc = FP8Export(block_size=(64, 32)).hf_config(kept)
    assert qc == {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8", "weight_block_size": [64, 32],
                  "modules_to_not_convert": ["embed_tokens", "lm_head", "mlp.experts", "mlp.gate"]}


def test_a_weight_that_cannot_be_quantized_is_refused_by_name():
    q = FP8Export()
    w = torch.randn(300, 200, dtype=torch.bfloat16)
    w[150, 7] = float("inf")
    with pytest.raises(ValueError, match=r"model\.layers\.0\.mlp\.down_proj\.weight \(300, 200\).*block \[1, 0\]"):
        q.convert("model.layers.0.mlp.down_proj.weight", w)
    with pytest.raises(ValueError, match=r"o_proj\.weight \(4, 4\): its dtype is torch\.int8"):
        q.convert("model.layers.0.self_attn.o_proj.weight", torch.zeros(4, 4, dtype=torch.int8))
    with pytest.raises(ValueError, match="already hold model.x.weight_scale_inv"):
        q.expand_specs({"model.x.weight": ((4, 4), torch.bfloat16), "model.x.weight_scale_inv": ((1, 1), torch.float32)})
