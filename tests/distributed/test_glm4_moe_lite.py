"""GLM-4.7-Flash (``Glm4MoeLiteForCausalLM``) end to end on real parts: a transformers checkpoint from a tiny config
(random weights, norms, router weights and correction biases included, fixed seed) -> AutoBridge -> megatron-core
GPTModel chunks on CPU / gloo -> HF, at TP2, PP2, TP2 x PP2, EP2, TP2 x EP2 (expert-TP 2), PP2 x EP2 and PP2 x VPP2,
all in ONE spawned world of 4 ranks.

The model: MLA with a q LoRA (``q_lora_rank`` set, as released), latent norms at epsilon 1e-6 and the other norms at
``rms_norm_eps`` 1e-5 (transformers' default for the family), interleaved RoPE on the rope channels, 4 layers whose
``mlp_layer_types`` are dense / sparse / dense / sparse (a dense layer after an MoE layer: not DeepSeek-V3's
``first_k_dense_replace``), 6 routed experts (3 per expert-parallel rank) behind the sigmoid router with its fp32
``e_score_correction_bias`` and routed scaling, one shared expert, untied output layer, a vocabulary that needs
padding.

Multi-token prediction: the released checkpoint holds one MTP layer after its decoder layers (transformers skips it on
load); the test writes one into the checkpoint (HF layer ``num_hidden_layers``: a transformers MoE decoder layer with
random weights, random ``enorm`` / ``hnorm`` / ``eh_proj`` / ``shared_head.norm``, ``embed_tokens`` /
``shared_head.head`` copies of the main tensors), and every layout converts it (PP2 x VPP2: one decoder layer per
virtual stage, the MTP layer on the last).

For each layout: Megatron logits against the transformers model's own (fp32, max |diff| <= 1e-4); the MTP logits
against a plain reference (``eh_proj([enorm(embed(shifted ids)); hnorm(final hidden)])`` through the transformers
decoder layer, then ``shared_head``); at the expert-parallel layouts every local expert against a plain-torch slice
of the HF tensors of its *global* expert; the export against the source (key set, dtypes, ``torch.equal``). From
PP2 x EP2, an export without the source (``AutoBridge.from_architecture``) that equals the source and that
transformers loads with the source model's logits.

Fused experts: a copy of the MTP checkpoint with each layer's experts as transformers' fused tensors
(``gate_up_proj`` ``[E, 2F, D]``, ``down_proj`` ``[E, D, F]``), imported at TP2 x EP2, gives exactly the Megatron
parameters of the per-expert checkpoint on every rank and exports back to itself; transformers loads it with the
per-expert model's logits (the writer is right).

bf16: transformers' own bf16 save keeps ``mlp.gate.weight`` and ``e_score_correction_bias`` fp32; at TP2 x EP2 the
Megatron routers hold them fp32, equal to the file's, every other parameter but the norms is bf16, and the export is
the file, dtypes included.
"""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch

pytest.importorskip("megatron.core")
transformers = pytest.importorskip("transformers")

from megatron_bridge_ext.io import SafeTensorsSource  # noqa: E402
from megatron_bridge_ext.testing.parity import (  # noqa: E402
    compare_checkpoints, hf_logits, local_expert_mismatches, mtp_reference_logits,
)
from megatron_bridge_ext.testing.tiny_models import (  # noqa: E402
    make_tiny_checkpoint, randomise, save_transformers_bf16, write_mtp_layer,
)
from megatron_bridge_ext.testing.tolerances import MEGATRON_VS_HF_ATOL, SAME_MODEL_ATOL, max_abs_diff  # noqa: E402
from megatron_bridge_ext.testing.worlds import Layout, spawn_layouts  # noqa: E402

ARCH = "Glm4MoeLiteForCausalLM"
E, F = 6, 24
CONFIG = dict(vocab_size=97, hidden_size=64, intermediate_size=80, moe_intermediate_size=F, num_hidden_layers=4,
              num_attention_heads=4, num_key_value_heads=4, n_routed_experts=E, num_experts_per_tok=2,
              n_shared_experts=1, routed_scaling_factor=1.8, n_group=1, topk_group=1, q_lora_rank=24,
              kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=16, v_head_dim=12, rms_norm_eps=1e-5,
              max_position_embeddings=64, tie_word_embeddings=False,
              mlp_layer_types=["dense", "sparse", "dense", "sparse"],
              rope_parameters={"rope_type": "default", "rope_theta": 1000000.0})
MTP = CONFIG["num_hidden_layers"]  # HF index of the MTP layer
SPARSE = [i for i, t in enumerate(CONFIG["mlp_layer_types"]) if t == "sparse"]
NO_SOURCE = "pp2ep2"
FUSED_AT = "tp2ep2"  # where the fused checkpoint is imported too


