"""GLM-5 (``GlmMoeDsaForCausalLM``: DeepSeek sparse attention with interleaved indexer RoPE and cross-layer top-k
sharing) end to end on real parts: a transformers checkpoint from a tiny config (random weights, norms, indexer
``k_norm`` weight and bias, router weights and correction biases, fixed seed) -> AutoBridge -> megatron-core (>= 0.19)
GPTModel chunks on CPU / gloo -> HF, at TP2, PP2, TP2 x PP2, EP2, TP2 x EP2 (expert-TP 2) and PP2 x EP2, all in ONE
spawned world of 4 ranks.

The model: 4 layers whose ``indexer_types`` are full / shared / full / shared (transformers' ``index_topk_freq = 2``,
``index_skip_topk_offset = 1``: layers 1 and 3 reuse the top-k of layers 0 and 2 and hold no indexer tensors), an
indexer (4 heads of 16 channels, the first 8 rotated in interleaved pairs) keeping ``index_topk = 5`` of 12 positions,
the first layer dense, 6 routed experts, one shared expert, ``rms_norm_eps`` 1e-5 with latent norms at 1e-6, untied
output layer, a vocabulary that needs padding. The test checks that the sharing and the sparsity both change
transformers' logits (a model whose every layer runs its own indexer, and one that keeps every key, differ).

For each layout: Megatron logits against the transformers model's own (fp32, max |diff| <= 1e-4); on every rank each
indexer parameter of a full layer against a plain reading of its HF tensor (replicated: the whole tensor) and no
indexer in a shared layer; at the expert-parallel layouts every local expert against its global expert's HF
tensors; the export against the source (key set, dtypes, ``torch.equal``). From PP2 x EP2, an export without the
source that equals the source and that transformers loads with the source model's logits (``indexer_types``
included). PP2 x VPP2 (one layer per virtual stage: stages starting on shared layers) is refused by name in
``tests/models/test_glm_moe_dsa_config.py``.

Multi-token prediction: a second checkpoint with every indexer full (transformers' default schedule) and one MTP
layer (a transformers GLM-5 MoE decoder layer with its indexer; ``test_deepseek_v32.py``'s writer, the plain
reference of ``testing.parity``), at TP2 x EP2 and PP2 x VPP2: logits, MTP logits and the bit-exact round trip.
"""

from __future__ import annotations

import json
import os
import sys

import pytest
import torch

pytest.importorskip("megatron.core")
transformers = pytest.importorskip("transformers")

from megatron_bridge_ext.io import SafeTensorsSource  # noqa: E402
from megatron_bridge_ext.mcore.versions import megatron_core_version  # noqa: E402
from megatron_bridge_ext.testing.parity import compare_checkpoints, hf_logits, mtp_reference_logits  # noqa: E402
from megatron_bridge_ext.testing.tiny_models import make_tiny_checkpoint  # noqa: E402
from megatron_bridge_ext.testing.tolerances import MEGATRON_VS_HF_ATOL, SAME_MODEL_ATOL, max_abs_diff  # noqa: E402
from megatron_bridge_ext.testing.worlds import Layout, spawn_layouts  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import test_deepseek_v32 as deepseek_v32  # noqa: E402  (the MTP writer and the expert check)

