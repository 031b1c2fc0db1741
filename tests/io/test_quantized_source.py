"""``io.quantized``: block-quantized HF checkpoints read as their dequantized tensors, and the checks made on what the
files say before anything is converted (issue #21, items 2 and 5).

Values are compared with plain-torch references of the formats (``tests/reference.py``) and with transformers' own
``convert_moe_packed_tensors``; errors must name the tensor and its file.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

from megatron_bridge_ext.io import SafeTensorsSource
from megatron_bridge_ext.io.quantized import QuantizedSource, open_source, quantization_of
from reference import fp8_dequant, fp8_quant

FP8 = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [8, 16]}
MX = {"quant_method": "mxfp4"}


def _ckpt(path, tensors, config=None):
    os.makedirs(path, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, os.path.join(path, "model.safetensors"))
    raw = {"architectures": ["LlamaForCausalLM"], "torch_dtype": "bfloat16"}
    if config is not None:
        raw["quantization_config"] = config
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(raw, f)
    return path, raw


def _open(path, raw):
    return open_source(SafeTensorsSource(path), raw, os.path.join(path, "config.json"))


def _fp8_pair(shape=(20, 40), block=(8, 16), seed=0):
    w = torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(torch.bfloat16)
    return fp8_quant(w, block)


def test_fp8_checkpoint_reads_as_its_dequantized_weights(tmp_path):
    q, s = _fp8_pair()  # 20 x 40 at 8 x 16 blocks: partial blocks at the bottom and the right edge
    norm = torch.randn(40).to(torch.bfloat16)
    path, raw = _ckpt(str(tmp_path), {"a.weight": q, "a.weight_scale_inv": s, "a.norm.weight": norm}, FP8)
    with _open(path, raw) as src:
        assert isinstance(src, QuantizedSource)
        assert sorted(src.keys()) == ["a.norm.weight", "a.weight"] and "a.weight_scale_inv" not in src
        assert src.dtype("a.weight") == torch.bfloat16 and src.shape("a.weight") == (20, 40)
        assert src.nbytes("a.weight") == 20 * 40 * 2
        assert src.file_of("a.weight").endswith("model.safetensors")
        assert torch.equal(src["a.weight"], fp8_dequant(q, s, (8, 16), torch.bfloat16))
        assert torch.equal(src["a.norm.weight"], norm) and src.dtype("a.norm.weight") == torch.bfloat16
        assert src.is_quantized("a.weight") and not src.is_quantized("a.norm.weight")


def test_fp8_reads_in_the_configs_dtype(tmp_path):
    q, s = _fp8_pair()
    path, raw = _ckpt(str(tmp_path), {"a.weight": q, "a.weight_scale_inv": s}, FP8)
    raw["torch_dtype"] = "float32"
    with _open(path, raw) as src:
        assert src["a.weight"].dtype == torch.float32
        assert torch.equal(src["a.weight"], fp8_dequant(q, s, (8, 16), torch.float32))


def test_mxfp4_checkpoint_reads_as_transformers_dequantizes_it(tmp_path):
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    gen = torch.Generator().manual_seed(1)
    blocks = torch.randint(0, 256, (3, 8, 2, 16), dtype=torch.uint8, generator=gen)  # [E, out, in/32, 16]
    scales = torch.randint(118, 130, (3, 8, 2), dtype=torch.uint8, generator=gen)
    bias = torch.randn(3, 8).to(torch.bfloat16)
    p = "model.layers.0.mlp.experts.gate_up_proj"
    path, raw = _ckpt(str(tmp_path), {p + "_blocks": blocks, p + "_scales": scales, p + "_bias": bias}, MX)
    with _open(path, raw) as src:
        assert sorted(src.keys()) == sorted([p, p + "_bias"])
        assert src.shape(p) == (3, 64, 8) and src.dtype(p) == torch.bfloat16
        want = convert_moe_packed_tensors(blocks, scales, dtype=torch.bfloat16)
        got = src[p]
        assert got.shape == want.shape and torch.equal(got, want)
        assert torch.equal(src[p + "_bias"], bias)


def test_an_unquantized_checkpoint_is_read_as_it_is(tmp_path):
    path, raw = _ckpt(str(tmp_path), {"a.weight": torch.randn(4, 4)})
    src = _open(path, raw)
    assert type(src) is SafeTensorsSource
    src.close()


@pytest.mark.parametrize("config,match", [
    ({"quant_method": "awq"}, r"quant_method = 'awq' is not supported"),
    ({"quant_method": "fp8"}, r"has no weight_block_size: per-tensor FP8 is not supported"),
    ({"quant_method": "fp8", "weight_block_size": [128]}, r"weight_block_size = \[128\], expected two positive"),
    ({"quant_method": "fp8", "weight_block_size": [0, 128]}, r"weight_block_size = \[0, 128\]"),
    ({"quant_method": "fp8", "weight_block_size": [128, 128], "fmt": "e3m4"}, r"fmt = 'e3m4'"),
    ("fp8", r"quantization_config is a str"),
])
def test_bad_quantization_configs_are_refused_by_name(config, match):
    with pytest.raises(ValueError, match=r"config\.json: .*" + match):
        quantization_of({"quantization_config": config}, "/ckpt/config.json")


def _fp8_case(name):
    q, s = _fp8_pair()
    t = {"a.weight": q, "a.weight_scale_inv": s, "b.weight": torch.randn(4, 4).to(torch.bfloat16)}
    if name == "missing_scale":
        del t["a.weight_scale_inv"]
    elif name == "scale_shape":
        t["a.weight_scale_inv"] = s[:, :2].contiguous()
    elif name == "scale_dtype":
        t["a.weight_scale_inv"] = s.to(torch.int32)
    elif name == "nan_scale":
        s = s.clone()
        s[1, 2] = float("nan")
        t["a.weight_scale_inv"] = s
    elif name == "inf_scale":
        s = s.clone()
        s[0, 0] = float("inf")
        t["a.weight_scale_inv"] = s
    elif name == "orphan_scale":
        t["c.weight_scale_inv"] = s.clone()
    elif name == "scale_of_bf16":
        t["b.weight_scale_inv"] = torch.ones(1, 1)
    elif name == "vector":
        t["v"] = torch.zeros(8).to(torch.float8_e4m3fn)
        t["v_scale_inv"] = torch.ones(1)
    return t


@pytest.mark.parametrize("case,match", [
    ("missing_scale", r"tensor 'a\.weight' in .*model\.safetensors: an FP8 weight \(torch\.float8_e4m3fn\) without its "
                      r"block scales 'a\.weight_scale_inv'"),
    ("scale_shape", r"tensor 'a\.weight_scale_inv' in .*model\.safetensors: block scales of shape \[3, 2\] for the FP8 "
                    r"weight 'a\.weight' of shape \[20, 40\]; weight_block_size \[8, 16\] gives \[3, 3\]"),
    ("scale_dtype", r"tensor 'a\.weight_scale_inv' in .*: block scales stored as torch\.int32"),
    ("nan_scale", r"tensor 'a\.weight_scale_inv' in .*model\.safetensors: 1 of its 9 block scales are NaN or Inf"),
    ("inf_scale", r"tensor 'a\.weight_scale_inv' in .*: 1 of its 9 block scales are NaN or Inf"),
    ("orphan_scale", r"tensor 'c\.weight_scale_inv' in .*: a block scale whose weight 'c\.weight' is not in the"),
    ("scale_of_bf16", r"tensor 'b\.weight_scale_inv' in .*: a block scale for 'b\.weight', which is stored as "
                      r"torch\.bfloat16, not as FP8"),
    ("vector", r"tensor 'v' in .*: an FP8 weight of shape \[8\]"),
])
def test_damaged_fp8_checkpoints_are_refused_by_name(tmp_path, case, match):
    path, raw = _ckpt(str(tmp_path), _fp8_case(case), FP8)
    with pytest.raises(ValueError, match=match):
        _open(path, raw)


def test_fp8_tensors_without_a_quantization_config_are_refused(tmp_path):
    q, s = _fp8_pair()
    path, raw = _ckpt(str(tmp_path), {"a.weight": q, "a.weight_scale_inv": s})
    with pytest.raises(ValueError, match=r"tensor 'a\.weight' in .*model\.safetensors is stored as "
                                         r"torch\.float8_e4m3fn, but .*config\.json has no quantization_config"):
        _open(path, raw)


def _mx_case(name):
    blocks = torch.zeros(2, 8, 2, 16, dtype=torch.uint8)
    scales = torch.full((2, 8, 2), 127, dtype=torch.uint8)
    t = {"e.down_proj_blocks": blocks, "e.down_proj_scales": scales}
    if name == "no_scales":
        del t["e.down_proj_scales"]
    elif name == "no_blocks":
        del t["e.down_proj_blocks"]
    elif name == "scale_shape":
        t["e.down_proj_scales"] = scales[:, :4].contiguous()
    elif name == "blocks_dtype":
        t["e.down_proj_blocks"] = blocks.to(torch.int16)
    elif name == "blocks_shape":
        t["e.down_proj_blocks"] = torch.zeros(2, 8, 2, 8, dtype=torch.uint8)
        t["e.down_proj_scales"] = torch.full((2, 8, 2), 127, dtype=torch.uint8)
    elif name == "both":
        t["e.down_proj"] = torch.zeros(2, 64, 8)
    elif name == "fp8":
        t["w"] = torch.zeros(4, 4).to(torch.float8_e4m3fn)
    return t


@pytest.mark.parametrize("case,match", [
    ("no_scales", r"tensor 'e\.down_proj_blocks' in .*model\.safetensors: MXFP4 blocks without their scales "
                  r"'e\.down_proj_scales'"),
    ("no_blocks", r"tensor 'e\.down_proj_scales' in .*: MXFP4 scales without their blocks 'e\.down_proj_blocks'"),
    ("scale_shape", r"tensor 'e\.down_proj_scales' in .*: MXFP4 scales of shape \[2, 4, 2\] for blocks "
                    r"'e\.down_proj_blocks' of shape \[2, 8, 2, 16\]; expected \[2, 8, 2\]"),
    ("blocks_dtype", r"tensor 'e\.down_proj_blocks' in .*: stored as torch\.int16, expected uint8"),
    ("blocks_shape", r"e\.down_proj_blocks has shape \[8, 2, 8\], expected \[N, K/32, 16\]"),
    ("both", r"tensor 'e\.down_proj_blocks' in .*: the checkpoint holds both 'e\.down_proj' and its MXFP4 blocks"),
    ("fp8", r"tensor 'w' in .*: stored as torch\.float8_e4m3fn in an MXFP4 checkpoint"),
])
def test_damaged_mxfp4_checkpoints_are_refused_by_name(tmp_path, case, match):
    path, raw = _ckpt(str(tmp_path), _mx_case(case), MX)
    with pytest.raises(ValueError, match=match):
        _open(path, raw)


def test_mxfp4_nan_scale_is_named_when_read(tmp_path):
    """An E8M0 scale of 255 (NaN) is found when the tensor is dequantized: the error names the tensor and file."""
    blocks = torch.zeros(1, 4, 1, 16, dtype=torch.uint8)
    scales = torch.full((1, 4, 1), 127, dtype=torch.uint8)
    scales[0, 2, 0] = 255
    path, raw = _ckpt(str(tmp_path), {"e.down_proj_blocks": blocks, "e.down_proj_scales": scales}, MX)
    with _open(path, raw) as src, pytest.raises(ValueError, match=r"dequantizing 'e\.down_proj' \(e\.down_proj_blocks "
                                                               r"\+ e\.down_proj_scales in .*model\.safetensors\): "):
        src["e.down_proj"]


def test_import_of_a_damaged_fp8_checkpoint_writes_nothing(tmp_path):
    """The command line: a NaN block scale in a Llama FP8 checkpoint is named (tensor, file) and no output directory
    is created."""
    pytest.importorskip("transformers")
    from megatron_bridge_ext.testing.tiny_models import make_tiny_llama

    src = make_tiny_llama(str(tmp_path / "llama"), dtype=torch.bfloat16)
    from safetensors.torch import load_file

    state = load_file(os.path.join(src, "model.safetensors"))
    name = "model.layers.1.mlp.down_proj.weight"
    q, s = fp8_quant(state[name], (8, 16))
    s[0, 0] = float("nan")
    state[name], state[name + "_scale_inv"] = q, s
    save_file(state, os.path.join(src, "model.safetensors"))
    with open(os.path.join(src, "config.json")) as f:
        cfg = json.load(f)
    cfg["quantization_config"] = FP8
    with open(os.path.join(src, "config.json"), "w") as f:
        json.dump(cfg, f)
    out = str(tmp_path / "out")
    r = subprocess.run([sys.executable, "-m", "megatron_bridge_ext", "import", src, out], capture_output=True,
                       text=True, timeout=300)
    assert r.returncode != 0
    assert f"tensor '{name}_scale_inv' in {os.path.join(src, 'model.safetensors')}: 1 of its" in r.stderr + r.stdout
    assert not os.path.exists(out)