def _randomise(module: torch.nn.Module) -> None:
    randomise(module, (1.0, 0.2), rest=(0.0, 0.15), correction_bias=0.3)


def _make_checkpoint(path: str, seed: int):
    """The tiny transformers checkpoint (``CONFIG``, random weights incl. norms and correction biases, no MTP layer);
    returns the model. Also the maker of ``tests/distributed/test_te_checkpoint.py``'s case."""
    return make_tiny_checkpoint(path, "Glm4MoeLite", CONFIG, seed=seed, norm=(1.0, 0.2), rest=(0.0, 0.15),
                                correction_bias=0.3).eval()


def _write_mtp(src: str, dst: str, model, seed: int):
    """A copy of ``src`` with one MTP layer (HF layer MTP): a transformers MoE decoder layer's tensors (random; one
    tensor per expert, like the rest of the file), random enorm / hnorm / eh_proj / shared_head.norm, copies of the
    embedding and lm_head, and ``num_nextn_predict_layers = 1`` in config.json. Returns (decoder layer, MTP
    tensors)."""
    torch.manual_seed(seed)
    layer = type(model.model.layers[SPARSE[-1]])(model.config, SPARSE[-1]).float().eval()
    _randomise(layer)
    mtp = write_mtp_layer(src, dst, layer, MTP)
    with open(os.path.join(src, "config.json")) as f:
        cfg = json.load(f)
    cfg["num_nextn_predict_layers"] = 1
    with open(os.path.join(dst, "config.json"), "w") as f:
        json.dump(cfg, f)
    return layer, mtp


def _write_fused(src: str, dst: str) -> None:
    """A copy of ``src`` whose experts are fused tensors per layer: ``gate_up_proj`` ``[E, 2F, D]`` ([gate; up] rows
    per expert) and ``down_proj`` ``[E, D, F]``, transformers' own orientation."""
    from safetensors.torch import load_file, save_file

    out, experts = {}, {}
    for k, v in load_file(os.path.join(src, "model.safetensors")).items():
        parts = k.split(".")
        if ".mlp.experts." in k:
            experts.setdefault(int(parts[2]), {})[(int(parts[5]), parts[6])] = v
        else:
            out[k] = v
    for layer, t in experts.items():
        p = f"model.layers.{layer}.mlp.experts"
        out[f"{p}.gate_up_proj"] = torch.stack([torch.cat([t[(e, "gate_proj")], t[(e, "up_proj")]]) for e in range(E)])
        out[f"{p}.down_proj"] = torch.stack([t[(e, "down_proj")] for e in range(E)])
    os.makedirs(dst, exist_ok=True)
    save_file(out, os.path.join(dst, "model.safetensors"), metadata={"format": "pt"})
    shutil.copy(os.path.join(src, "config.json"), os.path.join(dst, "config.json"))


def _check_routers(chunks, sd):
    """(mismatches, routers seen): every router weight and expert bias is fp32 and equals the HF tensor; the other
    floating parameters are bf16, but the norms (megatron-core's local-spec norms are fp32 whatever params_dtype is)."""
    bad, seen = [], 0
    for chunk in chunks:
        for name, tensor in chunk.state_dict().items():
            if "_extra_state" in name:
                continue
            kind = "weight" if name.endswith(".mlp.router.weight") else \
                "e_score_correction_bias" if name.endswith(".mlp.router.expert_bias") else None
            if kind is None:
                if "norm" not in name and tensor.dtype != torch.bfloat16:
                    bad.append(f"{name}: {tensor.dtype}")
                continue
            seen += 1
            layer = chunk.decoder.layers[int(name.split(".")[2])].layer_number - 1
            hf = sd[f"model.layers.{layer}.mlp.gate.{kind}"]
            if tensor.dtype != torch.float32 or hf.dtype != torch.float32 or not torch.equal(tensor, hf):
                bad.append(f"{name}: {tensor.dtype} vs HF {hf.dtype}")
    return bad, seen


def _experts(run) -> dict:
    from megatron.core import parallel_state as ps
    from safetensors.torch import load_file

    sd = load_file(os.path.join(run.ckpts["mtp"], "model.safetensors"))  # a plain reading of the file
    bad, layers = local_expert_mismatches(run.chunks, sd, E, ps.get_expert_model_parallel_rank(), run.layout.ep,
                                          ps.get_expert_tensor_parallel_rank(), run.layout.tp, mtp_index=MTP)
    return {"bad_experts": bad, "moe_layers": layers}


