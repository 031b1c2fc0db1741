"""The streamed import when it is killed, resumed, and pointed at bad input.

A Llama checkpoint (~30 MB) is streamed into 64 KiB files (hundreds of fsynced files, a few seconds), so that a
conversion killed with SIGKILL from outside stops in the middle of it. Afterwards:

- nothing looks complete: no ``iter_0000000``, no tracker, only the staging directory;
- ``--resume`` keeps the files the journal recorded (each checked against its size and SHA-256) and converts only the
  rest; the result equals, tensor for tensor and object for object, an import that was never interrupted
  (``compare_megatron_checkpoints``, read with the restricted reader);
- a kept file that changed on disk is found and redone; a resume with other settings keeps nothing;
- the CLI's ``--resume`` with ``--overwrite`` is refused, and a second import over a complete checkpoint is refused
  unless ``--overwrite``.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

pytest.importorskip("megatron.core")
pytest.importorskip("transformers")

LAYERS = 8
CONFIG = dict(hidden_size=256, intermediate_size=688, num_hidden_layers=LAYERS, num_attention_heads=8,
              num_key_value_heads=4, vocab_size=4000)


def _cli(*args, env=None, **kw):
    return subprocess.run([sys.executable, "-m", "megatron_bridge_ext", *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, **kw)


def _journal_records(partial: str) -> int:
    from megatron_bridge_ext.engine.stream import JOURNAL_NAME

    path = os.path.join(partial, f"{JOURNAL_NAME}.0")
    if not os.path.isfile(path):
        return 0
    with open(path, "rb") as f:
        return f.read().count(b"WrittenFile")


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    import torch

    from megatron_bridge_ext.testing.tiny_models import make_tiny_llama

    root = tmp_path_factory.mktemp("stream_resume")
    hf = make_tiny_llama(str(root / "hf"), seed=7, dtype=torch.bfloat16, **CONFIG)
    return str(root), hf


def _stream(hf, out, **kw):
    """The library call the CLI makes (one process, in a gloo group of its own)."""
    from megatron_bridge_ext.cli.import_hf import import_checkpoint

    return import_checkpoint(hf, out, **kw)


def test_killed_conversion_leaves_nothing_complete_and_resumes(source, tmp_path):
    from megatron_bridge_ext.testing.parity import compare_megatron_checkpoints

    root, hf = source
    whole = str(tmp_path / "whole")
    ref = _stream(hf, whole, file_bytes=64 << 10)
    assert ref["kept_files"] == 0 and os.path.isdir(os.path.join(whole, "iter_0000000"))

    out = str(tmp_path / "killed")
    partial = os.path.join(out, "iter_0000000.partial")
    # small files, each fsynced: the conversion takes long enough to be killed in the middle
    proc = subprocess.Popen([sys.executable, "-m", "megatron_bridge_ext", "import", hf, out, "--quiet",
                             "--file-bytes", "64K"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while _journal_records(partial) < 20 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    killed_at = _journal_records(partial)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the conversion finished before it could be killed"
    assert killed_at >= 20
    assert not os.path.exists(os.path.join(out, "iter_0000000"))
    assert not os.path.exists(os.path.join(out, "latest_checkpointed_iteration.txt"))
    assert os.path.isdir(partial) and not os.path.exists(os.path.join(partial, ".metadata"))

    # a kept file changed on disk: found (SHA-256) and converted again
    files = sorted(n for n in os.listdir(partial) if n.endswith(".distcp"))
    with open(os.path.join(partial, files[0]), "r+b") as f:
        f.seek(100)
        byte = f.read(1)
        f.seek(100)
        f.write(bytes([byte[0] ^ 0xFF]))

    res = _stream(hf, out, resume=True, file_bytes=64 << 10)
    assert res["kept_files"] >= killed_at - 2, res  # the changed file and at most the one being written are redone
    assert any("content differs" in p for p in res["resume_problems"]), res["resume_problems"]
    assert 0 < res["written_bytes"] < ref["written_bytes"], (res["written_bytes"], ref["written_bytes"])
    assert not os.path.exists(partial)
    assert compare_megatron_checkpoints(out, whole) == []


def test_resume_with_other_settings_keeps_nothing(source, tmp_path):
    from megatron_bridge_ext.testing.parity import compare_megatron_checkpoints

    root, hf = source
    out = str(tmp_path / "out")
    partial = os.path.join(out, "iter_0000000.partial")
    proc = subprocess.Popen([sys.executable, "-m", "megatron_bridge_ext", "import", hf, out, "--quiet",
                             "--dtype", "fp32", "--file-bytes", "64K"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while _journal_records(partial) < 5 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    res = _stream(hf, out, resume=True, file_bytes=64 << 10)  # bf16 now: the fp32 files are of another conversion
    assert res["kept_files"] == 0
    assert any("another conversion" in p for p in res["resume_problems"]), res["resume_problems"]
    assert compare_megatron_checkpoints(out, _stream(hf, str(tmp_path / "ref"))["path"]) == []


def test_cli_refusals(source, tmp_path):
    root, hf = source
    out = str(tmp_path / "out")
    r = _cli("import", hf, out, "--resume", "--overwrite")
    assert r.returncode != 0 and "--resume" in r.stderr + r.stdout
    assert _cli("import", hf, out, "--quiet").returncode == 0
    r = _cli("import", hf, out, "--quiet")
    assert r.returncode != 0 and "exists" in r.stderr + r.stdout
    assert _cli("import", hf, out, "--quiet", "--overwrite", "--buffer-bytes", "1M").returncode == 0
    r = _cli("import", hf, out, "--buffer-bytes", "lots")
    assert r.returncode != 0 and "not a byte size" in r.stderr


def test_four_ranks_write_the_checkpoint_one_rank_writes(source, tmp_path):
    """``--ranks 4``: four local gloo processes convert disjoint shares of the tensors and write their own files;
    rank 0 merges the metadata. The checkpoint equals the one-rank one tensor for tensor, object for object."""
    from megatron_bridge_ext.testing.parity import compare_megatron_checkpoints

    root, hf = source
    one = _stream(hf, str(tmp_path / "one"))
    four = _stream(hf, str(tmp_path / "four"), ranks=4)
    assert four["ranks"] == 4
    files = sorted(n for n in os.listdir(four["path"]) if n.endswith(".distcp"))
    assert {n.split("_")[2] for n in files} == {"0", "1", "2", "3"}, files  # every rank wrote its share
    assert compare_megatron_checkpoints(four["path"], one["path"]) == []


def test_gate_and_up_rows_are_written_from_the_hf_tensors(source, tmp_path, monkeypatch):
    """At TP 1 megatron-core stores a SwiGLU ``linear_fc1`` as its gate rows and its up rows: the streamed import
    writes each straight from the memory of the HF ``gate_proj`` / ``up_proj`` tensor (no ``[gate; up]`` made), and
    the stored tensor is ``[gate; up]`` of the HF files, layer by layer."""
    import torch

    from megatron_bridge_ext.io.dcp_writer import StreamingDcpWriter
    from megatron_bridge_ext.io.hf_source import SafeTensorsSource

    root, hf = source
    views, puts = {}, []
    getitem, put = SafeTensorsSource.__getitem__, StreamingDcpWriter.put

    def recording_getitem(self, key):
        t = getitem(self, key)
        views[key] = (t.data_ptr(), t.data_ptr() + t.numel() * t.element_size())
        return t

    def recording_put(self, item, data):
        if isinstance(data, torch.Tensor):
            puts.append((item.index.fqn, tuple(item.index.offset), data.data_ptr()))
        return put(self, item, data)

    monkeypatch.setattr(SafeTensorsSource, "__getitem__", recording_getitem)
    monkeypatch.setattr(StreamingDcpWriter, "put", recording_put)
    streamed = _stream(hf, str(tmp_path / "streamed"))
    monkeypatch.undo()

    def inside(ptr, name):
        lo, hi = views[name]
        return lo <= ptr < hi

    fc1 = sorted((off, ptr) for fqn, off, ptr in puts if fqn.endswith("mlp.linear_fc1.weight"))
    ffn = CONFIG["intermediate_size"]
    assert len(fc1) == 2 * LAYERS, fc1
    for layer, row, ptr in ((off[0], off[1], ptr) for off, ptr in fc1):
        part = "gate_proj" if row == 0 else "up_proj"
        assert row in (0, ffn) and inside(ptr, f"model.layers.{layer}.mlp.{part}.weight"), (layer, row, part)
    # the stored rows are the HF tensors' (read back with the restricted reader, against the files read plainly)
    from safetensors.torch import load_file

    from megatron_bridge_ext.io.dcp_reader import TorchDistCheckpoint

    files = [os.path.join(hf, n) for n in os.listdir(hf) if n.endswith(".safetensors")]
    hf_tensors = {k: v for f in files for k, v in load_file(f).items()}
    with TorchDistCheckpoint(streamed["path"]) as ckpt:
        stored = ckpt.read_tensor("decoder.layers.mlp.linear_fc1.weight")
    for layer in range(LAYERS):
        want = torch.cat([hf_tensors[f"model.layers.{layer}.mlp.gate_proj.weight"],
                          hf_tensors[f"model.layers.{layer}.mlp.up_proj.weight"]])
        assert torch.equal(stored[layer], want), layer
