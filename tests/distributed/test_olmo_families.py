"""OLMo 2, Olmo 3 and OLMoE end to end on real parts: transformers checkpoints from tiny configs (random weights, norms
included: N(1, 0.3), so that a norm read per head instead of over the whole projection, or a missing post norm,
moves the logits) -> AutoBridge -> megatron-core GPTModel chunks (CPU, gloo) -> HF, all in ONE spawned world of 4
ranks.

- olmo2: post norms only, q/k norms over the whole projection with GQA (4 query heads, 2 key heads: ``k_norm`` is
  half ``q_norm``'s width), untied; TP2, PP2 + VPP2, TP2 x PP2.
- olmo3: OLMo 2 plus sliding (window 5 < 12 tokens) / full layers and per-layer-type RoPE (full layers theta 1e6 with
  linear scaling, sliding layers theta 1e4: ``local_rotary_base``), tied embeddings; TP2, PP2, TP2 x PP2.
- olmo3yarn: as released Olmo 3 checkpoints, YaRN (factor 4, explicit attention factor) on the full layers only,
  unscaled RoPE of the same theta on the sliding ones (3 sliding : 1 full); TP2, PP2 + VPP2.
- olmoe: pre norms, 6 experts top-2 without ``norm_topk_prob`` (megatron's softmax before the top-k), whole-projection
  q/k norms with GQA; EP2 and TP2 x EP2 (expert-TP 2).

For each layout: the Megatron logits against the HF model's own (fp32, max |diff| <= 1e-4); each rank's q / k norm
weights against its heads' slice of the HF ``q_norm`` / ``k_norm`` (plain torch); the exported checkpoint against the
source (key set, dtypes, torch.equal). One export per family without the source that transformers loads with the
same logits. A ``torch_dist`` checkpoint written at TP2 (OLMo 2) and TP2 x EP2 (OLMoE) and read at another layout from
its stored config gives the HF logits again (the norms' sharded state dicts are TP-sharded). At OLMo 2 TP2 the q / k
norm weight gradients of a loss over the logits are transformers' (the all-reduce's backward). Fewer key heads than
TP ranks (TP4, 2 key heads) is refused by name when the model is built.
"""

from __future__ import annotations

import json
import math
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

BASE = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-5, pad_token_id=None,
            eos_token_id=None, bos_token_id=None)
