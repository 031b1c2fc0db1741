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


def test_list_models():
    res = _run("list-models")
    assert res.returncode == 0, res.stderr
    assert {"LlamaForCausalLM", "Qwen2ForCausalLM", "MixtralForCausalLM"} <= set(res.stdout.split())


def test_demo_pipeline_parallel(tmp_path):
    res = _run("demo", "--tp", "1", "--pp", "2", "--keep", str(tmp_path))
    assert res.returncode == 0, res.stdout + res.stderr
    assert "PASS" in res.stdout and "bit-exact round trip" in res.stdout
    assert os.path.exists(tmp_path / "hf_roundtrip" / "config.json")


def test_roundtrip_rejects_unknown_directory(tmp_path):
    res = _run("roundtrip", str(tmp_path / "missing"), str(tmp_path / "out"), "--no-logits")
    assert res.returncode != 0
    assert "missing" in res.stderr
