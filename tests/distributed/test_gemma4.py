"""End to end on real parts for Gemma 4 text (``Gemma4ForCausalLM``): transformers checkpoints from tiny configs
(random weights incl. norms and ``layer_scalar``, fixed seed) -> AutoBridge -> megatron-core GPTModel chunks (CPU,
gloo) -> HF, at TP2, PP2, PP2+VPP2 and TP2xPP2 (the released shape at TP2, PP2, TP2xPP2), all in ONE spawned world
of 4 ranks.

For each layout: the Megatron logits against the HF model's own (fp32, max |diff| <= 1e-4) and the exported
checkpoint against the source (key set, dtypes, torch.equal). Exports without the source checkpoint (config.json from
the Megatron config) load in transformers with the source model's logits.
Megatron torch_dist checkpoints of the ``gemma4`` and ``gemma4_released`` checkpoints (written from the model and
streamed, TE keys; the released shape with one checkpoint key per layer) are proved in
``tests/distributed/test_te_checkpoint.py``.

What each checkpoint exercises:
- gemma4: what Gemma 4 adds over Gemma 3 and converts: plain (not zero-centred) RMSNorms, the weightless value norm
  (``v_norm``), a random ``layer_scalar`` per layer, attention scaling 1.0, full-attention layers with proportional
  RoPE (``partial_rotary_factor`` 0.25, theta 1e4, ``factor`` 2) and sliding layers with their own base (100,
  window 5 < 12 tokens), final logit soft-capping (1.5 on logits up to ~1.5), tied embeddings, head_dim 24 !=
  hidden / heads;
- gemma4_plain: one default RoPE for both layer types, no soft-capping, untied embeddings;
- gemma4_released: the released dense shape scaled down: full-attention layers with their own head size
  (``global_head_dim`` 32 against 16) and kv heads (``num_global_key_value_heads`` 1 against 2, fewer than TP
  ranks), ``attention_k_eq_v`` (no ``v_proj``: the keys' projection fills ``linear_qkv``'s value rows), 6 layers in
  a 2:1 sliding / full pattern, proportional RoPE over the full layers' 32 channels.
``test_gemma4_features_bite`` shows on the HF model that each of layer_scalar, v_norm and the proportional RoPE
moves the logits far beyond the tolerance, so a Megatron model missing one could not pass.
"""

from __future__ import annotations

import os

import pytest
import torch

pytest.importorskip("megatron.core")
transformers = pytest.importorskip("transformers")

from megatron_bridge_ext.io import SafeTensorsSource  # noqa: E402
from megatron_bridge_ext.testing.parity import compare_checkpoints, hf_logits  # noqa: E402
from megatron_bridge_ext.testing.tiny_models import randomise, tiny_hf_model  # noqa: E402
from megatron_bridge_ext.testing.tolerances import MEGATRON_VS_HF_ATOL, SAME_MODEL_ATOL, max_abs_diff  # noqa: E402
from megatron_bridge_ext.testing.worlds import Layout, spawn_layouts  # noqa: E402

VOCAB = 97
BASE = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, head_dim=24, global_head_dim=24, hidden_size_per_layer_input=0,
            max_position_embeddings=128, rms_norm_eps=1e-5, sliding_window=5,
            layer_types=["sliding_attention", "full_attention", "sliding_attention", "full_attention"])
PROPORTIONAL = {"rope_type": "proportional", "partial_rotary_factor": 0.25, "rope_theta": 10000.0, "factor": 2.0}
CHECKPOINTS = {
    "gemma4": dict(final_logit_softcapping=1.5,
                   rope_parameters={"full_attention": PROPORTIONAL,
                                    "sliding_attention": {"rope_type": "default", "rope_theta": 100.0}}),
    "gemma4_plain": dict(final_logit_softcapping=None, tie_word_embeddings=False,
                         rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 10000.0},
                                          "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}}),
    # the released dense shape, scaled down: full-attention layers of their own head size (global_head_dim 32 vs
    # 16) and kv heads (num_global_key_value_heads 1 vs 2; 1 < tp 2: a query group split over the TP ranks), keys
    # used as values (attention_k_eq_v: no v_proj), a 2:1 sliding / full pattern over 6 layers
    "gemma4_released": dict(num_hidden_layers=6, head_dim=16, global_head_dim=32, num_global_key_value_heads=1,
                            attention_k_eq_v=True, final_logit_softcapping=1.5,
                            layer_types=["sliding_attention", "sliding_attention", "full_attention"] * 2,
                            rope_parameters={"full_attention": PROPORTIONAL,
                                             "sliding_attention": {"rope_type": "default", "rope_theta": 100.0}}),
}
NO_SOURCE = {"gemma4_pp2vpp2", "gemma4_tp2pp2", "gemma4_plain_tp2", "released_tp2", "released_tp2pp2"}
ARCH = "Gemma4ForCausalLM"


def _layout(name: str, ckpt: str, tp: int, pp: int, vpp=None) -> Layout:
    return Layout(name, ckpt, tp=tp, pp=pp, vpp=vpp, max_shard_bytes=96 * 1024,
                  no_source=ARCH if name in NO_SOURCE else None)


