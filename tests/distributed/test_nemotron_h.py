"""NemotronH (Mamba-2 / attention / squared-ReLU MLP layers) -> megatron-core HybridModel chunks (CPU, gloo) -> HF,
all in ONE spawned world of 4 ranks (megatron-core >= 0.19; under 0.16.1 the family's named refusal).

Checkpoints (transformers' NemotronHForCausalLM from tiny configs, every tensor redrawn at random: norms N(1, 0.3),
``A_log`` / ``D`` / ``dt_bias`` / convolution included, so that a component read from the wrong rows moves a value):

- ``hybrid``: pattern ``M-*-M*M-`` (Mamba 8 heads of 8 in 2 groups of state 8, GQA attention 4 / 2 heads of 16),
  untied; TP2, PP2, PP2 + VPP2 (megatron's explicit '|' stages), TP2 x PP2.
- ``tied``: pattern ``M*-M`` with ``tie_word_embeddings=True``, which transformers' NemotronH ignores (its
  ``_tied_weights_keys`` is empty: ``lm_head`` is its own tensor, checked here): untied in Megatron too; TP2 x PP2.
- ``bf16``: pattern ``M*-M`` saved in bf16, TP2 with ``params_dtype=bf16``: megatron keeps ``A_log`` / ``D`` (its
  mixer's choice) and the torch norms in fp32 (the bf16 values widened exactly), every other parameter is bf16, and
  the export gives the bf16 source back bit-exact.
- ``dense``: pattern ``*-*-`` (no Mamba layer), TP2: its logits are compared with transformers' (the attention and
  MLP layers, norms, embedding and output run on CPU as megatron-core has them).
- ``scan``: ``hybrid``'s pattern with ``time_step_min=0`` (transformers clamps the time step there, megatron does
  not), TP2 and PP2: logits against transformers' with megatron's Mamba mixer running its non-fused path
  (``use_mamba_mem_eff_path=False``) and transformers' torch scan ``mamba2_chunk_scan`` standing in for
  ``mamba_ssm``'s Triton ``mamba_chunk_scan_combined`` (megatron has no torch scan): the scan is the same function on
  both sides, everything around it (in_proj split, conv1d, gated group norm, out_proj, TP all-reduce) is megatron's.

For each layout, on every rank: every parameter of every chunk equals (``torch.equal``) a plain-torch reading of the
HF tensors written here (:func:`_expected`: ``in_proj`` split into z / x / B / C / dt and each chunked over TP,
the convolution over x / B / C, per-head vectors and the gated norm chunked, ``out_proj`` / ``o_proj`` /
``down_proj`` chunked by columns, q / k / v interleaved per query group, the vocabulary padded); no parameter is left
unchecked. The export is bit-exact against the source (key set, dtypes, torch.equal). One export without the source
loads in transformers with the source's layer types and tensors. ``torch_dist`` checkpoints written at TP2, with the
local spec's keys and with the default Transformer Engine spec's (megatron-core's TE hybrid spec: each layer's
pre-norm fused into its first linear; the keys proved against megatron's own TE ``HybridModel`` in
``test_te_checkpoint.py``), are read at PP2 from their stored config with every parameter again equal to the HF
reading; the streamed conversion (no live model) writes the same checkpoints (each spec) and reads back at TP2 x PP2
likewise; both streamed checkpoints export back bit-exact, streamed and through a model.
"""

from __future__ import annotations

import json
import os

import pytest
import torch

pytest.importorskip("megatron.core")
transformers = pytest.importorskip("transformers")

from megatron_bridge_ext.io import SafeTensorsSource  # noqa: E402
from megatron_bridge_ext.mcore.versions import MEGATRON_CORE_0_19, unmet_megatron_core  # noqa: E402
from megatron_bridge_ext.testing.parity import compare_checkpoints, hf_logits  # noqa: E402
from megatron_bridge_ext.testing.tiny_models import make_tiny_checkpoint, save_transformers_bf16  # noqa: E402
from megatron_bridge_ext.testing.tolerances import MEGATRON_VS_HF_ATOL, SAME_MODEL_ATOL, max_abs_diff  # noqa: E402
from megatron_bridge_ext.testing.worlds import Layout, spawn_layouts  # noqa: E402

HAS_HYBRID = unmet_megatron_core(MEGATRON_CORE_0_19) is None
ARCH = "NemotronHForCausalLM"
HEADS, GROUPS, HEAD_DIM = 4, 2, 16
M_HEADS, M_HEAD_DIM, M_GROUPS, M_STATE = 8, 8, 2, 8
BASE = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_attention_heads=HEADS,
            num_key_value_heads=GROUPS, head_dim=HEAD_DIM, mamba_num_heads=M_HEADS, mamba_head_dim=M_HEAD_DIM,
            n_groups=M_GROUPS, ssm_state_size=M_STATE, conv_kernel=4, chunk_size=8, max_position_embeddings=128,
            layer_norm_epsilon=1e-5, pad_token_id=None, eos_token_id=None, bos_token_id=None)
