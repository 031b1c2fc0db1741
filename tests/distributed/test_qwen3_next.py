"""Qwen3-Next (``Qwen3NextForCausalLM``) end to end on real parts: a transformers checkpoint from a tiny config
(random weights, fixed seed) -> AutoBridge -> megatron-core 0.19 GPTModel chunks with gated delta-net layers (CPU,
gloo) -> HF, at TP2, PP2, EP2, TP2 x EP2 (expert-TP 2) and PP2 x VPP2, all in ONE spawned world of 4 ranks.

The model: 4 layers ``[linear, full, linear, full]`` (each pipeline stage holds both kinds), 2 key heads / 4 value
heads in the delta-net (two value heads per key head: the grouping that HF's ``in_proj_qkvz`` interleaves), gated
attention with GQA (4 query heads, 2 kv heads, ``head_dim`` 16) and partial RoPE (0.25), zero-centred norms drawn
N(0, 0.3), the delta-net's gated norms N(1, 0.2) (plain ``x * w`` in HF, ``1 + w`` in megatron), 4 routed experts
with ``norm_topk_prob``, a gated shared expert, a dense layer (``mlp_only_layers=[2]``), untied embeddings and a
vocabulary that needs padding.

For each layout:
- every Megatron parameter on every rank equals a plain-torch reading of the HF tensors written here
  (:func:`_expected`), the delta-net's ``in_proj`` read through transformers' own ``fix_query_key_value_ordering``;
- the Megatron logits against the transformers model's (fp32, max |diff| <= 1e-4): megatron's ``GatedDeltaNet`` runs
  on the CPU through its own torch paths (``mcore.linear_attention``), so every delta-net layer is compared, at TP1
  and TP2;
- the export against the source (key set, dtypes, ``torch.equal``).
From PP2, an export without the source (``AutoBridge.from_architecture``) that transformers loads with the source
model's logits. transformers' own bf16 save at TP2 (bf16 parameters, bit-exact export). A checkpoint with the
release's multi-token-prediction tensors (``mtp.*``) is refused, naming them.

Under megatron-core < 0.19 the family is refused by name (``test_megatron_core_version_gate``); the world tests run
in the 0.19 suite.
"""

from __future__ import annotations

import json
import os

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
from megatron_bridge_ext.testing.tiny_models import randomise, save_transformers_bf16, tiny_hf_model  # noqa: E402
from megatron_bridge_ext.testing.tolerances import MEGATRON_VS_HF_ATOL, SAME_MODEL_ATOL  # noqa: E402

ARCH = "Qwen3NextForCausalLM"
HAS_GDN = unmet_megatron_core(MEGATRON_CORE_0_19) is None
E = 4
HK, HV, DK, DV, K = 2, 4, 8, 12, 4
HEADS, GROUPS, HEAD_DIM = 4, 2, 16
CONFIG = dict(vocab_size=97, hidden_size=64, intermediate_size=80, moe_intermediate_size=24,
              shared_expert_intermediate_size=32, num_hidden_layers=4, num_attention_heads=HEADS,
              num_key_value_heads=GROUPS, head_dim=HEAD_DIM, num_experts=E, num_experts_per_tok=2,
              norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[2], linear_conv_kernel_dim=K,
              linear_key_head_dim=DK, linear_value_head_dim=DV, linear_num_key_heads=HK, linear_num_value_heads=HV,
              rms_norm_eps=1e-6, max_position_embeddings=64, partial_rotary_factor=0.25, tie_word_embeddings=False,
              layer_types=["linear_attention", "full_attention", "linear_attention", "full_attention"],
              pad_token_id=None, bos_token_id=None, eos_token_id=None)
# name, tp, pp, vpp, ep
LAYOUTS = [("tp2", 2, 1, None, 1), ("pp2", 1, 2, None, 1), ("ep2", 1, 1, None, 2), ("tp2ep2", 2, 1, None, 2),
           ("pp2vpp2", 1, 2, 2, 1)]
NO_SOURCE = "pp2"
IDS = [layout[0] for layout in LAYOUTS]

needs_gdn = pytest.mark.skipif(not HAS_GDN, reason="gated delta-net needs megatron-core >= 0.19: these run in the 0.19 "
                               "suite, and this version's refusal is test_megatron_core_version_gate")


