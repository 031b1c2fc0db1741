"""End to end on real parts: transformers LlamaForCausalLM (and Qwen2ForCausalLM) checkpoints -> AutoBridge ->
megatron-core GPTModel chunks (CPU, gloo) -> HF, for TP1, TP2, PP2, TP2xPP2, PP2+VPP2, odd vocabularies, tied embeddings, and Qwen2's q/k/v biases.

All layouts run in ONE spawned world of 4 ranks (each process that imports megatron-core costs seconds). For each
layout the Megatron logits are compared with the HF model's own logits, and the exported checkpoint with the source
checkpoint (key set, dtypes, torch.equal).
"""

from __future__ import annotations

import json
import os

import pytest
import torch

pytest.importorskip("megatron.core")
transformers = pytest.importorskip("transformers")

from megatron_bridge_ext.launch import spawn_local  # noqa: E402
from megatron_bridge_ext.io import SafeTensorsSource  # noqa: E402
from megatron_bridge_ext.testing.parity import hf_logits  # noqa: E402
from megatron_bridge_ext.testing.tiny_models import make_tiny_checkpoint  # noqa: E402
from megatron_bridge_ext.testing.tolerances import MEGATRON_VS_HF_ATOL, SAME_MODEL_ATOL  # noqa: E402

BASE = dict(
    vocab_size=128, hidden_size=64, intermediate_size=160, num_hidden_layers=4, num_attention_heads=4,
    num_key_value_heads=2, head_dim=16, max_position_embeddings=128, rms_norm_eps=1e-5, rope_theta=10000.0,
    tie_word_embeddings=False,
)
CHECKPOINTS = {
    "untied": dict(),
    "odd_vocab": dict(vocab_size=97),
    "tied": dict(tie_word_embeddings=True, vocab_size=101),
    "tied_stored_head": dict(tie_word_embeddings=True, vocab_size=101),  # lm_head.weight stored, = the embedding
    "llama3_rope": dict(rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                      "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}),
    "bf16": dict(),
    "qwen2": dict(),
}
ARCH = {"qwen2": "Qwen2"}  # checkpoints of another architecture (default: Llama)
# name, tp, pp, vpp, checkpoint, world ranks needed
LAYOUTS = [
    ("tp1", 1, 1, None, "untied"),
    ("tp2", 2, 1, None, "untied"),
    ("pp2", 1, 2, None, "untied"),
    ("tp2pp2", 2, 2, None, "untied"),
    ("pp2vpp2", 1, 2, 2, "untied"),
    ("tp2_odd_vocab", 2, 1, None, "odd_vocab"),
    ("pp2_tied", 1, 2, None, "tied"),
    ("tp2pp2_tied", 2, 2, None, "tied"),
    ("tp2pp2_tied_stored_head", 2, 2, None, "tied_stored_head"),
    ("tp2_llama3_rope", 2, 1, None, "llama3_rope"),
    ("tp2_bf16", 2, 1, None, "bf16"),
    ("tp2pp2_qwen2", 2, 2, None, "qwen2"),
    ("tp4_two_kv_groups", 4, 1, None, "untied"),  # 2 query groups over 4 TP ranks: each group split in two
]


def _make_checkpoint(path: str, overrides: dict, dtype: torch.dtype, seed: int, arch: str = "Llama") -> None:
    # random norms; HF initialises biases to zero: make them visible
    make_tiny_checkpoint(path, arch, {**BASE, **overrides}, seed, dtype=dtype,
                         rules=[(lambda name: name.endswith(".bias"), 0.0, 0.1)])


def _worker(rank: int, world: int, ckpts: dict, tokens: torch.Tensor, out_root: str, layouts: list) -> dict:
    from megatron_bridge_ext.mcore.cpu_compat import apply_cpu_patches

    apply_cpu_patches()
    import torch.distributed as dist

    from megatron_bridge_ext.auto_bridge import AutoBridge
    from megatron_bridge_ext.mcore.model_builder import destroy_parallel, init_parallel
    from megatron_bridge_ext.mcore.forward import megatron_logits

    results = {}
    for name, tp, pp, vpp, ckpt in layouts:
        init_parallel(tp=tp, pp=pp, vpp=vpp)
        bridge = AutoBridge.from_hf_pretrained(ckpts[ckpt])
        chunks = bridge.to_megatron_model(params_dtype=torch.float32)
        logits = megatron_logits(chunks, tokens)
        # small shards and buckets: several shards + an index, several flat collectives per stage
        bridge.save_hf_pretrained(chunks, os.path.join(out_root, name), max_shard_bytes=96 * 1024,
                                  bucket_bytes=64 * 1024, show_progress=False)
        if rank == 0:
            results[name] = logits
        if name in NO_SOURCE:  # export a trained model with no HF checkpoint at hand: config.json from Megatron
            AutoBridge.from_architecture(f"{ARCH.get(ckpt, 'Llama')}ForCausalLM").save_hf_pretrained(
                chunks, os.path.join(out_root, f"{name}_nosource"), max_shard_bytes=96 * 1024, bucket_bytes=64 * 1024,
                show_progress=False)
        if name == "tp2pp2":  # weight sync to every rank (RL): each rank checks what it received
            from megatron_bridge_ext.io import SafeTensorsSource

            got = dict(bridge.export_hf_weights(chunks, dst="all", bucket_bytes=32 * 1024, show_progress=False))
            with SafeTensorsSource(ckpts[ckpt]) as src:
                ok = set(got) == set(src.keys()) and all(torch.equal(got[k], src[k]) for k in src.keys())
            results[f"dst_all_rank{rank}"] = ok
            got = list(bridge.export_hf_weights(chunks, dst=3, show_progress=False))
            results[f"dst3_rank{rank}"] = len(got)
        destroy_parallel()
        dist.barrier()
    # a tied checkpoint whose stored lm_head.weight differs from the embedding: Megatron keeps one tensor for both,
    # so the import refuses it (every rank holds the embedding at TP1 PP1), naming both tensors
    init_parallel(tp=1, pp=1)
    try:
        AutoBridge.from_hf_pretrained(ckpts["tied_bad_head"]).to_megatron_model(params_dtype=torch.float32)
        results[f"bad_head_rank{rank}"] = None
    except Exception as e:  # noqa: BLE001 - the message is what is checked
        results[f"bad_head_rank{rank}"] = f"{type(e).__name__}: {e}"
    destroy_parallel()
    return results


def _store_tied_head(path: str, out: str = None, perturb: bool = False) -> None:
    """Rewrite a tied checkpoint with ``lm_head.weight`` stored beside the embedding (as some releases do): equal to
    it, or with one element changed (``perturb``), into ``out`` (a copy of the directory) or in place."""
    import shutil

    from safetensors.torch import load_file, save_file

    if out is not None:
        shutil.copytree(path, out)
        path = out
    file = os.path.join(path, "model.safetensors")
    tensors = load_file(file)
    head = tensors["model.embed_tokens.weight"].clone()
    if perturb:
        head[3, 5] += 1.0
    tensors["lm_head.weight"] = head
    save_file(tensors, file, metadata={"format": "pt"})


@pytest.fixture(scope="module")
def world_results(tmp_path_factory):
    root = tmp_path_factory.mktemp("llama_e2e")
    ckpts = {}
    for i, (key, overrides) in enumerate(CHECKPOINTS.items()):
        ckpts[key] = str(root / f"hf_{key}")
        _make_checkpoint(ckpts[key], overrides, torch.bfloat16 if key == "bf16" else torch.float32, seed=i,
                         arch=ARCH.get(key, "Llama"))
    _store_tied_head(ckpts["tied_stored_head"])
    ckpts["tied_bad_head"] = str(root / "hf_tied_bad_head")
    _store_tied_head(ckpts["tied"], ckpts["tied_bad_head"], perturb=True)
    tokens = torch.randint(0, 97, (2, 12), generator=torch.Generator().manual_seed(0))
    out_root = str(root / "out")
    per_rank = spawn_local(_worker, 4, (ckpts, tokens, out_root, LAYOUTS), timeout=600)
    results = per_rank[0]
    for r in per_rank[1:]:
        results.update({k: v for k, v in r.items() if k.startswith(("dst", "bad_head"))})
    hf = {key: hf_logits(path, tokens) for key, path in ckpts.items() if key not in ("bf16", "tied_bad_head")}
    return ckpts, out_root, results, hf


NO_SOURCE = ("tp2pp2", "pp2_tied", "tp2pp2_qwen2")
FP32_LAYOUTS = [layout for layout in LAYOUTS if layout[4] != "bf16"]  # bf16: round trip only


@pytest.mark.parametrize("name,tp,pp,vpp,ckpt", FP32_LAYOUTS, ids=[layout[0] for layout in FP32_LAYOUTS])
def test_logits_match_hf(world_results, name, tp, pp, vpp, ckpt):
    _, _, results, hf = world_results
    got = results[name]
    assert got.shape == hf[ckpt].shape, (got.shape, hf[ckpt].shape)
    diff = (got - hf[ckpt]).abs().max().item()
    assert diff <= MEGATRON_VS_HF_ATOL, f"{name}: max |logit diff| {diff:.3e} > {MEGATRON_VS_HF_ATOL:.0e}"


@pytest.mark.parametrize("name,tp,pp,vpp,ckpt", LAYOUTS, ids=[layout[0] for layout in LAYOUTS])
def test_round_trip_bit_exact(world_results, name, tp, pp, vpp, ckpt):
    ckpts, out_root, _, _ = world_results
    out = os.path.join(out_root, name)
    with SafeTensorsSource(ckpts[ckpt]) as src, SafeTensorsSource(out) as dst:
        assert set(src.keys()) == set(dst.keys()), (set(src.keys()) ^ set(dst.keys()))
        for key in src.keys():
            a, b = src[key], dst[key]
            assert a.dtype == b.dtype, (key, a.dtype, b.dtype)
            assert torch.equal(a, b), key
    # several shards, an index written from what was written, and the side files
    index = json.load(open(os.path.join(out, "model.safetensors.index.json")))
    files = set(index["weight_map"].values())
    assert len(files) > 1
    assert index["metadata"]["total_size"] == sum(
        SafeTensorsSource(out).nbytes(k) for k in index["weight_map"])
    assert os.path.exists(os.path.join(out, "config.json"))


def test_tied_checkpoint_has_no_lm_head(world_results):
    ckpts, out_root, _, _ = world_results
    with SafeTensorsSource(ckpts["tied"]) as src, SafeTensorsSource(os.path.join(out_root, "pp2_tied")) as dst:
        assert ("lm_head.weight" in src) == ("lm_head.weight" in dst)


def test_tied_checkpoint_with_stored_head(world_results):
    """A tied checkpoint that stores lm_head.weight (a copy of the embedding): the export reproduces it (the
    round-trip test compares every tensor), and one whose stored head differs from the embedding is refused."""
    ckpts, out_root, results, _ = world_results
    with SafeTensorsSource(ckpts["tied_stored_head"]) as src, \
            SafeTensorsSource(os.path.join(out_root, "tp2pp2_tied_stored_head")) as dst:
        assert "lm_head.weight" in src and "lm_head.weight" in dst
        assert torch.equal(dst["lm_head.weight"], src["model.embed_tokens.weight"])
    errors = [results[f"bad_head_rank{r}"] for r in range(4)]
    assert all(e is not None for e in errors), errors
    assert any("lm_head.weight" in e and "model.embed_tokens.weight" in e and "differs" in e for e in errors), errors


def test_export_to_every_rank_and_to_one_rank(world_results):
    _, _, results, _ = world_results
    assert all(results[f"dst_all_rank{r}"] for r in range(4)), results
    n_keys = len(SafeTensorsSource(world_results[0]["untied"]).keys())
    assert [results[f"dst3_rank{r}"] for r in range(4)] == [0, 0, 0, n_keys]


@pytest.mark.parametrize("name", NO_SOURCE)
def test_export_without_source_loads_in_transformers(world_results, name):
    """No HF source: config.json is generated from the Megatron config, shapes from the mappings; transformers loads
    the directory and reproduces the original model's logits, and every tensor equals the source checkpoint's."""
    ckpts, out_root, _, hf = world_results
    ckpt = next(layout[4] for layout in LAYOUTS if layout[0] == name)
    out = os.path.join(out_root, f"{name}_nosource")
    assert set(os.listdir(out)) >= {"config.json", "model.safetensors.index.json"}
    with SafeTensorsSource(ckpts[ckpt]) as src, SafeTensorsSource(out) as dst:
        want = set(src.keys()) - ({"lm_head.weight"} if CHECKPOINTS[ckpt].get("tie_word_embeddings") else set())
        assert set(dst.keys()) == want, set(dst.keys()) ^ want
        for key in want:
            assert src[key].dtype == dst[key].dtype and torch.equal(src[key], dst[key]), key
    tokens = torch.randint(0, 97, (2, 12), generator=torch.Generator().manual_seed(0))
    got = hf_logits(out, tokens)
    diff = (got - hf[ckpt]).abs().max().item()
    assert diff <= SAME_MODEL_ATOL, f"{name}: max |logit diff| {diff:.3e}"  # same class and weights (tolerances.py)
