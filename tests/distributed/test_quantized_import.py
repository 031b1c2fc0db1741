"""Block-quantized HF releases imported as their dequantized weights, end to end on real parts (issue #21, item 2).

Checkpoints (``tests/quantized_checkpoints.py``), each beside a dequantized twin made without the code under test:

- ``deepseek_v3_fp8``: a tiny DeepSeek-V3 (MLA, a dense first layer, 6 routed experts + a shared one) saved in bf16 by
  transformers, its linear weights quantized to FP8 with transformers' own ``Fp8Quantize`` (8x8 blocks);
- ``deepseek_v3_fp8_edge``: the same model quantized with the plain-torch DeepSeek rule at 16x32 blocks, which cut
  ``q_a_proj`` [24, 64], ``kv_a_proj_with_mqa`` [24, 64], ``kv_b_proj`` [112, 16], ... into partial edge blocks (as
  the release's 576-row ``kv_a_proj_with_mqa``; transformers' quantizer refuses such weights);
- ``qwen3_fp8``: a tiny Qwen3 (dense; the Qwen3 ``-FP8`` releases' format), transformers' ``Fp8Quantize``;
- ``gpt_oss_mxfp4``: a tiny GPT-OSS whose experts are random MXFP4 blocks and scales in the release's layout; its twin
  is transformers' ``convert_moe_packed_tensors`` of them.

In ONE spawned world of 4 ranks, for each checkpoint and layout (TP2 x EP2 with expert-TP 2 — GPT-OSS 1 —, PP2 x EP2,
TP2 x PP2 for Qwen3): every Megatron parameter on every rank imported from the quantized checkpoint ``torch.equal``
the one imported from the twin; the logits against transformers' own load of the quantized checkpoint (it
dequantizes FP8 / MXFP4 on a CPU) or, for the partial-block one, of the twin. The streamed import (no model; the 4
ranks share the tensors) writes the same Megatron checkpoint from the quantized files as from the twin, and its
streamed export gives the twin's tensors, with a ``config.json`` that no longer claims a quantization.
"""

from __future__ import annotations

import json
import os
import sys

import pytest
import torch

pytest.importorskip("megatron.core")
transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")  # transformers loads FP8 / MXFP4 checkpoints through it

from megatron_bridge_ext.io import SafeTensorsSource  # noqa: E402
from megatron_bridge_ext.launch import spawn_local  # noqa: E402
from megatron_bridge_ext.testing.tiny_models import randomise, save_transformers_bf16, tiny_hf_model  # noqa: E402
from megatron_bridge_ext.testing.tolerances import MEGATRON_VS_HF_ATOL, max_abs_diff  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from quantized_checkpoints import write_fp8, write_mxfp4  # noqa: E402

YARN = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 16,
        "beta_fast": 32.0, "beta_slow": 1.0}
BASE = dict(vocab_size=97, hidden_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
            max_position_embeddings=64, rms_norm_eps=1e-5, tie_word_embeddings=False)
MODELS = {
    "deepseek_v3": ("DeepseekV3", dict(intermediate_size=80, moe_intermediate_size=24, n_routed_experts=6,
                                       num_experts_per_tok=2, n_group=2, topk_group=1, first_k_dense_replace=1,
                                       q_lora_rank=24, kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=16,
                                       v_head_dim=12, num_key_value_heads=4, n_shared_experts=1,
                                       routed_scaling_factor=2.5,
                                       rope_parameters={**YARN, "mscale": 1.0, "mscale_all_dim": 1.0})),
    "qwen3": ("Qwen3", dict(intermediate_size=80, head_dim=16)),
    # MXFP4 groups are 32 values: hidden 64 and 32 expert rows keep every expert matrix whole groups
    "gpt_oss": ("GptOss", dict(intermediate_size=32, num_local_experts=4, num_experts_per_tok=2, head_dim=16,
                               sliding_window=4, swiglu_limit=1.5, rope_parameters={**YARN, "truncate": False})),
}
TP2EP2, PP2EP2 = ("tp2ep2", dict(tp=2, pp=1, ep=2)), ("pp2ep2", dict(tp=1, pp=2, ep=2))
# case -> (model, how it is quantized, layouts, the layout the streamed import records, transformers loads it)
CASES = {
    "deepseek_v3_fp8": ("deepseek_v3", ("fp8", (8, 8), "transformers"), [TP2EP2, PP2EP2], dict(tp=1, pp=1, ep=2),
                        True),
    "deepseek_v3_fp8_edge": ("deepseek_v3", ("fp8", (16, 32), "reference"), [TP2EP2], dict(tp=1, pp=1, ep=2),
                             False),
    "qwen3_fp8": ("qwen3", ("fp8", (8, 8), "transformers"), [("tp2pp2", dict(tp=2, pp=2))], dict(tp=2, pp=1), True),
    "gpt_oss_mxfp4": ("gpt_oss", ("mxfp4", None, None), [("tp2ep2", dict(tp=2, pp=1, ep=2, etp=1))],
                      dict(tp=1, pp=1, ep=2, etp=1), True),
}
FUSED_OPS = ("fp8_block_dequant", "fp8_gate_up_pack", "fp8_qkv_pack", "fp8_expert_pack_fc1", "fp8_expert_pack_fc2",
             "mxfp4_expert_pack_fc1", "mxfp4_expert_pack_fc2")
