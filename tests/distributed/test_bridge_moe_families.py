"""Mixture-of-experts families end to end on real parts: transformers checkpoints of Qwen3-MoE, Qwen2-MoE, DeepSeek-V3,
GLM-4.5 and GPT-OSS from tiny configs (random weights, router weights and correction biases included, fixed seed)
-> AutoBridge -> megatron-core GPTModel chunks on CPU / gloo -> HF, at EP2, TP2 x EP2 (expert-TP 2; GPT-OSS expert-TP
1, see its module) and PP2 x EP2, all in ONE spawned world of 4 ranks.

Every model has 6 experts (3 per expert-parallel rank: not a power of two) and 4 layers; DeepSeek-V3 and GLM-4.5 have
a dense first layer, Qwen3-MoE a dense third one (``mlp_only_layers``).

For each (family, layout): Megatron logits against the HF model's own (fp32, max |diff| <= 1e-4); every local expert
parameter on every rank against a plain-torch slice of the HF tensors of its *global* expert (numbering checked
against the source, not against our export); the exported checkpoint against the source (key set, dtypes,
torch.equal); one ``expert_pack_*`` call per layer and rank on import and one ``expert_unpack_*`` call per layer on
the destination on export.

HF expert layouts: transformers' ``save_pretrained`` writes one tensor per expert for Qwen / DeepSeek / GLM and fused
transposed tensors for GPT-OSS; the tests also write fused checkpoints themselves (Qwen3-MoE ``[E, 2F, D]`` and
``[E, D, 2F]``, DeepSeek-V3 ``[E, 2F, D]``, GPT-OSS in the other orientation). Each gives exactly the Megatron
parameters of its per-expert / native twin (torch.equal on every rank) and exports back to itself bit-exact;
transformers loads the ``[E, 2F, D]`` ones with the per-expert model's logits (the writer is right).

Export without a source (``AutoBridge.from_architecture``) writes the default layout (per expert; GPT-OSS fused) and a
``config.json`` that transformers loads with the source model's logits.

Grouped-GEMM names (``linear_fc1.weight{e}``, Transformer Engine's grouped experts; no kernel runs on CPU): a module
tree carrying exactly such parameters is driven through the engine at TP2 x EP2 from the per-expert and the fused
checkpoint; its parameters equal the sequential experts' and the HF slices, and its export equals the source.
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

E, F, FFN = 6, 24, 80  # 2F != hidden and F != hidden: fused orientations are told apart by their shapes
BASE = dict(vocab_size=97, hidden_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
            max_position_embeddings=64, rms_norm_eps=1e-5, tie_word_embeddings=False)
YARN = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 16,
        "beta_fast": 32.0, "beta_slow": 1.0}
# family -> (transformers class prefix, config overrides)
FAMILIES = {
    "qwen3_moe": ("Qwen3Moe", dict(intermediate_size=FFN, moe_intermediate_size=F, num_experts=E,
                                   num_experts_per_tok=2, head_dim=16, norm_topk_prob=True, mlp_only_layers=[2])),
    "qwen2_moe": ("Qwen2Moe", dict(intermediate_size=FFN, moe_intermediate_size=F, num_experts=E,
                                   num_experts_per_tok=2, shared_expert_intermediate_size=48)),
    "deepseek_v3": ("DeepseekV3", dict(intermediate_size=FFN, moe_intermediate_size=F, n_routed_experts=E,
                                       num_experts_per_tok=2, n_group=2, topk_group=1, first_k_dense_replace=1,
                                       q_lora_rank=24, kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=16,
                                       v_head_dim=12, num_key_value_heads=4, n_shared_experts=1,
                                       routed_scaling_factor=2.5,
                                       rope_parameters={**YARN, "mscale": 1.0, "mscale_all_dim": 1.0})),
    "glm4_moe": ("Glm4Moe", dict(intermediate_size=FFN, moe_intermediate_size=F, n_routed_experts=E,
                                 num_experts_per_tok=2, first_k_dense_replace=1, head_dim=16, attention_bias=True,
                                 use_qk_norm=True, n_shared_experts=1, routed_scaling_factor=1.5, n_group=1,
                                 topk_group=1, rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                                                "partial_rotary_factor": 0.5})),
    "gpt_oss": ("GptOss", dict(intermediate_size=F, num_local_experts=E, num_experts_per_tok=2, head_dim=16,
                               sliding_window=4, swiglu_limit=1.5, rope_parameters={**YARN, "truncate": False})),
}
# name, tp, pp, ep
LAYOUTS = [("ep2", 1, 1, 2), ("tp2ep2", 2, 1, 2), ("pp2ep2", 1, 2, 2)]
# family -> the fused checkpoints written here: variant -> (fc1 transposed, fc2 transposed); GPT-OSS's native one is
# transposed (written by transformers), its variant is the other orientation
FUSED = {"qwen3_moe": {"fused": (False, False), "fused_t": (True, True)},
         "deepseek_v3": {"fused": (False, False)},
         "gpt_oss": {"fused_rows": (False, False)}}
HF_LOADABLE = {("qwen3_moe", "fused"), ("deepseek_v3", "fused")}  # transformers' own fused orientation
# family -> layers with routed experts (from the configs above)
MOE_LAYERS = {"qwen3_moe": 3, "qwen2_moe": 4, "deepseek_v3": 3, "glm4_moe": 3, "gpt_oss": 4}
GROUPED_FAMILY = "qwen3_moe"


def _arch(family: str) -> str:
    return f"{FAMILIES[family][0]}ForCausalLM"


def _etp(family: str, tp: int) -> int:
    return 1 if family == "gpt_oss" else tp  # megatron-core 0.16.1: expert biases need expert-TP 1


# ---------------------------------------------------------------------------------------------------------------------
# checkpoints
# ---------------------------------------------------------------------------------------------------------------------


def _make_checkpoint(path: str, family: str, seed: int):
    prefix, overrides = FAMILIES[family]
    torch.manual_seed(seed)
    config = getattr(transformers, f"{prefix}Config")(**{**BASE, **overrides})
    model = getattr(transformers, f"{prefix}ForCausalLM")(config).float().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.normal_(1.0, 0.2)
            elif "sinks" in name:
                p.normal_(0.0, 1.0)
            else:
                p.normal_(0.0, 0.15)  # router weights and biases included
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.normal_(0.0, 0.3)
    model.save_pretrained(path, safe_serialization=True)
    return model


def _write_fused(src: str, dst: str, fc1_t: bool, fc2_t: bool, gpt_oss: bool) -> None:
    """A copy of ``src`` whose experts are fused tensors: ``gate_up_proj`` ``[E, 2F, D]`` ([gate; up] rows, GPT-OSS:
    interleaved) or ``[E, D, 2F]`` with ``fc1_t``, ``down_proj`` ``[E, D, F]`` or ``[E, F, D]`` with ``fc2_t``."""
    from safetensors.torch import save_file

    os.makedirs(dst, exist_ok=True)
    with SafeTensorsSource(src) as s:
        sd = {k: s[k].clone() for k in s.keys()}
    out = {}
    if gpt_oss:  # native [E, D, 2F] interleaved columns / [E, F, D]: re-orient
        for k, v in sd.items():
            if k.endswith("mlp.experts.gate_up_proj"):
                v = v.transpose(1, 2) if not fc1_t else v
            elif k.endswith("mlp.experts.down_proj"):
                v = v.transpose(1, 2) if not fc2_t else v
            out[k] = v.contiguous()
    else:
        layers = {}
        for k, v in sd.items():
            parts = k.split(".")
            if ".mlp.experts." in k and parts[5].isdigit():
                layers.setdefault(int(parts[2]), {})[(int(parts[5]), parts[6])] = v
            else:
                out[k] = v
        for layer, experts in layers.items():
            gate_up = torch.stack([torch.cat([experts[(e, "gate_proj")], experts[(e, "up_proj")]]) for e in range(E)])
            down = torch.stack([experts[(e, "down_proj")] for e in range(E)])
            out[f"model.layers.{layer}.mlp.experts.gate_up_proj"] = (gate_up.transpose(1, 2) if fc1_t
                                                                     else gate_up).contiguous()
            out[f"model.layers.{layer}.mlp.experts.down_proj"] = (down.transpose(1, 2) if fc2_t else down).contiguous()
    save_file(out, os.path.join(dst, "model.safetensors"), metadata={"format": "pt"})
    for name in os.listdir(src):
        if name.endswith(".json") and "index" not in name:
            with open(os.path.join(src, name)) as f, open(os.path.join(dst, name), "w") as g:
                g.write(f.read())


def _hf_expert(sd, family: str, layer: int, g: int):
    """Plain-torch (gate [F, D], up [F, D], down [D, F], biases or None) of global expert g of a layer."""
    p = f"model.layers.{layer}.mlp.experts"
    if family != "gpt_oss":
        return (sd[f"{p}.{g}.gate_proj.weight"], sd[f"{p}.{g}.up_proj.weight"], sd[f"{p}.{g}.down_proj.weight"],
                None)
    w = sd[f"{p}.gate_up_proj"][g]  # [D, 2F], gate / up interleaved along 2F
    b = sd[f"{p}.gate_up_proj_bias"][g]
    return w[:, 0::2].t(), w[:, 1::2].t(), sd[f"{p}.down_proj"][g].t(), (b[0::2], b[1::2], sd[f"{p}.down_proj_bias"][g])


def _expected(sd, family: str, layer: int, g: int, etp: int, etp_rank: int):
    """Expert g's Megatron shard on expert-TP rank t: fc1 ``[gate_t; up_t]``, fc2 the t-th column block."""
    gate, up, down, bias = _hf_expert(sd, family, layer, g)
    f = gate.shape[0] // etp
    rows = slice(etp_rank * f, (etp_rank + 1) * f)
    out = {"linear_fc1.weight": torch.cat([gate[rows], up[rows]]), "linear_fc2.weight": down[:, rows]}
    if bias is not None:
        out["linear_fc1.bias"] = torch.cat([bias[0][rows], bias[1][rows]])
        out["linear_fc2.bias"] = bias[2]
    return out


