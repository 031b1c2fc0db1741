"""Qwen3.5 as released, vision-language (``Qwen3_5ForConditionalGeneration``, ``Qwen3_5MoeForConditionalGeneration``),
end to end on real parts: transformers checkpoints from tiny configs (``text_config`` = ``test_qwen3_5.py``'s
language models, a 2-block vision tower; random weights, fixed seeds) plus a multi-token-prediction layer's tensors
(``mtp.*``, as the releases hold them: transformers skips them on load) -> AutoBridge -> megatron-core 0.19 GPTModel
chunks (CPU, gloo) -> HF, all in ONE spawned world of 4 ranks.

Layouts: dense at TP2 and PP2, MoE at EP2 and PP2, at EP2 the MoE checkpoint with each layer's experts fused
(``experts.gate_up_proj`` / ``experts.down_proj``, as transformers holds them), and at TP2 a dense one with tied
embeddings (no ``lm_head.weight`` stored, as in the small releases). For each: every Megatron parameter on
every rank against a plain-torch reading of the HF tensors (``test_qwen3_5._expected`` on the checkpoint's
``model.language_model.*`` tensors read under their text-only names), the Megatron logits against transformers' own
forward of the ConditionalGeneration model on text-only input (fp32, max |diff| <= 1e-4), and the export with the
source against the source: every tensor, vision tower and MTP layer included (carried), ``torch.equal``, dtypes, key
set, ``config.json``. An export without the source is refused by name; so is the import under megatron-core < 0.19.
"""

from __future__ import annotations

import os
import sys

import pytest
import torch

pytest.importorskip("megatron.core")
transformers = pytest.importorskip("transformers")

from megatron_bridge_ext.io import SafeTensorsSource  # noqa: E402
from megatron_bridge_ext.mcore.versions import (  # noqa: E402
    MEGATRON_CORE_0_19,
    unmet_megatron_core,
)
from megatron_bridge_ext.testing.tiny_models import randomise  # noqa: E402
from megatron_bridge_ext.testing.tolerances import MEGATRON_VS_HF_ATOL  # noqa: E402
from megatron_bridge_ext.testing.worlds import Layout, spawn_layouts  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import test_qwen3_5 as q35  # noqa: E402
import test_qwen3_next as nxt  # noqa: E402

HAS_GDN = not unmet_megatron_core(MEGATRON_CORE_0_19)
LM = "model.language_model."
VISION = dict(depth=2, hidden_size=32, intermediate_size=48, num_heads=2, in_channels=3, patch_size=4,
              temporal_patch_size=2, spatial_merge_size=2, out_hidden_size=q35.BASE["hidden_size"],
              num_position_embeddings=16)
# family -> (transformers class prefix, architecture)
FAMILIES = {"dense": ("Qwen3_5", "Qwen3_5ForConditionalGeneration"),
            "moe": ("Qwen3_5Moe", "Qwen3_5MoeForConditionalGeneration")}
LAYOUTS = [Layout("dense_tp2", "dense", tp=2), Layout("dense_pp2", "dense", pp=2),
           Layout("moe_ep2", "moe", ep=2, etp=1), Layout("moe_pp2", "moe", pp=2),
           Layout("moe_fused_ep2", "moe_fused", ep=2, etp=1), Layout("dense_tied_tp2", "dense_tied", tp=2)]
#: checkpoint -> the checkpoint whose tensors it holds (under other names: the fused experts)
SAME_TENSORS = {"dense": "dense", "moe": "moe", "moe_fused": "moe", "dense_tied": "dense_tied"}
IDS = [layout.name for layout in LAYOUTS]

needs_gdn = pytest.mark.skipif(not HAS_GDN, reason="gated delta-net needs megatron-core >= 0.19: these run in the 0.19 "
                               "suite, and this version's refusal is test_megatron_core_version_gate")


def make_checkpoint(path: str, family: str, seed: int, tied: bool = False):
    """The family's tiny vision-language checkpoint plus ``mtp.*`` tensors; returns the model (without them). With
    ``tied`` the output layer is the embedding (``tie_word_embeddings``, as the small releases have it: transformers
    then stores no ``lm_head.weight``)."""
    from safetensors.torch import load_file, save_file

    prefix, _ = FAMILIES[family]
    text = dict(q35.FAMILIES[family][2], tie_word_embeddings=tied)
    torch.manual_seed(seed)
    cfg = getattr(transformers, f"{prefix}Config")(text_config=text, vision_config=dict(VISION),
                                                   tie_word_embeddings=tied)
    model = getattr(transformers, f"{prefix}ForConditionalGeneration")(cfg)
    randomise(model, (0.0, 0.3), rest=(0.0, 0.15))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("linear_attn.norm.weight"):
                p.copy_((1.0 + 0.2 * torch.randn_like(p)).clamp(0.5, 2.0))
    model.save_pretrained(path, safe_serialization=True)
    # the released MTP layer's names: a full-attention decoder layer after fc / the pre-fc norms, then a norm
    file = os.path.join(path, "model.safetensors")
    sd = load_file(file)
    d = text["hidden_size"]
    mtp = {f"mtp.layers.0.{k[len(LM + 'layers.3.'):]}": torch.randn_like(v)
           for k, v in sd.items() if k.startswith(LM + "layers.3.")}
    mtp.update({"mtp.fc.weight": torch.randn(d, 2 * d), "mtp.pre_fc_norm_embedding.weight": torch.randn(d),
                "mtp.pre_fc_norm_hidden.weight": torch.randn(d), "mtp.norm.weight": torch.randn(d)})
    save_file({**sd, **mtp}, file, metadata={"format": "pt"})
    return model.eval()