def make_checkpoint(path: str, seed: int, prefix: str = "Qwen3Next", arch=None, config=None):
    """The tiny transformers checkpoint: zero-centred norms N(0, 0.3), gated norms N(1, 0.2) in [0.5, 2], the rest
    N(0, 0.15)
    (A_log, dt_bias, conv1d included); returns the model. Also the maker of ``test_te_checkpoint.py``'s case and
    (other ``prefix`` / ``arch`` / ``config``) of ``test_qwen3_5.py``'s."""
    model = tiny_hf_model(prefix, config or CONFIG, seed, arch)
    randomise(model, (0.0, 0.3), rest=(0.0, 0.15))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("linear_attn.norm.weight"):
                p.copy_((1.0 + 0.2 * torch.randn_like(p)).clamp(0.5, 2.0))  # where w - 1 is exact (Sterbenz)
    model.save_pretrained(path, safe_serialization=True)
    return model.eval()


def _split(t: torch.Tensor, n: int, i: int, dim: int = 0) -> torch.Tensor:
    return torch.chunk(t, n, dim=dim)[i]


def _qkvzba_reading(sd, layer: int):
    """q, k, v, z, b, a rows (all heads) of HF layer ``layer``'s delta-net, read by transformers' own
    ``fix_query_key_value_ordering`` applied to the weights as if they were activations (``[1, D, rows]``)."""
    from transformers.models.qwen3_next.modeling_qwen3_next import Qwen3NextGatedDeltaNet

    p = f"model.layers.{layer}.linear_attn"
    gdn = Qwen3NextGatedDeltaNet.__new__(Qwen3NextGatedDeltaNet)
    gdn.num_k_heads, gdn.num_v_heads, gdn.head_k_dim, gdn.head_v_dim = HK, HV, DK, DV
    q, k, v, z, b, a = gdn.fix_query_key_value_ordering(sd[f"{p}.in_proj_qkvz.weight"].t()[None],
                                                        sd[f"{p}.in_proj_ba.weight"].t()[None])
    return [x[0].reshape(x.shape[1], -1).t() for x in (q, k, v, z, b, a)]


