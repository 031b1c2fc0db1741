"""FP8 export (DeepSeek-V3's release layout) on real parts, in ONE spawned world of 2 ranks: a bf16 Qwen3 at TP2 and a
bf16 DeepSeek-V3 (dense first layer, 4 routed experts + 1 shared, fp32 routers as transformers keeps them) at EP2,
imported from transformers checkpoints (random weights, fixed seed), then exported with ``save_hf_pretrained`` plainly
and with ``quantization="fp8"`` (both rules, several block sizes), and synced with ``WeightSyncPlan(quantization=
"fp8")`` (to every rank with fresh tensors, to rank 0 with reused memory).

Checked in the test process, against independent references only:
- every FP8 weight and its ``weight_scale_inv`` equal a plain-torch quantization of the plain export's tensor
  (``tests/reference.py`` ``fp8_quant``, partial edge blocks included) and, for the transformers rule where the block
  divides the tensor, transformers' own ``Fp8Quantize``; every other tensor equals the plain export's, same dtype;
- which tensors are quantized: exactly the 2-D linear weights (embeddings, lm_head, norms, routers, the correction
  bias kept), read from the names of the checkpoint transformers wrote, not from the code under test;
- ``config.json``: DeepSeek-V3's ``quantization_config``; a plain export of a source whose config.json carries one
  does not keep it;
- transformers loads the FP8 exports (CPU: it dequantizes) with logits within the FP8 tolerance of the plain export's;
- the weight sync yields exactly the file export's tensors, in the order ``hf_names()`` announces.
"""

from __future__ import annotations

import json
import os
import types

import pytest
import torch

pytest.importorskip("megatron.core")
transformers = pytest.importorskip("transformers")

from reference import fp8_quant  # noqa: E402  (tests/reference.py: the plain-torch formula)

from megatron_bridge_ext.io import SafeTensorsSource  # noqa: E402
from megatron_bridge_ext.launch import spawn_local  # noqa: E402
from megatron_bridge_ext.testing.parity import hf_logits  # noqa: E402
from megatron_bridge_ext.testing.tiny_models import randomise, save_transformers_bf16, tiny_hf_model  # noqa: E402

BASE = dict(vocab_size=97, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            max_position_embeddings=64, rms_norm_eps=1e-5, tie_word_embeddings=False)
QWEN3 = dict(intermediate_size=96, head_dim=16)
DEEPSEEK = dict(intermediate_size=80, moe_intermediate_size=24, n_routed_experts=4, num_experts_per_tok=2, n_group=2,
                topk_group=1, first_k_dense_replace=1, q_lora_rank=24, kv_lora_rank=16, qk_rope_head_dim=8,
                qk_nope_head_dim=16, v_head_dim=12, num_key_value_heads=4, n_shared_experts=1,
                routed_scaling_factor=2.5)
# export name -> (family, rule, block size); block 32 divides every Qwen3 linear (multi-block, transformers-loadable);
# DeepSeek-V3's linears are all below 128 (one partial block each: loadable) and straddle 16-blocks (kv_a_proj_with_mqa
# has 24 rows, kv_b_proj 112: partial edges)
FP8_EXPORTS = {
    "qwen3_fp8": ("qwen3", "transformers", (32, 32)),
    "qwen3_fp8_deepseek": ("qwen3", "deepseek", (32, 32)),
    "deepseek_fp8": ("deepseek_v3", None, None),  # the defaults: transformers, (128, 128)
    "deepseek_fp8_16": ("deepseek_v3", "deepseek", (16, 16)),
}
SYNCED = {"qwen3": "qwen3_fp8", "deepseek_v3": "deepseek_fp8_16"}  # the sync's settings are those of this export
# a quantization_config the source's config.json carries (its weights are bf16): a plain export must drop it
SOURCE_QC = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [64, 64]}
# FP8 tolerance of the logits: ||fp8 - bf16|| / ||bf16|| <= FP8_LOGITS_RTOL. e4m3 keeps 3 mantissa bits: one
# weight's relative rounding error is at most 2^-4, and the RMS error of a random bf16 weight quantized per 128-block
# is 2.6%; through two layers the logits move by 5.6% (Qwen3) and 5.2% (DeepSeek-V3) here (measured), 1.5x margin.
FP8_LOGITS_RTOL = 0.08


