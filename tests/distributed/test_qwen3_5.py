"""Qwen3.5 dense (``Qwen3_5ForCausalLM``) and MoE (``Qwen3_5MoeForCausalLM``), text only, end to end on real parts:
transformers checkpoints from tiny configs (random weights, fixed seeds) -> AutoBridge -> megatron-core 0.19
GPTModel chunks with gated delta-net layers (CPU, gloo) -> HF, all in ONE spawned world of 4 ranks.

The models are ``test_qwen3_next.py``'s geometry (``[linear, full, linear, full]``, 2 key / 4 value heads in the
delta-net, gated GQA attention with partial RoPE, zero-centred norms N(0, 0.3), gated norms N(1, 0.2)) with Qwen3.5's
split delta-net projections (``in_proj_qkv`` / ``in_proj_z`` / ``in_proj_b`` / ``in_proj_a``) and the released
configs' multimodal RoPE fields (``mrope_section``, ``mrope_interleaved``: the same positions in every section for
text); dense: a SwiGLU MLP per layer; MoE: 4 experts in every layer (the router always renormalises) and a gated
shared expert.

Layouts: dense at TP2 and PP2 x VPP2, MoE at EP2, TP2 x EP2 (expert-TP 2) and PP2. For each: every Megatron parameter
on every rank against a plain-torch reading of the HF tensors (``test_qwen3_next._expected``, the split projections
read here), the Megatron logits against transformers' (fp32, max |diff| <= 1e-4; megatron's ``GatedDeltaNet`` on its
torch paths), the export against the source (``torch.equal``, dtypes, key set). One export per family without the
source that transformers loads with the source model's logits.

Under megatron-core < 0.19 both families are refused by name (``test_megatron_core_version_gate``); the world tests
run in the 0.19 suite.
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
from megatron_bridge_ext.launch import spawn_local  # noqa: E402
from megatron_bridge_ext.mcore.versions import (  # noqa: E402
    MEGATRON_CORE_0_19, installed_megatron_core, unmet_megatron_core,
)
from megatron_bridge_ext.testing.parity import hf_logits  # noqa: E402
from megatron_bridge_ext.testing.tolerances import MEGATRON_VS_HF_ATOL, SAME_MODEL_ATOL  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import test_qwen3_next as nxt  # noqa: E402

HAS_GDN = unmet_megatron_core(MEGATRON_CORE_0_19) is None
BASE = {k: v for k, v in nxt.CONFIG.items() if k not in (
    "moe_intermediate_size", "shared_expert_intermediate_size", "num_experts", "num_experts_per_tok",
    "norm_topk_prob", "decoder_sparse_step", "mlp_only_layers", "partial_rotary_factor")}
BASE["rope_parameters"] = {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.25,
                           "mrope_section": [1, 1, 0], "mrope_interleaved": True}
# family -> (transformers config prefix, architecture, config)
FAMILIES = {
    "dense": ("Qwen3_5Text", "Qwen3_5ForCausalLM", BASE),
    "moe": ("Qwen3_5MoeText", "Qwen3_5MoeForCausalLM", dict(BASE, moe_intermediate_size=24,
                                                           shared_expert_intermediate_size=32, num_experts=nxt.E,
                                                           num_experts_per_tok=2)),
}
# name, family, tp, pp, vpp, ep
LAYOUTS = [("dense_tp2", "dense", 2, 1, None, 1), ("dense_pp2vpp2", "dense", 1, 2, 2, 1),
           ("moe_ep2", "moe", 1, 1, None, 2), ("moe_tp2ep2", "moe", 2, 1, None, 2), ("moe_pp2", "moe", 1, 2, None, 1)]
NO_SOURCE = {"dense": "dense_tp2", "moe": "moe_pp2"}
IDS = [layout[0] for layout in LAYOUTS]

needs_gdn = pytest.mark.skipif(not HAS_GDN, reason="gated delta-net needs megatron-core >= 0.19: these run in the 0.19 "
                               "suite, and this version's refusal is test_megatron_core_version_gate")


def make_checkpoint(path: str, family: str, seed: int):
    """The family's tiny checkpoint (``test_qwen3_next.make_checkpoint``'s draws); returns the model. Also the maker
    of ``test_te_checkpoint.py``'s cases."""
    prefix, arch, config = FAMILIES[family]
    return nxt.make_checkpoint(path, seed, prefix=prefix, arch=arch.replace("ForCausalLM", ""), config=config)