# model -> the fused ops its quantized import must call (TP slices of column / row linears: fp8_block_dequant)
EXPECTED_OPS = {"deepseek_v3": {"fp8_block_dequant", "fp8_gate_up_pack", "fp8_expert_pack_fc1", "fp8_expert_pack_fc2"},
                "qwen3": {"fp8_block_dequant", "fp8_gate_up_pack", "fp8_qkv_pack"},
                "gpt_oss": {"mxfp4_expert_pack_fc1", "mxfp4_expert_pack_fc2"}}
LAYOUT_CASES = [(case, name) for case, (_, _, layouts, _, _) in CASES.items() for name, _ in layouts]


def _make_bf16(path: str, model: str, seed: int) -> None:
    """transformers' own bf16 checkpoint of a random tiny model (its fp32-kept router tensors included)."""
    prefix, overrides = MODELS[model]
    net = tiny_hf_model(prefix, {**BASE, **overrides}, seed).float().eval()
    save_transformers_bf16(randomise(net, (1.0, 0.2), rest=(0.0, 0.15), correction_bias=0.3), path)


def _hf_logits(path: str, tokens: torch.Tensor) -> torch.Tensor:
    net = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).eval()
    with torch.no_grad():
        return net.float()(tokens, use_cache=False).logits


def _params(chunks):
    return {f"{i}:{n}": p.detach() for i, c in enumerate(chunks) for n, p in c.named_parameters()}


