"""Kimi-K2 end to end through the DeepSeek-V3 family, on real parts (issue #22, item 6).

A tiny transformers DeepSeek-V3 written in Kimi-K2's released form (``tests/kimi_k2_checkpoints.py``:
``model_type: "kimi_k2"``, ``auto_map`` into code files that raise when imported, legacy YaRN ``rope_scaling`` x32
with mscale 1 / 1, top-8 of 16 routed experts in one group, a shared expert, a dense first layer, routed scaling
2.827). Its FP8 copy (128 x 128 blocks in the release; 8 x 8 here, transformers' own ``Fp8Quantize``) with a
dequantized twin made by ``tests/reference.py``.

In ONE spawned world of 4 ranks, at EP2, EP4, TP2 x EP2 (expert-TP 2) and PP2 x EP2: the Megatron logits against
transformers' own (fp32, the config read through DeepSeek-V3's class), the export with the source bit-exact (the
release's config.json and code files carried along as they are), and at PP2 x EP2 an export without the source
(config.json from the Megatron config, ``model_type: "deepseek_v3"``) that transformers loads with the same logits.
At TP2 x EP2 every Megatron parameter imported from the FP8 copy equals the one imported from its twin. Then the
converter as a user runs it: ``import`` (the stream, no model) and ``export`` in subprocesses give back the source's
tensors exactly.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("megatron.core")
transformers = pytest.importorskip("transformers")

from megatron_bridge_ext.testing.parity import compare_checkpoints, hf_logits  # noqa: E402
from megatron_bridge_ext.testing.tolerances import MEGATRON_VS_HF_ATOL, SAME_MODEL_ATOL, max_abs_diff  # noqa: E402
from megatron_bridge_ext.testing.worlds import Layout, spawn_layouts  # noqa: E402

TESTS = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ROOT = os.path.dirname(TESTS)
sys.path.insert(0, TESTS)
from kimi_k2_checkpoints import RELEASED, TINY, write_kimi_checkpoint  # noqa: E402
from quantized_checkpoints import write_fp8  # noqa: E402

NO_SOURCE = "pp2ep2"
FP8_LAYOUT = "tp2ep2"


def _params(chunks):
    return {f"{i}:{n}": p.detach() for i, c in enumerate(chunks) for n, p in c.named_parameters()}


def _fp8_as_twin(run) -> dict:
    """Every Megatron parameter imported from the FP8 copy against the one imported from its dequantized twin."""
    from megatron_bridge_ext.auto_bridge import AutoBridge

    got = _params(AutoBridge.from_hf_pretrained(run.ckpts["fp8"]).to_megatron_model(params_dtype=torch.float32))
    want = _params(AutoBridge.from_hf_pretrained(run.ckpts["fp8_twin"]).to_megatron_model(params_dtype=torch.float32))
    return {"fp8": {"keys": sorted(got) == sorted(want), "n": len(want),
                    "differ": sorted(k for k in want if k in got and not torch.equal(got[k], want[k]))}}


def _layout(name, tp, pp, ep):
    return Layout(name, "kimi", tp=tp, pp=pp, ep=ep, etp=tp,
                  no_source="DeepseekV3ForCausalLM" if name == NO_SOURCE else None,
                  after_export=(_fp8_as_twin,) if name == FP8_LAYOUT else ())


LAYOUTS = [_layout("ep2", 1, 1, 2), _layout("ep4", 1, 1, 4), _layout("tp2ep2", 2, 1, 2), _layout("pp2ep2", 1, 2, 2)]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    transformers.logging.set_verbosity_error()
    root = tmp_path_factory.mktemp("kimi_k2")
    ckpts = {"kimi": str(root / "kimi"), "fp8": str(root / "kimi_fp8"), "fp8_twin": str(root / "kimi_fp8_twin")}
    write_kimi_checkpoint(ckpts["kimi"], seed=3)
    write_fp8(ckpts["kimi"], ckpts["fp8"], ckpts["fp8_twin"], (8, 8), "transformers")
    tokens = torch.randint(0, TINY["vocab_size"], (2, 12), generator=torch.Generator().manual_seed(0))
    out_root = str(root / "out")
    results = spawn_layouts(ckpts, LAYOUTS, tokens, out_root)
    return ckpts, out_root, results, hf_logits(ckpts["kimi"], tokens), tokens


def test_the_checkpoint_is_in_the_release_form(world):
    """What the tests below convert is what Kimi-K2's release looks like to a reader, and transformers' own model
    follows the experts' routing closely enough for the logits to tell layouts apart."""
    ckpts = world[0]
    with open(os.path.join(ckpts["kimi"], "config.json")) as f:
        cfg = json.load(f)
    assert cfg["model_type"] == "kimi_k2" and cfg["auto_map"] == RELEASED["auto_map"]
    assert cfg["rope_scaling"]["type"] == "yarn" and "rope_parameters" not in cfg
    with open(os.path.join(ckpts["fp8"], "config.json")) as f:
        assert json.load(f)["quantization_config"]["quant_method"] == "fp8"


