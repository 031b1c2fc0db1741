"""Megatron checkpoints across megatron-core versions, end to end as a user runs the converter: written by ``import``
under one installed megatron-core, read under the other by ``export`` (bit-exact against the HF source, resharded),
``verify`` (every tensor and the logits against the HF source) and the checkpoint reader ``inspect``-style tools
use (``read_checkpoint_info``: architecture, layout, stored model config, Megatron-LM args; ``tensor_metadata``:
every tensor's global shape and dtype, which must be what the writing version reports). Each command runs in the
interpreter of its own environment, taken from ``MBE_MCORE_PYTHONS`` (``make test`` sets it to every built
environment's python). Two models: a Llama (odd vocabulary, imported at TP2, read at PP2 and TP1) and a DeepSeek-V3
(multi-latent attention, routed and shared experts, a dense first layer; imported at EP2, exported at TP2, verified
and exported with ``--hf-source`` at TP1).

Each direction is its own test function and runs in the suite of the version that writes (so ``make test`` runs each
once); the other suite skips it, saying so.
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
from typing import Dict

import pytest

pytest.importorskip("megatron.core")
transformers = pytest.importorskip("transformers")

from megatron_bridge_ext.mcore.versions import installed_megatron_core  # noqa: E402
from megatron_bridge_ext.testing.parity import compare_checkpoints  # noqa: E402
from megatron_bridge_ext.testing.tiny_models import make_tiny_checkpoint  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ENV_VAR = "MBE_MCORE_PYTHONS"
OLD, NEW = "0.16.1", "0.19.2"
LLAMA = dict(vocab_size=1003, hidden_size=64, intermediate_size=160, num_hidden_layers=4, num_attention_heads=4,
             num_key_value_heads=2, head_dim=16, max_position_embeddings=128, rms_norm_eps=1e-5, rope_theta=10000.0,
             tie_word_embeddings=False)
DEEPSEEK = dict(vocab_size=97, hidden_size=64, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4,
                max_position_embeddings=64, rms_norm_eps=1e-5, tie_word_embeddings=False, intermediate_size=80,
                moe_intermediate_size=24, n_routed_experts=4, num_experts_per_tok=2, n_group=2, topk_group=1,
                first_k_dense_replace=1, q_lora_rank=24, kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=16,
                v_head_dim=12, n_shared_experts=1, routed_scaling_factor=2.5,
                rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                                 "original_max_position_embeddings": 16, "beta_fast": 32.0, "beta_slow": 1.0,
                                 "mscale": 1.0, "mscale_all_dim": 1.0})
# name -> (transformers class prefix, config, import layout, export layout, verify layout or None: not verified)
MODELS = {
    "llama": ("Llama", LLAMA, ["--tp", "2"], ["--pp", "2"], None),
    "deepseek_v3": ("DeepseekV3", DEEPSEEK, ["--ep", "2"], ["--tp", "2"], []),
}

# what inspect-style tools read from a checkpoint, printed as JSON by the reading interpreter
_READ_SCRIPT = """
import json, sys
from megatron_bridge_ext.io.megatron_checkpoint import read_checkpoint_info, tensor_metadata
out = {}
for path in sys.argv[1:]:
    info = read_checkpoint_info(path)
    args = vars(info.args) if info.args is not None else {}
    out[path] = {
        "architecture": info.architecture, "parallel": info.parallel, "model_keys": info.model_keys,
        "model_config": info.model_config, "iteration": info.iteration,
        "checkpoint_version": info.checkpoint_version,
        "args": {k: str(args.get(k)) for k in ("num_layers", "hidden_size", "num_attention_heads", "num_experts",
                                                "tensor_model_parallel_size", "expert_model_parallel_size",
                                                "params_dtype", "no_save_optim", "no_save_rng")},
        "tensors": {k: [list(v.global_shape), str(v.dtype)] for k, v in tensor_metadata(path).items()},
    }