HEADS, GROUPS, HEAD_DIM = 4, 2, 16
# name -> (transformers prefix, config overrides)
CHECKPOINTS = {
    "olmo2": ("Olmo2", dict(rope_parameters={"rope_type": "default", "rope_theta": 20000.0})),
    "olmo3": ("Olmo3", dict(sliding_window=5, tie_word_embeddings=True,
                            layer_types=["sliding_attention", "full_attention", "sliding_attention", "full_attention"],
                            rope_parameters={"full_attention": {"rope_type": "linear", "factor": 2.0,
                                                                "rope_theta": 1000000.0},
                                             "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}})),
    # as the released Olmo 3 checkpoints: YaRN (explicit attention_factor) on the full layers only, one rope theta,
    # the default 3 sliding : 1 full pattern
    "olmo3yarn": ("Olmo3", dict(sliding_window=5, rope_parameters={
        "full_attention": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 500000.0, "beta_fast": 32.0,
                           "beta_slow": 1.0, "original_max_position_embeddings": 32,
                           "attention_factor": 0.1 * math.log(4.0) + 1.0},
        "sliding_attention": {"rope_type": "default", "rope_theta": 500000.0}})),
    "olmoe": ("Olmoe", dict(intermediate_size=24, num_experts=6, num_experts_per_tok=2, norm_topk_prob=False)),
}
def _arch(ckpt: str) -> str:
    return f"{CHECKPOINTS[ckpt][0]}ForCausalLM"


def _make_checkpoint(path: str, ckpt: str, seed: int) -> None:
    prefix, overrides = CHECKPOINTS[ckpt]
    make_tiny_checkpoint(path, prefix, {**BASE, **overrides}, seed, norm=(1.0, 0.3),
                         rules=[(lambda name: any(s in name for s in ("q_proj", "k_proj")), 0.0, 0.3)],
                         rest=(0.0, 0.1))


def _norm_slices(chunks, sd, tp_rank: int, tp: int) -> list:
    """Mismatches of this rank's ``q_layernorm`` / ``k_layernorm`` weights against its heads' rows of HF ``q_norm`` /
    ``k_norm`` (rank t holds heads [t*n/tp, (t+1)*n/tp), HF order)."""
    bad, seen = [], 0
    for chunk in chunks:
        for layer in chunk.decoder.layers:
            i = layer.layer_number - 1
            for meg, hf, heads in (("q_layernorm", "q_norm", HEADS), ("k_layernorm", "k_norm", GROUPS)):
                rows = heads // tp * HEAD_DIM
                want = sd[f"model.layers.{i}.self_attn.{hf}.weight"][tp_rank * rows:(tp_rank + 1) * rows]
                got = getattr(layer.self_attention, meg).weight
                seen += 1
                if not torch.equal(got, want):
                    bad.append(f"layer {i} {meg} {list(got.shape)} vs HF {hf} rows of rank {tp_rank}")
    return bad if seen else ["no layers"]


GRAD_LAYOUT = "olmo2_tp2"  # where the q / k norm gradients are checked


def _loss_weights(tokens: torch.Tensor) -> torch.Tensor:
    """Fixed random weights of the test loss ``sum(logits * w)`` (one per logit)."""
    return torch.randn(*tokens.shape, BASE["vocab_size"], generator=torch.Generator().manual_seed(7))


def _norm_grads(chunk, tokens: torch.Tensor, tp_rank: int, tp: int) -> dict:
    """Gradients of this rank's q / k norm weights of the loss ``sum(logits * w)`` summed over the TP ranks' vocabulary
    shards (each rank backpropagates its shard's share; the padded columns have weight 0)."""
    b, s = tokens.shape
    position_ids = torch.arange(s).unsqueeze(0).expand(b, s)
    mask = torch.triu(torch.ones(1, 1, s, s, dtype=torch.bool), diagonal=1)
    chunk.zero_grad(set_to_none=True)
    with torch.enable_grad():
        logits = chunk(input_ids=tokens, position_ids=position_ids, attention_mask=mask)  # [b, s, padded vocab / tp]
        local = logits.shape[-1]
        w = torch.nn.functional.pad(_loss_weights(tokens), (0, local * tp - BASE["vocab_size"]))
        (logits.float() * w[..., tp_rank * local:(tp_rank + 1) * local]).sum().backward()
    return {f"{layer.layer_number - 1}.{meg}": getattr(layer.self_attention, meg).weight.grad.clone()
            for layer in chunk.decoder.layers for meg in ("q_layernorm", "k_layernorm")}


def _hf_norm_grads(path: str, tokens: torch.Tensor) -> dict:
    """The same loss's gradients of HF ``q_norm`` / ``k_norm`` (whole tensors)."""
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    (model(tokens, use_cache=False).logits * _loss_weights(tokens)).sum().backward()
    return {f"{i}.{meg}": getattr(layer.self_attn, hf).weight.grad.clone() for i, layer in enumerate(model.model.layers)
            for meg, hf in (("q_layernorm", "q_norm"), ("k_layernorm", "k_norm"))}


def _norms(run) -> dict:
    from megatron.core import parallel_state as ps

    with SafeTensorsSource(run.ckpts[run.layout.ckpt]) as src:
        sd = {k: src[k].clone() for k in src.keys() if "_norm." in k}
    r = {"norms": _norm_slices(run.chunks, sd, ps.get_tensor_model_parallel_rank(), run.layout.tp)}
    if run.layout.name == GRAD_LAYOUT:
        r["grads"] = _norm_grads(run.chunks[0], run.tokens, ps.get_tensor_model_parallel_rank(), run.layout.tp)
        r["tp_rank"] = ps.get_tensor_model_parallel_rank()
    return r


def _dist(run) -> dict:
    """The chunks written as a ``torch_dist`` checkpoint, read at the layout ``DIST`` names: its logits."""
    from megatron_bridge_ext.io.megatron_checkpoint import read_checkpoint_info
    from megatron_bridge_ext.mcore.checkpoint import (cast_to_params_dtype, config_from_checkpoint,
                                                      load_megatron_checkpoint, save_megatron_checkpoint)
    from megatron_bridge_ext.mcore.forward import megatron_logits
    from megatron_bridge_ext.mcore.model_builder import build_model_chunks, init_parallel

    name = run.layout.name
    path = os.path.join(run.out_root, f"{name}_dist")
    save_megatron_checkpoint(cast_to_params_dtype(run.chunks), path, architecture=_arch(run.layout.ckpt),
                             spec="local")
    tp2, pp2, ep2 = DIST[name]
    init_parallel(tp=tp2, pp=pp2, ep=ep2)
    info = read_checkpoint_info(path)
    loaded = cast_to_params_dtype(build_model_chunks(config_from_checkpoint(info)))
    load_megatron_checkpoint(loaded, info.path)
    return {"dist_logits": megatron_logits(loaded, run.tokens)}


def _tp4(rank: int, ckpts: dict, tokens: torch.Tensor, out_root: str) -> dict:
    """Fewer key heads (2) than TP ranks (4): megatron would replicate key heads, the key norm has no slice to hold."""
    from megatron_bridge_ext.auto_bridge import AutoBridge
    from megatron_bridge_ext.mcore.model_builder import destroy_parallel, init_parallel

    init_parallel(tp=4, pp=1)
    try:
        AutoBridge.from_hf_pretrained(ckpts["olmo2"]).to_megatron_model(params_dtype=torch.float32)
        out = "built"
    except ValueError as e:
        out = str(e)
    destroy_parallel()
    return {"tp4": out}


NO_SOURCE = {"olmo2_tp2pp2", "olmo3_pp2", "olmo3yarn_tp2", "olmoe_tp2ep2"}
# layout written as a torch_dist checkpoint -> (tp, pp, ep) it is read at
DIST = {"olmo2_tp2": (1, 2, 1), "olmoe_tp2ep2": (1, 1, 2)}


def _layout(name: str, tp: int, pp: int, vpp, ep: int, ckpt: str) -> Layout:
    return Layout(name, ckpt, tp=tp, pp=pp, vpp=vpp, ep=ep, etp=tp if ep > 1 else None, max_shard_bytes=96 * 1024,
                  no_source=_arch(ckpt) if name in NO_SOURCE else None, checks=(_norms,),
                  after_export=(_dist,) if name in DIST else ())


LAYOUTS = [
    _layout("olmo2_tp2", 2, 1, None, 1, "olmo2"),
    _layout("olmo2_pp2vpp2", 1, 2, 2, 1, "olmo2"),
    _layout("olmo2_tp2pp2", 2, 2, None, 1, "olmo2"),
    _layout("olmo3_tp2", 2, 1, None, 1, "olmo3"),
    _layout("olmo3_pp2", 1, 2, None, 1, "olmo3"),
    _layout("olmo3_tp2pp2", 2, 2, None, 1, "olmo3"),
    _layout("olmo3yarn_tp2", 2, 1, None, 1, "olmo3yarn"),
    _layout("olmo3yarn_pp2vpp2", 1, 2, 2, 1, "olmo3yarn"),
    _layout("olmoe_ep2", 1, 1, None, 2, "olmoe"),
    _layout("olmoe_tp2ep2", 2, 1, None, 2, "olmoe"),
    _layout("olmoe_pp2ep2", 1, 2, None, 2, "olmoe"),
    _layout("olmoe_tp2pp2", 2, 2, None, 1, "olmoe"),
]
BY_NAME = {layout.name: layout for layout in LAYOUTS}
CASES = [(layout.name, layout.ckpt) for layout in LAYOUTS]
IDS = [layout.name for layout in LAYOUTS]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    transformers.logging.set_verbosity_error()
    root = tmp_path_factory.mktemp("olmo_families")
    ckpts = {}
    for i, ckpt in enumerate(CHECKPOINTS):
        ckpts[ckpt] = str(root / f"hf_{ckpt}")
        _make_checkpoint(ckpts[ckpt], ckpt, seed=30 + i)
    tokens = torch.randint(0, BASE["vocab_size"], (2, 12), generator=torch.Generator().manual_seed(0))
    out_root = str(root / "out")
    per_rank = spawn_layouts(ckpts, LAYOUTS, tokens, out_root, tail=_tp4)
    hf = {ckpt: hf_logits(path, tokens) for ckpt, path in ckpts.items()}
    hf["grads"] = _hf_norm_grads(ckpts[BY_NAME[GRAD_LAYOUT].ckpt], tokens)
    return ckpts, out_root, per_rank, hf, tokens


@pytest.mark.parametrize("name,ckpt", CASES, ids=IDS)
def test_logits_match_hf(world, name, ckpt):
    _, _, per_rank, hf, _ = world
    diff = max_abs_diff(per_rank[0][name]["logits"], hf[ckpt])  # shapes checked too
    assert diff <= MEGATRON_VS_HF_ATOL, f"{name}: max |logit diff| {diff:.3e} > {MEGATRON_VS_HF_ATOL:.0e}"


@pytest.mark.parametrize("name", IDS)
def test_qk_norm_weights_are_split_by_heads(world, name):
    _, _, per_rank, _, _ = world
    for rank, r in enumerate(per_rank):
        assert r[name]["norms"] == [], (rank, r[name]["norms"][:4])


def test_qk_norm_gradients_match_hf(world):
    """Training through the TP all-reduce: at TP2 each rank's q / k norm weight gradients of a loss over the logits
    are its heads' rows of transformers' gradients (the all-reduce's backward sums the ranks' contributions)."""
    _, _, per_rank, hf, _ = world
    tp = BY_NAME[GRAD_LAYOUT].tp
    for rank, r in enumerate(per_rank):
        res = r[GRAD_LAYOUT]
        assert sorted(res["grads"]) == sorted(hf["grads"]), rank
        for key, got in res["grads"].items():
            full = hf["grads"][key]
            rows = full.shape[0] // tp
            want = full[res["tp_rank"] * rows:(res["tp_rank"] + 1) * rows]
            scale = full.abs().max().item()
            diff = (got - want).abs().max().item()
            assert scale > 1e-3 and diff <= 1e-4 * max(1.0, scale), (rank, key, diff, scale)


def _assert_same_tensors(src_dir: str, dst_dir: str) -> None:
    cmp = compare_checkpoints(src_dir, dst_dir)  # key set, dtypes, shapes, torch.equal
    assert cmp["same_keys"] and cmp["bit_exact"], cmp


@pytest.mark.parametrize("name,ckpt", CASES, ids=IDS)
def test_round_trip_bit_exact(world, name, ckpt):
    ckpts, out_root, _, _, _ = world
    _assert_same_tensors(ckpts[ckpt], os.path.join(out_root, name))


@pytest.mark.parametrize("name", sorted(NO_SOURCE))
def test_export_without_source_loads_in_transformers(world, name):
    ckpts, out_root, _, hf, tokens = world
    ckpt = BY_NAME[name].ckpt
    out = os.path.join(out_root, f"{name}_nosource")
    _assert_same_tensors(ckpts[ckpt], out)
    with open(os.path.join(out, "config.json")) as f:
        assert json.load(f)["architectures"] == [_arch(ckpt)]
    config = transformers.AutoConfig.from_pretrained(out)
    assert type(config) is type(transformers.AutoConfig.from_pretrained(ckpts[ckpt]))
    diff = max_abs_diff(hf_logits(out, tokens), hf[ckpt])
    assert diff <= SAME_MODEL_ATOL, f"{name}: max |logit diff| {diff:.3e}"  # same class and weights (tolerances.py)


@pytest.mark.parametrize("name", sorted(DIST))
def test_torch_dist_checkpoint_reads_at_another_layout(world, name):
    """Written at TP2 from the local spec, read at TP1 (PP2 / EP2): the q / k norm weights were saved as TP shards of
    the whole-projection tensor, so the model read back has the HF logits."""
    _, _, per_rank, hf, _ = world
    ckpt = BY_NAME[name].ckpt
    diff = max_abs_diff(per_rank[0][name]["dist_logits"], hf[ckpt])
    assert diff <= MEGATRON_VS_HF_ATOL, f"{name}: max |logit diff| {diff:.3e}"


def test_fewer_key_heads_than_tp_ranks_is_refused(world):
    _, _, per_rank, _, _ = world
    for rank, r in enumerate(per_rank):
        assert "WholeKeyRMSNorm: num_query_groups=2 is not a multiple of tensor_model_parallel_size=4" in r["tp4"], \
            (rank, r["tp4"])