LAYOUTS = [
    _layout("gemma4_tp2", "gemma4", 2, 1),
    _layout("gemma4_pp2", "gemma4", 1, 2),
    _layout("gemma4_pp2vpp2", "gemma4", 1, 2, 2),
    _layout("gemma4_tp2pp2", "gemma4", 2, 2),
    _layout("gemma4_plain_tp2", "gemma4_plain", 2, 1),
    _layout("released_tp2", "gemma4_released", 2, 1),
    _layout("released_pp2", "gemma4_released", 1, 2),
    _layout("released_tp2pp2", "gemma4_released", 2, 2),
]
CASES = [(layout.name, layout.ckpt) for layout in LAYOUTS]
IDS = [layout.name for layout in LAYOUTS]


def _make_checkpoint(path: str, ckpt: str, seed: int) -> None:
    """Random weights from a fixed seed: norms N(1, 0.3) (Gemma 4's norms multiply by w), sharp attention (q/k std
    0.3) so that windows and RoPE visibly change the logits, and each layer's ``layer_scalar`` (a buffer
    transformers saves) drawn from U(0.5, 1.5)."""
    model = tiny_hf_model("Gemma4Text", {**BASE, **CHECKPOINTS[ckpt]}, seed, arch="Gemma4")
    randomise(model, (1.0, 0.3), rules=[(lambda name: "q_proj" in name or "k_proj" in name, 0.0, 0.3)],
              rest=(0.0, 0.08))
    with torch.no_grad():
        for layer in model.model.layers:
            layer.layer_scalar.uniform_(0.5, 1.5)
    model.save_pretrained(path, safe_serialization=True)


@pytest.fixture(scope="module")
def world_results(tmp_path_factory):
    root = tmp_path_factory.mktemp("gemma4")
    ckpts = {}
    for i, ckpt in enumerate(CHECKPOINTS):
        ckpts[ckpt] = str(root / f"hf_{ckpt}")
        _make_checkpoint(ckpts[ckpt], ckpt, seed=40 + i)
    tokens = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(0))
    out_root = str(root / "out")
    results = spawn_layouts(ckpts, LAYOUTS, tokens, out_root, timeout=600)[0]
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
    with SafeTensorsSource(ckpts[ckpt]) as src:  # the layer scalars travel too
        assert {f"model.layers.{i}.layer_scalar" for i in range(BASE["num_hidden_layers"])} <= set(src.keys())
    _assert_same_tensors(ckpts[ckpt], os.path.join(out_root, name))
    assert os.path.exists(os.path.join(out_root, name, "config.json"))


@pytest.mark.parametrize("name", sorted(NO_SOURCE))
def test_export_without_source_loads_in_transformers(world_results, name):
    """config.json from the Megatron config, tensors from the mappings: transformers builds Gemma4ForCausalLM from
    it (one head size: an empty per_layer_config; the released shape: the full layers' head_dim / kv heads, k=v
    without v_proj) and reproduces the source model's logits."""
    ckpts, out_root, _, hf, tokens = world_results
    ckpt = dict(CASES)[name]
    out = os.path.join(out_root, f"{name}_nosource")
    _assert_same_tensors(ckpts[ckpt], out)
    config = transformers.AutoConfig.from_pretrained(out)
    assert config.architectures == [ARCH]
    assert type(config) is transformers.Gemma4TextConfig
    if ckpt == "gemma4_released":
        assert config.per_layer_attributes == {"head_dim", "num_key_value_heads"} and config.attention_k_eq_v
        full = [i for i, t in enumerate(config.layer_types) if t == "full_attention"]
        assert [(config.per_layer_config[i].head_dim, config.per_layer_config[i].num_key_value_heads)
                for i in range(len(config.layer_types))] == [(32, 1) if i in full else (16, 2) for i in range(6)]
    else:
        assert not config.per_layer_attributes
    diff = max_abs_diff(hf_logits(out, tokens), hf[ckpt])
    assert diff <= SAME_MODEL_ATOL, f"{name}: max |logit diff| {diff:.3e}"  # same class and weights (tolerances.py)


def _without_layer_scalar(model):
    for layer in model.model.layers:
        layer.layer_scalar.fill_(1.0)


def _without_v_norm(model):
    for layer in model.model.layers:
        layer.self_attn.v_norm = torch.nn.Identity()


def _default_rope(model):
    emb = model.model.rotary_emb
    head_dim = BASE["head_dim"]
    theta = PROPORTIONAL["rope_theta"]
    emb.full_attention_inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float) / head_dim)


@pytest.mark.parametrize("change", [_without_layer_scalar, _without_v_norm, _default_rope],
                         ids=["layer_scalar", "v_norm", "proportional_rope"])
def test_gemma4_features_bite(world_results, change):
    """Each Gemma 4 feature the Megatron model reproduces changes the HF model's logits by far more than the 1e-4
    tolerance: a conversion that dropped it could not pass test_logits_match_hf."""
    ckpts, _, _, hf, tokens = world_results
    model = transformers.AutoModelForCausalLM.from_pretrained(ckpts["gemma4"], dtype=torch.float32).eval()
    with torch.no_grad():
        change(model)
        changed = model(tokens, use_cache=False).logits.float()
    assert (changed - hf["gemma4"]).abs().max().item() > 100 * MEGATRON_VS_HF_ATOL