def _fused(run) -> dict:
    """The fused-expert copy imported at this layout: the same Megatron parameters; exported back."""
    from megatron_bridge_ext.auto_bridge import AutoBridge

    mine = {f"{i}:{k}": v for i, c in enumerate(run.chunks) for k, v in c.state_dict().items()
            if "_extra_state" not in k}
    fused_bridge = AutoBridge.from_hf_pretrained(run.ckpts["fused"])
    fused = fused_bridge.to_megatron_model(params_dtype=torch.float32)
    theirs = {f"{i}:{k}": v for i, c in enumerate(fused) for k, v in c.state_dict().items()
              if "_extra_state" not in k}
    fused_bridge.save_hf_pretrained(fused, os.path.join(run.out_root, "fused"), bucket_bytes=64 * 1024,
                                    show_progress=False)
    return {"fused_differs": sorted(set(mine) ^ set(theirs)) + sorted(
        k for k in set(mine) & set(theirs) if not torch.equal(mine[k], theirs[k])), "fused_params": len(theirs)}


def _routers(run) -> dict:
    from safetensors.torch import load_file

    return {"routers": _check_routers(run.chunks, load_file(os.path.join(run.ckpts["bf16"], "model.safetensors")))}


def _layout(name: str, tp: int, pp: int, vpp, ep: int) -> Layout:
    return Layout(name, "mtp", tp=tp, pp=pp, vpp=vpp, ep=ep, etp=tp if ep > 1 else None, logits="mtp",
                  max_shard_bytes=256 * 1024, no_source=ARCH if name == NO_SOURCE else None,
                  checks=(_experts,) if ep > 1 else (), after_export=(_fused,) if name == FUSED_AT else ())


LAYOUTS = [_layout("tp2", 2, 1, None, 1), _layout("pp2", 1, 2, None, 1), _layout("tp2pp2", 2, 2, None, 1),
           _layout("ep2", 1, 1, None, 2), _layout("tp2ep2", 2, 1, None, 2), _layout("pp2ep2", 1, 2, None, 2),
           _layout("pp2vpp2", 1, 2, 2, 1)]
IDS = [layout.name for layout in LAYOUTS]
# transformers' own bf16 save, params_dtype from config.json
BF16 = Layout("bf16_tp2ep2", "bf16", tp=2, ep=2, etp=2, dtype=None, logits=None, checks=(_routers,))


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    transformers.logging.set_verbosity_error()
    root = tmp_path_factory.mktemp("glm4_moe_lite")
    tokens = torch.randint(0, CONFIG["vocab_size"], (2, 12), generator=torch.Generator().manual_seed(0))
    native = str(root / "hf_native")
    model = _make_checkpoint(native, seed=31)
    with torch.no_grad():
        hf = model(tokens, use_cache=False).logits.float()
    ckpts = {"native": native, "mtp": str(root / "hf_mtp"), "fused": str(root / "hf_fused")}
    layer, mtp = _write_mtp(native, ckpts["mtp"], model, seed=41)
    _write_fused(ckpts["mtp"], ckpts["fused"])
    ckpts["bf16"] = save_transformers_bf16(model, str(root / "hf_bf16"))
    hf_mtp = mtp_reference_logits(model, layer, mtp, tokens)
    out_root = str(root / "out")
    per_rank = spawn_layouts(ckpts, LAYOUTS + [BF16], tokens, out_root)
    return ckpts, out_root, per_rank, hf, hf_mtp, tokens


def _assert_same_tensors(src_dir, dst_dir):
    cmp = compare_checkpoints(src_dir, dst_dir)  # key set, dtypes, shapes, torch.equal
    assert cmp["same_keys"] and cmp["bit_exact"], cmp


def test_the_checkpoint_has_what_the_tests_claim(world):
    """Random norms (latent ones included), non-zero correction biases, a dense layer after an MoE layer, one MTP
    layer in the MTP checkpoint and none in transformers' own save."""
    ckpts, _, _, _, _, _ = world
    with SafeTensorsSource(ckpts["mtp"]) as src:
        keys = set(src.keys())
        for key in ("model.layers.1.self_attn.q_a_layernorm.weight", "model.layers.0.self_attn.kv_a_layernorm.weight",
                    "model.layers.3.post_attention_layernorm.weight", "model.norm.weight"):
            assert (src[key] - 1.0).abs().max().item() > 0.1, key
        assert src["model.layers.3.mlp.gate.e_score_correction_bias"].abs().max().item() > 0.1
        assert src["model.layers.3.mlp.gate.weight"].dtype == torch.float32
    assert "model.layers.2.mlp.gate_proj.weight" in keys and "model.layers.1.mlp.gate.weight" in keys
    assert "model.layers.2.mlp.gate.weight" not in keys
    assert f"model.layers.{MTP}.eh_proj.weight" in keys and f"model.layers.{MTP}.mlp.experts.5.up_proj.weight" in keys
    with SafeTensorsSource(ckpts["native"]) as src:
        assert not any(k.startswith(f"model.layers.{MTP}.") for k in src.keys())