def _expected(name, sd, layer, tp, t, ep, r, etp, et, shape):
    """``test_qwen3_next._expected`` with Qwen3.5's split projections: ``in_proj_qkv`` rows ``[q; k; v]``."""
    if name.endswith("self_attention.in_proj.weight"):
        p = f"model.layers.{layer}.linear_attn"
        qk = nxt.HK * nxt.DK
        qkv = sd[f"{p}.in_proj_qkv.weight"]
        parts = [qkv[:qk], qkv[qk:2 * qk], qkv[2 * qk:], sd[f"{p}.in_proj_z.weight"], sd[f"{p}.in_proj_b.weight"],
                 sd[f"{p}.in_proj_a.weight"]]
        return torch.cat([torch.chunk(x, tp)[t] for x in parts])
    return nxt._expected(name, sd, layer, tp, t, ep, r, etp, et, shape)


def _worker(rank, world, ckpts, tokens, out_root):
    from megatron_bridge_ext.mcore.cpu_compat import apply_cpu_patches

    apply_cpu_patches()
    import torch.distributed as dist
    from megatron.core import parallel_state as ps
    from safetensors.torch import load_file

    from megatron_bridge_ext.auto_bridge import AutoBridge
    from megatron_bridge_ext.mcore.forward import megatron_logits
    from megatron_bridge_ext.mcore.model_builder import destroy_parallel, init_parallel

    results = {}
    for name, family, tp, pp, vpp, ep in LAYOUTS:
        sd = load_file(os.path.join(ckpts[family], "model.safetensors"))
        init_parallel(tp=tp, pp=pp, vpp=vpp, ep=ep, etp=tp)
        bridge = AutoBridge.from_hf_pretrained(ckpts[family])
        chunks = bridge.to_megatron_model(params_dtype=torch.float32)
        r = {"logits": megatron_logits(chunks, tokens)}
        r["bad"], r["seen"] = nxt._check_parameters(
            chunks, sd, tp, ps.get_tensor_model_parallel_rank(), ep, ps.get_expert_model_parallel_rank(), tp,
            ps.get_expert_tensor_parallel_rank(), expected=_expected)
        r["gdn_layers"] = sum(type(layer.self_attention).__name__ == "LocalGatedDeltaNet"
                              for c in chunks for layer in c.decoder.layers)
        bridge.save_hf_pretrained(chunks, os.path.join(out_root, name), max_shard_bytes=256 * 1024,
                                  bucket_bytes=64 * 1024, show_progress=False)
        if name == NO_SOURCE[family]:
            AutoBridge.from_architecture(FAMILIES[family][1]).save_hf_pretrained(
                chunks, os.path.join(out_root, f"nosource_{family}"), bucket_bytes=64 * 1024, show_progress=False)
        if rank != 0:
            r.pop("logits")
        results[name] = r
        destroy_parallel()
        dist.barrier()
    return results


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    transformers.logging.set_verbosity_error()
    root = tmp_path_factory.mktemp("qwen3_5")
    tokens = torch.randint(0, BASE["vocab_size"], (2, 12), generator=torch.Generator().manual_seed(0))
    ckpts, hf = {}, {}
    for i, family in enumerate(FAMILIES):
        ckpts[family] = str(root / f"hf_{family}")
        model = make_checkpoint(ckpts[family], family, seed=41 + i)
        with torch.no_grad():
            hf[family] = model(tokens, use_cache=False).logits.float()
    out_root = str(root / "out")
    per_rank = spawn_local(_worker, 4, (ckpts, tokens, out_root), timeout=900)
    return ckpts, out_root, per_rank, hf, tokens