@pytest.mark.parametrize("name", [layout.name for layout in LAYOUTS])
def test_logits_match_transformers(world, name):
    _, _, results, hf, _ = world
    diff = max_abs_diff(results[0][name]["logits"], hf)
    assert diff <= MEGATRON_VS_HF_ATOL, f"{name}: max |logit diff| {diff:.3e}"


@pytest.mark.parametrize("name", [layout.name for layout in LAYOUTS])
def test_round_trip_bit_exact_with_the_release_files(world, name):
    ckpts, out_root, _, _, _ = world
    out = os.path.join(out_root, name)
    cmp = compare_checkpoints(ckpts["kimi"], out)
    assert cmp["same_keys"] and cmp["bit_exact"], cmp
    for side in ("config.json", "configuration_deepseek.py", "modeling_deepseek.py"):
        with open(os.path.join(ckpts["kimi"], side), "rb") as a, open(os.path.join(out, side), "rb") as b:
            assert a.read() == b.read(), side


def test_export_without_source_loads_in_transformers(world):
    ckpts, out_root, _, hf, tokens = world
    out = os.path.join(out_root, f"{NO_SOURCE}_nosource")
    cmp = compare_checkpoints(ckpts["kimi"], out)
    assert cmp["same_keys"] and cmp["bit_exact"], cmp
    config = transformers.AutoConfig.from_pretrained(out)
    assert type(config) is transformers.DeepseekV3Config and config.n_routed_experts == TINY["n_routed_experts"]
    diff = max_abs_diff(hf_logits(out, tokens), hf)
    assert diff <= SAME_MODEL_ATOL, f"max |logit diff| {diff:.3e}"


def test_fp8_release_imports_as_its_dequantized_twin(world):
    res = [r[FP8_LAYOUT]["fp8"] for r in world[2]]
    for rank, r in enumerate(res):
        assert r["keys"] and r["n"] > 0 and r["differ"] == [], (rank, r)


def _cli(*args):
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "GLOO_SOCKET_IFNAME": os.environ.get("GLOO_SOCKET_IFNAME", "lo")}
    res = subprocess.run([sys.executable, "-m", "megatron_bridge_ext", *args], capture_output=True, text=True,
                         timeout=600, env=env, cwd=ROOT)
    assert res.returncode == 0, res.stdout + res.stderr
    return res


def test_streamed_import_and_export(world, tmp_path):
    """``import`` writes the torch_dist checkpoint straight from the Kimi-form files (no model), ``export`` reads it
    back without a model: the source's tensors exactly."""
    ckpts = world[0]
    meg, out = str(tmp_path / "megatron"), str(tmp_path / "hf")
    _cli("import", ckpts["kimi"], meg)
    _cli("export", meg, out, "--hf-source", ckpts["kimi"])
    cmp = compare_checkpoints(ckpts["kimi"], out)
    assert cmp["same_keys"] and cmp["bit_exact"], cmp
