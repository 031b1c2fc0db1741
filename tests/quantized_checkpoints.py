"""Tiny block-quantized HF checkpoints for the tests, each with its dequantized twin made independently of the code
under test.

- FP8 (``quant_method="fp8"``): a transformers model saved in bf16, then every linear weight (``*_proj.weight`` and
  ``kv_a_proj_with_mqa.weight``, what DeepSeek-V3's release stores in FP8; norms, embeddings, the output head and the router stay bf16 / fp32) quantized
  per block with transformers' own ``Fp8Quantize`` (``quantizer="transformers"``; the block size must divide the
  weights, which that function requires) or with ``tests/reference.fp8_quant`` (``quantizer="reference"``: DeepSeek's
  rule, partial edge blocks allowed). The twin: ``tests/reference.fp8_dequant`` of the stored bytes.
- MXFP4 (``quant_method="mxfp4"``, GPT-OSS): the experts' ``gate_up_proj`` / ``down_proj`` replaced by random E2M1
  blocks and E8M0 scales in the release's layout (``*_blocks`` ``[E, out, in/32, 16]``, ``*_scales`` ``[E, out,
  in/32]``). The twin: transformers' ``convert_moe_packed_tensors`` of them (``[E, in, out]``, the parameter's
  layout).
"""

from __future__ import annotations

import json
import os
import shutil
import types
from typing import Dict, Sequence, Tuple

import torch

from reference import fp8_dequant, fp8_quant

FP8_CONFIG = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8"}


def _write(dst: str, tensors: Dict[str, torch.Tensor], src: str, config_update=None, drop=()) -> None:
    from safetensors.torch import save_file

    os.makedirs(dst, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, os.path.join(dst, "model.safetensors"),
              metadata={"format": "pt"})
    for name in os.listdir(src):
        if name.endswith(".json") and "index" not in name:
            shutil.copy(os.path.join(src, name), os.path.join(dst, name))
    with open(os.path.join(dst, "config.json")) as f:
        cfg = json.load(f)
    for k in drop:
        cfg.pop(k, None)
    cfg.update(config_update or {})
    with open(os.path.join(dst, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)


def _load(src: str) -> Dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(os.path.join(src, "model.safetensors"))


def is_fp8_weight(name: str) -> bool:
    """The tensors DeepSeek-V3's release stores in FP8: the linear weights (``kv_a_proj_with_mqa`` included)."""
    return name.endswith("_proj.weight") or name.endswith("_proj_with_mqa.weight")


def write_fp8(src: str, dst: str, twin: str, block: Sequence[int], quantizer: str) -> Tuple[str, str]:
    """An FP8 copy of the bf16 checkpoint ``src`` at ``dst`` and its dequantized twin at ``twin``."""
    state = _load(src)
    q_state, d_state = {}, {}
    if quantizer == "transformers":
        from transformers import FineGrainedFP8Config
        from transformers.integrations.finegrained_fp8 import Fp8Quantize

        op = Fp8Quantize(types.SimpleNamespace(quantization_config=FineGrainedFP8Config(
            weight_block_size=list(block))))
    for name, t in state.items():
        if not is_fp8_weight(name):
            q_state[name], d_state[name] = t, t
            continue
        if quantizer == "transformers":
            out = op._quantize_one(name, t)
            assert set(out) == {name, name + "_scale_inv"}, f"{name} {tuple(t.shape)} not tiled by {block}"
            q, s = out[name], out[name + "_scale_inv"]
        else:
            q, s = fp8_quant(t, block, "deepseek")
        q_state[name], q_state[name + "_scale_inv"] = q, s
        d_state[name] = fp8_dequant(q, s, block, t.dtype)
    _write(dst, q_state, src, {"quantization_config": {**FP8_CONFIG, "weight_block_size": list(block)}})
    _write(twin, d_state, src)
    return dst, twin


def write_mxfp4(src: str, dst: str, twin: str, seed: int) -> Tuple[str, str]:
    """A GPT-OSS MXFP4 copy of ``src`` (random experts) at ``dst`` and its dequantized twin at ``twin``."""
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    gen = torch.Generator().manual_seed(seed)
    state = _load(src)
    q_state, d_state = {}, {}
    for name, t in state.items():
        if not (name.endswith(".mlp.experts.gate_up_proj") or name.endswith(".mlp.experts.down_proj")):
            q_state[name], d_state[name] = t, t
            continue
        e, k_in, n_out = t.shape  # the parameter is [E, in, out]; the release stores [E, out, in/32, 16]
        blocks = torch.randint(0, 256, (e, n_out, k_in // 32, 16), dtype=torch.uint8, generator=gen)
        scales = torch.randint(121, 127, (e, n_out, k_in // 32), dtype=torch.uint8, generator=gen)  # 2^-6 .. 2^-1
        q_state[name + "_blocks"], q_state[name + "_scales"] = blocks, scales
        d_state[name] = convert_moe_packed_tensors(blocks, scales, dtype=t.dtype).contiguous()
        assert d_state[name].shape == t.shape, (name, d_state[name].shape, t.shape)
    _write(dst, q_state, src, {"quantization_config": {"quant_method": "mxfp4",
                                                        "modules_to_not_convert": ["model.layers.*.self_attn",
                                                                                   "model.layers.*.mlp.router",
                                                                                   "model.embed_tokens", "lm_head"]}})
    _write(twin, d_state, src)
    return dst, twin