def write_fused_experts(src: str, dst: str) -> None:
    """``dst``: ``src`` (config files and tensors) with each layer's experts as transformers holds them in memory,
    ``mlp.experts.gate_up_proj`` ``[E, 2F, D]`` (``[gate; up]`` per expert) and ``mlp.experts.down_proj``
    ``[E, D, F]``, instead of one tensor per expert."""
    import re
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    sd = load_file(os.path.join(src, "model.safetensors"))
    per = re.compile(r"^(.*\.mlp\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")
    out, experts = {}, {}
    for k, v in sd.items():
        m = per.match(k)
        if m is None:
            out[k] = v
        else:
            experts.setdefault(m.group(1), {})[(int(m.group(2)), m.group(3))] = v
    for prefix, t in experts.items():
        n = 1 + max(e for e, _ in t)
        out[f"{prefix}.gate_up_proj"] = torch.stack([torch.cat([t[(e, "gate_proj")], t[(e, "up_proj")]])
                                                     for e in range(n)])
        out[f"{prefix}.down_proj"] = torch.stack([t[(e, "down_proj")] for e in range(n)])
    save_file(out, os.path.join(dst, "model.safetensors"), metadata={"format": "pt"})


def text_reading(ckpt: str):
    """The checkpoint's language-model tensors under their text-only names (``model.language_model.X`` ->
    ``model.X``), ``lm_head.weight`` as it is: the plain reading ``test_qwen3_5._expected`` indexes."""
    from safetensors.torch import load_file

    sd = load_file(os.path.join(ckpt, "model.safetensors"))
    out = {"model." + k[len(LM):]: v for k, v in sd.items() if k.startswith(LM)}
    if "lm_head.weight" in sd:
        out["lm_head.weight"] = sd["lm_head.weight"]
    return out


def _parameters(run):
    """This rank's parameters against the plain reading."""
    from megatron.core import parallel_state as ps

    lay = run.layout
    bad, seen = nxt._check_parameters(
        run.chunks, text_reading(run.ckpts[SAME_TENSORS[lay.ckpt]]), lay.tp, ps.get_tensor_model_parallel_rank(),
        lay.ep,
        ps.get_expert_model_parallel_rank(), lay.etp or lay.tp, ps.get_expert_tensor_parallel_rank(),
        expected=q35._expected)
    gdn = sum(type(layer.self_attention).__name__ == "LocalGatedDeltaNet" for c in run.chunks
              for layer in c.decoder.layers)
    return {"bad": bad, "seen": seen, "gdn_layers": gdn}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    transformers.logging.set_verbosity_error()
    root = tmp_path_factory.mktemp("qwen3_5_vl")
    tokens = torch.randint(0, q35.BASE["vocab_size"], (2, 12), generator=torch.Generator().manual_seed(0))
    ckpts, hf = {}, {}
    for i, family in enumerate(FAMILIES):
        ckpts[family] = str(root / f"hf_{family}")
        model = make_checkpoint(ckpts[family], family, seed=51 + i)
        with torch.no_grad():
            hf[family] = model(input_ids=tokens, use_cache=False).logits.float()
    ckpts["dense_tied"] = str(root / "hf_dense_tied")
    with torch.no_grad():
        hf["dense_tied"] = make_checkpoint(ckpts["dense_tied"], "dense", seed=53, tied=True)(
            input_ids=tokens, use_cache=False).logits.float()
    ckpts["moe_fused"] = str(root / "hf_moe_fused")
    write_fused_experts(ckpts["moe"], ckpts["moe_fused"])
    with torch.no_grad():  # transformers reads the fused experts as its own
        fused = getattr(transformers, "Qwen3_5MoeForConditionalGeneration").from_pretrained(
            ckpts["moe_fused"], dtype=torch.float32)
        hf["moe_fused"] = fused.eval()(input_ids=tokens, use_cache=False).logits.float()
    out_root = str(root / "out")
    layouts = [Layout(**{**vars(layout), "checks": (_parameters,)}) for layout in LAYOUTS]
    per_rank = spawn_layouts(ckpts, layouts, tokens, out_root)
    return ckpts, out_root, per_rank, hf


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_megatron_core_version_gate(tmp_path, family):
    """megatron-core >= 0.19: the Megatron config is text_config's (the text family's); below: a ValueError naming
    the architecture, the version needed and the installed one."""
    transformers.logging.set_verbosity_error()
    ckpt = str(tmp_path / "hf")
    make_checkpoint(ckpt, family, seed=1)
    cfg = q35.config_or_refusal(ckpt, FAMILIES[family][1])
    if cfg is None:
        return
    text = q35.FAMILIES[family][2]
    assert (cfg.num_layers, cfg.hidden_size, cfg.ffn_hidden_size) == (
        text["num_hidden_layers"], text["hidden_size"], text["intermediate_size"])
    assert cfg.experimental_attention_variant == "gated_delta_net" and cfg.linear_attention_freq == [1, 0, 1, 0]
    assert cfg.attention_output_gate and cfg.layernorm_zero_centered_gamma and cfg.rotary_percent == 0.25
    assert cfg.num_moe_experts == (nxt.E if family == "moe" else None)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_export_without_the_source_is_refused(family):
    """No vision_config and no vision tower without the source: refused by name before anything is exchanged."""
    from megatron_bridge_ext.auto_bridge import AutoBridge

    arch = FAMILIES[family][1]
    bridge = AutoBridge.from_architecture(arch)
    with pytest.raises(ValueError, match=r"exports only with its source checkpoint.*model\.visual\.\*, mtp\.\*"):
        bridge.save_hf_pretrained([], "/nonexistent/out")


