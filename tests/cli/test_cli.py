"""The command line: ``list-models`` and the main job (``demo``) as a user runs them."""

import os
import subprocess
import sys

import pytest

pytest.importorskip("megatron.core")
pytest.importorskip("transformers")

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _run(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "GLOO_SOCKET_IFNAME": os.environ.get("GLOO_SOCKET_IFNAME", "lo")}
    return subprocess.run([sys.executable, "-m", "megatron_bridge_ext", *args], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=ROOT)


# the families whose layers only megatron-core 0.19 has (gated delta-net, Mamba hybrid, DeepSeek sparse attention)
NEED_0_19 = {"Qwen3NextForCausalLM", "Qwen3_5ForCausalLM", "Qwen3_5MoeForCausalLM", "Qwen3_5ForConditionalGeneration",
             "Qwen3_5MoeForConditionalGeneration", "NemotronHForCausalLM",
             "DeepseekV32ForCausalLM", "GlmMoeDsaForCausalLM"}


def test_list_models():
    """Every architecture, one per line; under a megatron-core older than 0.19 the families that need it are marked
    with the release they need and the installed one."""
    from megatron_bridge_ext.mcore.versions import installed_megatron_core, megatron_core_version

    res = _run("list-models")
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    names = [ln.split()[0] for ln in lines]
    assert {"LlamaForCausalLM", "Qwen2ForCausalLM", "MixtralForCausalLM"} | NEED_0_19 <= set(names)
    old = megatron_core_version() < (0, 19, 0)
    marked = {ln.split()[0] for ln in lines if "needs megatron-core" in ln}
    assert marked == (NEED_0_19 if old else set()), lines
    for ln in lines:
        if ln.split()[0] in marked:
            assert ln.endswith(f"(needs megatron-core >= 0.19.0; {installed_megatron_core()} is installed)"), ln


def test_list_models_marks_what_an_older_megatron_core_refuses(monkeypatch):
    """With megatron-core 0.16.1 reported, exactly the 0.19-only families are marked (whatever is installed)."""
    from megatron_bridge_ext.cli.list_models import model_lines
    from megatron_bridge_ext.mcore import versions

    monkeypatch.setattr(versions, "megatron_core_version", lambda: (0, 16, 1))
    monkeypatch.setattr(versions, "installed_megatron_core", lambda: "0.16.1")
    lines = model_lines()
    marked = {ln.split()[0] for ln in lines if ln.endswith("(needs megatron-core >= 0.19.0; 0.16.1 is installed)")}
    assert marked == NEED_0_19, lines
    assert all("needs" not in ln for ln in lines if ln.split()[0] not in NEED_0_19)


def test_demo_pipeline_parallel(tmp_path):
    res = _run("demo", "--tp", "1", "--pp", "2", "--keep", str(tmp_path))
    assert res.returncode == 0, res.stdout + res.stderr
    assert "PASS" in res.stdout and "bit-exact round trip" in res.stdout
    assert os.path.exists(tmp_path / "hf_roundtrip" / "config.json")


def test_roundtrip_rejects_unknown_directory(tmp_path):
    res = _run("roundtrip", str(tmp_path / "missing"), str(tmp_path / "out"), "--no-logits")
    assert res.returncode != 0
    assert "missing" in res.stderr