SYMBOL_TYPES = {"M": "linear_attention", "*": "full_attention", "-": "mlp", "E": "moe"}
# MoE layers: 8 non-gated experts of 24 in 4 groups (the 2 best groups chosen per token, 4 experts from them), a shared
# expert of 40, scaled weights
EXPERTS = 8
MOE = dict(n_routed_experts=EXPERTS, num_experts_per_tok=4, n_group=4, topk_group=2, moe_intermediate_size=24,
           moe_shared_expert_intermediate_size=40, routed_scaling_factor=2.5)
CHECKPOINTS = {
    "hybrid": dict(pattern="M-*-M*M-"),
    "tied": dict(pattern="M*-M", tie_word_embeddings=True),
    "dense": dict(pattern="*-*-"),
    # HF clamps the Mamba time step at time_step_min from below, megatron's kernels do not: 0 for the logits check
    "scan": dict(pattern="M-*-M*M-", time_step_min=0.0),
    "bf16": dict(pattern="M*-M", dtype=torch.bfloat16),
    "moe": dict(pattern="ME*EM-E*", **MOE),
    "moe_attn": dict(pattern="*E-E", **MOE),  # no Mamba layer: logits against transformers'
    "moe_bf16": dict(pattern="*E-E", dtype=torch.bfloat16, **MOE),  # transformers' bf16: fp32 routers
}
NO_SOURCES = ("hybrid_tp2pp2", "moe_pp2ep2")
LOGITS = {"dense_tp2", "scan_tp2", "scan_pp2", "moe_attn_tp2ep2", "moe_attn_pp2ep2"}
#: torch_dist checkpoints written at the first layout, read at the second (tp, pp, ep)
DIST = ("hybrid_tp2", (1, 2, 1))
MOE_DIST = ("moe_tp2ep2", (1, 2, 2))
#: layouts whose experts are also converted into grouped-GEMM parameter names
GROUPED = ("moe_tp2ep2", "moe_pp2ep2")


#: config.json fields written after the save (transformers' weight initialisation takes log(time_step_min))
AFTER_SAVE = ("time_step_min",)
#: fields of CHECKPOINTS that are no config fields
NOT_CONFIG = ("pattern", "dtype") + AFTER_SAVE


def _config(ckpt: str) -> dict:
    spec = {k: v for k, v in CHECKPOINTS[ckpt].items() if k not in NOT_CONFIG}
    pattern = CHECKPOINTS[ckpt]["pattern"]
    return {**BASE, **spec, "layers_block_type": [SYMBOL_TYPES[s] for s in pattern]}


def _make_checkpoint(path: str, ckpt: str, seed: int) -> None:
    """The routers' correction biases drawn from N(0, 0.2) (they move the expert choice); a bf16 MoE checkpoint is
    transformers' own (loaded from fp32 in bf16 and saved: the routers' weights and biases stay fp32)."""
    dtype = CHECKPOINTS[ckpt].get("dtype", torch.float32)
    moe = "E" in CHECKPOINTS[ckpt]["pattern"]
    model = make_tiny_checkpoint(path, "NemotronH", _config(ckpt), seed, norm=(1.0, 0.3), rest=(0.0, 0.1),
                                 rules=[(lambda n: n.endswith(("A_log", ".D", "dt_bias")), 0.5, 0.3)],
                                 correction_bias=0.2 if moe else None,
                                 dtype=torch.float32 if moe else dtype)
    if moe and dtype != torch.float32:
        save_transformers_bf16(model, path)
    late = {k: v for k, v in CHECKPOINTS[ckpt].items() if k in AFTER_SAVE}
    if late:
        with open(os.path.join(path, "config.json")) as f:
            config = json.load(f)
        with open(os.path.join(path, "config.json"), "w") as f:
            json.dump({**config, **late}, f, indent=2)


# ---------------------------------------------------------------------------------------------------------------------
# The plain-torch reading of the HF tensors (written from transformers' and megatron-core's module code, not from the
# package's mappings)
# ---------------------------------------------------------------------------------------------------------------------

def _split_chunk(t: torch.Tensor, sizes, tp: int, r: int) -> torch.Tensor:
    """Components of ``sizes`` rows laid end to end, each chunked over TP; rank r's pieces concatenated."""
    return torch.cat([part.chunk(tp, 0)[r] for part in torch.split(t, sizes, 0)], 0)


