"""Llama 4 text (``Llama4ForCausalLM``) end to end on real parts: a transformers checkpoint from a tiny config (random
weights, norms and routers included, fixed seed) -> AutoBridge -> megatron-core GPTModel chunks on CPU / gloo -> HF,
at TP2, EP2, TP2 x EP2 (expert-TP 2) and PP2 x EP2, all in ONE spawned world of 4 ranks.

The tiny config makes every converted feature change the logits (``test_each_feature_changes_the_logits`` shows by
how much): 4 layers covering each combination of RoPE / NoPE and MoE / dense (``no_rope_layers=[1, 0, 0, 1]``,
``interleave_moe_layer_step=2``: MoE layers 1 and 3), a chunk of 5 positions on the RoPE layers for a 12-token
sequence, Scout's llama3 RoPE factors (``low_freq_factor = high_freq_factor = 1``), temperature tuning with
``floor_scale=2`` and ``attn_scale=0.5``, the L2 q/k norm (on RoPE layers only: putting it on the NoPE layers too
moves the logits), 6 routed experts (3 per expert-parallel rank), top-1 sigmoid routing on the expert input, a shared
expert, and a dense MLP wider than the experts.

For each layout: Megatron logits against the transformers model's own (fp32, max |diff| <= 1e-4), the exported
checkpoint against the source (key set, dtypes, torch.equal); at TP2 x EP2 an export without the source
(``AutoBridge.from_architecture``) that transformers loads as the same class with the source model's logits.
"""

from __future__ import annotations

import os

import pytest
import torch

pytest.importorskip("megatron.core")
transformers = pytest.importorskip("transformers")

from megatron_bridge_ext.io import SafeTensorsSource  # noqa: E402
from megatron_bridge_ext.testing.parity import compare_checkpoints, hf_logits  # noqa: E402
from megatron_bridge_ext.testing.tiny_models import make_tiny_checkpoint  # noqa: E402
from megatron_bridge_ext.testing.tolerances import MEGATRON_VS_HF_ATOL, SAME_MODEL_ATOL, max_abs_diff  # noqa: E402
from megatron_bridge_ext.testing.worlds import Layout, spawn_layouts  # noqa: E402

ARCH = "Llama4ForCausalLM"
# Llama 4 Scout's llama3 RoPE factors (low = high = 1: megatron-core fixes 1 / 4), its context cut to 16 positions so
# that most frequencies are scaled
SCOUT_ROPE = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 16.0, "low_freq_factor": 1.0,
              "high_freq_factor": 1.0, "original_max_position_embeddings": 16}
CONFIG = dict(vocab_size=97, hidden_size=64, intermediate_size=24, intermediate_size_mlp=80, num_hidden_layers=4,
              num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=64,
              rms_norm_eps=1e-5, num_local_experts=6, num_experts_per_tok=1, interleave_moe_layer_step=2,
              no_rope_layers=[1, 0, 0, 1], attention_chunk_size=5, attn_temperature_tuning=True, floor_scale=2,
              attn_scale=0.5, use_qk_norm=True, tie_word_embeddings=False,
              rope_parameters=SCOUT_ROPE)
SEQ = 12
LAYOUTS = [Layout("tp2", "llama4", tp=2, etp=2), Layout("ep2", "llama4", ep=2, etp=1),
           Layout("tp2ep2", "llama4", tp=2, ep=2, etp=2, no_source=ARCH),
           Layout("pp2ep2", "llama4", pp=2, ep=2, etp=1), Layout("tp2pp2", "llama4", tp=2, pp=2, etp=2)]
NO_SOURCE = "tp2ep2"
IDS = [layout.name for layout in LAYOUTS]


def _make_checkpoint(path: str, seed: int = 7) -> None:
    """The tiny Llama 4 checkpoint of this test (also written by ``test_te_checkpoint.py``): sharp attention (q/k std
    0.3) and random norms, so that chunks, temperature and the q/k norm show."""
    make_tiny_checkpoint(path, "Llama4Text", CONFIG, seed, arch="Llama4", norm=(1.0, 0.3),
                         rules=[(lambda name: "q_proj" in name or "k_proj" in name, 0.0, 0.3)], rest=(0.0, 0.15))


@pytest.fixture(scope="module")
def world_results(tmp_path_factory):
    root = tmp_path_factory.mktemp("llama4")
    ckpt = str(root / "hf_llama4")
    _make_checkpoint(ckpt)
    tokens = torch.randint(0, CONFIG["vocab_size"], (2, SEQ), generator=torch.Generator().manual_seed(0))
    out_root = str(root / "out")
    results = spawn_layouts({"llama4": ckpt}, LAYOUTS, tokens, out_root)[0]
    return ckpt, out_root, results, hf_logits(ckpt, tokens), tokens


