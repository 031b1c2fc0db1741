"""FP8 import of a DeepSeek-V3-shaped slice against the bf16 import of the same slice, in one run.

The slice has DeepSeek-V3's widths (hidden 7168, MLA with q_lora 1536 / kv_lora 512 / 128 heads, a dense first layer
of 18432, vocabulary 129280) and one MoE layer of ``--experts`` routed experts of 2048 plus the shared one (the release
has 256; fewer keep the two sources and their outputs on this machine's disk). Both sources are written here from the
same random bf16 weights: ``bf16/`` as they are, ``fp8/`` with every linear weight quantized to FP8 per 128x128 block
(``weight_scale_inv``, ``quantization_config`` as the release has it; embeddings, norms, router, output head bf16).

Measured for each, page cache dropped before each command (``--drop-caches``, needs root): ``python -m
megatron_bridge_ext import SRC OUT`` (the streamed converter), wall clock from start to exit, the CLI's own
conversion time, and peak RSS. Reported: FP8 / bf16 ratios of the same run, and the bytes each source holds.

    sudo python benchmarks/bench_quantized.py --drop-caches
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from typing import Any, Dict

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))
sys.path.insert(0, HERE)

from bench_stream import GiB, dir_bytes, measure  # noqa: E402

H, Q_LORA, KV_LORA, NOPE, ROPE, V_DIM, HEADS, DENSE, F, VOCAB = 7168, 1536, 512, 128, 64, 128, 128, 18432, 2048, 129280
BLOCK = (128, 128)


def _config(experts: int) -> Dict[str, Any]:
    import transformers

    cfg = transformers.DeepseekV3Config(
        vocab_size=VOCAB, hidden_size=H, intermediate_size=DENSE, moe_intermediate_size=F, num_hidden_layers=2,
        num_attention_heads=HEADS, num_key_value_heads=HEADS, n_shared_experts=1, n_routed_experts=experts,
        routed_scaling_factor=2.5, kv_lora_rank=KV_LORA, q_lora_rank=Q_LORA, qk_rope_head_dim=ROPE,
        v_head_dim=V_DIM, qk_nope_head_dim=NOPE, n_group=8, topk_group=4, num_experts_per_tok=8,
        first_k_dense_replace=1, norm_topk_prob=True, max_position_embeddings=4096, rms_norm_eps=1e-6,
        tie_word_embeddings=False, architectures=["DeepseekV3ForCausalLM"], dtype="bfloat16")
    return cfg.to_dict()


def _shapes(experts: int) -> Dict[str, tuple]:
    s = {"model.embed_tokens.weight": (VOCAB, H), "model.norm.weight": (H,), "lm_head.weight": (VOCAB, H)}
    for i in range(2):
        p = f"model.layers.{i}."
        s.update({p + "input_layernorm.weight": (H,), p + "post_attention_layernorm.weight": (H,),
                  p + "self_attn.q_a_proj.weight": (Q_LORA, H), p + "self_attn.q_a_layernorm.weight": (Q_LORA,),
                  p + "self_attn.q_b_proj.weight": (HEADS * (NOPE + ROPE), Q_LORA),
                  p + "self_attn.kv_a_proj_with_mqa.weight": (KV_LORA + ROPE, H),
                  p + "self_attn.kv_a_layernorm.weight": (KV_LORA,),
                  p + "self_attn.kv_b_proj.weight": (HEADS * (NOPE + V_DIM), KV_LORA),
                  p + "self_attn.o_proj.weight": (H, HEADS * V_DIM)})
        if i == 0:
            s.update({p + "mlp.gate_proj.weight": (DENSE, H), p + "mlp.up_proj.weight": (DENSE, H),
                      p + "mlp.down_proj.weight": (H, DENSE)})
            continue
        s.update({p + "mlp.gate.weight": (experts, H), p + "mlp.gate.e_score_correction_bias": (experts,)})
        for x in [f"experts.{e}." for e in range(experts)] + ["shared_experts."]:
            s.update({f"{p}mlp.{x}gate_proj.weight": (F, H), f"{p}mlp.{x}up_proj.weight": (F, H),
                      f"{p}mlp.{x}down_proj.weight": (H, F)})
    return s


def make_sources(root: str, experts: int) -> Dict[str, Any]:
    """``root/bf16`` and ``root/fp8`` from the same random weights, tensor by tensor."""
    import torch

    from megatron_bridge_ext import ops
    from megatron_bridge_ext.io import SafeTensorsWriter

    shapes = _shapes(experts)
    cfg = _config(experts)
    quantized = {k for k in shapes if k.endswith("_proj.weight") or k.endswith("_proj_with_mqa.weight")}
    dtypes = {k: torch.float32 if k.endswith("e_score_correction_bias") else torch.bfloat16 for k in shapes}
    fp8_specs: Dict[str, Any] = {}
    for k, s in shapes.items():
        if k in quantized:
            fp8_specs[k] = (s, torch.float8_e4m3fn)
            fp8_specs[k + "_scale_inv"] = ((-(-s[0] // BLOCK[0]), -(-s[1] // BLOCK[1])), torch.float32)
        else:
            fp8_specs[k] = (s, dtypes[k])
    for name, c in (("bf16", cfg), ("fp8", {**cfg, "quantization_config": {
            "activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8", "weight_block_size": list(BLOCK)}})):
        os.makedirs(os.path.join(root, name), exist_ok=True)
        with open(os.path.join(root, name, "config.json"), "w") as f:
            json.dump(c, f, indent=2)
    g = torch.Generator().manual_seed(0)
    with SafeTensorsWriter(os.path.join(root, "bf16"), {k: (s, dtypes[k]) for k, s in shapes.items()},
                           max_shard_bytes=4 * GiB) as wb, \
            SafeTensorsWriter(os.path.join(root, "fp8"), fp8_specs, max_shard_bytes=4 * GiB) as wq:
        for k, s in shapes.items():
            t = torch.empty(s, dtype=dtypes[k])
            t.normal_(0, 0.02, generator=g) if len(s) > 1 else t.normal_(1.0, 0.1, generator=g)
            wb.add(k, t)
            if k in quantized:
                q, sc = ops.fp8_block_quant(t, block_size=BLOCK)
                wq.add(k, q)
                wq.add(k + "_scale_inv", sc)
            else:
                wq.add(k, t)
    return {"bf16_bytes": dir_bytes(os.path.join(root, "bf16"), ".safetensors"),
            "fp8_bytes": dir_bytes(os.path.join(root, "fp8"), ".safetensors"), "tensors": len(shapes)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--experts", type=int, default=32, help="routed experts of the MoE layer (release: 256)")
    ap.add_argument("--drop-caches", action="store_true")
    ap.add_argument("--dir", default=None)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    root = args.dir or tempfile.mkdtemp(prefix="bench_quantized_")
    try:
        src = make_sources(root, args.experts)
        print(f"DeepSeek-V3-shaped slice, {args.experts} experts: bf16 {src['bf16_bytes'] / GiB:.2f} GiB, "
              f"fp8 {src['fp8_bytes'] / GiB:.2f} GiB, {src['tensors']} tensors", flush=True)
        res: Dict[str, Any] = {"source": src, "experts": args.experts}
        for name in ("bf16", "fp8"):
            out = os.path.join(root, f"out_{name}")
            # no read + write floor here (bench_stream.py measures it): the ratios below are FP8 against bf16
            res[name] = measure(f"import {name}", ["import", os.path.join(root, name), out], args.drop_caches,
                                float("nan"))
            shutil.rmtree(out)
        b, q = res["bf16"], res["fp8"]
        res["fp8_over_bf16_wall"] = q["wall_s"] / b["wall_s"]
        res["fp8_over_bf16_conversion"] = (q["cli_s"] / b["cli_s"]) if q["cli_s"] and b["cli_s"] else None
        res["fp8_over_bf16_peak_rss"] = q["peak_rss"] / b["peak_rss"]
        print(f"FP8 / bf16: wall {res['fp8_over_bf16_wall']:.2f}x, conversion "
              f"{res['fp8_over_bf16_conversion'] or float('nan'):.2f}x, peak RSS {res['fp8_over_bf16_peak_rss']:.2f}x",
              flush=True)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(res, f, indent=2)
    finally:
        if args.dir is None:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