print("RESULT " + json.dumps(out, sort_keys=True, default=str))
"""


@functools.lru_cache(maxsize=None)
def _interpreters() -> Dict[str, str]:
    """megatron-core version -> interpreter, for every interpreter in $MBE_MCORE_PYTHONS."""
    found: Dict[str, str] = {}
    for python in os.environ.get(ENV_VAR, "").split():
        res = subprocess.run([python, "-c", "import importlib.metadata as m; print(m.version('megatron-core'))"],
                             capture_output=True, text=True, timeout=120)
        if res.returncode == 0:
            found.setdefault(res.stdout.strip().split("+")[0], python)
    return found


def _python(version: str) -> str:
    python = _interpreters().get(version)
    if python is None:
        pytest.skip(f"{ENV_VAR} names no interpreter with megatron-core {version} (it has "
                    f"{sorted(_interpreters()) or 'none'}): `make test` sets it to every built environment's python; "
                    f"build that one with `make build-{version}`")
    return python


def _writer_suite_only(writer: str) -> None:
    here = (installed_megatron_core() or "").split("+")[0]
    if here != writer:
        pytest.skip(f"this direction runs in the megatron-core {writer} suite, where its checkpoints are written "
                    f"(this suite runs megatron-core {here})")


def _env() -> Dict[str, str]:
    return {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
            "GLOO_SOCKET_IFNAME": os.environ.get("GLOO_SOCKET_IFNAME", "lo")}


def _run(python: str, *args: str, timeout: int = 900) -> subprocess.CompletedProcess:
    return subprocess.run([python, *args], capture_output=True, text=True, timeout=timeout, env=_env(), cwd=ROOT)


def _cli(python: str, *args: str) -> subprocess.CompletedProcess:
    res = _run(python, "-m", "megatron_bridge_ext", *args)
    assert res.returncode == 0, f"{python} {' '.join(args)}:\n{res.stdout}\n{res.stderr}"
    return res


def _read(python: str, paths) -> dict:
    res = _run(python, "-c", _READ_SCRIPT, *paths)
    lines = [ln for ln in res.stdout.splitlines() if ln.startswith("RESULT ")]
    assert res.returncode == 0 and lines, f"{python} reading {paths}:\n{res.stdout}\n{res.stderr}"
    return json.loads(lines[-1][len("RESULT "):])


def _make(path: str, name: str) -> str:
    prefix, config, *_ = MODELS[name]
    make_tiny_checkpoint(path, prefix, config, seed=7, rest=(0.0, 0.1), correction_bias=0.3)
    return path


def _across(writer: str, reader: str, tmp_path) -> None:
    """Import every model under ``writer``; export, verify and read it under ``reader``."""
    write_py, read_py = _python(writer), _python(reader)
    _writer_suite_only(writer)
    sources, checkpoints = {}, {}
    for name, (_, _, layout, _, _) in MODELS.items():
        sources[name] = _make(str(tmp_path / f"hf_{name}"), name)
        checkpoints[name] = str(tmp_path / f"megatron_{name}")
        _cli(write_py, "import", sources[name], checkpoints[name], *layout)
    # the reader sees what the writer wrote: same info, every tensor with the same global shape and dtype
    paths = list(checkpoints.values())
    written, read = _read(write_py, paths), _read(read_py, paths)
    for path in checkpoints.values():
        assert read[path]["tensors"] == written[path]["tensors"] and read[path]["tensors"], path
        for key in ("architecture", "parallel", "model_keys", "model_config", "iteration", "args"):
            assert read[path][key] == written[path][key], (path, key, read[path][key], written[path][key])
    for name, (_, _, _, export_layout, verify_layout) in MODELS.items():
        out = str(tmp_path / f"hf_out_{name}")
        _cli(read_py, "export", checkpoints[name], out, *export_layout)  # rebuilt from the stored config alone
        cmp = compare_checkpoints(sources[name], out)
        assert cmp["same_keys"] and cmp["bit_exact"], (name, cmp)
        if verify_layout is None:  # keeps the test short: one model goes through every command
            continue
        res = _cli(read_py, "verify", sources[name], checkpoints[name], *verify_layout)
        assert "PASS" in res.stdout and "MISMATCH" not in res.stdout, res.stdout
        # the HF source checked against the stored config written by the other version, its side files copied
        _cli(read_py, "export", checkpoints[name], out + "_src", "--hf-source", sources[name])
        cmp = compare_checkpoints(sources[name], out + "_src")
        assert cmp["same_keys"] and cmp["bit_exact"], (name, cmp)


def test_checkpoints_imported_under_0_16_1_are_read_under_0_19_2(tmp_path):
    """megatron-core 0.16.1 writes common.pt; 0.19.2 reads it (``torch.load(weights_only=True)`` with 0.19's
    allowlist: the common state holds nothing else)."""
    _across(OLD, NEW, tmp_path)


def test_checkpoints_imported_under_0_19_2_are_read_under_0_16_1(tmp_path):
    """megatron-core 0.19.2 writes the common state inside the torch.distributed.checkpoint files (no common.pt);
    0.16.1's own loader cannot read that, so this direction needs the package's own reader of the common state."""
    _across(NEW, OLD, tmp_path)