def _make(root: str, family: str, seed: int) -> str:
    """transformers' own bf16 checkpoint (``from_pretrained(dtype=bf16)``: DeepSeek-V3's routers stay fp32)."""
    prefix, overrides = {"qwen3": ("Qwen3", QWEN3), "deepseek_v3": ("DeepseekV3", DEEPSEEK)}[family]
    model = randomise(tiny_hf_model(prefix, {**BASE, **overrides}, seed), rest=(0.0, 0.05), correction_bias=0.3)
    return save_transformers_bf16(model, os.path.join(root, family))  # the fp32 one beside it: {family}_fp32


def _with_source_qc(src: str, dst: str) -> str:
    import shutil

    shutil.copytree(src, dst)
    with open(os.path.join(dst, "config.json")) as f:
        config = json.load(f)
    config["quantization_config"] = SOURCE_QC
    with open(os.path.join(dst, "config.json"), "w") as f:
        json.dump(config, f)
    return dst


def _portable(t):
    """A copy that crosses the process boundary (FP8 storages do not unpickle): (dtype name, bytes or tensor)."""
    return str(t.dtype), (t.view(torch.uint8) if t.dtype.itemsize == 1 else t).clone()


def _restored(portable):
    dtype, t = portable
    return t.view(getattr(torch, dtype.removeprefix("torch.")))


def _worker(rank, world, ckpts, out_root):
    from megatron_bridge_ext.mcore.cpu_compat import apply_cpu_patches

    apply_cpu_patches()
    import torch.distributed as dist

    from megatron_bridge_ext.auto_bridge import AutoBridge
    from megatron_bridge_ext.engine import WeightSyncPlan
    from megatron_bridge_ext.mcore.model_builder import destroy_parallel, init_parallel

    def save(bridge, chunks, name, **kw):
        bridge.save_hf_pretrained(chunks, os.path.join(out_root, name), max_shard_bytes=64 * 1024,
                                  bucket_bytes=32 * 1024, show_progress=False, **kw)

    results = {}
    for family, layout in (("qwen3", dict(tp=2, pp=1)), ("deepseek_v3", dict(tp=1, pp=1, ep=2))):
        init_parallel(**layout)
        bridge = AutoBridge.from_hf_pretrained(ckpts[family])
        chunks = bridge.to_megatron_model(params_dtype=torch.bfloat16)
        save(bridge, chunks, f"{family}_plain")
        for name, (fam, rule, block) in FP8_EXPORTS.items():
            if fam == family:
                save(bridge, chunks, name, quantization="fp8", quantization_rule=rule, quantization_block_size=block)
        if family == "qwen3":  # a source whose config.json says it is quantized
            qc_bridge = AutoBridge.from_hf_pretrained(ckpts["qwen3_qc"])
            save(qc_bridge, chunks, "qwen3_qc_plain")
            save(qc_bridge, chunks, "qwen3_qc_fp8", quantization="fp8", quantization_block_size=(32, 32))
        _, rule, block = FP8_EXPORTS[SYNCED[family]]
        kw = dict(quantization="fp8", quantization_rule=rule, quantization_block_size=block)
        everyone = WeightSyncPlan(bridge.model_bridge, chunks, bucket_bytes=32 * 1024, dst="all", **kw)
        reused = WeightSyncPlan(bridge.model_bridge, chunks, bucket_bytes=32 * 1024, dst=0, copy=False, **kw)
        r = {"all": [(n, _portable(t)) for bucket in everyone.sync() for n, t in bucket],
             "names": everyone.hf_names()}
        # copy=False: the tensors live in reused memory until the next bucket: keep copies
        r["reused"] = [(n, _portable(t)) for bucket in reused.sync() for n, t in bucket]
        results[family] = r
        destroy_parallel()
        dist.barrier()
    # last (a failed export leaves the world without further collectives): a NaN in the attention output projection's
    # shard of rank 1 reaches the destination, whose quantization refuses it; nothing is written
    init_parallel(tp=2, pp=1)
    bridge = AutoBridge.from_hf_pretrained(ckpts["qwen3"])
    chunks = bridge.to_megatron_model(params_dtype=torch.bfloat16)
    if rank == 1:
        with torch.no_grad():
            chunks[0].decoder.layers[0].self_attention.linear_proj.weight[5, 3] = float("nan")
    try:
        save(bridge, chunks, "qwen3_nan", quantization="fp8")
        results["nan"] = None
    except Exception as e:  # noqa: BLE001
        results["nan"] = f"{type(e).__name__}: {e}"
    return results


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    transformers.logging.set_verbosity_error()
    root = str(tmp_path_factory.mktemp("fp8_export"))
    ckpts = {"qwen3": _make(root, "qwen3", seed=3), "deepseek_v3": _make(root, "deepseek_v3", seed=4)}
    ckpts["qwen3_qc"] = _with_source_qc(ckpts["qwen3"], os.path.join(root, "qwen3_qc"))
    out_root = os.path.join(root, "out")
    per_rank = spawn_local(_worker, 2, (ckpts, out_root), timeout=600)
    return ckpts, out_root, per_rank