def _expected(local_name: str, layer: int, sd: dict, par: dict, padded_vocab: int) -> torch.Tensor:
    """``par``: this rank's ``tp`` / ``tp_rank``, ``ep`` / ``ep_rank`` and ``etp`` / ``etp_rank``."""
    d_inner, gn = M_HEADS * M_HEAD_DIM, M_GROUPS * M_STATE
    tp, r = par["tp"], par["tp_rank"]
    hf = f"backbone.layers.{layer}."
    if local_name in ("embedding.word_embeddings.weight", "output_layer.weight"):
        src = sd["backbone.embeddings.weight" if local_name.startswith("embedding") else "lm_head.weight"]
        padded = torch.cat([src, src.new_zeros(padded_vocab - src.shape[0], src.shape[1])])
        return padded.chunk(tp, 0)[r]
    if local_name == "decoder.final_norm.weight":
        return sd["backbone.norm_f.weight"]
    leaf = local_name.split(".", 3)[3]  # after decoder.layers.<i>.
    if leaf in ("norm.weight", "input_layernorm.weight", "pre_mlp_layernorm.weight"):
        return sd[hf + "norm.weight"]
    if leaf == "mixer.in_proj.weight":
        return _split_chunk(sd[hf + "mixer.in_proj.weight"], [d_inner, d_inner, gn, gn, M_HEADS], tp, r)
    if leaf in ("mixer.conv1d_weight", "mixer.conv1d_bias"):
        return _split_chunk(sd[hf + "mixer.conv1d." + leaf.rsplit("_", 1)[1]], [d_inner, gn, gn], tp, r)
    if leaf in ("mixer.A_log", "mixer.D", "mixer.dt_bias", "mixer.norm.weight"):
        return sd[hf + leaf].chunk(tp, 0)[r]
    if leaf in ("mixer.out_proj.weight", "mlp.linear_fc2.weight", "self_attention.linear_proj.weight",
                "mlp.shared_experts.linear_fc2.weight"):
        name = {"mixer.out_proj.weight": "mixer.out_proj.weight", "mlp.linear_fc2.weight": "mixer.down_proj.weight",
                "self_attention.linear_proj.weight": "mixer.o_proj.weight",
                "mlp.shared_experts.linear_fc2.weight": "mixer.shared_experts.down_proj.weight"}[leaf]
        return sd[hf + name].chunk(tp, 1)[r]
    if leaf == "mlp.linear_fc1.weight":
        return sd[hf + "mixer.up_proj.weight"].chunk(tp, 0)[r]
    if leaf == "mlp.shared_experts.linear_fc1.weight":
        return sd[hf + "mixer.shared_experts.up_proj.weight"].chunk(tp, 0)[r]
    # the router (replicated) and its fp32 correction bias (a buffer)
    if leaf == "mlp.router.weight":
        return sd[hf + "mixer.gate.weight"]
    if leaf == "mlp.router.expert_bias":
        return sd[hf + "mixer.gate.e_score_correction_bias"]
    if leaf.startswith("mlp.experts.local_experts."):  # local expert e of EP rank q: global q * E/ep + e
        e, fc = int(leaf.split(".")[3]), leaf.split(".")[4]
        g = par["ep_rank"] * (EXPERTS // par["ep"]) + e
        if fc == "linear_fc1":  # non-gated: up_proj rows over expert-TP
            return sd[hf + f"mixer.experts.{g}.up_proj.weight"].chunk(par["etp"], 0)[par["etp_rank"]]
        return sd[hf + f"mixer.experts.{g}.down_proj.weight"].chunk(par["etp"], 1)[par["etp_rank"]]
    if leaf == "self_attention.linear_qkv.weight":
        q, k, v = (sd[hf + f"mixer.{p}_proj.weight"] for p in "qkv")
        hidden = q.shape[1]
        per_group = torch.cat([q.view(GROUPS, HEADS // GROUPS * HEAD_DIM, hidden), k.view(GROUPS, HEAD_DIM, hidden),
                               v.view(GROUPS, HEAD_DIM, hidden)], 1)
        return per_group.reshape(-1, hidden).chunk(tp, 0)[r]
    raise KeyError(local_name)


def _parallel() -> dict:
    from megatron.core import parallel_state as ps

    return dict(tp=ps.get_tensor_model_parallel_world_size(), tp_rank=ps.get_tensor_model_parallel_rank(),
                ep=ps.get_expert_model_parallel_world_size(), ep_rank=ps.get_expert_model_parallel_rank(),
                etp=ps.get_expert_tensor_parallel_world_size(), etp_rank=ps.get_expert_tensor_parallel_rank())


def _check_params(chunks, sd: dict) -> dict:
    """Every parameter of this rank (and the routers' correction-bias buffers) against :func:`_expected`:
    mismatches and the number checked."""
    bad, checked = [], 0
    par = _parallel()
    for chunk in chunks:
        layer_of = {i: layer.layer_number - 1 for i, layer in enumerate(chunk.decoder.layers)}
        tensors = [*chunk.named_parameters(), *((n, b) for n, b in chunk.named_buffers() if n.endswith("expert_bias"))]
        for name, p in tensors:
            layer = layer_of[int(name.split(".")[2])] if name.startswith("decoder.layers.") else -1
            want = _expected(name, layer, sd, par, chunk.vocab_size)
            checked += 1
            # megatron keeps A_log and D in fp32 whatever params_dtype is, and torch's norms are built in fp32: a
            # bf16 HF value widened exactly (the export narrows it back)
            wide = p.dtype == torch.float32 and (name.endswith(("mixer.A_log", "mixer.D")) or "norm" in name)
            if p.shape != want.shape or (p.dtype != want.dtype and not wide) or \
                    not torch.equal(p.detach(), want.to(p.dtype)):
                bad.append(f"{name} (layer {layer}) {list(p.shape)} {p.dtype} vs {list(want.shape)} {want.dtype}")
    return {"bad": bad, "checked": checked}


def _hf_tensors(path: str) -> dict:
    with SafeTensorsSource(path) as src:
        return {k: src[k].clone() for k in src.keys()}


def _read_back(path: str, sd: dict, tp: int, pp: int, ep: int = 1, etp=None) -> dict:
    """The ``torch_dist`` checkpoint at ``path`` read at TP ``tp`` x PP ``pp`` x EP ``ep`` (expert-TP ``etp``, None:
    ``tp``) from its stored config into
    NaN-poisoned chunks (the load must write every parameter and correction bias), checked against
    :func:`_expected`."""
    from megatron_bridge_ext.io.megatron_checkpoint import read_checkpoint_info
    from megatron_bridge_ext.mcore.checkpoint import cast_to_params_dtype, config_from_checkpoint
    from megatron_bridge_ext.mcore.checkpoint import load_megatron_checkpoint
    from megatron_bridge_ext.mcore.model_builder import build_model_chunks, init_parallel

    init_parallel(tp=tp, pp=pp, ep=ep, etp=etp)
    info = read_checkpoint_info(path)
    loaded = cast_to_params_dtype(build_model_chunks(config_from_checkpoint(info)))
    for chunk in loaded:
        for p in [*chunk.parameters(), *(b for n, b in chunk.named_buffers() if n.endswith("expert_bias"))]:
            p.data.fill_(float("nan"))
    load_megatron_checkpoint(loaded, info.path)
    return _check_params(loaded, sd)


def _torch_scan(rank: int, layout) -> None:
    """megatron's Mamba scan is mamba_ssm's Triton kernel: transformers' torch scan (same arguments) stands in for
    it, so that the rest of megatron's mixer (in_proj split, torch conv1d, gated group norm, out_proj) runs on the
    CPU."""
    import megatron.core.ssm.mamba_mixer as mamba_mixer
    from transformers.models.nemotron_h import modeling_nemotron_h

    mamba_mixer.mamba_chunk_scan_combined = modeling_nemotron_h.mamba2_chunk_scan


def _params(run) -> dict:
    sd = _hf_tensors(run.ckpts[run.layout.ckpt])
    return {"params": _check_params(run.chunks, sd), "kind": type(run.chunks[0]).__name__}


class _Grouped(torch.nn.Module):
    """Transformer Engine's grouped experts as parameters only: ``weight0 .. weight{n-1}``."""

    def __init__(self, shapes):
        super().__init__()
        for e, shape in enumerate(shapes):
            self.register_parameter(f"weight{e}", torch.nn.Parameter(torch.full(tuple(shape), float("nan"))))


def _grouped(run) -> dict:
    """Grouped-GEMM names (``mlp.experts.linear_fc{1,2}.weight{e}``, TE's grouped experts; no kernel runs on CPU): a
    module tree carrying exactly such parameters for this rank's MoE layers, loaded through the engine, equals the
    sequential experts (themselves checked against the HF tensors) and exports the source's expert tensors."""
    from megatron_bridge_ext.auto_bridge import AutoBridge

    chunk = run.chunks[0]
    root = torch.nn.Module()
    root.config, root.vocab_size = chunk.config, chunk.vocab_size
    root.decoder = torch.nn.Module()
    root.decoder.layers = torch.nn.ModuleList()
    pairs = []
    for layer in chunk.decoder.layers:
        mod = torch.nn.Module()
        mod.layer_number = layer.layer_number
        experts = getattr(getattr(layer, "mlp", None), "experts", None)
        if experts is not None:
            mod.mlp = torch.nn.Module()
            mod.mlp.experts = torch.nn.Module()
            for fc in ("linear_fc1", "linear_fc2"):
                setattr(mod.mlp.experts, fc, _Grouped([getattr(x, fc).weight.shape for x in experts.local_experts]))
            pairs.append((layer, mod))
        root.decoder.layers.append(mod)
    path = run.ckpts[run.layout.ckpt]
    bridge = AutoBridge.from_hf_pretrained(path)
    others = [k for k in bridge.hf_pretrained.state.keys() if ".mixer.experts." not in k]
    bridge.load_hf_weights([root], show_progress=False, allowed_unused_hf_params=others)
    bad, checked = [], 0
    for layer, mod in pairs:
        for e, expert in enumerate(layer.mlp.experts.local_experts):
            for fc in ("linear_fc1", "linear_fc2"):
                checked += 1
                if not torch.equal(getattr(getattr(mod.mlp.experts, fc), f"weight{e}"), getattr(expert, fc).weight):
                    bad.append(f"layer {layer.layer_number - 1} {fc}.weight{e}")
    exported = dict(bridge.model_bridge.stream_weights_megatron_to_hf([root], bridge.hf_pretrained,
                                                                      bucket_bytes=16 * 1024, show_progress=False))
    if run.rank == 0:
        with SafeTensorsSource(path) as src:
            experts = {k for k in src.keys() if ".mixer.experts." in k}
            if set(exported) != experts:
                bad.append(f"exported {sorted(set(exported) ^ experts)[:4]}")
            bad += [f"exported {k} differs" for k in experts & set(exported) if not torch.equal(exported[k], src[k])]
    return {"grouped": {"bad": bad, "checked": checked}}


def _dist(run) -> dict:
    """``torch_dist`` checkpoints written here, of the local spec and of the default Transformer Engine spec (the
    keys of megatron-core's TE hybrid spec), each read at DIST's (MOE_DIST's) other layout."""
    from megatron_bridge_ext.io.megatron_checkpoint import tensor_metadata
    from megatron_bridge_ext.mcore.checkpoint import cast_to_params_dtype, save_megatron_checkpoint

    r = {}
    path = os.path.join(run.out_root, f"{run.layout.name}_dist")
    chunks = cast_to_params_dtype(run.chunks)
    save_megatron_checkpoint(chunks, path, architecture=ARCH, spec="local")
    save_megatron_checkpoint(chunks, path + "_te", architecture=ARCH)  # the default spec
    r["te_keys"] = sorted(tensor_metadata(os.path.join(path + "_te", "iter_0000000")))
    sd = _hf_tensors(run.ckpts[run.layout.ckpt])
    other = dict((DIST, MOE_DIST))[run.layout.name]
    r["dist"] = _read_back(path, sd, *other)
    r["dist_te"] = _read_back(path + "_te", sd, *other)
    return r


def _tail(rank: int, ckpts: dict, tokens: torch.Tensor, out_root: str) -> dict:
    """The streamed conversion (no model built but one on the meta device; the 4 ranks share the tensors), recording
    TP2; read back at TP2 x PP2; Mamba heads / groups that TP cannot split refused by name."""
    from megatron_bridge_ext.auto_bridge import AutoBridge
    from megatron_bridge_ext.mcore.model_builder import destroy_parallel, init_parallel
    from megatron_bridge_ext.testing.parity import compare_megatron_checkpoints

    results = {}
    stream = os.path.join(out_root, "hybrid_stream")
    AutoBridge.from_hf_pretrained(ckpts["hybrid"]).save_megatron_checkpoint(
        stream, spec="local", dtype=torch.float32, layout=dict(tp=2, pp=1), file_bytes=64 << 10,
        buffer_bytes=16 << 10)
    if rank == 0:  # the stored args differ (world size): tensors and objects compared
        results["stream_diff"] = [d for d in compare_megatron_checkpoints(
            stream, os.path.join(out_root, f"{DIST[0]}_dist")) if not d.startswith("common ")]
    stream_te = os.path.join(out_root, "hybrid_stream_te")  # the default spec (Transformer Engine keys)
    AutoBridge.from_hf_pretrained(ckpts["hybrid"]).save_megatron_checkpoint(
        stream_te, dtype=torch.float32, layout=dict(tp=2, pp=1), file_bytes=64 << 10, buffer_bytes=16 << 10)
    if rank == 0:
        results["stream_te_diff"] = [d for d in compare_megatron_checkpoints(
            stream_te, os.path.join(out_root, f"{DIST[0]}_dist_te")) if not d.startswith("common ")]
    results["stream_load"] = _read_back(stream, _hf_tensors(ckpts["hybrid"]), 2, 2)
    results["stream_te_load"] = _read_back(stream_te, _hf_tensors(ckpts["hybrid"]), 2, 2)
    # MoE layers: streamed at MOE_DIST's layout (TP2 x EP2 recorded), each spec, against the model path's checkpoints;
    # read back at TP2 x PP2 x EP2 (expert-TP 1)
    for spec in ("local", "te"):
        out = os.path.join(out_root, f"moe_stream_{spec}")
        AutoBridge.from_hf_pretrained(ckpts["moe"]).save_megatron_checkpoint(
            out, spec=spec, dtype=torch.float32, layout=dict(tp=2, pp=1, ep=2), file_bytes=64 << 10,
            buffer_bytes=16 << 10)
        if rank == 0:
            model_path = os.path.join(out_root, f"{MOE_DIST[0]}_dist" + ("_te" if spec == "te" else ""))
            results[f"moe_stream_{spec}_diff"] = [d for d in compare_megatron_checkpoints(out, model_path)
                                                   if not d.startswith("common ")]
        results[f"moe_stream_{spec}_load"] = _read_back(out, _hf_tensors(ckpts["moe"]), 2, 2, 2, 1)
    destroy_parallel()
    # Mamba heads / groups that TP cannot split: refused by name before megatron asserts
    init_parallel(tp=4, pp=1)
    try:
        AutoBridge.from_hf_pretrained(ckpts["hybrid"]).transformer_config(tensor_model_parallel_size=4)
        results["tp4"] = "built"
    except ValueError as e:
        results["tp4"] = str(e)
    destroy_parallel()
    return results


def _layout(name: str, tp: int, pp: int, vpp, ckpt: str, ep: int = 1, etp=None) -> Layout:
    """The logits layouts run megatron's non-fused Mamba path (_ssm_prefill: conv1d, scan, norm apart)."""
    return Layout(name, ckpt, tp=tp, pp=pp, vpp=vpp, ep=ep, etp=etp,
                  dtype=CHECKPOINTS[ckpt].get("dtype", torch.float32),
                  model_kwargs={"use_mamba_mem_eff_path": False} if name in LOGITS else None,
                  logits="plain" if name in LOGITS else None, no_source=ARCH if name in NO_SOURCES else None,
                  max_shard_bytes=96 * 1024, before_import=(_torch_scan,),
                  checks=(_params, _grouped) if name in GROUPED else (_params,),
                  after_export=(_dist,) if name in (DIST[0], MOE_DIST[0]) else ())


LAYOUTS = [
    _layout("hybrid_tp2", 2, 1, None, "hybrid"),
    _layout("hybrid_pp2", 1, 2, None, "hybrid"),
    _layout("hybrid_pp2vpp2", 1, 2, 2, "hybrid"),
    _layout("hybrid_tp2pp2", 2, 2, None, "hybrid"),
    _layout("tied_tp2pp2", 2, 2, None, "tied"),
    _layout("dense_tp2", 2, 1, None, "dense"),
    _layout("scan_tp2", 2, 1, None, "scan"),
    _layout("scan_pp2", 1, 2, None, "scan"),
    _layout("bf16_tp2", 2, 1, None, "bf16"),
    # MoE layers: experts over EP2 x expert-TP2, EP2 with expert-TP 1, EP4, PP2 x EP2 (experts on both stages)
    _layout("moe_tp2ep2", 2, 1, None, "moe", ep=2),
    _layout("moe_tp2ep2etp1", 2, 1, None, "moe", ep=2, etp=1),
    _layout("moe_ep4", 1, 1, None, "moe", ep=4),
    _layout("moe_pp2ep2", 1, 2, None, "moe", ep=2),
    _layout("moe_attn_tp2ep2", 2, 1, None, "moe_attn", ep=2),
    _layout("moe_attn_pp2ep2", 1, 2, None, "moe_attn", ep=2),
    _layout("moe_bf16_tp2ep2", 2, 1, None, "moe_bf16", ep=2),
]
BY_NAME = {layout.name: layout for layout in LAYOUTS}
IDS = [layout.name for layout in LAYOUTS]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    if not HAS_HYBRID:
        pytest.skip("megatron-core < 0.19 has no HybridModel (the refusal is tested in test_nemotron_h_refused_*)")
    transformers.logging.set_verbosity_error()
    root = tmp_path_factory.mktemp("nemotron_h")
    ckpts = {}
    for i, ckpt in enumerate(CHECKPOINTS):
        ckpts[ckpt] = str(root / f"hf_{ckpt}")
        _make_checkpoint(ckpts[ckpt], ckpt, seed=50 + i)
    tokens = torch.randint(0, BASE["vocab_size"], (2, 12), generator=torch.Generator().manual_seed(0))
    out_root = str(root / "out")
    per_rank = spawn_layouts(ckpts, LAYOUTS, tokens, out_root, tail=_tail)
    return ckpts, out_root, per_rank, tokens


@pytest.mark.parametrize("name", IDS)
def test_every_parameter_is_the_plain_torch_reading(world, name):
    _, _, per_rank, _ = world
    layout = BY_NAME[name]
    n_layers = len(CHECKPOINTS[layout.ckpt]["pattern"])
    total = 0
    for rank, r in enumerate(per_rank):
        assert r[name]["kind"] == "HybridModel", (rank, r[name]["kind"])
        assert r[name]["params"]["bad"] == [], (rank, r[name]["params"]["bad"][:4])
        total += r[name]["params"]["checked"]
    assert total >= (4 // (layout.tp * layout.pp)) * (n_layers + 2), (name, total)  # every rank checked its share


@pytest.mark.parametrize("name", sorted(LOGITS))
def test_logits_match_transformers(world, name):
    """``dense``: megatron-core's attention and MLP layers as they are. ``scan``: Mamba layers too, megatron's mixer
    with transformers' torch scan standing in for the Triton one (the same function on both sides: what is compared is
    everything around it, megatron's split of in_proj, its convolution, gated group norm and out_proj at TP2 / PP2)."""
    ckpts, _, per_rank, tokens = world
    want = hf_logits(ckpts[BY_NAME[name].ckpt], tokens)
    got = per_rank[0][name]["logits"]
    assert got.shape == want.shape
    diff = max_abs_diff(got, want)
    assert diff <= MEGATRON_VS_HF_ATOL, f"{name}: max |logit diff| {diff:.3e}"


def _assert_same_tensors(src_dir: str, dst_dir: str) -> None:
    cmp = compare_checkpoints(src_dir, dst_dir)  # key set, dtypes, shapes, torch.equal
    assert cmp["same_keys"] and cmp["bit_exact"], cmp


@pytest.mark.parametrize("name", IDS)
def test_round_trip_bit_exact(world, name):
    ckpts, out_root, _, _ = world
    _assert_same_tensors(ckpts[BY_NAME[name].ckpt], os.path.join(out_root, name))


@pytest.mark.parametrize("name", NO_SOURCES)
def test_export_without_source_loads_in_transformers(world, name):
    """The config written from the Megatron config alone (the MoE fields too) is transformers' source config, and
    the model it loads holds the source tensors (transformers stacks the per-expert tensors in memory) and gives its
    logits."""
    ckpts, out_root, _, tokens = world
    ckpt = BY_NAME[name].ckpt
    out = os.path.join(out_root, f"{name}_nosource")
    _assert_same_tensors(ckpts[ckpt], out)
    with open(os.path.join(out, "config.json")) as f:
        written = json.load(f)
    assert written["architectures"] == [ARCH] and written["hybrid_override_pattern"] == CHECKPOINTS[ckpt]["pattern"]
    config = transformers.AutoConfig.from_pretrained(out)
    source = transformers.AutoConfig.from_pretrained(ckpts[ckpt])
    assert type(config) is type(source)
    assert config.layers_block_type == source.layers_block_type
    for field in ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads", "head_dim",
                  "mamba_num_heads", "mamba_head_dim", "n_groups", "ssm_state_size", "conv_kernel", "chunk_size",
                  "layer_norm_epsilon", "mlp_hidden_act", "tie_word_embeddings", "vocab_size", "n_routed_experts",
                  "num_experts_per_tok", "n_group", "topk_group", "norm_topk_prob", "routed_scaling_factor",
                  "moe_intermediate_size", "moe_shared_expert_intermediate_size", "moe_latent_size"):
        assert getattr(config, field) == getattr(source, field), field
    model = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    with SafeTensorsSource(ckpts[ckpt]) as src:
        for key, value in model.state_dict().items():
            key = key.replace("model.", "backbone.", 1)
            if key.endswith(("experts.up_proj", "experts.down_proj")):  # [E, ...] in memory, one tensor each on disk
                want = torch.stack([src[f"{key.rsplit('.', 1)[0]}.{e}.{key.rsplit('.', 1)[1]}.weight"]
                                    for e in range(value.shape[0])])
            else:
                want = src[key]
            assert torch.equal(value, want), key
    diff = max_abs_diff(hf_logits(out, tokens), hf_logits(ckpts[ckpt], tokens))
    assert diff <= SAME_MODEL_ATOL


@pytest.mark.parametrize("dist", [DIST, MOE_DIST], ids=["hybrid", "moe"])
@pytest.mark.parametrize("spec", ["local", "te"])
def test_torch_dist_checkpoint_reads_at_another_layout(world, spec, dist):
    """Mamba / attention / MLP layers written at TP2, read at PP2; MoE layers written at TP2 x EP2 (expert-TP 2), read
    at PP2 x EP2 (expert-TP 1)."""
    _, _, per_rank, _ = world
    key = "dist" if spec == "local" else "dist_te"
    for rank, r in enumerate(per_rank):
        assert r[dist[0]][key]["bad"] == [], (rank, r[dist[0]][key]["bad"][:4])
        assert r[dist[0]][key]["checked"] > 0, rank


def test_mamba_heads_tp_cannot_split_are_refused(world):
    _, _, per_rank, _ = world
    for rank, r in enumerate(per_rank):
        assert "n_groups=2 is not divisible by tensor_model_parallel_size=4" in r["tp4"], (rank, r["tp4"])


def test_tie_word_embeddings_is_ignored_as_transformers_does(world):
    """transformers' NemotronH keeps ``lm_head`` apart from the embedding even with ``tie_word_embeddings=True``;
    the conversion above (``tied_tp2pp2``) read the output layer from ``lm_head`` and exported both tensors."""
    ckpts, _, _, _ = world
    model = transformers.AutoModelForCausalLM.from_pretrained(ckpts["tied"], dtype=torch.float32)
    assert model.config.tie_word_embeddings is True
    assert model.lm_head.weight.data_ptr() != model.model.embeddings.weight.data_ptr()
    assert not torch.equal(model.lm_head.weight, model.model.embeddings.weight)


def test_streamed_checkpoint_equals_the_model_path_and_reads_back(world):
    """The streamed ``torch_dist`` conversion (``AutoBridge.save_megatron_checkpoint``, no live model) holds the
    tensors the model path saved at TP2 (the mixer's split keys included), and read at TP2 x PP2 every parameter is
    the plain-torch reading of the HF tensors."""
    _, _, per_rank, _ = world
    assert per_rank[0]["stream_diff"] == [], per_rank[0]["stream_diff"][:10]
    for rank, r in enumerate(per_rank):
        assert r["stream_load"]["bad"] == [] and r["stream_load"]["checked"] > 0, (rank, r["stream_load"]["bad"][:4])


def test_transformer_engine_checkpoint_fuses_each_layers_norm(world):
    """The default spec writes megatron-core's TE hybrid keys (``test_te_checkpoint.py`` proves them against the TE
    hybrid model itself): each layer's pre-norm is the ``layer_norm_weight`` of its first linear, by the layer's
    symbol in ``M-*-M*M-``; no standalone pre-norm is left; the streamed import writes the model path's checkpoint
    (tensors, bytes, ``_extra_state`` objects) and reads back at TP2 x PP2 as the plain-torch reading."""
    _, _, per_rank, _ = world
    keys = per_rank[0][DIST[0]]["te_keys"]
    fused = {"M": "mixer.in_proj.layer_norm_weight", "*": "self_attention.linear_qkv.layer_norm_weight",
             "-": "mlp.linear_fc1.layer_norm_weight"}
    pattern = CHECKPOINTS["hybrid"]["pattern"]
    for i, symbol in enumerate(pattern):
        assert f"decoder.layers.{i}.{fused[symbol]}" in keys, (i, symbol)
    layer_norms = [k for k in keys if k.startswith("decoder.layers.") and k.split(".", 3)[3] in (
        "norm.weight", "input_layernorm.weight", "pre_mlp_layernorm.weight")]
    assert layer_norms == [] and "decoder.final_norm.weight" in keys
    assert per_rank[0]["stream_te_diff"] == [], per_rank[0]["stream_te_diff"][:10]
    for rank, r in enumerate(per_rank):
        assert r["stream_te_load"]["bad"] == [] and r["stream_te_load"]["checked"] > 0, (
            rank, r["stream_te_load"]["bad"][:4])


@pytest.mark.parametrize("spec", ["local", "te"])
@pytest.mark.parametrize("via_model", [False, True], ids=["stream", "model"])
def test_export_of_the_torch_dist_checkpoint_is_bit_exact(world, via_model, spec, tmp_path):
    """``export`` of the streamed checkpoint (local spec, and the default Transformer Engine spec) with its HF source,
    streamed (no model, TP1) and through a model at TP2 x PP2 (local gloo ranks): the source's tensors back,
    bit-exact."""
    from megatron_bridge_ext.cli.export import export_checkpoint

    ckpts, out_root, _, _ = world
    out = str(tmp_path / "hf")
    layout = dict(tp=2, pp=2) if via_model else {}
    export_checkpoint(os.path.join(out_root, "hybrid_stream" if spec == "local" else "hybrid_stream_te"), out,
                      hf_source=ckpts["hybrid"], backend="gloo", via_model=via_model, timeout=600, **layout)
    _assert_same_tensors(ckpts["hybrid"], out)


@pytest.mark.parametrize("spec", ["local", "te"])
def test_moe_layers_streamed_equal_the_model_path(world, spec):
    """MoE layers streamed (no live model) into the model path's ``torch_dist`` checkpoint of ``moe_tp2ep2`` (local
    and Transformer Engine keys: tensors, bytes, ``_extra_state`` objects), read back at TP2 x PP2 x EP2 as the
    plain-torch reading (routers' correction biases included)."""
    _, _, per_rank, _ = world
    assert per_rank[0][f"moe_stream_{spec}_diff"] == [], per_rank[0][f"moe_stream_{spec}_diff"][:10]
    for rank, r in enumerate(per_rank):
        load = r[f"moe_stream_{spec}_load"]
        assert load["bad"] == [] and load["checked"] > 0, (rank, load["bad"][:4])


def test_transformer_engine_keys_of_moe_layers(world):
    """An 'E' layer in the TE hybrid spec is megatron's ``MoETransformerLayer``: its pre-norm stays a standalone
    ``pre_mlp_layernorm`` (``TENorm``), router / experts / shared experts under the GPT MoE keys; the other layers'
    norms are fused as in ``M-*-M*M-`` (``test_te_checkpoint.py`` reads these keys into megatron's own TE model)."""
    _, _, per_rank, _ = world
    keys = set(per_rank[0][MOE_DIST[0]]["te_keys"])
    fused = {"M": "mixer.in_proj.layer_norm_weight", "*": "self_attention.linear_qkv.layer_norm_weight",
             "-": "mlp.linear_fc1.layer_norm_weight"}
    for i, symbol in enumerate(CHECKPOINTS["moe"]["pattern"]):
        if symbol != "E":
            assert f"decoder.layers.{i}.{fused[symbol]}" in keys, (i, symbol)
            continue
        for leaf in ("pre_mlp_layernorm.weight", "mlp.router.weight", "mlp.router.expert_bias",
                     "mlp.shared_experts.linear_fc1.weight", "mlp.shared_experts.linear_fc2.weight"):
            assert f"decoder.layers.{i}.{leaf}" in keys, (i, leaf)
        experts = sorted(k for k in keys if k.startswith(f"decoder.layers.{i}.mlp.experts."))
        assert experts and all("linear_fc" in k for k in experts), (i, experts)


@pytest.mark.parametrize("name", GROUPED)
def test_grouped_gemm_expert_names_through_the_engine(world, name):
    _, _, per_rank, _ = world
    for rank, r in enumerate(per_rank):
        assert r[name]["grouped"]["bad"] == [], (rank, r[name]["grouped"]["bad"][:4])
        assert r[name]["grouped"]["checked"] > 0, rank
