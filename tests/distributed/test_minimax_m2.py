"""MiniMax-M2 end to end on real parts: a transformers checkpoint from a tiny config (random weights, norms N(1, 0.3)
so that a norm read per head instead of over the whole projection moves the logits, correction biases N(0, 0.5) so
that they change which experts are chosen) -> AutoBridge -> megatron-core GPTModel chunks (CPU, gloo) -> HF, in ONE
spawned world of 4 ranks.

The model: GQA (4 query heads, 2 key heads) with ``head_dim`` 24 independent of ``hidden_size`` 64, q / k norms over
the whole projection, partial RoPE (``rotary_dim`` 12 of 24), 6 experts top-2 on every layer behind the sigmoid
router with ``e_score_correction_bias``; layouts EP2, TP2 x EP2 (expert-TP 2), PP2 x EP2.

For each layout: the Megatron logits against transformers' own (fp32, max |diff| <= 1e-4) and the exported
checkpoint against the source (key set, dtypes, torch.equal). One export without the source that transformers loads
with the same logits. transformers' own bf16 save of the checkpoint (gate weights and correction biases bf16: HF
keeps no MiniMax-M2 tensor in fp32) converts at EP2 with bf16 router weights equal to the file's and exports back to
itself bit for bit.
"""

from __future__ import annotations

import json
import os

import pytest
import torch

pytest.importorskip("megatron.core")
transformers = pytest.importorskip("transformers")

from megatron_bridge_ext.io import SafeTensorsSource  # noqa: E402
from megatron_bridge_ext.testing.parity import compare_checkpoints, hf_logits  # noqa: E402
from megatron_bridge_ext.testing.tiny_models import make_tiny_checkpoint, save_transformers_bf16  # noqa: E402
from megatron_bridge_ext.testing.tolerances import MEGATRON_VS_HF_ATOL, SAME_MODEL_ATOL, max_abs_diff  # noqa: E402
from megatron_bridge_ext.testing.worlds import Layout, spawn_layouts  # noqa: E402

ARCH = "MiniMaxM2ForCausalLM"
CONFIG = dict(vocab_size=97, hidden_size=64, intermediate_size=24, num_hidden_layers=4, num_attention_heads=4,
              num_key_value_heads=2, head_dim=24, rotary_dim=12, num_local_experts=6, num_experts_per_tok=2,
              max_position_embeddings=128, rms_norm_eps=1e-5, rope_parameters={"rope_type": "default",
                                                                               "rope_theta": 50000.0},
              pad_token_id=None, eos_token_id=None, bos_token_id=None)
NO_SOURCE = "pp2ep2"


def _make_checkpoint(path: str, seed: int) -> torch.nn.Module:
    """The tiny checkpoint (fp32) at ``path``; returns the transformers model (also used by test_te_checkpoint)."""
    return make_tiny_checkpoint(path, "MiniMaxM2", CONFIG, seed, norm=(1.0, 0.3), correction_bias=0.5,
                                rules=[(lambda name: any(s in name for s in ("q_proj", "k_proj")), 0.0, 0.3)],
                                rest=(0.0, 0.1))


def _routers(chunks, sd: dict) -> list:
    """Mismatches of the Megatron routers (weight and correction bias) against the HF file's tensors, dtypes included
    (the bias is megatron's fp32 buffer: the file's bf16 values, widened)."""
    bad, seen = [], 0
    for chunk in chunks:
        for layer in chunk.decoder.layers:
            i, router = layer.layer_number - 1, layer.mlp.router
            hf = f"model.layers.{i}.block_sparse_moe"
            seen += 1
            if router.weight.dtype != torch.bfloat16 or not torch.equal(router.weight, sd[f"{hf}.gate.weight"]):
                bad.append(f"layer {i} router.weight {router.weight.dtype}")
            if router.expert_bias.dtype != torch.float32 or not torch.equal(
                    router.expert_bias, sd[f"{hf}.e_score_correction_bias"].float()):
                bad.append(f"layer {i} router.expert_bias {router.expert_bias.dtype}")
    return bad if seen else ["no layers"]


def _bf16_routers(run) -> dict:
    with SafeTensorsSource(run.ckpts[run.layout.ckpt]) as src:
        sd = {k: src[k].clone() for k in src.keys() if "block_sparse_moe.e_score" in k or "gate.weight" in k}
    return {"routers": _routers(run.chunks, sd)}