def _read(path):
    with SafeTensorsSource(path) as s:
        return {k: s[k].clone() for k in s.keys()}


def _config(path):
    with open(os.path.join(path, "config.json")) as f:
        return json.load(f)


def _quantized_names(source: str):
    """The 2-D linear weights, from the names transformers wrote: everything 2-D ending in .weight but the
    embeddings, the output layer and the routers (mlp.gate)."""
    sd = _read(source)
    return {k for k, v in sd.items() if v.dim() == 2 and k.endswith(".weight") and "embed_tokens" not in k
            and k != "lm_head.weight" and not k.endswith(".mlp.gate.weight")}


def _transformers_quantize(name, tensor, block):
    from transformers.integrations.finegrained_fp8 import Fp8Quantize
    from transformers.utils.quantization_config import FineGrainedFP8Config

    quantizer = types.SimpleNamespace(quantization_config=FineGrainedFP8Config(weight_block_size=list(block)))
    out = Fp8Quantize(quantizer)._quantize_one(name, tensor)
    return out[name], out[name.removesuffix(".weight") + ".weight_scale_inv"]


def _bits(t):
    return t.view(torch.uint8) if t.dtype.itemsize == 1 else t


@pytest.mark.parametrize("name", list(FP8_EXPORTS))
def test_fp8_export_is_the_quantized_plain_export(world, name):
    ckpts, out_root, _ = world
    family, rule, block = FP8_EXPORTS[name]
    rule, block = rule or "transformers", block or (128, 128)
    plain, fp8 = _read(os.path.join(out_root, f"{family}_plain")), _read(os.path.join(out_root, name))
    quantized = _quantized_names(ckpts[family])
    assert quantized and len(quantized) < len(plain)
    assert set(fp8) == set(plain) | {k + "_scale_inv" for k in quantized}
    checked_with_transformers = 0
    for key, want in plain.items():
        if key not in quantized:
            assert fp8[key].dtype == want.dtype and torch.equal(fp8[key], want), key
            continue
        assert want.dtype == torch.bfloat16, key
        q_ref, s_ref = fp8_quant(want, block, rule)
        q, s = fp8[key], fp8[key + "_scale_inv"]
        assert q.dtype == torch.float8_e4m3fn and s.dtype == torch.float32, key
        assert tuple(s.shape) == (-(-want.shape[0] // block[0]), -(-want.shape[1] // block[1])), key
        assert torch.equal(_bits(q), _bits(q_ref)) and torch.equal(s, s_ref), key
        if rule == "transformers" and want.shape[0] % block[0] == 0 and want.shape[1] % block[1] == 0:
            q_tf, s_tf = _transformers_quantize(key, want, block)
            assert torch.equal(_bits(q), _bits(q_tf)) and torch.equal(s, s_tf), key
            checked_with_transformers += 1
    if family == "qwen3" and rule == "transformers":
        assert checked_with_transformers == len(quantized)  # every Qwen3 linear is a whole number of 32-blocks
    if name == "deepseek_fp8_16":  # partial edge blocks are there
        assert any(plain[k].shape[0] % 16 for k in quantized)


def test_the_two_rules_differ(world):
    """DeepSeek's scale (amax / 448) and transformers' (1 / (448 / amax)) round differently: the rule is visible."""
    _, out_root, _ = world
    a, b = _read(os.path.join(out_root, "qwen3_fp8")), _read(os.path.join(out_root, "qwen3_fp8_deepseek"))
    assert any(not torch.equal(a[k], b[k]) for k in a if k.endswith("_scale_inv"))


def test_a_nan_weight_fails_the_export_naming_it_and_writes_nothing(world):
    _, out_root, per_rank = world
    message = per_rank[0]["nan"]
    assert message is not None and "model.layers.0.self_attn.o_proj.weight" in message and "NaN" in message, message
    assert per_rank[1]["nan"] is not None  # the other rank's export fails too (naming rank 0's error)
    assert not os.path.exists(os.path.join(out_root, "qwen3_nan"))
    assert not [f for f in os.listdir(out_root) if "qwen3_nan" in f]  # no staging directory left beside it


def test_the_router_and_correction_bias_stay_fp32(world):
    _, out_root, _ = world
    fp8 = _read(os.path.join(out_root, "deepseek_fp8"))
    kept = {k: v.dtype for k, v in fp8.items() if k.endswith((".mlp.gate.weight", ".e_score_correction_bias"))}
    assert kept and set(kept.values()) == {torch.float32}, kept
    assert fp8["model.embed_tokens.weight"].dtype == torch.bfloat16 == fp8["lm_head.weight"].dtype


@pytest.mark.parametrize("name", list(FP8_EXPORTS))
def test_config_json_carries_deepseeks_quantization_config(world, name):
    _, out_root, _ = world
    family, _, block = FP8_EXPORTS[name]
    qc = _config(os.path.join(out_root, name))["quantization_config"]
    assert {k: qc[k] for k in ("activation_scheme", "fmt", "quant_method", "weight_block_size")} == {
        "activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
        "weight_block_size": list(block or (128, 128))}
    assert "lm_head" in qc["modules_to_not_convert"]
    assert ("mlp.gate" in qc["modules_to_not_convert"]) == (family == "deepseek_v3")
    assert "quantization_config" not in _config(os.path.join(out_root, f"{family}_plain"))


def test_a_plain_export_drops_the_source_quantization_config(world):
    ckpts, out_root, _ = world
    assert _config(ckpts["qwen3_qc"])["quantization_config"] == SOURCE_QC
    plain = _config(os.path.join(out_root, "qwen3_qc_plain"))
    assert "quantization_config" not in plain
    assert plain == {k: v for k, v in _config(ckpts["qwen3_qc"]).items() if k != "quantization_config"}
    assert _config(os.path.join(out_root, "qwen3_qc_fp8"))["quantization_config"]["weight_block_size"] == [32, 32]
    a, b = _read(os.path.join(out_root, "qwen3_qc_fp8")), _read(os.path.join(out_root, "qwen3_fp8"))
    assert set(a) == set(b) and all(torch.equal(_bits(a[k]), _bits(b[k])) for k in a)


def _write_dequantized(fp8_dir: str, block, dst: str) -> str:
    """The FP8 export dequantized in plain torch (fp32(w) * fp32(scale of its block)) into an fp32 checkpoint without
    a quantization_config: what the FP8 checkpoint means."""
    from safetensors.torch import save_file

    from reference import fp8_dequant

    sd = _read(fp8_dir)
    out = {k: (fp8_dequant(v, sd[k + "_scale_inv"], block, torch.float32) if k + "_scale_inv" in sd else v.float())
           for k, v in sd.items() if not k.endswith("_scale_inv")}
    os.makedirs(dst)
    save_file(out, os.path.join(dst, "model.safetensors"), metadata={"format": "pt"})
    config = {k: v for k, v in _config(fp8_dir).items() if k != "quantization_config"}
    with open(os.path.join(dst, "config.json"), "w") as f:
        json.dump(config, f)
    return dst


@pytest.mark.parametrize("name", ["qwen3_fp8", "deepseek_fp8"])
def test_transformers_loads_the_fp8_export(world, name, tmp_path):
    """transformers (no GPU: it dequantizes the FP8 weights with their scales) gives the logits of the plain-torch
    dequantized checkpoint (<= SAME_MODEL_ATOL: it reads every scale where it belongs), and those are within the FP8
    tolerance of the bf16 export's: ||fp8 - bf16|| / ||bf16|| <= FP8_LOGITS_RTOL over the logits (measured 5.6% and
    5.2%; the FP8 bytes read without their scales give logits off by more than 100%)."""
    from megatron_bridge_ext.testing.tolerances import SAME_MODEL_ATOL

    _, out_root, _ = world
    family, _, block = FP8_EXPORTS[name]
    tokens = torch.randint(0, BASE["vocab_size"], (2, 12), generator=torch.Generator().manual_seed(1))
    got = hf_logits(os.path.join(out_root, name), tokens)
    meant = hf_logits(_write_dequantized(os.path.join(out_root, name), block or (128, 128), str(tmp_path / "deq")),
                    tokens)
    assert (got - meant).abs().max().item() <= SAME_MODEL_ATOL
    want = hf_logits(os.path.join(out_root, f"{family}_plain"), tokens)
    rel = ((got - want).norm() / want.norm()).item()
    assert 0 < rel <= FP8_LOGITS_RTOL, f"{name}: ||fp8 - bf16|| / ||bf16|| = {rel:.4f}"


def _same_as_file(name, t, want):
    """A synced tensor against the file's: FP8 weights and scales bit for bit; the others hold the same values (the
    sync yields the model's dtypes, e.g. Megatron's fp32 final norm; the file export those of the source)."""
    if want.dtype == torch.float8_e4m3fn or name.endswith("_scale_inv"):
        return t.dtype == want.dtype and torch.equal(_bits(t), _bits(want))
    return torch.equal(t.to(want.dtype), want)


@pytest.mark.parametrize("family", list(SYNCED))
def test_weight_sync_yields_the_file_export(world, family):
    _, out_root, per_rank = world
    want = _read(os.path.join(out_root, SYNCED[family]))
    for rank in (0, 1):
        got = [(n, _restored(p)) for n, p in per_rank[rank][family]["all"]]
        assert [n for n, _ in got] == [n for names in per_rank[rank][family]["names"] for n in names]
        assert sorted(n for n, _ in got) == sorted(want), rank
        for n, t in got:
            assert _same_as_file(n, t, want[n]), (rank, n, t.dtype, want[n].dtype)
    reused = [(n, _restored(p)) for n, p in per_rank[0][family]["reused"]]
    assert sorted(n for n, _ in reused) == sorted(want)
    assert all(_same_as_file(n, t, want[n]) for n, t in reused)
    assert per_rank[1][family]["reused"] == []