def config_or_refusal(ckpt: str, arch: str):
    """megatron-core >= 0.19: the checkpoint's ``TransformerConfig``; below: None, once the import is checked to be
    refused naming the architecture, the release it needs and the installed one."""
    from megatron_bridge_ext.auto_bridge import AutoBridge

    if not HAS_GDN:
        with pytest.raises(ValueError, match=rf"{arch}: .*needs megatron-core >= 0\.19\.0; megatron-core "
                                             f"{installed_megatron_core()} is installed"):
            AutoBridge.from_hf_pretrained(ckpt).transformer_config()
        return None
    return AutoBridge.from_hf_pretrained(ckpt).transformer_config()


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_megatron_core_version_gate(tmp_path, family):
    """megatron-core >= 0.19: the config has the gated delta-net pattern; below: a ValueError naming the
    architecture, the version needed and the installed one."""
    transformers.logging.set_verbosity_error()
    ckpt = str(tmp_path / "hf")
    make_checkpoint(ckpt, family, seed=1)
    cfg = config_or_refusal(ckpt, FAMILIES[family][1])
    if cfg is None:
        return
    assert cfg.experimental_attention_variant == "gated_delta_net" and cfg.linear_attention_freq == [1, 0, 1, 0]
    assert cfg.attention_output_gate and cfg.layernorm_zero_centered_gamma and cfg.rotary_percent == 0.25
    assert (cfg.num_moe_experts, cfg.moe_shared_expert_gate) == ((nxt.E, True) if family == "moe" else (None, False))
    if family == "moe":
        assert cfg.moe_layer_freq == 1 and cfg.moe_router_pre_softmax is False


@needs_gdn
def test_the_checkpoints_have_what_the_tests_claim(world):
    ckpts = world[0]
    with SafeTensorsSource(ckpts["dense"]) as src:
        keys = set(src.keys())
        assert src["model.layers.0.linear_attn.norm.weight"].sub(1.0).abs().max().item() > 0.1
    assert {"model.layers.0.linear_attn.in_proj_qkv.weight", "model.layers.0.linear_attn.in_proj_z.weight",
            "model.layers.2.linear_attn.in_proj_b.weight", "model.layers.2.linear_attn.in_proj_a.weight",
            "model.layers.3.mlp.gate_proj.weight"} <= keys
    with SafeTensorsSource(ckpts["moe"]) as src:
        keys = set(src.keys())
    assert {"model.layers.1.mlp.experts.3.up_proj.weight", "model.layers.0.mlp.shared_expert_gate.weight"} <= keys


@needs_gdn
@pytest.mark.parametrize("name,family,tp,pp,vpp,ep", LAYOUTS, ids=IDS)
def test_every_parameter_is_the_plain_reading(world, name, family, tp, pp, vpp, ep):
    per_rank = world[2]
    for rank, r in enumerate(per_rank):
        assert r[name]["seen"] > 0 and r[name]["bad"] == [], (rank, r[name]["bad"][:6])
    assert sum(r[name]["gdn_layers"] for r in per_rank) == 2 * len(per_rank) // pp


@needs_gdn
@pytest.mark.parametrize("name,family,tp,pp,vpp,ep", LAYOUTS, ids=IDS)
def test_logits_match_hf(world, name, family, tp, pp, vpp, ep):
    _, _, per_rank, hf, _ = world
    diff = (per_rank[0][name]["logits"] - hf[family]).abs().max().item()
    assert diff <= MEGATRON_VS_HF_ATOL, f"{name}: max |logit diff| {diff:.3e} > {MEGATRON_VS_HF_ATOL:.0e}"


@needs_gdn
@pytest.mark.parametrize("name,family,tp,pp,vpp,ep", LAYOUTS, ids=IDS)
def test_round_trip_bit_exact(world, name, family, tp, pp, vpp, ep):
    ckpts, out_root, _, _, _ = world
    nxt._assert_same_tensors(ckpts[family], os.path.join(out_root, name))


@needs_gdn
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_export_without_source_loads_in_transformers(world, family):
    ckpts, out_root, _, hf, tokens = world
    out = os.path.join(out_root, f"nosource_{family}")
    nxt._assert_same_tensors(ckpts[family], out)
    with open(os.path.join(out, "config.json")) as f:
        cfg = json.load(f)
    assert cfg["architectures"] == [FAMILIES[family][1]] and cfg["layer_types"] == BASE["layer_types"]
    diff = (hf_logits(out, tokens) - hf[family]).abs().max().item()
    assert diff <= SAME_MODEL_ATOL, f"max |logit diff| {diff:.3e}"