def _layout(name, tp, pp, ep):
    return Layout(name, "hf", tp=tp, pp=pp, ep=ep, etp=tp, max_shard_bytes=96 * 1024,
                  no_source=ARCH if name == NO_SOURCE else None)


LAYOUTS = [_layout("ep2", 1, 1, 2), _layout("tp2ep2", 2, 1, 2), _layout("pp2ep2", 1, 2, 2),
           _layout("tp2pp2", 2, 2, 1)]
IDS = [layout.name for layout in LAYOUTS]
# transformers' bf16 save at EP2, params_dtype from config.json: bf16
BF16 = Layout("bf16_ep2", "bf16", ep=2, dtype=None, logits=None, checks=(_bf16_routers,))


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    transformers.logging.set_verbosity_error()
    root = tmp_path_factory.mktemp("minimax_m2")
    ckpt = str(root / "hf")
    model = _make_checkpoint(ckpt, seed=52)
    bf16 = save_transformers_bf16(model, str(root / "hf_bf16"))
    tokens = torch.randint(0, CONFIG["vocab_size"], (2, 12), generator=torch.Generator().manual_seed(0))
    out_root = str(root / "out")
    per_rank = spawn_layouts({"hf": ckpt, "bf16": bf16}, LAYOUTS + [BF16], tokens, out_root, timeout=600)
    return ckpt, out_root, per_rank, hf_logits(ckpt, tokens), tokens, bf16


def test_checkpoint_is_the_release_layout(world):
    """transformers' save_pretrained writes the release's names: Mixtral-style per-expert w1 / w2 / w3 under
    block_sparse_moe, the correction bias beside the gate (random, so the routing depends on it)."""
    ckpt = world[0]
    with SafeTensorsSource(ckpt) as src:
        keys = set(src.keys())
        bias = src["model.layers.0.block_sparse_moe.e_score_correction_bias"]
    assert {"model.layers.0.block_sparse_moe.gate.weight", "model.layers.0.block_sparse_moe.experts.5.w2.weight",
            "model.layers.0.self_attn.q_norm.weight"} <= keys
    assert bias.shape == (6,) and bias.abs().max() > 0.1


@pytest.mark.parametrize("name", IDS)
def test_logits_match_hf(world, name):
    _, _, per_rank, hf, _, _ = world
    diff = max_abs_diff(per_rank[0][name]["logits"], hf)  # shapes checked too
    assert diff <= MEGATRON_VS_HF_ATOL, f"{name}: max |logit diff| {diff:.3e} > {MEGATRON_VS_HF_ATOL:.0e}"


def _assert_same_tensors(src_dir: str, dst_dir: str) -> None:
    cmp = compare_checkpoints(src_dir, dst_dir)  # key set, dtypes, shapes, torch.equal
    assert cmp["same_keys"] and cmp["bit_exact"], cmp


@pytest.mark.parametrize("name", IDS)
def test_round_trip_bit_exact(world, name):
    ckpt, out_root, _, _, _, _ = world
    _assert_same_tensors(ckpt, os.path.join(out_root, name))


def test_export_without_source_loads_in_transformers(world):
    ckpt, out_root, _, hf, tokens, _ = world
    out = os.path.join(out_root, f"{NO_SOURCE}_nosource")
    _assert_same_tensors(ckpt, out)
    with open(os.path.join(out, "config.json")) as f:
        written = json.load(f)
    assert written["architectures"] == [ARCH] and written["rotary_dim"] == CONFIG["rotary_dim"]
    config = transformers.AutoConfig.from_pretrained(out)
    assert type(config) is transformers.MiniMaxM2Config
    diff = max_abs_diff(hf_logits(out, tokens), hf)
    assert diff <= SAME_MODEL_ATOL, f"max |logit diff| {diff:.3e}"  # same class and weights (tolerances.py)


def test_bf16_round_trip_keeps_router_dtypes(world):
    """transformers' bf16 save: the Megatron routers hold the file's bf16 gate weights (no fp32 copy, unlike
    DeepSeek-V3) and its correction biases in megatron's fp32 buffer; the export is the source, dtypes included."""
    _, out_root, per_rank, _, _, bf16 = world
    with SafeTensorsSource(bf16) as src:
        assert src["model.layers.0.block_sparse_moe.gate.weight"].dtype == torch.bfloat16
    for rank, r in enumerate(per_rank):
        assert r["bf16_ep2"]["routers"] == [], (rank, r["bf16_ep2"]["routers"][:4])
    _assert_same_tensors(bf16, os.path.join(out_root, "bf16_ep2"))
