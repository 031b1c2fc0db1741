"""End to end on real parts for the dense families Mistral, Qwen3, Gemma 2, Gemma 3 (text) and Phi-3: transformers
checkpoints from tiny configs (random weights incl. norms, fixed seed) -> AutoBridge -> megatron-core GPTModel chunks
(CPU, gloo) -> HF, at TP2, PP2 or PP2+VPP2, and TP2xPP2.

All layouts run in ONE spawned world of 4 ranks. For each layout: the Megatron logits against the HF model's own
(fp32, max |diff| <= 1e-4) and the exported checkpoint against the source (key set, dtypes, torch.equal). For each
family, one export without the source checkpoint (config.json from the Megatron config) that transformers loads with
the same logits.

What each checkpoint exercises:
- mistral: sliding window on every layer (window 5 < 12 tokens), odd vocabulary, untied;
- qwen3: q/k norms, head_dim 24 != hidden / heads, sliding window on the last two layers only, tied embeddings;
- gemma2: GeGLU, zero-centred sandwich norms, sqrt(hidden) embedding scale, query_pre_attn_scalar, alternating
  sliding / full layers, tied embeddings, attention and final logit soft-capping with caps small enough to bite
  (3.0 on scores of std ~5, 1.5 on logits up to ~2.4: without either cap the logits move by > 0.5, which
  test_gemma2_soft_caps_bite checks on the HF model);
- gemma3: Gemma 2's features plus zero-centred q/k norms, a sliding / full pattern, full layers with linear-scaled RoPE
  (theta 1e6) and sliding layers with their own RoPE base (1e4);
- phi3: fused qkv_proj and gate_up_proj, partial rotary (0.5), sliding window 7 on every layer.
"""

from __future__ import annotations

import os

import pytest
import torch

pytest.importorskip("megatron.core")
transformers = pytest.importorskip("transformers")

from megatron_bridge_ext.testing.parity import compare_checkpoints, hf_logits  # noqa: E402
from megatron_bridge_ext.testing.tiny_models import make_tiny_checkpoint  # noqa: E402
from megatron_bridge_ext.testing.tolerances import MEGATRON_VS_HF_ATOL, SAME_MODEL_ATOL, max_abs_diff  # noqa: E402
from megatron_bridge_ext.testing.worlds import Layout, spawn_layouts  # noqa: E402

