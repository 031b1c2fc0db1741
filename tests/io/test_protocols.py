"""The declared interfaces between the engine and storage (``io/protocols.py``): every source the engine reads and
the HF writer implement them (checked structurally, as the engine relies on them), a plain mapping of tensors is
adapted, and anything else is refused by name."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import save_file

from megatron_bridge_ext.io import SafeTensorsSource
from megatron_bridge_ext.io.hf_writer import SafeTensorsWriter
from megatron_bridge_ext.io.protocols import (MappingSource, QuantizedTensorSource, TensorSink, TensorSource,
                                              as_source)
from megatron_bridge_ext.io.quantized import open_source


def _checkpoint(path: str, tensors: dict, quantization=None) -> dict:
    os.makedirs(path, exist_ok=True)
    save_file(tensors, os.path.join(path, "model.safetensors"))
    raw = {"architectures": ["LlamaForCausalLM"], "torch_dtype": "bfloat16"}
    if quantization is not None:
        raw["quantization_config"] = quantization
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(raw, f)
    return raw


def test_safetensors_source_is_a_tensor_source(tmp_path):
    w = torch.randn(6, 4)
    _checkpoint(str(tmp_path), {"a.weight": w})
    with SafeTensorsSource(str(tmp_path)) as src:
        assert isinstance(src, TensorSource) and not isinstance(src, QuantizedTensorSource)
        assert as_source(src) is src
        assert src.shape("a.weight") == (6, 4) and src.dtype("a.weight") == torch.float32
        assert torch.equal(src["a.weight"], w) and src.file_of("a.weight").endswith("model.safetensors")


def test_quantized_source_is_a_quantized_tensor_source(tmp_path):
    weight = torch.randn(16, 32).to(torch.float8_e4m3fn)
    scale = torch.rand(2, 2) + 0.5  # 8 x 16 blocks
    fp8 = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [8, 16]}
    raw = _checkpoint(str(tmp_path), {"a.weight": weight, "a.weight_scale_inv": scale}, fp8)
    with open_source(SafeTensorsSource(str(tmp_path)), raw, os.path.join(str(tmp_path), "config.json")) as src:
        assert isinstance(src, QuantizedTensorSource) and isinstance(src, TensorSource)
        assert src.is_quantized("a.weight") and src.shape("a.weight") == (16, 32)
        block = src["a.weight"][:8, :16].float()  # block (0, 0) dequantized: fp8 value x its block's scale
        assert torch.equal(block, (weight[:8, :16].float() * scale[0, 0]).to(torch.bfloat16).float())


def test_plain_mapping_is_adapted_and_other_objects_refused():
    tensors = {"x": torch.arange(6.0).view(2, 3), "y": torch.ones(4, dtype=torch.int64)}
    src = as_source(tensors)
    assert isinstance(src, MappingSource) and isinstance(src, TensorSource)
    assert list(src.keys()) == ["x", "y"] and len(src) == 2 and "x" in src and "z" not in src
    assert src["x"] is tensors["x"] and src.shape("x") == (2, 3) and src.dtype("y") == torch.int64
    assert src.file_of("x") == "the HF state"
    with pytest.raises(KeyError):
        src.file_of("z")
    src.release(["x"])  # nothing to drop: the tensors stay the caller's
    assert src["x"] is tensors["x"]
    assert as_source(None) is None
    with pytest.raises(TypeError, match=r"got int"):
        as_source(3)


def test_hf_writer_is_a_tensor_sink(tmp_path):
    out = str(tmp_path / "out")
    writer = SafeTensorsWriter(out, {"a": ((2, 2), torch.float32)})
    assert isinstance(writer, TensorSink)
    writer.abort()
    assert not os.path.exists(os.path.join(out, "model.safetensors"))
