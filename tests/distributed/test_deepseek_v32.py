"""DeepSeek-V3.2 (``DeepseekV32ForCausalLM``, DeepSeek sparse attention) end to end on real parts: a transformers
checkpoint from a tiny config (random weights, norms, indexer ``k_norm`` weight and bias, router weights and
correction biases included, fixed seed) -> AutoBridge -> megatron-core (>= 0.19) GPTModel chunks with
``experimental_attention_variant="dsa"`` on CPU / gloo -> HF, at TP2, PP2, TP2 x PP2, EP2, TP2 x EP2 (expert-TP 2),
PP2 x EP2 and PP2 x VPP2, all in ONE spawned world of 4 ranks.

The model: MLA with a q LoRA, the lightning indexer (4 heads of 16 channels, the first 8 rotated in halves) keeping
``index_topk = 5`` of the 12 positions (so the selection matters: the test checks transformers' logits change when
every key is kept), 4 layers of which the first is dense (``first_k_dense_replace = 1``), 6 routed experts behind
the sigmoid router, one shared expert, untied output layer, a vocabulary that needs padding, and one
multi-token-prediction layer written into the checkpoint (a transformers MoE decoder layer with its indexer).

For each layout: Megatron logits against the transformers model's own (fp32, max |diff| <= 1e-4); the MTP logits
against a plain reference around the transformers decoder layer; on every rank each indexer parameter against a
plain reading of its HF tensor (the whole tensor: megatron builds the indexer duplicated over TP); at the
expert-parallel layouts every local expert against the HF tensors of its global expert; the export against the
source (key set, dtypes, ``torch.equal``). From PP2 x EP2, an export without the source that equals the source
and that transformers loads with the source model's logits.

Under megatron-core < 0.19 the family is refused by name (the version test at the end; no world is spawned).
"""

from __future__ import annotations

import json
import os

import pytest
import torch

pytest.importorskip("megatron.core")
transformers = pytest.importorskip("transformers")

from megatron_bridge_ext.io import SafeTensorsSource  # noqa: E402
from megatron_bridge_ext.mcore.versions import megatron_core_version  # noqa: E402
from megatron_bridge_ext.testing.parity import (  # noqa: E402
    compare_checkpoints, hf_logits, local_expert_mismatches, mtp_reference_logits,
)
from megatron_bridge_ext.testing.tiny_models import (  # noqa: E402
    make_tiny_checkpoint, randomise, save_transformers_bf16, write_mtp_layer,
)
from megatron_bridge_ext.testing.tolerances import MEGATRON_VS_HF_ATOL, SAME_MODEL_ATOL, max_abs_diff  # noqa: E402
from megatron_bridge_ext.testing.worlds import Layout, spawn_layouts  # noqa: E402