BASE = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-5)
GEMMA2_SOFTCAP = dict(attn_logit_softcapping=3.0, final_logit_softcapping=1.5)
# name -> (HF config class prefix, architecture prefix, config overrides)
CHECKPOINTS = {
    "mistral": ("Mistral", "Mistral", dict(head_dim=16, sliding_window=5,
                                           rope_parameters={"rope_type": "default", "rope_theta": 10000.0})),
    "qwen3": ("Qwen3", "Qwen3", dict(head_dim=24, tie_word_embeddings=True, use_sliding_window=True,
                                     sliding_window=5, max_window_layers=2, vocab_size=101)),
    "gemma2": ("Gemma2", "Gemma2", dict(head_dim=16, query_pre_attn_scalar=24, sliding_window=5, **GEMMA2_SOFTCAP)),
    "gemma3": ("Gemma3Text", "Gemma3", dict(
        head_dim=16, sliding_window=5, query_pre_attn_scalar=20,
        layer_types=["sliding_attention", "sliding_attention", "full_attention", "sliding_attention"],
        rope_parameters={"full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1000000.0},
                         "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}})),
    "phi3": ("Phi3", "Phi3", dict(pad_token_id=None, eos_token_id=None, sliding_window=7,
                                  rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                                   "partial_rotary_factor": 0.5})),
}
def _arch(ckpt: str) -> str:
    return f"{CHECKPOINTS[ckpt][1]}ForCausalLM"


def _make_checkpoint(path: str, ckpt: str, seed: int) -> None:
    """Random weights from a fixed seed; norms random too (Gemma's around 0: they are stored as w of 1 + w); sharp
    attention (q/k std 0.3) so that windows and RoPE visibly change the logits."""
    config_prefix, arch, overrides = CHECKPOINTS[ckpt]
    make_tiny_checkpoint(path, config_prefix, {**BASE, **overrides}, seed, arch=arch,
                         norm=(0.0 if arch.startswith("Gemma") else 1.0, 0.3),
                         rules=[(lambda name: any(s in name for s in ("q_proj", "k_proj", "qkv_proj")), 0.0, 0.3)],
                         rest=(0.0, 0.08))


def _layout(ckpt: str, suffix: str, tp: int, pp: int, vpp=None) -> Layout:
    name = f"{ckpt}_{suffix}"
    return Layout(name, ckpt, tp=tp, pp=pp, vpp=vpp, max_shard_bytes=96 * 1024,
                  no_source=_arch(ckpt) if name in NO_SOURCE else None)


NO_SOURCE = {"mistral_tp2pp2", "qwen3_tp2pp2", "gemma2_tp2pp2", "gemma3_pp2vpp2", "phi3_tp2pp2"}
LAYOUTS = [
    _layout("mistral", "tp2", 2, 1), _layout("mistral", "pp2vpp2", 1, 2, 2),
    _layout("mistral", "tp2pp2", 2, 2),
    _layout("qwen3", "tp2", 2, 1), _layout("qwen3", "pp2", 1, 2), _layout("qwen3", "tp2pp2", 2, 2),
    _layout("gemma2", "tp2", 2, 1), _layout("gemma2", "pp2", 1, 2), _layout("gemma2", "tp2pp2", 2, 2),
    _layout("gemma3", "tp2", 2, 1), _layout("gemma3", "pp2vpp2", 1, 2, 2),
    _layout("gemma3", "tp2pp2", 2, 2),
    _layout("phi3", "tp2", 2, 1), _layout("phi3", "pp2", 1, 2), _layout("phi3", "tp2pp2", 2, 2),
]
CASES = [(layout.name, layout.ckpt) for layout in LAYOUTS]
IDS = [layout.name for layout in LAYOUTS]


@pytest.fixture(scope="module")
def world_results(tmp_path_factory):
    root = tmp_path_factory.mktemp("dense_families")
    ckpts = {}
    for i, ckpt in enumerate(CHECKPOINTS):
        ckpts[ckpt] = str(root / f"hf_{ckpt}")
        _make_checkpoint(ckpts[ckpt], ckpt, seed=10 + i)
    tokens = torch.randint(0, 97, (2, 12), generator=torch.Generator().manual_seed(0))
    out_root = str(root / "out")
    results = spawn_layouts(ckpts, LAYOUTS, tokens, out_root)[0]
    hf = {ckpt: hf_logits(path, tokens) for ckpt, path in ckpts.items()}
    return ckpts, out_root, results, hf, tokens


@pytest.mark.parametrize("name,ckpt", CASES, ids=IDS)
def test_logits_match_hf(world_results, name, ckpt):
    _, _, results, hf, _ = world_results
    diff = max_abs_diff(results[name]["logits"], hf[ckpt])  # shapes checked too
    assert diff <= MEGATRON_VS_HF_ATOL, f"{name}: max |logit diff| {diff:.3e} > {MEGATRON_VS_HF_ATOL:.0e}"


def _assert_same_tensors(src_dir: str, dst_dir: str) -> None:
    cmp = compare_checkpoints(src_dir, dst_dir)  # key set, dtypes, shapes, torch.equal
    assert cmp["same_keys"] and cmp["bit_exact"], cmp


@pytest.mark.parametrize("name,ckpt", CASES, ids=IDS)
def test_round_trip_bit_exact(world_results, name, ckpt):
    ckpts, out_root, _, _, _ = world_results
    _assert_same_tensors(ckpts[ckpt], os.path.join(out_root, name))
    assert os.path.exists(os.path.join(out_root, name, "config.json"))


@pytest.mark.parametrize("name", sorted(NO_SOURCE))
def test_export_without_source_loads_in_transformers(world_results, name):
    """config.json from the Megatron config (the family's megatron_to_hf_config), tensors from the mappings:
    transformers builds the same architecture from it and reproduces the source model's logits."""
    ckpts, out_root, _, hf, tokens = world_results
    ckpt = dict(CASES)[name]
    out = os.path.join(out_root, f"{name}_nosource")
    _assert_same_tensors(ckpts[ckpt], out)
    config = transformers.AutoConfig.from_pretrained(out)
    assert config.architectures == [_arch(ckpt)]
    assert type(config) is type(transformers.AutoConfig.from_pretrained(ckpts[ckpt]))
    diff = max_abs_diff(hf_logits(out, tokens), hf[ckpt])
    assert diff <= SAME_MODEL_ATOL, f"{name}: max |logit diff| {diff:.3e}"  # same class and weights (tolerances.py)


@pytest.mark.parametrize("cap", sorted(GEMMA2_SOFTCAP))
def test_gemma2_soft_caps_bite(world_results, cap):
    """The Gemma 2 checkpoint's caps change its logits far beyond the 1e-4 tolerance: a Megatron model missing
    either cap could not pass test_logits_match_hf."""
    ckpts, _, _, hf, tokens = world_results
    model = transformers.AutoModelForCausalLM.from_pretrained(ckpts["gemma2"], dtype=torch.float32).eval()
    assert getattr(model.config, cap) == GEMMA2_SOFTCAP[cap]
    setattr(model.config, cap, None)
    for layer in model.model.layers:  # the attention reads its cap at construction
        layer.self_attn.attn_logit_softcapping = model.config.attn_logit_softcapping
    with torch.no_grad():
        uncapped = model(tokens, use_cache=False).logits.float()
    assert (uncapped - hf["gemma2"]).abs().max().item() > 0.5
