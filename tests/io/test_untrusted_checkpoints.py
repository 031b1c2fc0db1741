"""The checkpoint directory as a trust boundary: damaged, odd and hostile safetensors checkpoints are refused with the
file and the tensor named; HF-cache symlinks keep working; pickle weights are never unpickled."""

from __future__ import annotations

import json
import os
import pickle
import struct

import pytest
import torch
from safetensors.torch import save_file

from megatron_bridge_ext.io import SAFE_WEIGHTS_INDEX_NAME, SAFE_WEIGHTS_NAME, SafeTensorsSource


def _write_raw(path, header_json: str, data: bytes) -> None:
    raw = header_json.encode()
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        f.write(data)


def _entry(dtype, shape, begin, end) -> dict:
    return {"dtype": dtype, "shape": shape, "data_offsets": [begin, end]}


def _write_header(path, header: dict, data: bytes) -> None:
    _write_raw(path, json.dumps(header), data)


def _sharded(root, shards: dict, weight_map: dict) -> None:
    """shards: file name -> {tensor name: tensor}; weight_map: the index's, written as given."""
    for fname, tensors in shards.items():
        save_file(tensors, os.path.join(root, fname))
    with open(os.path.join(root, SAFE_WEIGHTS_INDEX_NAME), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)


# ---- the index stays inside the directory ---------------------------------------------------------------------------


@pytest.mark.parametrize("entry", ["../outside.safetensors", "../../etc/passwd", "/etc/passwd",
                                   "sub/../../outside.safetensors", "./model.safetensors", "sub//x.safetensors"])
def test_index_entry_leaving_the_directory_is_refused(tmp_path, entry):
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    save_file({"a": torch.ones(2)}, str(tmp_path / "outside.safetensors"))  # a real file it could reach
    (ckpt / SAFE_WEIGHTS_INDEX_NAME).write_text(json.dumps({"weight_map": {"a": entry}}))
    with pytest.raises(ValueError) as e:
        SafeTensorsSource(ckpt)
    msg = str(e.value)
    assert SAFE_WEIGHTS_INDEX_NAME in msg and repr(entry) in msg and "inside the checkpoint directory" in msg


def test_hf_cache_symlinks_stay_usable(tmp_path):
    """An HF cache snapshot: every file is a symlink to ../../blobs/<hash>; the index names plain file names."""
    repo = tmp_path / "models--org--tiny"
    blobs, snap = repo / "blobs", repo / "snapshots" / "0123abc"
    blobs.mkdir(parents=True)
    snap.mkdir(parents=True)
    tensors = {"a": torch.arange(4.0), "b": torch.ones(3, dtype=torch.bfloat16)}
    save_file({"a": tensors["a"]}, str(blobs / "h1"))
    save_file({"b": tensors["b"]}, str(blobs / "h2"))
    (blobs / "h3").write_text(json.dumps({"weight_map": {"a": "model-00001-of-00002.safetensors",
                                                         "b": "model-00002-of-00002.safetensors"}}))
    os.symlink("../../blobs/h1", snap / "model-00001-of-00002.safetensors")
    os.symlink("../../blobs/h2", snap / "model-00002-of-00002.safetensors")
    os.symlink("../../blobs/h3", snap / SAFE_WEIGHTS_INDEX_NAME)
    with SafeTensorsSource(snap) as src:
        assert sorted(src.keys()) == ["a", "b"]
        assert torch.equal(src["a"], tensors["a"]) and torch.equal(src["b"], tensors["b"])


def test_index_entry_that_is_not_a_regular_file(tmp_path):
    (tmp_path / "dir.safetensors").mkdir()
    (tmp_path / SAFE_WEIGHTS_INDEX_NAME).write_text(json.dumps({"weight_map": {"a": "dir.safetensors"}}))
    with pytest.raises(ValueError, match=r"dir.safetensors is not a regular file"):
        SafeTensorsSource(tmp_path)
    os.symlink(str(tmp_path / "gone"), tmp_path / "dangling.safetensors")
    (tmp_path / SAFE_WEIGHTS_INDEX_NAME).write_text(json.dumps({"weight_map": {"a": "dangling.safetensors"}}))
    with pytest.raises(ValueError, match=r"dangling.safetensors is a broken symlink"):
        SafeTensorsSource(tmp_path)


# ---- index and shards must agree -------------------------------------------------------------------------------------