# ---------------------------------------------------------------------------------------------------------------------
# the world
# ---------------------------------------------------------------------------------------------------------------------


class _Grouped(torch.nn.Module):
    """Transformer Engine's grouped experts as parameters only: ``weight0 .. weight{n-1}``."""

    def __init__(self, shapes):
        super().__init__()
        for e, shape in enumerate(shapes):
            self.register_parameter(f"weight{e}", torch.nn.Parameter(torch.zeros(shape)))


def _grouped_tree(chunk):
    """A module tree with the chunk's config and, per MoE layer, ``mlp.experts.linear_fc{1,2}.weight{e}``."""
    root = torch.nn.Module()
    root.config = chunk.config
    root.vocab_size = chunk.vocab_size
    root.decoder = torch.nn.Module()
    root.decoder.layers = torch.nn.ModuleList()
    for layer in chunk.decoder.layers:
        mod = torch.nn.Module()
        mod.layer_number = layer.layer_number
        experts = getattr(layer.mlp, "experts", None)
        if experts is not None:
            mod.mlp = torch.nn.Module()
            mod.mlp.experts = torch.nn.Module()
            local = experts.local_experts
            mod.mlp.experts.linear_fc1 = _Grouped([x.linear_fc1.weight.shape for x in local])
            mod.mlp.experts.linear_fc2 = _Grouped([x.linear_fc2.weight.shape for x in local])
        root.decoder.layers.append(mod)
    return root