@pytest.mark.parametrize("name", IDS)
def test_logits_match_hf(world, name):
    _, _, per_rank, hf, _, _ = world
    diff = max_abs_diff(per_rank[0][name]["logits"], hf)
    assert diff <= MEGATRON_VS_HF_ATOL, f"{name}: max |logit diff| {diff:.3e} > {MEGATRON_VS_HF_ATOL:.0e}"


@pytest.mark.parametrize("name", IDS)
def test_mtp_logits_match_the_reference(world, name):
    """One MTP depth, against the plain reference around the transformers decoder layer."""
    _, _, per_rank, _, hf_mtp, _ = world
    got = per_rank[0][name]["mtp_logits"]
    assert len(got) == 1
    diff = max_abs_diff(got[0], hf_mtp)
    assert diff <= MEGATRON_VS_HF_ATOL and hf_mtp.abs().max().item() > 1.0, f"{name}: MTP max |diff| {diff:.3e}"


@pytest.mark.parametrize("name,pp", [(c.name, c.pp) for c in LAYOUTS if c.ep > 1],
                         ids=[c.name for c in LAYOUTS if c.ep > 1])
def test_local_experts_are_the_hf_global_experts(world, name, pp):
    """Local expert e on expert-parallel rank r is HF expert e + 3 r, sliced for its expert-TP rank, in the two
    sparse decoder layers and the MTP layer (one of them on the first pipeline stage, two on the last)."""
    _, _, per_rank, _, _, _ = world
    for rank, r in enumerate(per_rank):
        assert r[name]["moe_layers"] > 0 and r[name]["bad_experts"] == [], (rank, r[name])
    assert sum(r[name]["moe_layers"] for r in per_rank) == (len(SPARSE) + 1) * len(per_rank) // pp


@pytest.mark.parametrize("name", IDS)
def test_round_trip_bit_exact(world, name):
    ckpts, out_root, _, _, _, _ = world
    _assert_same_tensors(ckpts["mtp"], os.path.join(out_root, name))


def test_fused_checkpoint_gives_the_per_expert_parameters_and_round_trips(world):
    ckpts, out_root, per_rank, hf, _, tokens = world
    with SafeTensorsSource(ckpts["fused"]) as src:
        keys = set(src.keys())
    assert f"model.layers.{MTP}.mlp.experts.gate_up_proj" in keys and not any(".experts.0." in k for k in keys)
    for rank, r in enumerate(per_rank):
        res = r[FUSED_AT]
        assert res["fused_params"] > 0 and res["fused_differs"] == [], (rank, res["fused_differs"][:6])
    _assert_same_tensors(ckpts["fused"], os.path.join(out_root, "fused"))
    # transformers reads the fused tensors as its own (the MTP layer apart, which it skips): the same model; the
    # fused experts only change the GEMMs' reduction order (testing/tolerances.py)
    diff = max_abs_diff(hf_logits(ckpts["fused"], tokens), hf)
    assert diff <= SAME_MODEL_ATOL, f"max |logit diff| {diff:.3e}"


def test_bf16_round_trip_keeps_fp32_routers(world):
    ckpts, out_root, per_rank, _, _, _ = world
    name = BF16.name
    for rank, r in enumerate(per_rank):
        bad, seen = r[name]["routers"]
        assert bad == [] and seen == 2 * len(SPARSE), (rank, bad[:6], seen)  # weight and bias per sparse layer
    _assert_same_tensors(ckpts[BF16.ckpt], os.path.join(out_root, name))


def test_export_without_source_loads_in_transformers(world):
    """From PP2 x EP2 without a source: the tensors of the MTP checkpoint, a config.json with the layer pattern and
    the MTP layer, and transformers loads it with the source model's logits."""
    ckpts, out_root, _, hf, _, tokens = world
    out = os.path.join(out_root, f"{NO_SOURCE}_nosource")
    _assert_same_tensors(ckpts["mtp"], out)
    with open(os.path.join(out, "config.json")) as f:
        cfg = json.load(f)
    assert cfg["architectures"] == [ARCH] and cfg["model_type"] == "glm4_moe_lite"
    assert cfg["mlp_layer_types"] == CONFIG["mlp_layer_types"] and cfg["num_nextn_predict_layers"] == 1
    assert cfg["num_hidden_layers"] == MTP and cfg["q_lora_rank"] == CONFIG["q_lora_rank"]
    diff = max_abs_diff(hf_logits(out, tokens), hf)
    assert diff <= SAME_MODEL_ATOL, f"max |logit diff| {diff:.3e}"  # same class and weights (tolerances.py)