def test_the_checkpoint_has_every_feature(world_results):
    ckpt = world_results[0]
    model = transformers.AutoModelForCausalLM.from_pretrained(ckpt)
    assert type(model).__name__ == ARCH
    config = model.config
    assert config.layer_types == ["chunked_attention", "full_attention", "full_attention", "chunked_attention"]
    assert config.moe_layers == [1, 3] and config.attention_chunk_size < SEQ
    with SafeTensorsSource(ckpt) as src:
        assert list(src["model.layers.1.feed_forward.experts.gate_up_proj"].shape) == [6, 64, 48]
        assert list(src["model.layers.1.feed_forward.experts.down_proj"].shape) == [6, 24, 64]
        assert "model.layers.3.feed_forward.shared_expert.gate_proj.weight" in src.keys()
        assert list(src["model.layers.2.feed_forward.gate_proj.weight"].shape) == [80, 64]


@pytest.mark.parametrize("name", IDS)
def test_logits_match_hf(world_results, name):
    _, _, results, hf, _ = world_results
    diff = max_abs_diff(results[name]["logits"], hf)  # shapes checked too
    assert diff <= MEGATRON_VS_HF_ATOL, f"{name}: max |logit diff| {diff:.3e} > {MEGATRON_VS_HF_ATOL:.0e}"


@pytest.mark.parametrize("name", IDS)
def test_round_trip_bit_exact(world_results, name):
    ckpt, out_root, _, _, _ = world_results
    cmp = compare_checkpoints(ckpt, os.path.join(out_root, name))  # key set, dtypes, shapes, torch.equal
    assert cmp["same_keys"] and cmp["bit_exact"], cmp
    assert os.path.exists(os.path.join(out_root, name, "config.json"))


def test_export_without_source_loads_in_transformers(world_results):
    """config.json from the Megatron config (the bridge's megatron_to_hf_config), tensors in transformers' fused
    expert layout: transformers builds the same model from it and reproduces the source model's logits."""
    ckpt, out_root, _, hf, tokens = world_results
    out = os.path.join(out_root, f"{NO_SOURCE}_nosource")
    cmp = compare_checkpoints(ckpt, out)
    assert cmp["same_keys"] and cmp["bit_exact"], cmp
    config = transformers.AutoConfig.from_pretrained(out)
    source = transformers.AutoConfig.from_pretrained(ckpt)
    assert config.architectures == [ARCH] and type(config) is type(source)
    for field in ("no_rope_layers", "moe_layers", "layer_types", "attention_chunk_size", "floor_scale", "attn_scale",
                  "attn_temperature_tuning", "use_qk_norm", "intermediate_size", "intermediate_size_mlp"):
        assert getattr(config, field) == getattr(source, field), field
    diff = max_abs_diff(hf_logits(out, tokens), hf)
    assert diff <= SAME_MODEL_ATOL, f"max |logit diff| {diff:.3e}"  # same class and weights (tolerances.py)


def _without(model, feature: str):
    """``model`` changed in one converted feature, in place."""
    config = model.config
    if feature == "chunked_attention":
        config.layer_types = ["full_attention"] * config.num_hidden_layers
    elif feature == "temperature_tuning":
        for layer in model.model.layers:
            layer.self_attn.attn_temperature_tuning = False
    elif feature == "rope_layers_only_qk_norm":  # megatron's qk_l2_norm spec: the norm on every layer
        norm = type(model.model.layers[0].self_attn.qk_norm)
        for layer in model.model.layers:
            layer.self_attn.qk_norm = norm(config.rms_norm_eps)
    elif feature == "qk_norm":
        for layer in model.model.layers:
            if hasattr(layer.self_attn, "qk_norm"):
                del layer.self_attn.qk_norm
    elif feature == "nope_layers":
        for layer in model.model.layers:
            layer.self_attn.use_rope = True
    elif feature == "llama3_rope_factors":  # megatron-core's fixed llama3 factors in place of the config's
        config.rope_parameters = {**config.rope_parameters, "high_freq_factor": 4.0,
                                  "original_max_position_embeddings": 8192}
        model.model.rotary_emb = type(model.model.rotary_emb)(config)
    elif feature == "shared_expert":
        for i in config.moe_layers:
            torch.nn.init.zeros_(model.model.layers[i].feed_forward.shared_expert.down_proj.weight)
    return model


@pytest.mark.parametrize("feature", ["chunked_attention", "temperature_tuning", "rope_layers_only_qk_norm", "qk_norm",
                                     "nope_layers", "llama3_rope_factors", "shared_expert"])
def test_each_feature_changes_the_logits(world_results, feature):
    """The negative controls: the source model with one feature removed (or, for the q/k norm, put on every layer as
    megatron-core's own qk_l2_norm spec does) differs from the source's logits by far more than the tolerance, so a
    Megatron model missing that feature could not pass test_logits_match_hf."""
    ckpt, _, _, hf, tokens = world_results
    model = transformers.AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()
    with torch.no_grad():
        changed = _without(model, feature)(tokens, use_cache=False).logits.float()
    diff = (changed - hf).abs().max().item()
    assert diff > 100 * MEGATRON_VS_HF_ATOL, f"{feature}: max |logit diff| {diff:.3e}"