def _worker(rank, world, ckpts, tokens, root):
    from megatron_bridge_ext.mcore.cpu_compat import apply_cpu_patches

    apply_cpu_patches()
    import torch.distributed as dist

    from megatron_bridge_ext.auto_bridge import AutoBridge
    from megatron_bridge_ext.mcore.forward import megatron_logits
    from megatron_bridge_ext.mcore.model_builder import destroy_parallel, init_parallel
    from megatron_bridge_ext.testing.parity import compare_megatron_checkpoints

    from megatron_bridge_ext import ops
    from megatron_bridge_ext.io.quantized import QuantizedSource

    # every read of a quantized expert tensor on this rank: (key, None) for a whole tensor, read dequantized or as
    # stored for a fused op; (key, (lo, hi)) for experts [lo, hi) of a tensor fused over the layer's experts
    read = []
    getitem, quantized, experts = QuantizedSource.__getitem__, QuantizedSource.quantized, QuantizedSource.experts
    stored_experts = ops.QuantizedWeight.experts

    def counted_getitem(self, key):
        if ".experts." in key and self.is_quantized(key):
            read.append((key, None))
        return getitem(self, key)

    def counted_quantized(self, key):
        q = quantized(self, key)
        if ".experts." in key:
            if q.dim() == 3:  # fused over experts: the engine cuts it to its range (counted there)
                read.append((key, "fused"))
            else:
                read.append((key, None))
        return q

    def counted_experts(self, key, lo, hi):
        if self.is_quantized(key):
            read.append((key, (lo, hi)))
        return experts(self, key, lo, hi)

    def counted_stored_experts(self, lo, hi):
        key = read.pop()[0] if read and read[-1][1] == "fused" else "?"
        read.append((key, (lo, hi)))
        return stored_experts(self, lo, hi)

    QuantizedSource.__getitem__, QuantizedSource.quantized = counted_getitem, counted_quantized
    QuantizedSource.experts, ops.QuantizedWeight.experts = counted_experts, counted_stored_experts
    from megatron_bridge_ext.testing.calls import count_calls

    fused = count_calls(ops, FUSED_OPS)  # the fused dequantizing ops the mappings call
    whole = []  # QuantizedWeight.dequantize: a mapping without a fused path read a whole weight dequantized
    dequantize = ops.QuantizedWeight.dequantize

    def counted_dequantize(self):
        whole.append(tuple(self.shape))
        return dequantize(self)

    ops.QuantizedWeight.dequantize = counted_dequantize
    out = {}
    for case, (_, _, layouts, stream_layout, _) in CASES.items():
        quant, twin = ckpts[case]
        for name, layout in layouts:
            init_parallel(**layout)
            read.clear()
            fused.clear()
            whole.clear()
            got = _params(AutoBridge.from_hf_pretrained(quant).to_megatron_model(params_dtype=torch.float32))
            expert_reads = sorted(read, key=str)
            op_calls, whole_reads = dict(fused), list(whole)
            chunks = AutoBridge.from_hf_pretrained(twin).to_megatron_model(params_dtype=torch.float32)
            want = _params(chunks)
            r = {"keys": (sorted(got) == sorted(want), len(want)), "expert_reads": expert_reads,
                 "op_calls": op_calls, "whole_reads": whole_reads,
                 "differ": sorted(k for k in want if k in got and not torch.equal(got[k], want[k]))}
            logits = megatron_logits(chunks, tokens)
            if rank == 0:
                r["logits"] = logits
            out[f"{case}/{name}"] = r
            destroy_parallel()
            dist.barrier()
        for which, src in (("quant", quant), ("twin", twin)):
            AutoBridge.from_hf_pretrained(src).save_megatron_checkpoint(
                os.path.join(root, case, which), dtype=torch.bfloat16, layout=stream_layout, file_bytes=64 << 10,
                buffer_bytes=16 << 10)
        if rank == 0:
            out[f"{case}/stream_diff"] = compare_megatron_checkpoints(os.path.join(root, case, "quant"),
                                                                      os.path.join(root, case, "twin"))
    return out


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    transformers.logging.set_verbosity_error()
    root = str(tmp_path_factory.mktemp("quantized"))
    tokens = torch.randint(0, BASE["vocab_size"], (2, 12), generator=torch.Generator().manual_seed(0))
    bf16 = {}
    for i, model in enumerate(MODELS):
        bf16[model] = os.path.join(root, f"{model}_bf16")
        _make_bf16(bf16[model], model, seed=30 + i)
    ckpts, hf = {}, {}
    for case, (model, (method, block, quantizer), _, _, loadable) in CASES.items():
        quant, twin = os.path.join(root, case), os.path.join(root, f"{case}_twin")
        if method == "fp8":
            write_fp8(bf16[model], quant, twin, block, quantizer)
        else:
            write_mxfp4(bf16[model], quant, twin, seed=7)
        ckpts[case] = (quant, twin)
        hf[case] = _hf_logits(quant if loadable else twin, tokens)
    out = os.path.join(root, "out")
    per_rank = spawn_local(_worker, 4, (ckpts, tokens, out), timeout=900)
    return ckpts, hf, per_rank, out


@pytest.mark.parametrize("case,name", LAYOUT_CASES, ids=[f"{c}-{n}" for c, n in LAYOUT_CASES])
def test_parameters_equal_the_dequantized_twins(world, case, name):
    """Every parameter on every rank, imported from the quantized files, is the one imported from the twin."""
    _, _, per_rank, _ = world
    for rank, results in enumerate(per_rank):
        r = results[f"{case}/{name}"]
        same_keys, count = r["keys"]
        assert same_keys and count > 0, (rank, r["keys"])
        assert r["differ"] == [], (rank, r["differ"][:8])


def test_a_rank_dequantizes_only_its_own_experts(world):
    """At EP2 each rank reads the quantized experts it keeps and no others: DeepSeek-V3's per-expert FP8 tensors of
    its half of the experts, GPT-OSS's fused MXFP4 tensors cut to its half ([0, 2) or [2, 4) of 4), each once."""
    _, _, per_rank, _ = world
    import re

    for rank, results in enumerate(per_rank):
        reads = results["deepseek_v3_fp8/tp2ep2"]["expert_reads"]
        ids = {int(re.search(r"\.experts\.(\d+)\.", k).group(1)) for k, _ in reads}
        assert ids in ({0, 1, 2}, {3, 4, 5}), (rank, sorted(ids))
        assert len(reads) == len(set(reads)), "an expert tensor dequantized twice"
        assert len(reads) == 3 * 3 * 3, len(reads)  # 3 MoE layers x 3 experts x gate / up / down
        oss = results["gpt_oss_mxfp4/tp2ep2"]["expert_reads"]
        ranges = {rng for _, rng in oss}
        assert ranges in ({(0, 2)}, {(2, 4)}), (rank, ranges)
        assert len(oss) == 4 * 2, oss  # 4 layers x gate_up / down, each once