def _local_experts(chunks):
    """(global layer, local expert index, expert module) of this rank's sequential experts."""
    for chunk in chunks:
        for layer in chunk.decoder.layers:
            experts = getattr(layer.mlp, "experts", None)
            if experts is not None:
                for e, expert in enumerate(experts.local_experts):
                    yield layer.layer_number - 1, e, expert


def _check_experts(chunks, sd, family, ep_rank, ep, etp_rank, etp):
    """Every local expert parameter against the HF slice of its global expert; returns the mismatches."""
    bad = []
    for layer, e, expert in _local_experts(chunks):
        g = ep_rank * (E // ep) + e
        for name, want in _expected(sd, family, layer, g, etp, etp_rank).items():
            got = expert.get_parameter(name)
            if got.shape != want.shape or not torch.equal(got, want):
                bad.append(f"layer {layer} local expert {e} (global {g}) {name}")
    return bad


def _params(chunks):
    return {f"{i}:{k}": v for i, c in enumerate(chunks) for k, v in c.state_dict().items() if "_extra_state" not in k}


def _worker(rank, world, ckpts, tokens, out_root):
    from megatron_bridge_ext.mcore.cpu_compat import apply_cpu_patches

    apply_cpu_patches()
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from megatron_bridge_ext import ops
    from megatron_bridge_ext.auto_bridge import AutoBridge
    from megatron_bridge_ext.mcore.forward import megatron_logits
    from megatron_bridge_ext.mcore.model_builder import destroy_parallel, init_parallel

    calls = {}

    def counting(op_name):
        original = getattr(ops, op_name)

        def wrapper(*args, **kwargs):
            calls[op_name] = calls.get(op_name, 0) + 1
            return original(*args, **kwargs)
        return wrapper

    for op_name in ("expert_pack_fc1", "expert_pack_fc2", "expert_unpack_fc1", "expert_unpack_fc2"):
        setattr(ops, op_name, counting(op_name))

    def save(bridge, chunks, name):
        bridge.save_hf_pretrained(chunks, os.path.join(out_root, name), max_shard_bytes=256 * 1024,
                                  bucket_bytes=64 * 1024, show_progress=False)

    results = {}
    for family in FAMILIES:
        with SafeTensorsSource(ckpts[family]["native"]) as src:
            sd = {k: src[k].clone() for k in src.keys()}
        for name, tp, pp, ep in LAYOUTS:
            key = f"{family}_{name}"
            etp = _etp(family, tp)
            init_parallel(tp=tp, pp=pp, ep=ep, etp=etp)
            ep_rank, etp_rank = ps.get_expert_model_parallel_rank(), ps.get_expert_tensor_parallel_rank()
            bridge = AutoBridge.from_hf_pretrained(ckpts[family]["native"])
            calls.clear()
            chunks = bridge.to_megatron_model(params_dtype=torch.float32)
            imported = dict(calls)
            moe_layers = len({layer for layer, _, _ in _local_experts(chunks)})
            r = {"bad_experts": _check_experts(chunks, sd, family, ep_rank, ep, etp_rank, etp),
                 "moe_layers": moe_layers, "logits": megatron_logits(chunks, tokens)}
            calls.clear()
            save(bridge, chunks, key)
            r["calls"] = (imported, dict(calls))
            if name == "tp2ep2":
                mine = _params(chunks)
                for variant in FUSED.get(family, {}):
                    fused_bridge = AutoBridge.from_hf_pretrained(ckpts[family][variant])
                    calls.clear()
                    fused_chunks = fused_bridge.to_megatron_model(params_dtype=torch.float32)
                    fused_calls = dict(calls)
                    theirs = _params(fused_chunks)
                    r[f"{variant}_same"] = sorted(k for k in mine if k not in theirs or
                                                  not torch.equal(mine[k], theirs[k])) or (set(mine) == set(theirs))
                    r[f"{variant}_calls"] = fused_calls
                    streamed = {n: t for n, t, _ in fused_bridge.model_bridge.stream_weights_hf_to_megatron(
                        fused_bridge.hf_pretrained, fused_chunks)}  # the generator variant, same tensors
                    local = {k.split(":", 1)[1]: v for k, v in theirs.items()}
                    r[f"{variant}_streamed"] = set(streamed) == set(local) and all(
                        torch.equal(streamed[k], local[k]) for k in local)
                    save(fused_bridge, fused_chunks, f"{family}_{variant}")
                if family == GROUPED_FAMILY:
                    r["grouped"] = _grouped_check(AutoBridge, ckpts[family], chunks, sd, family, ep_rank, ep,
                                                  etp_rank, etp, rank)
            if name == "pp2ep2":
                AutoBridge.from_architecture(_arch(family)).save_hf_pretrained(
                    chunks, os.path.join(out_root, f"{family}_nosource"), bucket_bytes=64 * 1024,
                    show_progress=False)
            if rank != 0:
                r.pop("logits")
            results[key] = r
            destroy_parallel()
            dist.barrier()
    return results


def _grouped_check(AutoBridge, ckpts, chunks, sd, family, ep_rank, ep, etp_rank, etp, rank):
    """Grouped-GEMM names through the engine, from the per-expert and the fused checkpoint."""
    out = {}
    for variant in ("native", "fused"):
        bridge = AutoBridge.from_hf_pretrained(ckpts[variant])
        tree = _grouped_tree(chunks[0])
        others = [k for k in bridge.hf_pretrained.state.keys() if ".mlp.experts." not in k]  # the tree has experts only
        bridge.load_hf_weights([tree], show_progress=False, allowed_unused_hf_params=others)
        bad = []
        for layer, mod in zip(chunks[0].decoder.layers, tree.decoder.layers):
            experts = getattr(layer.mlp, "experts", None)
            for e, expert in enumerate(experts.local_experts if experts is not None else []):
                g = ep_rank * (E // ep) + e
                want = _expected(sd, family, layer.layer_number - 1, g, etp, etp_rank)
                for kind in ("linear_fc1", "linear_fc2"):
                    got = getattr(getattr(mod.mlp.experts, kind), f"weight{e}")
                    if not (torch.equal(got, want[f"{kind}.weight"]) and
                            torch.equal(got, getattr(expert, kind).weight)):
                        bad.append(f"{variant}: layer {layer.layer_number - 1} {kind}.weight{e} (global expert {g})")
        with SafeTensorsSource(ckpts[variant]) as src:
            exported = {}
            for name, tensor in bridge.model_bridge.stream_weights_megatron_to_hf([tree], bridge.hf_pretrained,
                                                                                 bucket_bytes=16 * 1024,
                                                                                 show_progress=False):
                exported[name] = tensor
            if rank == 0:
                experts = {k for k in src.keys() if ".mlp.experts." in k}
                if set(exported) != experts:
                    bad.append(f"{variant}: exported {sorted(set(exported) ^ experts)[:4]} ...")
                bad += [f"{variant}: exported {k} differs" for k in experts & set(exported)
                        if not torch.equal(exported[k], src[k])]
        out[variant] = bad
    return out


# ---------------------------------------------------------------------------------------------------------------------
# fixture and tests
# ---------------------------------------------------------------------------------------------------------------------


def _hf_logits(path, tokens):
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(tokens, use_cache=False).logits.float()


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    transformers.logging.set_verbosity_error()
    root = tmp_path_factory.mktemp("moe_families")
    tokens = torch.randint(0, BASE["vocab_size"], (2, 12), generator=torch.Generator().manual_seed(0))
    ckpts, hf = {}, {}
    for i, family in enumerate(FAMILIES):
        native = str(root / f"hf_{family}")
        model = _make_checkpoint(native, family, seed=20 + i)
        with torch.no_grad():
            hf[family] = model(tokens, use_cache=False).logits.float()
        ckpts[family] = {"native": native}
        for variant, (fc1_t, fc2_t) in FUSED.get(family, {}).items():
            ckpts[family][variant] = str(root / f"hf_{family}_{variant}")
            _write_fused(native, ckpts[family][variant], fc1_t, fc2_t, family == "gpt_oss")
    out_root = str(root / "out")
    per_rank = spawn_local(_worker, 4, (ckpts, tokens, out_root), timeout=1500)
    return ckpts, out_root, per_rank, hf, tokens


CASES = [(family, *layout) for family in FAMILIES for layout in LAYOUTS]
IDS = [f"{c[0]}-{c[1]}" for c in CASES]


@pytest.mark.parametrize("family,name,tp,pp,ep", CASES, ids=IDS)
def test_logits_match_hf(world, family, name, tp, pp, ep):
    _, _, per_rank, hf, _ = world
    got = per_rank[0][f"{family}_{name}"]["logits"]
    diff = (got - hf[family]).abs().max().item()
    assert diff <= 1e-4, f"{family} {name}: max |logit diff| {diff:.3e} > 1e-4"


@pytest.mark.parametrize("family,name,tp,pp,ep", CASES, ids=IDS)
def test_local_experts_are_the_hf_global_experts(world, family, name, tp, pp, ep):
    """Local expert e on expert-parallel rank r is HF expert e + r * E / ep, sliced for its expert-TP rank."""
    _, _, per_rank, _, _ = world
    for rank, r in enumerate(per_rank):
        res = r[f"{family}_{name}"]
        assert res["moe_layers"] >= 1, (rank, res["moe_layers"])
        assert res["bad_experts"] == [], (rank, res["bad_experts"][:5])


def _assert_same_tensors(src_dir, dst_dir):
    with SafeTensorsSource(src_dir) as src, SafeTensorsSource(dst_dir) as dst:
        assert set(src.keys()) == set(dst.keys()), set(src.keys()) ^ set(dst.keys())
        for key in src.keys():
            assert src[key].dtype == dst[key].dtype, (key, src[key].dtype, dst[key].dtype)
            assert torch.equal(src[key], dst[key]), key


@pytest.mark.parametrize("family,name,tp,pp,ep", CASES, ids=IDS)
def test_round_trip_bit_exact(world, family, name, tp, pp, ep):
    ckpts, out_root, _, _, _ = world
    _assert_same_tensors(ckpts[family]["native"], os.path.join(out_root, f"{family}_{name}"))


@pytest.mark.parametrize("family,name,tp,pp,ep", CASES, ids=IDS)
def test_experts_convert_with_one_op_call_per_layer(world, family, name, tp, pp, ep):
    """Import: per rank one expert_pack_fc1 / fc2 call per local MoE layer (and per bias tensor kind for GPT-OSS);
    export: one expert_unpack_fc1 / fc2 call per MoE layer on the destination, none elsewhere."""
    _, _, per_rank, _, _ = world
    kinds = 2 if family == "gpt_oss" else 1  # weights (and biases)
    total = MOE_LAYERS[family]
    assert sum(r[f"{family}_{name}"]["moe_layers"] for r in per_rank) == total * 4 // pp
    for rank, r in enumerate(per_rank):
        res = r[f"{family}_{name}"]
        imported, exported = res["calls"]
        local = res["moe_layers"] * kinds
        assert imported == {"expert_pack_fc1": local, "expert_pack_fc2": local}, (rank, imported)
        want = {"expert_unpack_fc1": total * kinds, "expert_unpack_fc2": total * kinds} if rank == 0 else {}
        assert exported == want, (rank, exported)


FUSED_CASES = [(family, variant) for family, variants in FUSED.items() for variant in variants]


@pytest.mark.parametrize("family,variant", FUSED_CASES, ids=[f"{f}-{v}" for f, v in FUSED_CASES])
def test_fused_and_per_expert_checkpoints_give_identical_megatron_parameters(world, family, variant):
    _, _, per_rank, _, _ = world
    for rank, r in enumerate(per_rank):
        res = r[f"{family}_tp2ep2"]
        assert res[f"{variant}_same"] is True, (rank, res[f"{variant}_same"])
        local = res["moe_layers"] * (2 if family == "gpt_oss" else 1)
        assert res[f"{variant}_calls"] == {"expert_pack_fc1": local, "expert_pack_fc2": local}, rank
        assert res[f"{variant}_streamed"], rank  # stream_weights_hf_to_megatron yields the same tensors


@pytest.mark.parametrize("family,variant", FUSED_CASES, ids=[f"{f}-{v}" for f, v in FUSED_CASES])
def test_fused_checkpoint_round_trips_to_itself(world, family, variant):
    ckpts, out_root, _, hf, tokens = world
    _assert_same_tensors(ckpts[family][variant], os.path.join(out_root, f"{family}_{variant}"))
    if (family, variant) in HF_LOADABLE:  # transformers reads our fused tensors as its own: same model
        diff = (_hf_logits(ckpts[family][variant], tokens) - hf[family]).abs().max().item()
        assert diff == 0.0, diff


def test_mixed_layout_checkpoint_is_refused(world, tmp_path):
    """One tensor per expert in one layer and fused tensors in another: a named error, naming one of each, when the
    checkpoint is opened."""
    ckpts, _, _, _, _ = world
    from safetensors.torch import save_file

    from megatron_bridge_ext.auto_bridge import AutoBridge

    with SafeTensorsSource(ckpts["qwen3_moe"]["native"]) as a, SafeTensorsSource(ckpts["qwen3_moe"]["fused"]) as b:
        mixed = {k: a[k].clone() for k in a.keys() if not k.startswith("model.layers.1.")}
        mixed.update({k: b[k].clone() for k in b.keys() if k.startswith("model.layers.1.")})
    save_file(mixed, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(ckpts["qwen3_moe"]["native"], "config.json")) as f:
        (tmp_path / "config.json").write_text(f.read())
    with pytest.raises(ValueError, match=r"mixes expert layouts: one tensor per expert \(e\.g\. model\.layers\.\d+\.mlp"
                                         r"\.experts\.\d+\..*\) and fused expert tensors \(e\.g\. model\.layers\.1\.mlp"
                                         r"\.experts\.(gate_up|down)_proj\)"):
        AutoBridge.from_hf_pretrained(tmp_path)  # refused when the checkpoint is opened


@pytest.mark.parametrize("family", list(FAMILIES))
def test_export_without_source_loads_in_transformers(world, family):
    """Default layout (per expert; GPT-OSS fused transposed) and a config.json from the Megatron config."""
    ckpts, out_root, _, hf, tokens = world
    out = os.path.join(out_root, f"{family}_nosource")
    _assert_same_tensors(ckpts[family]["native"], out)
    with open(os.path.join(out, "config.json")) as f:
        assert json.load(f)["architectures"] == [_arch(family)]
    diff = (_hf_logits(out, tokens) - hf[family]).abs().max().item()
    assert diff <= 1e-4, f"{family}: max |logit diff| {diff:.3e}"


@pytest.mark.parametrize("variant", ["native", "fused"])
def test_grouped_gemm_names_through_the_engine(world, variant):
    _, _, per_rank, _, _ = world
    for rank, r in enumerate(per_rank):
        assert r[f"{GROUPED_FAMILY}_tp2ep2"]["grouped"][variant] == [], rank
