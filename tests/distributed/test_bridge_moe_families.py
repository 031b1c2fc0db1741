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

Multi-token prediction (DeepSeek-V3, GLM-4.5): transformers builds no MTP layers, so the test writes one into a copy
of the checkpoint (HF layer ``num_hidden_layers``: a transformers decoder layer of that index with random weights,
``enorm`` / ``hnorm`` / ``eh_proj`` / ``shared_head.norm`` random, ``embed_tokens`` / ``shared_head.head`` copies of the
main tensors). At EP2, TP2 x EP2 and PP2 x EP2 (MTP on the last stage): the main logits against the HF model's, the
MTP logits against a plain reference (``eh_proj([enorm(embed(shifted ids)); hnorm(final hidden)])`` through the
transformers decoder layer, then ``shared_head``), the round trip, the export without a source, and (TP1 layouts)
every MTP parameter on every rank against a plain-torch reading of the file. A copy that differs from the main
embedding is refused by name.

bf16 (DeepSeek-V3, GLM-4.5, with MTP): transformers saves ``mlp.gate.weight`` and ``e_score_correction_bias`` in fp32
in a bf16 model; the Megatron routers keep both fp32 (equal to the file's) and the round trip is bit-exact.
"""

from __future__ import annotations

import functools
import json
import os
import re
import shutil

import pytest
import torch

pytest.importorskip("megatron.core")
transformers = pytest.importorskip("transformers")

from megatron_bridge_ext.io import SafeTensorsSource  # noqa: E402
from megatron_bridge_ext.testing.parity import hf_logits, mtp_reference_logits  # noqa: E402
from megatron_bridge_ext.testing.tiny_models import randomise, tiny_hf_model, write_mtp_layer  # noqa: E402
from megatron_bridge_ext.mcore.versions import mtp_layer_module  # noqa: E402
from megatron_bridge_ext.testing.tolerances import MEGATRON_VS_HF_ATOL, SAME_MODEL_ATOL  # noqa: E402
from megatron_bridge_ext.testing.worlds import Layout, spawn_layouts  # noqa: E402

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
MTP_FAMILIES = ("deepseek_v3", "glm4_moe")
MTP = BASE["num_hidden_layers"]  # HF index of the MTP layer
BF16_LAYOUTS = [LAYOUTS[0], LAYOUTS[2]]  # ep2, pp2ep2


def _arch(family: str) -> str:
    return f"{FAMILIES[family][0]}ForCausalLM"


def _etp(family: str, tp: int) -> int:
    return 1 if family == "gpt_oss" else tp  # megatron-core 0.16.1: expert biases need expert-TP 1


# ---------------------------------------------------------------------------------------------------------------------
# checkpoints
# ---------------------------------------------------------------------------------------------------------------------


def _make_checkpoint(path: str, family: str, seed: int):
    prefix, overrides = FAMILIES[family]
    model = tiny_hf_model(prefix, {**BASE, **overrides}, seed).float().eval()
    _randomise(model)
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


def _randomise(module: torch.nn.Module) -> None:
    randomise(module, (1.0, 0.2), rules=[(lambda name: "sinks" in name, 0.0, 1.0)],
              rest=(0.0, 0.15), correction_bias=0.3)  # router weights and biases included


def _write_mtp(src: str, dst: str, model, seed: int):
    """A copy of ``src`` with one multi-token-prediction layer (HF layer MTP): the tensors of a transformers decoder
    layer of that index (random; experts one tensor per expert, like the rest of the file), random enorm / hnorm /
    eh_proj / shared_head.norm, and copies of the embedding and lm_head. Returns (decoder layer, MTP tensors)."""
    torch.manual_seed(seed)
    layer = type(model.model.layers[-1])(model.config, MTP).float().eval()
    _randomise(layer)
    mtp = write_mtp_layer(src, dst, layer, MTP)
    for name in os.listdir(src):
        if name.endswith(".json") and "index" not in name:
            shutil.copy(os.path.join(src, name), os.path.join(dst, name))
    with open(os.path.join(dst, "config.json")) as f:
        assert json.load(f).get("num_nextn_predict_layers", 1) == 1  # transformers' default, kept as written
    return layer, mtp


def _fp32_in_bf16(name: str) -> bool:
    """What transformers keeps in fp32 in a bf16 DeepSeek-V3 / GLM-4.5 (``_keep_in_fp32_modules_strict``)."""
    return name.endswith(".mlp.gate.weight") or name.endswith(".e_score_correction_bias")


def _write_bf16(native: str, mtp_dir: str, dst: str) -> None:
    """The MTP checkpoint in bf16: transformers' own bf16 save of the main model (``from_pretrained(dtype=bf16)``
    keeps the router weights and correction biases fp32), plus the MTP tensors cast the same way."""
    from safetensors.torch import load_file, save_file

    tmp = dst + "_main"
    transformers.AutoModelForCausalLM.from_pretrained(native, dtype=torch.bfloat16).save_pretrained(tmp)
    main = load_file(os.path.join(tmp, "model.safetensors"))
    fp32 = {k for k, v in main.items() if v.dtype == torch.float32}
    assert fp32 and fp32 == {k for k in main if _fp32_in_bf16(k)}, sorted(fp32)[:6]
    assert {v.dtype for k, v in main.items() if k not in fp32} == {torch.bfloat16}
    full = load_file(os.path.join(mtp_dir, "model.safetensors"))
    extra = {k: v.float() if _fp32_in_bf16(k) else v.to(torch.bfloat16) for k, v in full.items() if k not in main}
    os.makedirs(dst, exist_ok=True)
    save_file({**main, **extra}, os.path.join(dst, "model.safetensors"), metadata={"format": "pt"})
    for name in os.listdir(tmp):
        if name.endswith(".json") and "index" not in name:
            shutil.copy(os.path.join(tmp, name), os.path.join(dst, name))
    shutil.rmtree(tmp)


def _write_bad_copy(src: str, dst: str) -> None:
    """The MTP checkpoint with one value of its embedding copy changed."""
    from safetensors.torch import load_file, save_file

    sd = load_file(os.path.join(src, "model.safetensors"))
    sd[f"model.layers.{MTP}.embed_tokens.weight"][50, 3] += 1.0
    os.makedirs(dst, exist_ok=True)
    save_file(sd, os.path.join(dst, "model.safetensors"), metadata={"format": "pt"})
    shutil.copy(os.path.join(src, "config.json"), os.path.join(dst, "config.json"))


def _pack_qkv(q, k, v, heads, groups, d):
    """Megatron's ``linear_qkv`` rows (TP1): per query group its heads' q rows, then its k and v rows."""
    n = heads // groups
    return torch.cat([t for g in range(groups)
                      for t in (q[g * n * d:(g + 1) * n * d], k[g * d:(g + 1) * d], v[g * d:(g + 1) * d])])


def _mtp_expected(sd, family: str):
    """Megatron name under ``mtp.layers.0.`` -> the tensor it holds at TP1, from the HF tensors of layer MTP (routed
    experts apart, see :func:`_check_mtp`)."""
    p, t = f"model.layers.{MTP}", mtp_layer_module()
    out = {
        "enorm.weight": sd[f"{p}.enorm.weight"],
        "hnorm.weight": sd[f"{p}.hnorm.weight"],
        "eh_proj.weight": sd[f"{p}.eh_proj.weight"],
        "final_layernorm.weight": sd[f"{p}.shared_head.norm.weight"],
        f"{t}.input_layernorm.weight": sd[f"{p}.input_layernorm.weight"],
        f"{t}.pre_mlp_layernorm.weight": sd[f"{p}.post_attention_layernorm.weight"],
        f"{t}.mlp.router.weight": sd[f"{p}.mlp.gate.weight"],
        f"{t}.mlp.router.expert_bias": sd[f"{p}.mlp.gate.e_score_correction_bias"],
        f"{t}.mlp.shared_experts.linear_fc1.weight": torch.cat([sd[f"{p}.mlp.shared_experts.gate_proj.weight"],
                                                                sd[f"{p}.mlp.shared_experts.up_proj.weight"]]),
        f"{t}.mlp.shared_experts.linear_fc2.weight": sd[f"{p}.mlp.shared_experts.down_proj.weight"],
    }
    a, h = f"{t}.self_attention", f"{p}.self_attn"
    if family == "deepseek_v3":
        for meg, hf in (("linear_q_down_proj", "q_a_proj"), ("q_layernorm", "q_a_layernorm"),
                        ("linear_q_up_proj", "q_b_proj"), ("linear_kv_down_proj", "kv_a_proj_with_mqa"),
                        ("kv_layernorm", "kv_a_layernorm"), ("linear_kv_up_proj", "kv_b_proj"),
                        ("linear_proj", "o_proj")):
            out[f"{a}.{meg}.weight"] = sd[f"{h}.{hf}.weight"]
    else:
        heads, groups, d = BASE["num_attention_heads"], BASE["num_key_value_heads"], FAMILIES[family][1]["head_dim"]
        for kind in ("weight", "bias"):
            out[f"{a}.linear_qkv.{kind}"] = _pack_qkv(sd[f"{h}.q_proj.{kind}"], sd[f"{h}.k_proj.{kind}"],
                                                      sd[f"{h}.v_proj.{kind}"], heads, groups, d)
        out.update({f"{a}.linear_proj.weight": sd[f"{h}.o_proj.weight"],
                    f"{a}.q_layernorm.weight": sd[f"{h}.q_norm.weight"],
                    f"{a}.k_layernorm.weight": sd[f"{h}.k_norm.weight"]})
    return out


def _check_mtp(chunks, sd, family, ep_rank, ep):
    """(mismatches, MTP tensors seen) of this rank's MTP layer against the HF tensors (TP1): every parameter and
    buffer under ``mtp.layers.0``, local expert e being HF expert ``ep_rank * E / ep + e``; on a stage that is not the
    first, the embedding copy against HF's embedding."""
    expected = _mtp_expected(sd, family)
    bad, seen = [], 0
    for chunk in chunks:
        for name, tensor in chunk.state_dict().items():
            if "_extra_state" in name:
                continue
            if name == "embedding.word_embeddings.weight" and not chunk.pre_process:
                want = sd["model.embed_tokens.weight"]
                if not (torch.equal(tensor[:want.shape[0]], want) and not tensor[want.shape[0]:].any()):
                    bad.append(f"{name} (the MTP stage's copy)")
                continue
            if not name.startswith("mtp.layers.0."):
                continue
            seen += 1
            rest = name[len("mtp.layers.0."):]
            m = re.fullmatch(rf"{mtp_layer_module()}\.mlp\.experts\.local_experts\.(\d+)\.(.+)", rest)
            if m is not None:
                want = _expected(sd, family, MTP, ep_rank * (E // ep) + int(m.group(1)), 1, 0).get(m.group(2))
            else:
                want = expected.get(rest)
            if want is None:
                bad.append(f"{name}: no HF tensor expected")
            elif tensor.dtype != want.dtype or not torch.equal(tensor, want):
                bad.append(name)
    return bad, seen


def _check_routers(chunks, sd):
    """Every router weight and expert bias (decoder and MTP layers) is fp32 and equals the HF tensor; the other
    floating parameters are bf16, but the norms (megatron-core's local-spec norms are fp32 whatever params_dtype is).
    Returns (mismatches, routers seen)."""
    bad, seen = [], 0
    for chunk in chunks:
        for name, tensor in chunk.state_dict().items():
            m = re.fullmatch(rf"(?:decoder\.layers\.(\d+)|mtp\.layers\.0\.{mtp_layer_module()})\.mlp\.router\."
                             r"(weight|expert_bias)", name)
            if m is None:
                if "_extra_state" not in name and "norm" not in name and tensor.dtype != torch.bfloat16:
                    bad.append(f"{name}: {tensor.dtype}")
                continue
            seen += 1
            layer = MTP if m.group(1) is None else chunk.decoder.layers[int(m.group(1))].layer_number - 1
            hf = sd[f"model.layers.{layer}.mlp.gate." + ("weight" if m.group(2) == "weight" else
                                                         "e_score_correction_bias")]
            if tensor.dtype != torch.float32 or hf.dtype != torch.float32 or not torch.equal(tensor, hf):
                bad.append(f"{name}: {tensor.dtype} vs HF {hf.dtype}")
    return bad, seen


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


def _flat(ckpts: dict) -> dict:
    """The world's checkpoints by ``family/variant`` (native, the fused ones, mtp, bf16, bad_copy)."""
    return {f"{family}/{variant}": path for family, variants in ckpts.items() for variant, path in variants.items()}


def _family(run) -> str:
    return run.layout.ckpt.split("/")[0]


@functools.lru_cache(maxsize=None)
def _file(path: str) -> dict:
    """A checkpoint's tensors (once per rank and checkpoint)."""
    with SafeTensorsSource(path) as src:
        return {k: src[k].clone() for k in src.keys()}


@functools.lru_cache(maxsize=None)
def _plain_file(path: str) -> dict:
    """A plain reading of a checkpoint's single file (safetensors' own loader; once per rank and checkpoint)."""
    from safetensors.torch import load_file

    return load_file(os.path.join(path, "model.safetensors"))


_CALLS = {}  # this rank's counter of the fused expert ops, installed by the first layout


def _reset_calls(rank, layout) -> None:
    """Counts every call of the fused expert ops in this rank, by op name, from here on."""
    from megatron_bridge_ext import ops
    from megatron_bridge_ext.testing.calls import count_calls

    if "counter" not in _CALLS:
        _CALLS["counter"] = count_calls(ops, ("expert_pack_fc1", "expert_pack_fc2", "expert_unpack_fc1",
                                              "expert_unpack_fc2"))
    _CALLS["counter"].clear()


def _experts(run) -> dict:
    """The import's op calls, then every local expert against the HF slice of its global expert."""
    from megatron.core import parallel_state as ps

    calls = _CALLS["counter"]
    imported = dict(calls)
    sd = _file(run.ckpts[run.layout.ckpt])
    bad = _check_experts(run.chunks, sd, _family(run), ps.get_expert_model_parallel_rank(), run.layout.ep,
                         ps.get_expert_tensor_parallel_rank(), run.layout.etp)
    calls.clear()
    return {"bad_experts": bad, "moe_layers": len({layer for layer, _, _ in _local_experts(run.chunks)}),
            "imported": imported}


def _exported(run) -> dict:
    """The op calls of the export with the source (this check runs first after it)."""
    return {"exported": dict(_CALLS["counter"])}


def _fused_variants(run) -> dict:
    """Each fused copy of the family imported at this layout: the same Megatron parameters, one pack call per
    layer, the generator variant's tensors; exported back."""
    from megatron_bridge_ext.auto_bridge import AutoBridge

    family, calls, r = _family(run), _CALLS["counter"], {}
    mine = _params(run.chunks)
    for variant in FUSED.get(family, {}):
        fused_bridge = AutoBridge.from_hf_pretrained(run.ckpts[f"{family}/{variant}"])
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
        run.save(fused_bridge, fused_chunks, f"{family}_{variant}")
    return r


def _grouped(run) -> dict:
    from megatron.core import parallel_state as ps

    from megatron_bridge_ext.auto_bridge import AutoBridge

    family = _family(run)
    variants = {v: run.ckpts[f"{family}/{v}"] for v in ("native", "fused")}
    return {"grouped": _grouped_check(AutoBridge, variants, run.chunks, _file(run.ckpts[run.layout.ckpt]), family,
                                      ps.get_expert_model_parallel_rank(), run.layout.ep,
                                      ps.get_expert_tensor_parallel_rank(), run.layout.etp, run.rank)}


def _nosource(run) -> dict:
    """The export without a source (after the counted export: its op calls are not the export's)."""
    from megatron_bridge_ext.auto_bridge import AutoBridge

    family = _family(run)
    AutoBridge.from_architecture(_arch(family)).save_hf_pretrained(
        run.chunks, os.path.join(run.out_root, f"{family}_nosource"), bucket_bytes=64 * 1024, show_progress=False)
    return {}


def _mtp_checks(run) -> dict:
    from megatron.core import parallel_state as ps

    r = {"pp_rank": ps.get_pipeline_model_parallel_rank()}
    if run.layout.tp == 1:
        r["bad"], r["seen"] = _check_mtp(run.chunks, _plain_file(run.ckpts[run.layout.ckpt]), _family(run),
                                         ps.get_expert_model_parallel_rank(), run.layout.ep)
    return r


def _mtp_sync(run) -> dict:
    """A WeightSyncPlan without a source either: the table follows the model, the MTP layer and its copies too."""
    from megatron_bridge_ext.auto_bridge import AutoBridge
    from megatron_bridge_ext.engine import WeightSyncPlan

    sd = _plain_file(run.ckpts[run.layout.ckpt])
    plan = WeightSyncPlan(AutoBridge.from_architecture(_arch(_family(run))).model_bridge, run.chunks,
                          bucket_bytes=64 * 1024, dst=0)
    synced = {n: t for bucket in plan.sync() for n, t in bucket}
    return {"sync": sorted(set(synced) ^ set(sd)) or [k for k in sd if not torch.equal(synced[k], sd[k])]}


def _bf16_routers(run) -> dict:
    return dict(zip(("bad", "seen"), _check_routers(run.chunks, _plain_file(run.ckpts[run.layout.ckpt]))))


def _refusals(rank, ckpts, tokens, out_root) -> dict:
    """Last (a failed import leaves the world without further collectives): the MTP copy that differs from the
    main tensor, and a model built without MTP layers from a checkpoint with one."""
    from megatron_bridge_ext.auto_bridge import AutoBridge
    from megatron_bridge_ext.mcore.forward import megatron_logits_with_mtp
    from megatron_bridge_ext.mcore.model_builder import destroy_parallel, init_parallel

    results = {}
    init_parallel(tp=1, pp=1, ep=2, etp=1)
    try:
        AutoBridge.from_hf_pretrained(ckpts["deepseek_v3/bad_copy"]).to_megatron_model(params_dtype=torch.float32)
        results["bad_copy"] = "imported"
    except Exception as e:  # every rank holds the embedding: each fails on its own or names the first failing rank
        results["bad_copy"] = f"{type(e).__name__}: {e}"
    # a model built without MTP layers: the MTP tensors are unused (named), unless allowed on purpose
    bridge = AutoBridge.from_hf_pretrained(ckpts["deepseek_v3/mtp"])
    try:
        bridge.to_megatron_model(params_dtype=torch.float32, mtp_num_layers=None)
        results["mtp_off"] = "imported"
    except Exception as e:
        results["mtp_off"] = f"{type(e).__name__}: {e}"
    chunks = bridge.to_megatron_model(params_dtype=torch.float32, mtp_num_layers=None,
                                      allowed_unused_hf_params=[f"model.layers.{MTP}.*"])
    results["mtp_off_logits"] = megatron_logits_with_mtp(chunks, tokens)
    destroy_parallel()
    return results


def _layouts() -> list:
    """The world's layouts in order: each family at each layout, then per MTP family the MTP checkpoint at each
    layout and the bf16 one at EP2 and PP2 x EP2."""
    out = []
    for family in FAMILIES:
        for name, tp, pp, ep in LAYOUTS:
            after = (_exported,) + ((_fused_variants,) if name == "tp2ep2" else ()) + \
                ((_grouped,) if name == "tp2ep2" and family == GROUPED_FAMILY else ()) + \
                ((_nosource,) if name == "pp2ep2" else ())
            out.append(Layout(f"{family}_{name}", f"{family}/native", tp=tp, pp=pp, ep=ep, etp=_etp(family, tp),
                              max_shard_bytes=256 * 1024, before_import=(_reset_calls,), checks=(_experts,),
                              after_export=after))
    for family in MTP_FAMILIES:
        for name, tp, pp, ep in LAYOUTS:
            out.append(Layout(f"{family}_mtp_{name}", f"{family}/mtp", tp=tp, pp=pp, ep=ep, etp=tp, logits="mtp",
                              max_shard_bytes=256 * 1024, checks=(_mtp_checks,),
                              no_source=_arch(family) if name == "pp2ep2" else None,
                              after_export=(_mtp_sync,) if name == "pp2ep2" else ()))
        for name, tp, pp, ep in BF16_LAYOUTS:
            out.append(Layout(f"{family}_bf16_{name}", f"{family}/bf16", tp=tp, pp=pp, ep=ep, etp=tp, dtype=None,
                              logits=None, max_shard_bytes=256 * 1024, checks=(_bf16_routers,)))
    return out


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
    for family in MTP_FAMILIES:
        native = ckpts[family]["native"]
        model = transformers.AutoModelForCausalLM.from_pretrained(native, dtype=torch.float32).eval()
        ckpts[family]["mtp"] = str(root / f"hf_{family}_mtp")
        layer, mtp = _write_mtp(native, ckpts[family]["mtp"], model, seed=40 + len(family))
        hf[f"{family}_mtp"] = mtp_reference_logits(model, layer, mtp, tokens)
        ckpts[family]["bf16"] = str(root / f"hf_{family}_bf16")
        _write_bf16(native, ckpts[family]["mtp"], ckpts[family]["bf16"])
    ckpts["deepseek_v3"]["bad_copy"] = str(root / "hf_deepseek_v3_bad_copy")
    _write_bad_copy(ckpts["deepseek_v3"]["mtp"], ckpts["deepseek_v3"]["bad_copy"])
    out_root = str(root / "out")
    per_rank = spawn_layouts(_flat(ckpts), _layouts(), tokens, out_root, timeout=1500, tail=_refusals)
    return ckpts, out_root, per_rank, hf, tokens


CASES = [(family, *layout) for family in FAMILIES for layout in LAYOUTS]
IDS = [f"{c[0]}-{c[1]}" for c in CASES]


@pytest.mark.parametrize("family,name,tp,pp,ep", CASES, ids=IDS)
def test_logits_match_hf(world, family, name, tp, pp, ep):
    _, _, per_rank, hf, _ = world
    got = per_rank[0][f"{family}_{name}"]["logits"]
    diff = (got - hf[family]).abs().max().item()
    assert diff <= MEGATRON_VS_HF_ATOL, f"{family} {name}: max |logit diff| {diff:.3e} > {MEGATRON_VS_HF_ATOL:.0e}"


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
    export: one expert_unpack_fc1 / fc2 call per MoE layer on the destination, none elsewhere; none at all where the
    HF tensors are per expert and there is no expert-TP (each is then a view of a gathered expert parameter; the
    round-trip tests check their values)."""
    _, _, per_rank, _, _ = world
    kinds = 2 if family == "gpt_oss" else 1  # weights (and biases)
    total = MOE_LAYERS[family]
    assert sum(r[f"{family}_{name}"]["moe_layers"] for r in per_rank) == total * 4 // pp
    for rank, r in enumerate(per_rank):
        res = r[f"{family}_{name}"]
        imported, exported = res["imported"], res["exported"]
        local = res["moe_layers"] * kinds
        assert imported == {"expert_pack_fc1": local, "expert_pack_fc2": local}, (rank, imported)
        unpacks = family == "gpt_oss" or _etp(family, tp) > 1  # GPT-OSS's native experts are fused tensors
        want = {"expert_unpack_fc1": total * kinds, "expert_unpack_fc2": total * kinds} if rank == 0 and unpacks \
            else {}
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
        # same class, same bytes; transformers holds the fused experts in another memory layout than the per-expert
        # model, so only the GEMMs' reduction order differs (testing/tolerances.py)
        diff = (hf_logits(ckpts[family][variant], tokens) - hf[family]).abs().max().item()
        assert diff <= SAME_MODEL_ATOL, f"{family}-{variant}: max |logit diff| {diff:.3e}"


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
    diff = (hf_logits(out, tokens) - hf[family]).abs().max().item()
    assert diff <= SAME_MODEL_ATOL, f"{family}: max |logit diff| {diff:.3e}"  # same class and weights (tolerances.py)


@pytest.mark.parametrize("variant", ["native", "fused"])
def test_grouped_gemm_names_through_the_engine(world, variant):
    _, _, per_rank, _, _ = world
    for rank, r in enumerate(per_rank):
        assert r[f"{GROUPED_FAMILY}_tp2ep2"]["grouped"][variant] == [], rank


# ---------------------------------------------------------------------------------------------------------------------
# multi-token prediction and bf16 routers
# ---------------------------------------------------------------------------------------------------------------------

MTP_CASES = [(family, *layout) for family in MTP_FAMILIES for layout in LAYOUTS]
MTP_IDS = [f"{c[0]}-{c[1]}" for c in MTP_CASES]


@pytest.mark.parametrize("family,name,tp,pp,ep", MTP_CASES, ids=MTP_IDS)
def test_mtp_main_and_mtp_logits(world, family, name, tp, pp, ep):
    """The main model's logits are the HF model's (transformers ignores MTP layers); the MTP depth-1 logits are the
    plain reference's (megatron-core needs labels for a forward with MTP layers; see mcore/forward.py)."""
    _, _, per_rank, hf, _ = world
    res = per_rank[0][f"{family}_mtp_{name}"]
    diff = (res["logits"] - hf[family]).abs().max().item()
    assert diff <= MEGATRON_VS_HF_ATOL, f"{family} {name}: main logits max |diff| {diff:.3e}"
    assert len(res["mtp_logits"]) == 1
    ref = hf[f"{family}_mtp"]
    diff = (res["mtp_logits"][0] - ref).abs().max().item()
    assert diff <= MEGATRON_VS_HF_ATOL and ref.abs().max().item() > 1.0, \
        f"{family} {name}: MTP logits max |diff| {diff:.3e}"


@pytest.mark.parametrize("family,name,tp,pp,ep", [c for c in MTP_CASES if c[2] == 1],
                         ids=[i for i, c in zip(MTP_IDS, MTP_CASES) if c[2] == 1])
def test_mtp_parameters_are_the_hf_tensors(world, family, name, tp, pp, ep):
    """Every MTP parameter and buffer on every rank equals a plain-torch reading of the HF file (experts by global
    index); MTP lives on the last pipeline stage only, whose embedding copy is the HF embedding."""
    _, _, per_rank, _, _ = world
    for rank, r in enumerate(per_rank):
        res = r[f"{family}_mtp_{name}"]
        assert res["bad"] == [], (rank, res["bad"][:6])
        on_last = res["pp_rank"] == pp - 1
        assert (res["seen"] > 0) == on_last, (rank, res["pp_rank"], res["seen"])


@pytest.mark.parametrize("family,name,tp,pp,ep", MTP_CASES, ids=MTP_IDS)
def test_mtp_round_trip_bit_exact(world, family, name, tp, pp, ep):
    ckpts, out_root, _, _, _ = world
    _assert_same_tensors(ckpts[family]["mtp"], os.path.join(out_root, f"{family}_mtp_{name}"))


@pytest.mark.parametrize("family", MTP_FAMILIES)
def test_mtp_export_without_source(world, family):
    """From PP2 x EP2 without a source: the MTP layer and its copies are written (by save_hf_pretrained and by a
    WeightSyncPlan), config.json says so, and transformers loads the main model with the source's logits."""
    ckpts, out_root, per_rank, hf, tokens = world
    assert per_rank[0][f"{family}_mtp_pp2ep2"]["sync"] == []
    out = os.path.join(out_root, f"{family}_mtp_pp2ep2_nosource")
    _assert_same_tensors(ckpts[family]["mtp"], out)
    with open(os.path.join(out, "config.json")) as f:
        cfg = json.load(f)
    assert cfg["num_nextn_predict_layers"] == 1 and cfg["num_hidden_layers"] == MTP
    diff = (hf_logits(out, tokens) - hf[family]).abs().max().item()
    assert diff <= SAME_MODEL_ATOL, f"{family}: max |logit diff| {diff:.3e}"  # same class and weights (tolerances.py)


@pytest.mark.parametrize("family,name", [(f, layout[0]) for f in MTP_FAMILIES for layout in BF16_LAYOUTS])
def test_bf16_round_trip_keeps_fp32_routers(world, family, name):
    """bf16 checkpoint with fp32 router weights and correction biases: the Megatron routers hold them in fp32, bit
    for bit; the other weights are bf16; the export is the source, dtypes included."""
    ckpts, out_root, per_rank, _, _ = world
    for rank, r in enumerate(per_rank):
        res = r[f"{family}_bf16_{name}"]
        assert res["bad"] == [] and res["seen"] > 0, (rank, res)
    _assert_same_tensors(ckpts[family]["bf16"], os.path.join(out_root, f"{family}_bf16_{name}"))


def test_an_mtp_copy_that_differs_from_the_main_tensor_is_refused(world):
    _, _, per_rank, _, _ = world
    for rank, r in enumerate(per_rank):
        assert re.search(r"embedding\.word_embeddings\.weight: HF tensor model\.layers\.4\.embed_tokens\.weight "
                         r"\(\[97, 64\] torch\.float32\) is stored as a copy of model\.embed_tokens\.weight .* but "
                         r"differs from it", r["bad_copy"]), (rank, r["bad_copy"])


def test_a_model_without_mtp_layers_names_the_mtp_tensors_it_leaves(world):
    """Built with mtp_num_layers=None from a checkpoint with an MTP layer: the import fails naming the MTP tensors;
    allowed on purpose, the main model converts (its logits are the HF model's) and no MTP logits exist."""
    ckpts, _, per_rank, hf, _ = world
    with SafeTensorsSource(ckpts["deepseek_v3"]["mtp"]) as src:
        count = sum(k.startswith(f"model.layers.{MTP}.") for k in src.keys())
    for rank, r in enumerate(per_rank):
        assert re.search(rf"{count} HF tensor\(s\) of .* are used by no mapping of this model: \['model\.layers\.4\.",
                         r["mtp_off"]), (rank, count, r["mtp_off"])
        logits, mtp = r["mtp_off_logits"]
        assert mtp == [] and (logits - hf["deepseek_v3"]).abs().max().item() <= MEGATRON_VS_HF_ATOL, rank