@pytest.mark.parametrize("case,name", LAYOUT_CASES, ids=[f"{c}-{n}" for c, n in LAYOUT_CASES])
def test_quantized_weights_go_through_the_fused_ops(world, case, name):
    """The model path hands each quantized weight as stored to the fused op of its layout (a TP slice, gate / up,
    QKV, a rank's experts), which dequantizes only what the rank keeps: no mapping reads a whole weight dequantized."""
    _, _, per_rank, _ = world
    for rank, results in enumerate(per_rank):
        r = results[f"{case}/{name}"]
        assert EXPECTED_OPS[CASES[case][0]] <= set(r["op_calls"]), (rank, r["op_calls"])
        assert r["whole_reads"] == [], (rank, r["whole_reads"][:8])


@pytest.mark.parametrize("case,name", LAYOUT_CASES, ids=[f"{c}-{n}" for c, n in LAYOUT_CASES])
def test_logits_match_transformers_dequantized_model(world, case, name):
    """The Megatron model's logits against transformers' own load of the quantized checkpoint (dequantized on a
    CPU; the twin for the partial-block one, which transformers does not read)."""
    _, hf, per_rank, _ = world
    got = per_rank[0][f"{case}/{name}"]["logits"]
    diff = max_abs_diff(got, hf[case])
    assert diff <= MEGATRON_VS_HF_ATOL, diff


@pytest.mark.parametrize("case", list(CASES))
def test_streamed_import_writes_the_twins_checkpoint(world, case):
    """The streamed import of the quantized files (4 ranks sharing the tensors, small files and buffer) writes the
    Megatron checkpoint the twin's gives: keys, shapes, dtypes, bytes, common state (the stored HF config carries no
    quantization_config: the weights are not quantized)."""
    _, _, per_rank, _ = world
    diff = per_rank[0][f"{case}/stream_diff"]
    assert diff == [], "\n".join(diff[:20])


@pytest.mark.parametrize("case", list(CASES))
def test_streamed_export_gives_the_twins_tensors(world, case, tmp_path):
    """``export`` of the checkpoint imported from the quantized files, with the quantized checkpoint as its HF source
    (its key set and dtypes are the dequantized model's): the twin's tensors bit for bit, and a config.json without
    the source's quantization_config (the written weights are not quantized), which transformers loads. Without a
    source the config.json (kept by ``import``) claims no quantization either."""
    from megatron_bridge_ext.cli.export import export_checkpoint

    ckpts, _, _, out_root = world
    quant, twin = ckpts[case]
    with open(os.path.join(quant, "config.json")) as f:
        assert "quantization_config" in json.load(f)  # the source does claim one
    for source in (quant, None):
        out = str(tmp_path / ("with_source" if source else "no_source"))
        export_checkpoint(os.path.join(out_root, case, "quant"), out, hf_source=source)
        with open(os.path.join(out, "config.json")) as f:
            assert "quantization_config" not in json.load(f)
        if source is None:
            continue
        with SafeTensorsSource(out) as got, SafeTensorsSource(twin) as want:
            assert sorted(got.keys()) == sorted(want.keys())
            bad = [(k, got[k].dtype, want[k].dtype) for k in want.keys()
                   if got[k].dtype != want[k].dtype or not torch.equal(got[k], want[k])]
            assert bad == [], bad[:8]
        transformers.AutoModelForCausalLM.from_pretrained(out)


@pytest.mark.parametrize("case", [c for c, v in CASES.items() if v[1][0] == "fp8" and v[4]])
def test_fp8_release_imported_and_exported_as_fp8_has_the_releases_layout(world, case, tmp_path):
    """FP8 release -> streamed import -> ``export --quantize fp8`` (the release as the source): the release's tensor
    names and dtypes (FP8 weights with their block scales where the release has them, the rest as stored), its
    quantization_config's method and block size, loadable by transformers. (Values are re-quantized from the
    dequantized weights: not claimed bit-exact.)"""
    from megatron_bridge_ext.cli.export import export_checkpoint

    ckpts, _, _, out_root = world
    quant = ckpts[case][0]
    with open(os.path.join(quant, "config.json")) as f:
        block = json.load(f)["quantization_config"]["weight_block_size"]
    out = str(tmp_path / "fp8")
    export_checkpoint(os.path.join(out_root, case, "quant"), out, hf_source=quant, quantization="fp8",
                      quantization_block_size=tuple(block))
    with SafeTensorsSource(out) as got, SafeTensorsSource(quant) as want:
        assert sorted(got.keys()) == sorted(want.keys())
        assert {k: got.dtype(k) for k in want.keys()} == {k: want.dtype(k) for k in want.keys()}
    with open(os.path.join(out, "config.json")) as f:
        q = json.load(f)["quantization_config"]
    assert q["quant_method"] == "fp8" and q["weight_block_size"] == block
    transformers.AutoModelForCausalLM.from_pretrained(out)