ARCH = "GlmMoeDsaForCausalLM"
HAS_DSA = megatron_core_version() >= (0, 19, 0)
E, F = 6, 24
CONFIG = dict(vocab_size=97, hidden_size=64, intermediate_size=80, moe_intermediate_size=F, num_hidden_layers=4,
              num_attention_heads=4, num_key_value_heads=4, n_routed_experts=E, num_experts_per_tok=2,
              n_shared_experts=1, routed_scaling_factor=1.8, n_group=1, topk_group=1, q_lora_rank=24,
              kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=16, v_head_dim=12, rms_norm_eps=1e-5,
              max_position_embeddings=64, tie_word_embeddings=False, first_k_dense_replace=1,
              index_topk=5, index_head_dim=16, index_n_heads=4, index_topk_freq=2, index_skip_topk_offset=1,
              rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
TYPES = ["full", "shared", "full", "shared"]
INDEXER = {"linear_wq_b.weight": "wq_b.weight", "linear_wk.weight": "wk.weight", "k_norm.weight": "k_norm.weight",
           "k_norm.bias": "k_norm.bias", "linear_weights_proj.weight": "weights_proj.weight"}
NO_SOURCE = "pp2ep2"
# every indexer full (transformers' default schedule) with a multi-token-prediction layer: also at PP2 x VPP2
FULL_MTP = {k: v for k, v in CONFIG.items() if k not in ("index_topk_freq", "index_skip_topk_offset")}

needs_dsa = pytest.mark.skipif(not HAS_DSA, reason="megatron-core < 0.19 has no DSA (the refusal is tested below)")


def _make_checkpoint(path: str, seed: int, config=CONFIG):
    """The tiny transformers checkpoint; returns the model. Also the maker of ``test_te_checkpoint.py``'s case."""
    return make_tiny_checkpoint(path, "GlmMoeDsa", config, seed=seed, norm=(1.0, 0.2), rest=(0.0, 0.15),
                                correction_bias=0.3).eval()


def _check_indexers(chunks, sd):
    """(mismatches, full layers seen, shared layers seen) of this rank's decoder layers."""
    bad, full, shared = [], 0, 0
    for chunk in chunks:
        for layer in chunk.decoder.layers:
            n = layer.layer_number - 1
            indexer = layer.self_attention.core_attention.indexer
            if TYPES[n] == "shared":
                shared += 1
                if indexer is not None:
                    bad.append(f"HF layer {n} is shared but has a Megatron indexer")
                continue
            full += 1
            for mine, theirs in INDEXER.items():
                if not torch.equal(indexer.get_parameter(mine), sd[f"model.layers.{n}.self_attn.indexer.{theirs}"]):
                    bad.append(f"HF layer {n} indexer.{mine}")
    return bad, full, shared


def _indexers(run) -> dict:
    return {"indexers": _check_indexers(run.chunks, deepseek_v32._file(run)),
            "sharing": (run.chunks[0].config.dsa_indexer_topk_freq, run.chunks[0].config.dsa_indexer_skip_topk_offset)}


def _layout(name: str, tp: int, pp: int, vpp, ep: int) -> Layout:
    return Layout(name, "main", tp=tp, pp=pp, vpp=vpp, ep=ep, etp=tp if ep > 1 else None,
                  max_shard_bytes=256 * 1024, no_source=ARCH if name == NO_SOURCE else None,
                  checks=(_indexers, deepseek_v32._experts) if ep > 1 else (_indexers,))


def _mtp_layout(name: str, tp: int, pp: int, vpp, ep: int) -> Layout:
    return Layout(name, "mtp", tp=tp, pp=pp, vpp=vpp, ep=ep, etp=tp if ep > 1 else None, logits="mtp")


LAYOUTS = [_layout("tp2", 2, 1, None, 1), _layout("pp2", 1, 2, None, 1), _layout("tp2pp2", 2, 2, None, 1),
           _layout("ep2", 1, 1, None, 2), _layout("tp2ep2", 2, 1, None, 2), _layout("pp2ep2", 1, 2, None, 2)]
MTP_LAYOUTS = [_mtp_layout("mtp_tp2ep2", 2, 1, None, 2), _mtp_layout("mtp_pp2vpp2", 1, 2, 2, 1)]
BY_NAME = {layout.name: layout for layout in LAYOUTS}
IDS = [layout.name for layout in LAYOUTS]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    transformers.logging.set_verbosity_error()
    root = tmp_path_factory.mktemp("glm_moe_dsa")
    tokens = torch.randint(0, CONFIG["vocab_size"], (2, 12), generator=torch.Generator().manual_seed(0))
    ckpt = str(root / "hf")
    model = _make_checkpoint(ckpt, seed=31)
    with torch.no_grad():
        hf = model(tokens, use_cache=False).logits.float()
        for layer in model.model.layers:  # every key kept: the indexers select nothing
            if layer.self_attn.indexer is not None:
                layer.self_attn.indexer.index_topk = 64
        dense = model(tokens, use_cache=False).logits.float()
    # the same weights, every layer running its own indexer (the shared layers' indexers drawn at random)
    unshared = transformers.GlmMoeDsaForCausalLM(transformers.GlmMoeDsaConfig(
        **{**{k: v for k, v in CONFIG.items() if not k.startswith("index_topk_") and k != "index_skip_topk_offset"},
           "indexer_types": ["full"] * 4})).float().eval()
    missing = unshared.load_state_dict(model.state_dict(), strict=False).missing_keys
    with torch.no_grad():
        for layer in model.model.layers:
            if layer.self_attn.indexer is not None:
                layer.self_attn.indexer.index_topk = CONFIG["index_topk"]
        own = unshared(tokens, use_cache=False).logits.float()
    # the all-full model with one MTP layer (test_deepseek_v32's writer: a transformers MoE decoder layer of this
    # family with its indexer, random enorm / hnorm / eh_proj / shared_head.norm) and its plain reference
    full = _make_checkpoint(str(root / "hf_full"), seed=33, config=FULL_MTP)
    mtp_ckpt = str(root / "hf_full_mtp")
    layer, mtp = deepseek_v32._write_mtp(str(root / "hf_full"), mtp_ckpt, full, seed=43)
    with torch.no_grad():
        full_hf = full(tokens, use_cache=False).logits.float()
    full_mtp = mtp_reference_logits(full, layer, mtp, tokens)
    out_root = str(root / "out")
    per_rank = spawn_layouts({"main": ckpt, "mtp": mtp_ckpt}, LAYOUTS + MTP_LAYOUTS, tokens, out_root) \
        if HAS_DSA else None
    world = (ckpt, out_root, per_rank, hf, dense, own, missing, tokens)
    return world + ((mtp_ckpt, full_hf, full_mtp),)


def _assert_same_tensors(src_dir, dst_dir):
    cmp = compare_checkpoints(src_dir, dst_dir)  # key set, dtypes, shapes, torch.equal
    assert cmp["same_keys"] and cmp["bit_exact"], cmp


def test_the_checkpoint_has_what_the_tests_claim(world):
    """Indexers in the full layers only, a random k_norm with a non-zero bias, and both the sparsity and the
    sharing change transformers' logits."""
    ckpt, _, _, hf, dense, own, missing, _, _ = world
    with open(os.path.join(ckpt, "config.json")) as f:
        assert json.load(f)["indexer_types"] == TYPES
    with SafeTensorsSource(ckpt) as src:
        keys = set(src.keys())
        assert (src["model.layers.2.self_attn.indexer.k_norm.weight"] - 1.0).abs().max().item() > 0.1
        assert src["model.layers.0.self_attn.indexer.k_norm.bias"].abs().max().item() > 0.05
    for n, kind in enumerate(TYPES):
        assert (f"model.layers.{n}.self_attn.indexer.wq_b.weight" in keys) == (kind == "full"), n
    assert sorted({k.split(".indexer.")[0] for k in missing}) == [f"model.layers.{n}.self_attn" for n in (1, 3)]
    assert (hf - dense).abs().max().item() > 0.05 and (hf - own).abs().max().item() > 0.05


@needs_dsa
@pytest.mark.parametrize("name", IDS)
def test_logits_match_hf(world, name):
    _, _, per_rank, hf, _, _, _, _, _ = world
    diff = max_abs_diff(per_rank[0][name]["logits"], hf)
    assert diff <= MEGATRON_VS_HF_ATOL, f"{name}: max |logit diff| {diff:.3e} > {MEGATRON_VS_HF_ATOL:.0e}"
    assert per_rank[0][name]["sharing"] == (2, 1)


@needs_dsa
@pytest.mark.parametrize("name", IDS)
def test_indexers_are_replicated_in_the_full_layers_only(world, name):
    _, _, per_rank, _, _, _, _, _, _ = world
    pp = BY_NAME[name].pp
    for rank, r in enumerate(per_rank):
        bad, full, shared = r[name]["indexers"]
        assert bad == [] and full == shared == 2 // pp, (rank, bad[:6], full, shared)


@needs_dsa
@pytest.mark.parametrize("name", [layout.name for layout in LAYOUTS if layout.ep > 1])
def test_local_experts_are_the_hf_global_experts(world, name):
    _, _, per_rank, _, _, _, _, _, _ = world
    for rank, r in enumerate(per_rank):
        bad, layers = r[name]["experts"]
        assert layers > 0 and bad == [], (rank, bad[:6])
    assert sum(r[name]["experts"][1] for r in per_rank) == 3 * len(per_rank) // BY_NAME[name].pp


@needs_dsa
@pytest.mark.parametrize("name", IDS)
def test_round_trip_bit_exact(world, name):
    ckpt, out_root, _, _, _, _, _, _, _ = world
    _assert_same_tensors(ckpt, os.path.join(out_root, name))


@needs_dsa
def test_export_without_source_loads_in_transformers(world):
    ckpt, out_root, _, hf, _, _, _, tokens, _ = world
    out = os.path.join(out_root, f"{NO_SOURCE}_nosource")
    _assert_same_tensors(ckpt, out)
    with open(os.path.join(out, "config.json")) as f:
        cfg = json.load(f)
    assert cfg["architectures"] == [ARCH] and cfg["model_type"] == "glm_moe_dsa"
    assert cfg["indexer_types"] == TYPES and cfg["index_topk"] == 5 and cfg["num_nextn_predict_layers"] == 0
    diff = max_abs_diff(hf_logits(out, tokens), hf)
    assert diff <= SAME_MODEL_ATOL, f"max |logit diff| {diff:.3e}"


@needs_dsa
@pytest.mark.parametrize("name", [layout.name for layout in MTP_LAYOUTS])
def test_all_full_model_with_mtp_layer(world, name):
    """Every indexer full (no sharing) and one MTP layer with its indexer: logits and MTP logits against
    transformers and the plain MTP reference, and the bit-exact round trip (PP2 x VPP2 too: no shared layer can
    start a stage)."""
    _, out_root, per_rank, _, _, _, _, _, (mtp_ckpt, full_hf, full_mtp) = world
    r = per_rank[0][name]
    diff = max_abs_diff(r["logits"], full_hf)
    assert diff <= MEGATRON_VS_HF_ATOL, f"{name}: max |logit diff| {diff:.3e}"
    assert len(r["mtp_logits"]) == 1
    diff = max_abs_diff(r["mtp_logits"][0], full_mtp)
    assert diff <= MEGATRON_VS_HF_ATOL and full_mtp.abs().max().item() > 1.0, f"{name}: MTP max |diff| {diff:.3e}"
    with SafeTensorsSource(mtp_ckpt) as src:
        assert "model.layers.4.self_attn.indexer.wq_b.weight" in src.keys()
    _assert_same_tensors(mtp_ckpt, os.path.join(out_root, name))


@pytest.mark.skipif(HAS_DSA, reason="megatron-core >= 0.19 converts the family (the tests above)")
def test_refused_before_megatron_core_0_19(world):
    from megatron_bridge_ext.auto_bridge import AutoBridge
    from megatron_bridge_ext.mcore.versions import installed_megatron_core

    refusal = rf"{ARCH}: DeepSeek sparse attention .*megatron-core >= 0\.19\.0; megatron-core " \
        rf"{installed_megatron_core()} is installed"
    with pytest.raises(ValueError, match=refusal):
        AutoBridge.from_hf_pretrained(world[0])
    with pytest.raises(ValueError, match=refusal):
        AutoBridge.from_architecture(ARCH).model_bridge.megatron_to_hf_config(None)