def test_config_is_read_from_text_config():
    """The language model's fields come from text_config, the architecture and tying from the outer config."""
    from megatron_bridge_ext.models.hf_config import LanguageModelConfig

    raw = {"architectures": ["Qwen3_5ForConditionalGeneration"], "model_type": "qwen3_5", "tie_word_embeddings": True,
           "dtype": "bfloat16", "text_config": {"hidden_size": 64, "tie_word_embeddings": False, "dtype": None,
                                                "model_type": "qwen3_5_text"}}
    cfg = LanguageModelConfig(raw, "family")
    assert (cfg.hidden_size, cfg.tie_word_embeddings, cfg.model_type, cfg.dtype) == (64, True, "qwen3_5", "bfloat16")
    assert cfg.architectures == ["Qwen3_5ForConditionalGeneration"]
    with pytest.raises(AttributeError):
        cfg.no_such_field
    with pytest.raises(ValueError, match="family: the config has no text_config"):
        LanguageModelConfig({"hidden_size": 64}, "family")


@needs_gdn
def test_the_checkpoints_have_what_the_tests_claim(world):
    ckpts = world[0]
    for family in FAMILIES:
        with SafeTensorsSource(ckpts[family]) as src:
            keys = set(src.keys())
        assert {LM + "embed_tokens.weight", LM + "layers.0.linear_attn.in_proj_qkv.weight", "lm_head.weight",
                "model.visual.blocks.1.attn.qkv.weight", "model.visual.merger.linear_fc2.weight",
                "mtp.fc.weight", "mtp.layers.0.self_attn.q_proj.weight"} <= keys, family
        assert not any(k.startswith("model.layers.") for k in keys)
    with SafeTensorsSource(ckpts["moe"]) as src:
        assert LM + "layers.1.mlp.experts.3.up_proj.weight" in set(src.keys())
    with SafeTensorsSource(ckpts["moe_fused"]) as src:
        keys = set(src.keys())
        assert tuple(src[LM + "layers.1.mlp.experts.gate_up_proj"].shape) == (nxt.E, 2 * 24, q35.BASE["hidden_size"])
    assert not any(".experts.0." in k for k in keys)
    assert torch.equal(world[3]["moe_fused"], world[3]["moe"])  # transformers: the same model
    with SafeTensorsSource(ckpts["dense_tied"]) as src:
        assert "lm_head.weight" not in set(src.keys()) and "mtp.fc.weight" in set(src.keys())


@needs_gdn
@pytest.mark.parametrize("layout", LAYOUTS, ids=IDS)
def test_every_parameter_is_the_plain_reading(world, layout):
    per_rank = world[2]
    for rank, r in enumerate(per_rank):
        assert r[layout.name]["seen"] > 0 and r[layout.name]["bad"] == [], (rank, r[layout.name]["bad"][:6])
    assert sum(r[layout.name]["gdn_layers"] for r in per_rank) == 2 * len(per_rank) // layout.pp


@needs_gdn
@pytest.mark.parametrize("layout", LAYOUTS, ids=IDS)
def test_logits_match_transformers_conditional_generation(world, layout):
    _, _, per_rank, hf = world
    diff = (per_rank[0][layout.name]["logits"] - hf[layout.ckpt]).abs().max().item()
    assert diff <= MEGATRON_VS_HF_ATOL, f"{layout.name}: max |logit diff| {diff:.3e} > {MEGATRON_VS_HF_ATOL:.0e}"


@needs_gdn
@pytest.mark.parametrize("layout", LAYOUTS, ids=IDS)
def test_export_is_the_source_vlm_checkpoint_bit_exact(world, layout):
    """Every tensor of the source, the carried vision tower and MTP layer included; config.json as the source's."""
    ckpts, out_root, _, _ = world
    out = os.path.join(out_root, layout.name)
    nxt._assert_same_tensors(ckpts[layout.ckpt], out)
    with open(os.path.join(ckpts[layout.ckpt], "config.json")) as a, open(os.path.join(out, "config.json")) as b:
        assert a.read() == b.read()