def test_key_in_two_shards_is_refused(tmp_path):
    _sharded(tmp_path, {"model-00001-of-00002.safetensors": {"a": torch.ones(2), "b": torch.zeros(2)},
                        "model-00002-of-00002.safetensors": {"b": torch.full((2,), 7.0)}},
             {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"})
    with pytest.raises(ValueError) as e:
        SafeTensorsSource(tmp_path)
    msg = str(e.value)
    assert "'b'" in msg and "two shards" in msg
    assert "model-00001-of-00002.safetensors" in msg and "model-00002-of-00002.safetensors" in msg


def test_shard_tensor_missing_from_the_index_is_refused(tmp_path):
    _sharded(tmp_path, {"model-00001-of-00001.safetensors": {"a": torch.ones(2), "hidden": torch.zeros(2)}},
             {"a": "model-00001-of-00001.safetensors"})
    with pytest.raises(ValueError, match=r"model-00001-of-00001.safetensors: holds tensor 'hidden'.*does not list"):
        SafeTensorsSource(tmp_path)


def test_duplicate_name_in_the_index_is_refused(tmp_path):
    save_file({"a": torch.ones(2)}, str(tmp_path / "x.safetensors"))
    save_file({"a": torch.zeros(2)}, str(tmp_path / "y.safetensors"))
    (tmp_path / SAFE_WEIGHTS_INDEX_NAME).write_text(
        '{"weight_map": {"a": "x.safetensors", "a": "y.safetensors"}}')
    with pytest.raises(ValueError, match=rf"{SAFE_WEIGHTS_INDEX_NAME}: index JSON names 'a' twice"):
        SafeTensorsSource(tmp_path)


# ---- one header ------------------------------------------------------------------------------------------------------


def test_duplicate_name_in_one_header_is_refused(tmp_path):
    path = tmp_path / SAFE_WEIGHTS_NAME
    entry = json.dumps(_entry("F32", [2], 0, 8))
    _write_raw(path, '{"w": %s, "w": %s}' % (entry, entry.replace("[0, 8]", "[8, 16]")), b"\0" * 16)
    with pytest.raises(ValueError, match=rf"{path}: safetensors header .*names 'w' twice"):
        SafeTensorsSource(tmp_path)


def test_overlapping_byte_ranges_are_refused(tmp_path):
    path = tmp_path / SAFE_WEIGHTS_NAME
    _write_header(path, {"a": _entry("F32", [4], 0, 16), "b": _entry("F32", [2], 8, 16)}, b"\0" * 16)
    with pytest.raises(ValueError) as e:
        SafeTensorsSource(path)
    msg = str(e.value)
    assert str(path) in msg and "'a'" in msg and "'b'" in msg and "overlap" in msg
    # one range inside another, not adjacent in offset order
    _write_header(path, {"big": _entry("U8", [32], 0, 32), "x": _entry("U8", [4], 4, 8),
                         "y": _entry("U8", [4], 20, 24)}, b"\0" * 32)
    with pytest.raises(ValueError, match=r"'big' \[0, 32\) and 'x' \[4, 8\) overlap"):
        SafeTensorsSource(path)
    # adjacent ranges and empty tensors anywhere are fine
    _write_header(path, {"a": _entry("F32", [2], 0, 8), "e": _entry("F32", [0], 4, 4),
                         "b": _entry("F32", [2], 8, 16)}, b"\0" * 16)
    with SafeTensorsSource(path) as src:
        assert sorted(src.keys()) == ["a", "b", "e"] and src["e"].shape == (0,)


def test_out_of_range_bytes_are_refused(tmp_path):
    path = tmp_path / SAFE_WEIGHTS_NAME
    _write_header(path, {"a": _entry("F32", [4], 8, 24)}, b"\0" * 16)
    with pytest.raises(ValueError, match=r"tensor 'a': data_offsets \[8, 24\] end beyond the data section \(16 bytes"):
        SafeTensorsSource(path)


@pytest.mark.parametrize("shape,why", [
    ([True, 2], "invalid shape"),           # a JSON boolean is an int to Python
    ([2.0], "invalid shape"),
    ([-1, 4], "invalid shape"),
    (["2"], "invalid shape"),
    (4, "invalid shape"),
    ([2**63], "invalid shape"),              # past int64
    ([2**40, 2**40, 0], "more elements than an int64"),
])
def test_bad_shapes_are_refused(tmp_path, shape, why):
    path = tmp_path / SAFE_WEIGHTS_NAME
    _write_header(path, {"w": _entry("F32", shape, 0, 0)}, b"")
    with pytest.raises(ValueError, match=rf"{path}: tensor 'w'.*{why}"):
        SafeTensorsSource(path)


@pytest.mark.parametrize("offsets", [[True, 8], [0, 8.0], [8, 0], [0], [-8, 0], "0-8"])
def test_bad_offsets_are_refused(tmp_path, offsets):
    path = tmp_path / SAFE_WEIGHTS_NAME
    _write_header(path, {"w": {"dtype": "F32", "shape": [2], "data_offsets": offsets}}, b"\0" * 8)
    with pytest.raises(ValueError, match=r"tensor 'w': invalid data_offsets"):
        SafeTensorsSource(path)


def test_dtype_that_does_not_match_the_bytes_is_refused(tmp_path):
    path = tmp_path / SAFE_WEIGHTS_NAME
    _write_header(path, {"w": _entry("BF16", [4], 0, 16)}, b"\0" * 16)  # 4 bf16 are 8 bytes
    with pytest.raises(ValueError, match=r"tensor 'w': data_offsets \[0, 16\] span 16 bytes but shape \[4\] of BF16 "
                                         r"needs 8"):
        SafeTensorsSource(path)
    _write_header(path, {"w": _entry(["F32"], [4], 0, 16)}, b"\0" * 16)
    with pytest.raises(ValueError, match=r"tensor 'w' has unknown dtype \['F32'\]"):
        SafeTensorsSource(path)


def test_metadata_must_map_strings_to_strings(tmp_path):
    path = tmp_path / SAFE_WEIGHTS_NAME
    _write_header(path, {"__metadata__": {"format": "pt", "n": 3}, "w": _entry("F32", [1], 0, 4)}, b"\0" * 4)
    with pytest.raises(ValueError, match=r"__metadata__ values must be strings, got \{'n': 3\}"):
        SafeTensorsSource(path)


def test_duplicate_name_in_config_json_is_refused(tmp_path):
    save_file({"a": torch.ones(1)}, str(tmp_path / SAFE_WEIGHTS_NAME))
    (tmp_path / "config.json").write_text('{"hidden_size": 32, "hidden_size": 64}')
    with SafeTensorsSource(tmp_path) as src:
        with pytest.raises(ValueError, match=r"config.json: config.json names 'hidden_size' twice"):
            src.config()


# ---- pickle weights are never unpickled ------------------------------------------------------------------------------


class _Tripwire:
    """Unpickling this object creates a file: proof that something unpickled the checkpoint."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


@pytest.fixture
def pickle_only(tmp_path):
    ckpt = tmp_path / "pickle_ckpt"
    ckpt.mkdir()
    tripwire = str(tmp_path / "UNPICKLED")
    with open(ckpt / "pytorch_model.bin", "wb") as f:
        pickle.dump({"model.embed_tokens.weight": _Tripwire(tripwire)}, f)
    (ckpt / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"], "model_type": "llama",
                                                  "hidden_size": 32}))
    return str(ckpt), tripwire


def test_pickle_only_checkpoint_is_refused_by_the_source(pickle_only):
    ckpt, tripwire = pickle_only
    for path in (ckpt, os.path.join(ckpt, "pytorch_model.bin")):
        with pytest.raises(ValueError, match=r"pytorch_model.bin.*safetensors is required.*never unpickled"):
            SafeTensorsSource(path)
    assert not os.path.exists(tripwire)


def test_pickle_only_checkpoint_is_refused_by_autobridge(pickle_only):
    pytest.importorskip("transformers")
    from megatron_bridge_ext import AutoBridge

    ckpt, tripwire = pickle_only
    with pytest.raises(ValueError, match=r"pytorch_model.bin.*safetensors is required"):
        AutoBridge.from_hf_pretrained(ckpt)
    assert not os.path.exists(tripwire)


def test_pickle_only_checkpoint_is_refused_by_the_roundtrip_command(pickle_only, tmp_path):
    pytest.importorskip("transformers")
    from megatron_bridge_ext.cli.roundtrip import roundtrip

    ckpt, tripwire = pickle_only
    with pytest.raises(ValueError, match=r"pytorch_model.bin.*safetensors is required"):
        roundtrip(ckpt, str(tmp_path / "out"), tp=1, check_logits=True)
    assert not os.path.exists(tripwire)