def _expected(name: str, sd, layer: int, tp: int, t: int, ep: int, r: int, etp: int, et: int, shape):
    """The plain-torch reading of the HF tensors that Megatron parameter ``name`` (``layer``: its HF layer) holds
    on TP rank t (EP rank r, expert-TP rank et)."""
    h = f"model.layers.{layer}"
    tail = name.split(".", 3)[3] if name.startswith("decoder.layers.") else name
    if name in ("embedding.word_embeddings.weight", "output_layer.weight"):
        w = sd["model.embed_tokens.weight" if name.startswith("embedding") else "lm_head.weight"]
        padded = torch.cat([w, w.new_zeros(shape[0] * tp - w.shape[0], w.shape[1])])
        return _split(padded, tp, t)
    if name == "decoder.final_layernorm.weight":
        return sd["model.norm.weight"]
    plain = {"input_layernorm.weight": "input_layernorm.weight", "pre_mlp_layernorm.weight":
             "post_attention_layernorm.weight", "self_attention.q_layernorm.weight": "self_attn.q_norm.weight",
             "self_attention.k_layernorm.weight": "self_attn.k_norm.weight", "mlp.router.weight": "mlp.gate.weight",
             "mlp.shared_experts.gate_weight": "mlp.shared_expert_gate.weight"}
    if tail in plain:
        return sd[f"{h}.{plain[tail]}"]
    if tail == "self_attention.linear_qkv.weight":  # per local group: [q heads; gate heads; k; v]
        q = sd[f"{h}.self_attn.q_proj.weight"].view(HEADS, 2, HEAD_DIM, -1)  # per head [query; gate]
        k = sd[f"{h}.self_attn.k_proj.weight"].view(GROUPS, HEAD_DIM, -1)
        v = sd[f"{h}.self_attn.v_proj.weight"].view(GROUPS, HEAD_DIM, -1)
        n = HEADS // GROUPS
        rows = []
        for g in range(t * GROUPS // tp, (t + 1) * GROUPS // tp):
            rows += [q[g * n + i, 0] for i in range(n)] + [q[g * n + i, 1] for i in range(n)] + [k[g], v[g]]
        return torch.cat(rows)
    if tail == "self_attention.linear_proj.weight":
        return _split(sd[f"{h}.self_attn.o_proj.weight"], tp, t, 1)
    if tail == "self_attention.in_proj.weight":
        return torch.cat([_split(x, tp, t) for x in _qkvzba_reading(sd, layer)])
    if tail == "self_attention.conv1d.weight":
        c = sd[f"{h}.linear_attn.conv1d.weight"]
        q, k, v = c[:HK * DK], c[HK * DK:2 * HK * DK], c[2 * HK * DK:]
        return torch.cat([_split(q, tp, t), _split(k, tp, t), _split(v, tp, t)])
    if tail in ("self_attention.A_log", "self_attention.dt_bias"):
        return _split(sd[f"{h}.linear_attn.{tail.split('.')[-1]}"], tp, t)
    if tail == "self_attention.out_norm.weight":
        return sd[f"{h}.linear_attn.norm.weight"] - 1.0
    if tail == "self_attention.out_proj.weight":
        return _split(sd[f"{h}.linear_attn.out_proj.weight"], tp, t, 1)
    for prefix, hf in (("mlp.shared_experts.", f"{h}.mlp.shared_expert"), ("mlp.", f"{h}.mlp")):
        if tail in (f"{prefix}linear_fc1.weight", f"{prefix}linear_fc2.weight"):
            if tail.endswith("fc1.weight"):
                return torch.cat([_split(sd[f"{hf}.gate_proj.weight"], tp, t), _split(sd[f"{hf}.up_proj.weight"],
                                                                                     tp, t)])
            return _split(sd[f"{hf}.down_proj.weight"], tp, t, 1)
    if tail.startswith("mlp.experts.local_experts."):
        e = int(tail.split(".")[3])
        g = r * (E // ep) + e
        p = f"{h}.mlp.experts.{g}"
        if tail.endswith("linear_fc1.weight"):
            return torch.cat([_split(sd[f"{p}.gate_proj.weight"], etp, et), _split(sd[f"{p}.up_proj.weight"], etp,
                                                                                  et)])
        return _split(sd[f"{p}.down_proj.weight"], etp, et, 1)
    raise KeyError(f"no plain reading of {name}")


def _check_parameters(chunks, sd, tp, t, ep, r, etp, et, expected=None):
    """(mismatches, parameters compared) of this rank's chunks against :func:`_expected` (or ``expected``)."""
    bad, seen = [], 0
    for chunk in chunks:
        for name, tensor in chunk.state_dict().items():
            if "_extra_state" in name:
                continue
            layer = None
            if name.startswith("decoder.layers."):
                layer = chunk.decoder.layers[int(name.split(".")[2])].layer_number - 1
            want = (expected or _expected)(name, sd, layer, tp, t, ep, r, etp, et, tuple(tensor.shape))
            seen += 1
            if tuple(want.shape) != tuple(tensor.shape) or not torch.equal(want.to(tensor.dtype), tensor):
                bad.append(f"{name} (HF layer {layer})")
    return bad, seen


def _worker(rank, world, ckpt, tokens, out_root):
    from megatron_bridge_ext.mcore.cpu_compat import apply_cpu_patches

    apply_cpu_patches()
    import torch.distributed as dist
    from megatron.core import parallel_state as ps
    from safetensors.torch import load_file

    from megatron_bridge_ext.auto_bridge import AutoBridge
    from megatron_bridge_ext.mcore.forward import megatron_logits
    from megatron_bridge_ext.mcore.model_builder import destroy_parallel, init_parallel

    sd = load_file(os.path.join(ckpt, "model.safetensors"))
    results = {}
    for name, tp, pp, vpp, ep in LAYOUTS:
        init_parallel(tp=tp, pp=pp, vpp=vpp, ep=ep, etp=tp)  # expert-TP = TP (megatron's default)
        bridge = AutoBridge.from_hf_pretrained(ckpt)
        chunks = bridge.to_megatron_model(params_dtype=torch.float32)
        r = {"logits": megatron_logits(chunks, tokens)}
        r["bad"], r["seen"] = _check_parameters(
            chunks, sd, tp, ps.get_tensor_model_parallel_rank(), ep, ps.get_expert_model_parallel_rank(), tp,
            ps.get_expert_tensor_parallel_rank())
        r["gdn_layers"] = sum(type(layer.self_attention).__name__ == "LocalGatedDeltaNet"
                              for c in chunks for layer in c.decoder.layers)
        bridge.save_hf_pretrained(chunks, os.path.join(out_root, name), max_shard_bytes=256 * 1024,
                                  bucket_bytes=64 * 1024, show_progress=False)
        if name == NO_SOURCE:
            AutoBridge.from_architecture(ARCH).save_hf_pretrained(chunks, os.path.join(out_root, "nosource"),
                                                                  bucket_bytes=64 * 1024, show_progress=False)
        if rank != 0:
            r.pop("logits")
        results[name] = r
        destroy_parallel()
        dist.barrier()
    init_parallel(tp=2, pp=1)  # transformers' own bf16 save: params_dtype from config.json, the same bytes back
    bridge = AutoBridge.from_hf_pretrained(ckpt + "_bf16")
    chunks = bridge.to_megatron_model()
    results["bf16_dtypes"] = sorted({str(p.dtype) for c in chunks for n, p in c.named_parameters() if "norm" not in n})
    bridge.save_hf_pretrained(chunks, os.path.join(out_root, "bf16_tp2"), bucket_bytes=64 * 1024, show_progress=False)
    destroy_parallel()
    init_parallel(tp=2, pp=1)  # a checkpoint with the release's multi-token-prediction tensors: refused, named
    try:
        AutoBridge.from_hf_pretrained(ckpt + "_mtp").to_megatron_model(params_dtype=torch.float32)
        results["mtp_refusal"] = None
    except ValueError as e:
        results["mtp_refusal"] = str(e)
    destroy_parallel()
    return results


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    transformers.logging.set_verbosity_error()
    root = tmp_path_factory.mktemp("qwen3_next")
    tokens = torch.randint(0, CONFIG["vocab_size"], (2, 12), generator=torch.Generator().manual_seed(0))
    ckpt = str(root / "hf")
    model = make_checkpoint(ckpt, seed=37)
    with torch.no_grad():
        hf = model(tokens, use_cache=False).logits.float()
    _write_mtp(ckpt, ckpt + "_mtp")
    save_transformers_bf16(model, ckpt + "_bf16")
    out_root = str(root / "out")
    per_rank = spawn_local(_worker, 4, (ckpt, tokens, out_root), timeout=900)
    return ckpt, out_root, per_rank, hf, tokens


def _write_mtp(src: str, dst: str) -> None:
    """A copy of ``src`` with two tensors of the released checkpoints' MTP module (``mtp.fc``, ``mtp.norm``)."""
    import shutil

    from safetensors.torch import load_file, save_file

    sd = load_file(os.path.join(src, "model.safetensors"))
    sd.update({"mtp.fc.weight": torch.randn(64, 128), "mtp.norm.weight": torch.randn(64)})
    os.makedirs(dst, exist_ok=True)
    save_file(sd, os.path.join(dst, "model.safetensors"), metadata={"format": "pt"})
    shutil.copy(os.path.join(src, "config.json"), os.path.join(dst, "config.json"))


def _assert_same_tensors(src_dir, dst_dir):
    with SafeTensorsSource(src_dir) as src, SafeTensorsSource(dst_dir) as dst:
        assert set(src.keys()) == set(dst.keys()), sorted(set(src.keys()) ^ set(dst.keys()))[:6]
        for key in src.keys():
            assert src[key].dtype == dst[key].dtype, (key, src[key].dtype, dst[key].dtype)
            assert torch.equal(src[key], dst[key]), key


def test_megatron_core_version_gate(tmp_path):
    """megatron-core >= 0.19: the config has the gated delta-net pattern of HF's layer_types, and a TP size that would
    split a delta-net head is refused by name; below: a ValueError naming the architecture, the version needed and
    the installed one."""
    from megatron_bridge_ext.auto_bridge import AutoBridge

    transformers.logging.set_verbosity_error()
    ckpt = str(tmp_path / "hf")
    make_checkpoint(ckpt, seed=1)
    if not HAS_GDN:
        with pytest.raises(ValueError, match=r"Qwen3NextForCausalLM: .*needs megatron-core >= 0\.19\.0; "
                                             f"megatron-core {installed_megatron_core()} is installed"):
            AutoBridge.from_hf_pretrained(ckpt).transformer_config()
        return
    cfg = AutoBridge.from_hf_pretrained(ckpt).transformer_config()
    assert cfg.experimental_attention_variant == "gated_delta_net" and cfg.linear_attention_freq == [1, 0, 1, 0]
    assert cfg.attention_output_gate and cfg.layernorm_zero_centered_gamma and cfg.rotary_percent == 0.25
    assert (cfg.linear_num_key_heads, cfg.linear_num_value_heads, cfg.linear_key_head_dim,
            cfg.linear_value_head_dim, cfg.linear_conv_kernel_dim) == (HK, HV, DK, DV, K)
    assert cfg.moe_shared_expert_gate and cfg.moe_layer_freq == [1, 1, 0, 1]
    with pytest.raises(ValueError, match=r"linear_num_key_heads \(2, HF linear_num_key_heads\) must be a multiple of "
                                         r"tensor_model_parallel_size \(4\)"):
        AutoBridge.from_hf_pretrained(ckpt).transformer_config(tensor_model_parallel_size=4)


@needs_gdn
def test_the_checkpoint_has_what_the_tests_claim(world):
    ckpt = world[0]
    with SafeTensorsSource(ckpt) as src:
        keys = set(src.keys())
        assert src["model.layers.0.linear_attn.norm.weight"].sub(1.0).abs().max().item() > 0.1
        assert src["model.layers.0.input_layernorm.weight"].abs().max().item() > 0.1
        assert src["model.layers.0.linear_attn.in_proj_qkvz.weight"].shape == (HK * (2 * DK + 2 * HV // HK * DV), 64)
    assert "model.layers.2.mlp.gate_proj.weight" in keys and "model.layers.2.mlp.gate.weight" not in keys
    assert "model.layers.1.self_attn.q_proj.weight" in keys and "model.layers.1.linear_attn.A_log" not in keys


@needs_gdn
@pytest.mark.parametrize("name,tp,pp,vpp,ep", LAYOUTS, ids=IDS)
def test_every_parameter_is_the_plain_reading(world, name, tp, pp, vpp, ep):
    per_rank = world[2]
    for rank, r in enumerate(per_rank):
        assert r[name]["seen"] > 0 and r[name]["bad"] == [], (rank, r[name]["bad"][:6])
    # every rank builds its stage's delta-net layers (two in the model, one per pipeline stage)
    assert sum(r[name]["gdn_layers"] for r in per_rank) == 2 * len(per_rank) // pp


@needs_gdn
@pytest.mark.parametrize("name,tp,pp,vpp,ep", LAYOUTS, ids=IDS)
def test_logits_match_hf(world, name, tp, pp, vpp, ep):
    _, _, per_rank, hf, _ = world
    diff = (per_rank[0][name]["logits"] - hf).abs().max().item()
    assert diff <= MEGATRON_VS_HF_ATOL, f"{name}: max |logit diff| {diff:.3e} > {MEGATRON_VS_HF_ATOL:.0e}"


@needs_gdn
@pytest.mark.parametrize("name,tp,pp,vpp,ep", LAYOUTS, ids=IDS)
def test_round_trip_bit_exact(world, name, tp, pp, vpp, ep):
    ckpt, out_root, _, _, _ = world
    _assert_same_tensors(ckpt, os.path.join(out_root, name))


@needs_gdn
def test_export_without_source_loads_in_transformers(world):
    ckpt, out_root, _, hf, tokens = world
    out = os.path.join(out_root, "nosource")
    _assert_same_tensors(ckpt, out)
    with open(os.path.join(out, "config.json")) as f:
        cfg = json.load(f)
    assert cfg["architectures"] == [ARCH] and cfg["model_type"] == "qwen3_next"
    assert cfg["layer_types"] == CONFIG["layer_types"] and cfg["mlp_only_layers"] == [2]
    diff = (hf_logits(out, tokens) - hf).abs().max().item()
    assert diff <= SAME_MODEL_ATOL, f"max |logit diff| {diff:.3e}"


@needs_gdn
def test_multi_token_prediction_tensors_are_refused_by_name(world):
    """The released checkpoints' ``mtp.*`` tensors are not converted (transformers skips them too): import refuses,
    naming them, rather than dropping them."""
    for rank, r in enumerate(world[2]):
        msg = r["mtp_refusal"]
        assert msg is not None and "used by no mapping" in msg, (rank, msg)
        assert "mtp.fc.weight" in msg and "mtp.norm.weight" in msg, (rank, msg)


@needs_gdn
def test_bf16_round_trip_bit_exact(world):
    """transformers' own bf16 save (every tensor bf16, ``A_log`` included), imported at TP2 with ``params_dtype``
    from config.json: bf16 parameters (megatron's local norms stay fp32), and the export is the file, dtypes
    included (the gated norm's ``w - 1`` is exact for its weights in [0.5, 2])."""
    ckpt, out_root, per_rank, _, _ = world
    for rank, r in enumerate(per_rank):
        assert r["bf16_dtypes"] == ["torch.bfloat16"], (rank, r["bf16_dtypes"])
    _assert_same_tensors(ckpt + "_bf16", os.path.join(out_root, "bf16_tp2"))