ARCH = "DeepseekV32ForCausalLM"
PREFIX = "DeepseekV32"
HAS_DSA = megatron_core_version() >= (0, 19, 0)
E, F = 6, 24
CONFIG = dict(vocab_size=97, hidden_size=64, intermediate_size=80, moe_intermediate_size=F, num_hidden_layers=4,
              num_attention_heads=4, num_key_value_heads=4, n_routed_experts=E, num_experts_per_tok=2,
              n_shared_experts=1, routed_scaling_factor=1.8, n_group=1, topk_group=1, q_lora_rank=24,
              kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=16, v_head_dim=12, rms_norm_eps=1e-6,
              max_position_embeddings=64, tie_word_embeddings=False, first_k_dense_replace=1,
              index_topk=5, index_head_dim=16, index_n_heads=4,
              rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
MTP = CONFIG["num_hidden_layers"]  # HF index of the MTP layer
SPARSE = [1, 2, 3]
INDEXER = {"linear_wq_b.weight": "wq_b.weight", "linear_wk.weight": "wk.weight", "k_norm.weight": "k_norm.weight",
           "k_norm.bias": "k_norm.bias", "linear_weights_proj.weight": "weights_proj.weight"}
NO_SOURCE = "pp2ep2"

needs_dsa = pytest.mark.skipif(not HAS_DSA, reason="megatron-core < 0.19 has no DSA (the refusal is tested below)")


def _randomise(module: torch.nn.Module) -> None:
    randomise(module, (1.0, 0.2), rest=(0.0, 0.15), correction_bias=0.3)


def _make_checkpoint(path: str, seed: int, config=CONFIG, prefix: str = PREFIX):
    """The tiny transformers checkpoint (random weights incl. norms, the indexer's LayerNorm bias and correction
    biases; no MTP layer); returns the model. Also the maker of ``test_te_checkpoint.py``'s case."""
    return make_tiny_checkpoint(path, prefix, config, seed=seed, norm=(1.0, 0.2), rest=(0.0, 0.15),
                                correction_bias=0.3).eval()


def _write_mtp(src: str, dst: str, model, seed: int):
    """A copy of ``src`` with one MTP layer (HF layer MTP): a transformers MoE decoder layer's tensors (random, its
    indexer included; one tensor per expert), random enorm / hnorm / eh_proj / shared_head.norm, copies of the
    embedding and lm_head, ``num_nextn_predict_layers = 1`` in config.json. Returns (decoder layer, MTP tensors)."""
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


def _layers(chunk):
    """(HF layer index, Megatron layer module) of a chunk's decoder and MTP layers."""
    found = [(layer.layer_number - 1, layer) for layer in chunk.decoder.layers]
    mtp = getattr(chunk, "mtp", None)
    if mtp is not None:
        found += [(MTP + i, getattr(m, next(n for n in ("transformer_layer", "mtp_model_layer") if hasattr(m, n))))
                  for i, m in enumerate(mtp.layers)]
    return found


def _check_indexers(chunks, sd):
    """(mismatches, indexers seen): every indexer parameter of this rank equals the whole HF tensor."""
    bad, seen = [], 0
    for chunk in chunks:
        for hf_layer, layer in _layers(chunk):
            indexer = layer.self_attention.core_attention.indexer
            seen += 1
            for mine, theirs in INDEXER.items():
                hf = sd[f"model.layers.{hf_layer}.self_attn.indexer.{theirs}"]
                if not torch.equal(indexer.get_parameter(mine), hf):
                    bad.append(f"HF layer {hf_layer} indexer.{mine}")
    return bad, seen


def _check_fp32_kept(chunks, sd):
    """(mismatches, fp32 tensors seen): the router weights / expert biases are fp32 and equal the file's; every other
    floating parameter but the norms (the indexers' included) is bf16."""
    bad, seen = [], 0
    for chunk in chunks:
        for n, layer in _layers(chunk):
            want = {"mlp.router.weight": f"model.layers.{n}.mlp.gate.weight",
                    "mlp.router.expert_bias": f"model.layers.{n}.mlp.gate.e_score_correction_bias"}
            for name, tensor in list(layer.named_parameters()) + list(layer.named_buffers()):
                if name in want:
                    seen += 1
                    hf = sd[want[name]]
                    if tensor.dtype != torch.float32 or hf.dtype != torch.float32 or not torch.equal(tensor, hf):
                        bad.append(f"layer {n} {name}: {tensor.dtype} vs HF {hf.dtype}")
                elif "norm" not in name and tensor.is_floating_point() and tensor.dtype != torch.bfloat16 and \
                        "expert_bias" not in name and "local_tokens_per_expert" not in name:
                    bad.append(f"layer {n} {name}: {tensor.dtype}")
    return bad, seen


def _file(run) -> dict:
    """A plain reading of the layout's checkpoint file."""
    from safetensors.torch import load_file

    return load_file(os.path.join(run.ckpts[run.layout.ckpt], "model.safetensors"))


def _indexers(run) -> dict:
    return {"indexers": _check_indexers(run.chunks, _file(run)),
            "sequence_parallel": run.chunks[0].config.sequence_parallel}


def _experts(run) -> dict:
    """Every local expert (decoder and MTP layers) against the HF tensors of its global expert; also
    ``test_glm_moe_dsa.py``'s."""
    from megatron.core import parallel_state as ps

    return {"experts": local_expert_mismatches(run.chunks, _file(run), E, ps.get_expert_model_parallel_rank(),
                                               run.layout.ep, ps.get_expert_tensor_parallel_rank(), run.layout.tp,
                                               mtp_index=MTP)}


def _fp32_kept(run) -> dict:
    return {"fp32_kept": _check_fp32_kept(run.chunks, _file(run))}


def _layout(name: str, tp: int, pp: int, vpp, ep: int) -> Layout:
    return Layout(name, "mtp", tp=tp, pp=pp, vpp=vpp, ep=ep, etp=tp if ep > 1 else None, logits="mtp",
                  max_shard_bytes=256 * 1024, no_source=ARCH if name == NO_SOURCE else None,
                  checks=(_indexers, _experts) if ep > 1 else (_indexers,))


LAYOUTS = [_layout("tp2", 2, 1, None, 1), _layout("pp2", 1, 2, None, 1), _layout("tp2pp2", 2, 2, None, 1),
           _layout("ep2", 1, 1, None, 2), _layout("tp2ep2", 2, 1, None, 2), _layout("pp2ep2", 1, 2, None, 2),
           _layout("pp2vpp2", 1, 2, 2, 1)]
BY_NAME = {layout.name: layout for layout in LAYOUTS}
IDS = [layout.name for layout in LAYOUTS]
EP_IDS = [layout.name for layout in LAYOUTS if layout.ep > 1]
# transformers' own bf16 save, params_dtype from config.json
BF16 = Layout("bf16_tp2ep2", "bf16", tp=2, ep=2, etp=2, dtype=None, logits=None, checks=(_fp32_kept,))


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    transformers.logging.set_verbosity_error()
    root = tmp_path_factory.mktemp("deepseek_v32")
    tokens = torch.randint(0, CONFIG["vocab_size"], (2, 12), generator=torch.Generator().manual_seed(0))
    native = str(root / "hf_native")
    model = _make_checkpoint(native, seed=31)
    with torch.no_grad():
        hf = model(tokens, use_cache=False).logits.float()
        for layer in model.model.layers:  # every key kept: the indexer selects nothing
            layer.self_attn.indexer.index_topk = 64
        dense = model(tokens, use_cache=False).logits.float()
        for layer in model.model.layers:
            layer.self_attn.indexer.index_topk = CONFIG["index_topk"]
    ckpts = {"mtp": str(root / "hf_mtp")}
    layer, mtp = _write_mtp(native, ckpts["mtp"], model, seed=41)
    hf_mtp = mtp_reference_logits(model, layer, mtp, tokens)
    out_root = str(root / "out")
    ckpts["bf16"] = save_transformers_bf16(model, str(root / "hf_bf16"))
    per_rank = spawn_layouts(ckpts, LAYOUTS + [BF16], tokens, out_root) if HAS_DSA else None
    return ckpts["mtp"], out_root, per_rank, hf, dense, hf_mtp, tokens, ckpts["bf16"]


def _assert_same_tensors(src_dir, dst_dir):
    cmp = compare_checkpoints(src_dir, dst_dir)  # key set, dtypes, shapes, torch.equal
    assert cmp["same_keys"] and cmp["bit_exact"], cmp


def test_the_checkpoint_has_what_the_tests_claim(world):
    """Random latent and indexer norms (the LayerNorm bias non-zero), an indexer in every layer and the MTP layer,
    and a top-k that changes transformers' logits (the sparse selection is exercised)."""
    ckpt, _, _, hf, dense, _, _, _ = world
    with SafeTensorsSource(ckpt) as src:
        keys = set(src.keys())
        for key in ("model.layers.1.self_attn.q_a_layernorm.weight", "model.layers.0.self_attn.indexer.k_norm.weight",
                    f"model.layers.{MTP}.self_attn.indexer.k_norm.weight"):
            assert (src[key] - 1.0).abs().max().item() > 0.1, key
        assert src["model.layers.2.self_attn.indexer.k_norm.bias"].abs().max().item() > 0.05
        assert src["model.layers.3.mlp.gate.e_score_correction_bias"].abs().max().item() > 0.1
    for n in range(MTP + 1):
        assert f"model.layers.{n}.self_attn.indexer.wq_b.weight" in keys, n
    assert "model.layers.0.mlp.gate_proj.weight" in keys and "model.layers.0.mlp.gate.weight" not in keys
    assert (hf - dense).abs().max().item() > 0.05


@needs_dsa
@pytest.mark.parametrize("name", IDS)
def test_logits_match_hf(world, name):
    _, _, per_rank, hf, _, _, _, _ = world
    diff = max_abs_diff(per_rank[0][name]["logits"], hf)
    assert diff <= MEGATRON_VS_HF_ATOL, f"{name}: max |logit diff| {diff:.3e} > {MEGATRON_VS_HF_ATOL:.0e}"
    assert per_rank[0][name]["sequence_parallel"] == (BY_NAME[name].tp > 1)  # AbsorbedMLA's requirement at TP > 1


@needs_dsa
@pytest.mark.parametrize("name", IDS)
def test_mtp_logits_match_the_reference(world, name):
    _, _, per_rank, _, _, hf_mtp, _, _ = world
    got = per_rank[0][name]["mtp_logits"]
    assert len(got) == 1
    diff = max_abs_diff(got[0], hf_mtp)
    assert diff <= MEGATRON_VS_HF_ATOL and hf_mtp.abs().max().item() > 1.0, f"{name}: MTP max |diff| {diff:.3e}"


@needs_dsa
@pytest.mark.parametrize("name", IDS)
def test_indexer_is_replicated_on_every_rank(world, name):
    """Every rank holds the whole HF indexer tensors of its layers (decoder and MTP): 5 layers over pp stages."""
    _, _, per_rank, _, _, _, _, _ = world
    for rank, r in enumerate(per_rank):
        bad, seen = r[name]["indexers"]
        assert seen > 0 and bad == [], (rank, bad[:6])
    assert sum(r[name]["indexers"][1] for r in per_rank) == (MTP + 1) * len(per_rank) // BY_NAME[name].pp


@needs_dsa
@pytest.mark.parametrize("name", EP_IDS)
def test_local_experts_are_the_hf_global_experts(world, name):
    _, _, per_rank, _, _, _, _, _ = world
    for rank, r in enumerate(per_rank):
        bad, layers = r[name]["experts"]
        assert layers > 0 and bad == [], (rank, bad[:6])
    assert sum(r[name]["experts"][1] for r in per_rank) == (len(SPARSE) + 1) * len(per_rank) // BY_NAME[name].pp


@needs_dsa
@pytest.mark.parametrize("name", IDS)
def test_round_trip_bit_exact(world, name):
    ckpt, out_root, _, _, _, _, _, _ = world
    _assert_same_tensors(ckpt, os.path.join(out_root, name))


@needs_dsa
def test_export_without_source_loads_in_transformers(world):
    ckpt, out_root, _, hf, _, _, tokens, _ = world
    out = os.path.join(out_root, f"{NO_SOURCE}_nosource")
    _assert_same_tensors(ckpt, out)
    with open(os.path.join(out, "config.json")) as f:
        cfg = json.load(f)
    assert cfg["architectures"] == [ARCH] and cfg["model_type"] == "deepseek_v32"
    assert (cfg["index_topk"], cfg["index_head_dim"], cfg["index_n_heads"]) == (5, 16, 4)
    assert cfg["first_k_dense_replace"] == 1 and cfg["num_nextn_predict_layers"] == 1
    diff = max_abs_diff(hf_logits(out, tokens), hf)
    assert diff <= SAME_MODEL_ATOL, f"max |logit diff| {diff:.3e}"


@needs_dsa
def test_bf16_round_trip_keeps_fp32_routers(world):
    """transformers' own bf16 save keeps the routers fp32 and the indexer bf16 (its ``_keep_in_fp32_modules``
    ``indexer.weights_proj`` applies to fp16 only): at TP2 x EP2 the Megatron routers are fp32, equal to the file's,
    the rest bf16 (norms apart), and the export is the file, dtypes included."""
    _, out_root, per_rank, _, _, _, _, bf16 = world
    with SafeTensorsSource(bf16) as src:
        assert src["model.layers.1.self_attn.indexer.weights_proj.weight"].dtype == torch.bfloat16
        assert src["model.layers.1.mlp.gate.weight"].dtype == torch.float32
    for rank, r in enumerate(per_rank):
        bad, seen = r[BF16.name]["fp32_kept"]
        assert bad == [] and seen == 2 * len(SPARSE), (rank, bad[:6], seen)  # routers: weight + bias
    _assert_same_tensors(bf16, os.path.join(out_root, BF16.name))


@needs_dsa
def test_streamed_import_then_export_at_another_layout_is_the_source(world, tmp_path):
    """``import`` as the command line runs it by default (streamed, TE spec keys, layout EP2 recorded), then
    ``export`` at TP2 (the stored config read at TP2: sequence parallel, as DSA needs): the source, bit-exact, MTP
    layer included."""
    from megatron_bridge_ext.cli.export import export_checkpoint
    from megatron_bridge_ext.cli.import_hf import import_checkpoint

    ckpt = world[0]
    import_checkpoint(ckpt, str(tmp_path / "mg"), ep=2, backend="gloo")
    export_checkpoint(str(tmp_path / "mg"), str(tmp_path / "hf"), tp=2, backend="gloo")
    _assert_same_tensors(ckpt, str(tmp_path / "hf"))


@pytest.mark.skipif(HAS_DSA, reason="megatron-core >= 0.19 converts the family (the tests above)")
def test_refused_before_megatron_core_0_19(world):
    from megatron_bridge_ext.auto_bridge import AutoBridge
    from megatron_bridge_ext.mcore.versions import installed_megatron_core

    refusal = rf"{ARCH}: DeepSeek sparse attention .*megatron-core >= 0\.19\.0; megatron-core " \
        rf"{installed_megatron_core()} is installed"
    with pytest.raises(ValueError, match=refusal):  # import: the checkpoint's config is refused
        AutoBridge.from_hf_pretrained(world[0])
    with pytest.raises(ValueError, match=refusal):  # export: before the Megatron config is read
        AutoBridge.from_architecture(ARCH).model_bridge.megatron_to_hf_config(None)
