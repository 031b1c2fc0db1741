"""The Megatron side as a trust boundary, as a user meets it on the command line (subprocesses, tiny Llama).

- ``import`` writes ``integrity.json`` (every file, SHA-256); ``verify --checksums`` passes, then names a file whose
  tensor bytes were flipped; ``export`` refuses that checkpoint naming the file, writing nothing; ``--no-checksums``
  skips the check (and the flipped value then reaches the export: what the manifest is for).
- A payload in a tensor chunk, and a truncated ``.distcp``: ``export`` fails naming the file, the tensor key (and the
  class), nothing runs, nothing is written.
- Checkpoints written by megatron-core 0.19.2 (common state inside the ``.distcp`` files, no ``common.pt``): by this
  package's ``import`` run in the 0.19.2 environment, and by megatron-core 0.19.2's plain ``dist_checkpointing.save``
  of a GPTModel; ``inspect``, ``export`` and ``verify`` read them under whichever megatron-core runs the tests, the
  export bit-exact to the HF source.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import zipfile

import pytest
import torch

pytest.importorskip("megatron.core")
transformers = pytest.importorskip("transformers")

from megatron_bridge_ext.testing.parity import compare_checkpoints  # noqa: E402
from megatron_bridge_ext.testing.tiny_models import make_tiny_checkpoint  # noqa: E402

TESTS = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # tests/, which holds dcp_fixture_writer.py
ROOT = os.path.dirname(TESTS)
LLAMA = dict(vocab_size=211, hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, head_dim=16, max_position_embeddings=128, rms_norm_eps=1e-5, rope_theta=10000.0,
             tie_word_embeddings=False)


def _env():
    return {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
            "GLOO_SOCKET_IFNAME": os.environ.get("GLOO_SOCKET_IFNAME", "lo")}


def _cli(*args: str, python: str = sys.executable, timeout: int = 900) -> subprocess.CompletedProcess:
    return subprocess.run([python, "-m", "megatron_bridge_ext", *args], capture_output=True, text=True,
                          timeout=timeout, env=_env(), cwd=ROOT)


def _python_019():
    for py in os.environ.get("MBE_MCORE_PYTHONS", "").split() or [sys.executable]:
        if not os.path.isfile(py):
            continue
        res = subprocess.run([py, "-c", "import importlib.metadata as m; print(m.version('megatron-core'))"],
                             capture_output=True, text=True, timeout=120)
        if res.returncode == 0 and res.stdout.strip() == "0.19.2":
            return py
    pytest.skip("no environment with megatron-core 0.19.2 in MBE_MCORE_PYTHONS (make test builds it)")


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("trust") / "hf")
    make_tiny_checkpoint(path, "Llama", LLAMA, seed=0)  # random norms, the rest as transformers initialises it
    return path


@pytest.fixture(scope="module")
def imported(llama, tmp_path_factory):
    meg = str(tmp_path_factory.mktemp("trust_meg") / "megatron")
    res = _cli("import", llama, meg, "--tp", "2")
    assert res.returncode == 0, res.stdout + res.stderr
    return meg


def _copy(meg: str, dst) -> str:
    shutil.copytree(meg, str(dst))
    return str(dst)


def _metadata(it: str):
    import pickle

    with open(os.path.join(it, ".metadata"), "rb") as f:
        return pickle.load(f)  # written by this test's own import: trusted


def _largest_chunk(it: str):
    """(file, byte offset of its tensor data, key) of the largest tensor chunk."""
    md = _metadata(it)
    index, info = max(((i, s) for i, s in md.storage_data.items() if i.offset is not None),
                      key=lambda kv: kv[1].length)
    path = os.path.join(it, info.relative_path)
    with open(path, "rb") as f:
        f.seek(info.offset)
        blob = f.read(info.length)
    import io

    z = zipfile.ZipFile(io.BytesIO(blob))
    data = next(zi for zi in z.infolist() if zi.filename.endswith("/data/0"))
    local = blob[data.header_offset:data.header_offset + 30]
    start = data.header_offset + 30 + int.from_bytes(local[26:28], "little") + int.from_bytes(local[28:30], "little")
    return info.relative_path, info.offset + start, index.fqn


def test_import_writes_a_manifest_of_every_file(imported):
    it = os.path.join(imported, "iter_0000000")
    manifest = json.load(open(os.path.join(it, "integrity.json")))
    names = sorted(os.path.relpath(os.path.join(d, n), it) for d, _, files in os.walk(it) for n in files
                   if n != "integrity.json" or d != it)
    assert manifest["algorithm"] == "sha256" and sorted(manifest["files"]) == names
    assert any(n.endswith(".distcp") for n in names) and ".metadata" in names and "metadata.json" in names
    assert "hf/config.json" in names  # the side files import keeps
    for n in names:
        assert manifest["files"][n] == hashlib.sha256(open(os.path.join(it, n), "rb").read()).hexdigest(), n


def test_a_flipped_tensor_byte_is_named_by_verify_and_stops_export(llama, imported, tmp_path):
    good = _cli("verify", "--checksums", imported)
    assert good.returncode == 0 and "PASS" in good.stdout and "CHANGED" not in good.stdout, good.stdout + good.stderr
    bad = _copy(imported, tmp_path / "bad")
    it = os.path.join(bad, "iter_0000000")
    name, at, key = _largest_chunk(it)
    with open(os.path.join(it, name), "r+b") as f:
        f.seek(at + 6)
        b = f.read(1)
        f.seek(at + 6)
        f.write(bytes([b[0] ^ 0x40]))
    res = _cli("verify", "--checksums", bad)
    assert res.returncode == 1, res.stdout + res.stderr
    changed = [ln for ln in res.stdout.splitlines() if ln.startswith("CHANGED")]
    assert len(changed) == 1 and changed[0].startswith(f"CHANGED {name}: changed (sha256 "), res.stdout
    out = str(tmp_path / "out")
    res = _cli("export", bad, out)
    assert res.returncode == 1 and name in res.stderr and "integrity.json" in res.stderr, res.stderr
    assert not os.path.exists(out)
    # skipping the check: the export runs, and the flipped value reaches the HF checkpoint
    res = _cli("export", bad, out, "--no-checksums")
    assert res.returncode == 0, res.stdout + res.stderr
    assert "checksums skipped" in res.stdout
    cmp = compare_checkpoints(llama, out)
    assert cmp["same_keys"] and len(cmp["mismatched"]) == 1, cmp


def test_a_payload_in_a_chunk_and_a_truncated_file_stop_export_before_anything_is_written(imported, tmp_path):
    import io
    import pickle

    from torch.distributed.checkpoint.filesystem import _StorageInfo

    class Payload:
        def __reduce__(self):
            return (exec, (f"open({str(tmp_path / 'ran')!r}, 'w').close()",))

    bad = _copy(imported, tmp_path / "payload")
    it = os.path.join(bad, "iter_0000000")
    os.remove(os.path.join(it, "integrity.json"))  # whoever plants a payload drops (or rewrites) the manifest too
    md = _metadata(it)
    index, info = next((i, s) for i, s in md.storage_data.items() if i.fqn == "output_layer.weight")
    buf = io.BytesIO()
    torch.save({"t": torch.zeros(1), "p": Payload()}, buf)
    path = os.path.join(it, info.relative_path)
    start = os.path.getsize(path)
    with open(path, "ab") as f:
        f.write(buf.getvalue())
    md.storage_data[index] = _StorageInfo(info.relative_path, start, len(buf.getvalue()))
    with open(os.path.join(it, ".metadata"), "wb") as f:
        pickle.dump(md, f)
    out = str(tmp_path / "out")
    res = _cli("export", bad, out)
    assert res.returncode == 1, res.stdout + res.stderr
    assert path in res.stderr and "output_layer.weight (chunk at" in res.stderr and "builtins.exec" in res.stderr, \
        res.stderr
    assert not os.path.exists(tmp_path / "ran") and not os.path.exists(out)

    short = _copy(imported, tmp_path / "short")
    it = os.path.join(short, "iter_0000000")
    name, _, key = _largest_chunk(it)
    with open(os.path.join(it, name), "r+b") as f:
        f.truncate(os.path.getsize(os.path.join(it, name)) // 2)
    res = _cli("export", short, out, "--no-checksums")
    assert res.returncode == 1 and name in res.stderr and "truncated" in res.stderr, res.stderr
    assert not os.path.exists(out)


def test_import_under_megatron_core_019_reads_here(llama, tmp_path):
    """This package's import run in the megatron-core 0.19.2 environment (common state inside the .distcp files),
    read by inspect, export and verify in this environment; the export is bit-exact to the HF source."""
    py = _python_019()
    meg = str(tmp_path / "meg019")
    res = _cli("import", llama, meg, "--tp", "2", python=py)
    assert res.returncode == 0, res.stdout + res.stderr
    it = os.path.join(meg, "iter_0000000")
    assert not os.path.exists(os.path.join(it, "common.pt"))
    res = _cli("inspect", meg, "--json", "-")
    assert res.returncode == 0, res.stdout + res.stderr
    d = json.loads(res.stdout)
    assert d["common_state"] == "common_state object in the .distcp files" and d["written_by_megatron_bridge_ext"]
    assert d["architecture"] == "LlamaForCausalLM" and d["checksum_manifest"]
    out = str(tmp_path / "out")
    res = _cli("export", meg, out)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "files match their checksums" in res.stdout, res.stdout
    cmp = compare_checkpoints(llama, out)
    assert cmp["same_keys"] and cmp["bit_exact"], cmp
    res = _cli("verify", llama, meg, "--checksums", "--tp", "2")
    assert res.returncode == 0 and "PASS" in res.stdout, res.stdout + res.stderr


def test_plain_megatron_core_019_save_reads_here(llama, tmp_path):
    """A GPTModel written with megatron-core 0.19.2's own dist_checkpointing.save (no entry of this package, no
    manifest): inspect says so, export with --hf-source is bit-exact, verify passes."""
    py = _python_019()
    root = str(tmp_path / "plain019")
    res = subprocess.run([py, os.path.join(TESTS, "dcp_fixture_writer.py"), "model", llama, root],
                         capture_output=True, text=True, timeout=900, env=_env(), cwd=ROOT)
    assert res.returncode == 0, res.stdout + res.stderr
    res = _cli("inspect", root, "--json", "-")
    assert res.returncode == 0, res.stdout + res.stderr
    d = json.loads(res.stdout)
    assert not d["written_by_megatron_bridge_ext"] and d["architecture"] is None
    assert d["common_state"] == "common_state object in the .distcp files" and not d["checksum_manifest"]
    out = str(tmp_path / "out")
    res = _cli("export", root, out, "--hf-source", llama)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "no checksum manifest" in res.stdout
    cmp = compare_checkpoints(llama, out)
    assert cmp["same_keys"] and cmp["bit_exact"], cmp
    res = _cli("verify", llama, root)
    assert res.returncode == 0 and "PASS" in res.stdout, res.stdout + res.stderr
    res = _cli("verify", "--checksums", root)  # nothing to check against: said, not passed
    assert res.returncode == 1 and "no integrity.json" in res.stderr, res.stdout + res.stderr
