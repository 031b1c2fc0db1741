"""Lazy safetensors source and streaming sharded writer, checked against safetensors' and transformers' own I/O."""

from __future__ import annotations

import json
import os
import weakref
import struct
import threading
import warnings

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from megatron_bridge_ext.io import (
    SAFE_WEIGHTS_INDEX_NAME,
    SAFE_WEIGHTS_NAME,
    SafeTensorsSource,
    SafeTensorsWriter,
    save_hf_tensors,
)

torch.set_num_threads(1)


def _bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit equality for every dtype (torch.equal lacks some fp8/unsigned kernels on CPU)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if a.numel() == 0:
        return True
    return torch.equal(a.contiguous().view(-1).view(torch.uint8), b.contiguous().view(-1).view(torch.uint8))


def _all_dtypes_tensors() -> dict:
    g = torch.Generator().manual_seed(0)
    base = torch.randn(5, 7, generator=g)
    out = {
        "f64": base.double(),
        "f32": base,
        "f16": base.half(),
        "bf16": base.bfloat16(),
        "i64": torch.randint(-(2**40), 2**40, (3, 4), generator=g),
        "i32": torch.randint(-(2**30), 2**30, (6,), generator=g, dtype=torch.int32),
        "i16": torch.randint(-(2**14), 2**14, (2, 3, 4), generator=g, dtype=torch.int16),
        "i8": torch.randint(-100, 100, (9,), generator=g, dtype=torch.int8),
        "u8": torch.randint(0, 255, (4, 4), generator=g, dtype=torch.uint8),
        "bool": torch.rand(3, 5, generator=g) > 0.5,
        "f8_e4m3": base.to(torch.float8_e4m3fn),
        "f8_e5m2": base.to(torch.float8_e5m2),
        "scalar": torch.tensor(3.5),
        "empty": torch.empty(0, 4),
    }
    return out


def _raw_header(path: str) -> tuple:
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        return n, json.loads(f.read(n))


def _write_raw(path: str, header: dict, data: bytes) -> None:
    raw = json.dumps(header).encode()
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        f.write(data)


# ---------------------------------------------------------------------------------------------------------------------
# Reading


def test_single_file_all_dtypes_match_safetensors(tmp_path):
    tensors = _all_dtypes_tensors()
    save_file(tensors, str(tmp_path / SAFE_WEIGHTS_NAME), metadata={"format": "pt", "who": "test"})
    ref = load_file(str(tmp_path / SAFE_WEIGHTS_NAME))
    for path in (tmp_path, tmp_path / SAFE_WEIGHTS_NAME):
        with SafeTensorsSource(path) as src:
            assert sorted(src.keys()) == sorted(tensors)
            assert len(src) == len(tensors)
            assert src.metadata == {"format": "pt", "who": "test"}
            assert src.files == [str(tmp_path / SAFE_WEIGHTS_NAME)]
            for k, t in tensors.items():
                assert k in src
                got = src[k]
                assert _bits_equal(got, ref[k]), k
                assert _bits_equal(got, t), k
                assert src.dtype(k) == t.dtype and src.shape(k) == tuple(t.shape)
                assert src.nbytes(k) == t.numel() * t.element_size()
                assert src.file_of(k) == str(tmp_path / SAFE_WEIGHTS_NAME)
            assert "nope" not in src
            assert src.get("nope") is None
            assert _bits_equal(src.get("bf16"), tensors["bf16"])


def test_keys_in_file_order_and_views_are_zero_copy(tmp_path):
    tensors = {f"t{i}": torch.full((i + 1, 3), float(i)) for i in range(6)}
    path = str(tmp_path / "w.safetensors")
    save_file(tensors, path)
    n, header = _raw_header(path)
    by_offset = sorted((v["data_offsets"][0], k) for k, v in header.items() if k != "__metadata__")
    with SafeTensorsSource(path) as src:
        assert src.keys() == [k for _, k in by_offset]
        views = {k: src[k] for k in src.keys()}
        base = views[by_offset[0][1]].data_ptr() - by_offset[0][0]
        for off, k in by_offset:
            # Every tensor sits at its file offset inside one mapping of the file: no copy was made.
            assert views[k].data_ptr() - base == off
        # Views are writable (copy-on-write) and the file is untouched.
        views["t3"].fill_(-1.0)
        assert torch.equal(src["t3"], torch.full((4, 3), -1.0))  # same private map
    assert torch.equal(load_file(path)["t3"], tensors["t3"])
    # Views outlive close(): they keep their map alive.
    assert torch.equal(views["t5"], tensors["t5"])
    with pytest.raises(ValueError, match="closed"):
        src["t1"]


def _mapping_rss_kb(path: str) -> int:
    total, inside = 0, False
    with open("/proc/self/smaps") as f:
        for line in f:
            first = line.split(maxsplit=1)[0]
            if "-" in first and not first.endswith(":"):
                inside = line.rstrip().endswith(path)
            elif inside and first == "Rss:":
                total += int(line.split()[1])
    return total


@pytest.mark.skipif(not os.path.exists("/proc/self/smaps"), reason="needs Linux /proc/self/smaps")
def test_partial_read_touches_only_its_pages(tmp_path):
    rows, cols = 8192, 1024  # 32 MiB of fp32
    big = torch.arange(rows * cols, dtype=torch.float32).view(rows, cols)
    path = str(tmp_path / "big.safetensors")
    save_file({"big": big}, path)
    del big
    real = os.path.realpath(path)
    with SafeTensorsSource(path) as src:
        view = src["big"]
        assert _mapping_rss_kb(real) == 0  # nothing read yet
        sl = view[5000:5004].clone()  # 16 KiB
        assert torch.equal(sl, torch.arange(5000 * cols, 5004 * cols, dtype=torch.float32).view(4, cols))
        rss_kb = _mapping_rss_kb(real)
        # The kernel maps whole folios (up to 2 MiB on ext4), still far below the 32 MiB of the tensor.
        assert 0 < rss_kb <= 4096, f"reading 16 KiB of a 32 MiB tensor mapped {rss_kb} KiB"
        del view
    # close() unmaps a shard once no view of it is alive
    with open("/proc/self/maps") as f:
        assert real not in f.read()


def test_sharded_transformers_checkpoint(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    model.save_pretrained(str(tmp_path), max_shard_size="20KB")
    index = json.loads((tmp_path / SAFE_WEIGHTS_INDEX_NAME).read_text())
    shard_files = sorted(set(index["weight_map"].values()))
    assert len(shard_files) > 2
    with SafeTensorsSource(tmp_path, require_config=True) as src:
        assert set(src.keys()) == set(index["weight_map"])
        assert src.files == [str(tmp_path / f) for f in shard_files]
        # keys() goes shard by shard
        shard_pos = [shard_files.index(index["weight_map"][k]) for k in src.keys()]
        assert shard_pos == sorted(shard_pos)
        assert src.config()["hidden_size"] == 32
        state = model.state_dict()
        for f in shard_files:
            ref = load_file(str(tmp_path / f))
            for k, t in ref.items():
                assert src.file_of(k) == str(tmp_path / f)
                assert _bits_equal(src[k], t), k
                assert _bits_equal(src[k], state[k]), k
        assert src.total_size == sum(t.numel() * t.element_size() for t in state.values())


# ---- validation ----------------------------------------------------------------------------------------------------


def test_missing_checkpoint_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="neither a directory nor a file"):
        SafeTensorsSource(tmp_path / "nothing")
    with pytest.raises(FileNotFoundError, match="no model.safetensors"):
        SafeTensorsSource(tmp_path)
    save_file({"a": torch.ones(2)}, str(tmp_path / SAFE_WEIGHTS_NAME))
    with pytest.raises(FileNotFoundError, match="config.json is missing"):
        SafeTensorsSource(tmp_path, require_config=True)
    with SafeTensorsSource(tmp_path) as src:
        with pytest.raises(KeyError, match=r"'b'.*" + str(tmp_path)):
            src["b"]
        with pytest.raises(KeyError, match="'b'"):
            src.shape("b")


def _sharded(tmp_path):
    save_file({"a": torch.ones(2), "b": torch.zeros(3)}, str(tmp_path / "model-00001-of-00002.safetensors"))
    save_file({"c": torch.arange(4.0)}, str(tmp_path / "model-00002-of-00002.safetensors"))
    index = {
        "metadata": {"total_size": 36},
        "weight_map": {
            "a": "model-00001-of-00002.safetensors",
            "b": "model-00001-of-00002.safetensors",
            "c": "model-00002-of-00002.safetensors",
        },
    }
    (tmp_path / SAFE_WEIGHTS_INDEX_NAME).write_text(json.dumps(index))
    return index


def test_index_errors(tmp_path):
    index = _sharded(tmp_path)
    with SafeTensorsSource(tmp_path) as src:
        assert src.keys() == ["a", "b", "c"] or src.keys() == ["b", "a", "c"]
        assert src.index_metadata == {"total_size": 36}
        assert torch.equal(src["c"], torch.arange(4.0))
    # key listed but absent from its shard
    index["weight_map"]["d"] = "model-00002-of-00002.safetensors"
    (tmp_path / SAFE_WEIGHTS_INDEX_NAME).write_text(json.dumps(index))
    with pytest.raises(ValueError, match=r"'d'.*model-00002-of-00002.safetensors"):
        SafeTensorsSource(tmp_path)
    del index["weight_map"]["d"]
    (tmp_path / SAFE_WEIGHTS_INDEX_NAME).write_text(json.dumps(index))
    # shard removed
    os.remove(tmp_path / "model-00002-of-00002.safetensors")
    with pytest.raises(FileNotFoundError, match=r"model-00002-of-00002.safetensors is missing.*'c'"):
        SafeTensorsSource(tmp_path)
    # a lone shard without its index is not a checkpoint
    os.remove(tmp_path / SAFE_WEIGHTS_INDEX_NAME)
    with pytest.raises(FileNotFoundError, match="model-00001-of-00002.safetensors of 2 .*index.json is missing"):
        SafeTensorsSource(tmp_path)
    (tmp_path / SAFE_WEIGHTS_INDEX_NAME).write_text("{not json")
    with pytest.raises(ValueError, match="corrupt index JSON"):
        SafeTensorsSource(tmp_path)


def test_truncated_file(tmp_path):
    path = tmp_path / SAFE_WEIGHTS_NAME
    save_file({"first": torch.ones(64), "last": torch.ones(8, dtype=torch.float64)}, str(path))
    data = path.read_bytes()
    path.write_bytes(data[:-10])
    with pytest.raises(ValueError, match=rf"{path}.*tensor '(first|last)'.*truncated"):
        SafeTensorsSource(tmp_path)
    path.write_bytes(data[:5])
    with pytest.raises(ValueError, match=rf"{path}: file is 5 bytes"):
        SafeTensorsSource(path)


def test_header_length_larger_than_file(tmp_path):
    path = tmp_path / SAFE_WEIGHTS_NAME
    save_file({"a": torch.ones(4)}, str(path))
    data = bytearray(path.read_bytes())
    data[:8] = struct.pack("<Q", len(data) + 100)
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=rf"{path}: header length {len(data) + 100} is larger"):
        SafeTensorsSource(tmp_path)


def test_scrambled_header(tmp_path):
    path = tmp_path / SAFE_WEIGHTS_NAME
    save_file({"a": torch.ones(4)}, str(path))
    data = bytearray(path.read_bytes())
    data[8:14] = b"#!@x%^"
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=rf"{path}: corrupt safetensors header"):
        SafeTensorsSource(tmp_path)


def test_unknown_dtype_and_size_mismatch(tmp_path):
    path = str(tmp_path / "x.safetensors")
    _write_raw(path, {"w": {"dtype": "F7", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 8)
    with pytest.raises(ValueError, match=r"x.safetensors: tensor 'w' has unknown dtype 'F7'"):
        SafeTensorsSource(path)
    _write_raw(path, {"w": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, b"\0" * 8)
    with pytest.raises(ValueError, match=r"tensor 'w': data_offsets \[0, 8\] span 8 bytes but shape \[3\]"):
        SafeTensorsSource(path)
    _write_raw(path, {"w": {"dtype": "F32", "shape": [2]}}, b"\0" * 8)
    with pytest.raises(ValueError, match=r"tensor 'w'.*lacks"):
        SafeTensorsSource(path)
    _write_raw(path, [1, 2], b"")
    with pytest.raises(ValueError, match="header is a list"):
        SafeTensorsSource(path)


def test_misaligned_tensor_is_read_correctly(tmp_path):
    # A hand-made file whose data section is not aligned: the reader must still return the right values.
    path = str(tmp_path / "odd.safetensors")
    vals = torch.tensor([1.5, -2.25, 3.0], dtype=torch.float32)
    header = {"w": {"dtype": "F32", "shape": [3], "data_offsets": [1, 13]},
              "b": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]}}
    _write_raw(path, header, b"\x07" + vals.numpy().tobytes())
    with SafeTensorsSource(path) as src:
        assert torch.equal(src["w"], vals)
        assert src["b"].tolist() == [7]
    ref = load_file(path)
    assert torch.equal(ref["w"], vals)


# ---------------------------------------------------------------------------------------------------------------------
# Writing


def _specs(tensors: dict) -> dict:
    return {k: (tuple(t.shape), t.dtype) for k, t in tensors.items()}


def _sample(n: int = 7) -> dict:
    g = torch.Generator().manual_seed(1)
    out = {}
    for i in range(n):
        dt = [torch.float32, torch.bfloat16, torch.float8_e4m3fn, torch.int64][i % 4]
        out[f"layers.{i}.w"] = torch.randn(8 + i, 4, generator=g).to(dt)
    return out


@pytest.mark.parametrize("fsync", [True, False])
def test_writer_round_trip_multi_shard(tmp_path, fsync):
    tensors = _sample()
    shard_limit = 200
    with SafeTensorsWriter(tmp_path, _specs(tensors), max_shard_bytes=shard_limit, fsync=fsync) as w:
        plan = w.shard_plan
        assert w.num_shards > 2
        for k, t in tensors.items():
            w.add(k, t)
        summary = w.close()
    index = json.loads((tmp_path / SAFE_WEIGHTS_INDEX_NAME).read_text())
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    assert index["metadata"]["total_size"] == total == summary["total_size"]
    assert set(index["weight_map"]) == set(tensors)
    for fname, keys in plan.items():
        ref = load_file(str(tmp_path / fname))
        assert set(ref) == set(keys)
        assert all(index["weight_map"][k] == fname for k in keys)
        # each shard respects the limit unless it holds a single larger tensor
        size = sum(ref[k].numel() * ref[k].element_size() for k in keys)
        assert size <= shard_limit or len(keys) == 1
        for k in keys:
            assert _bits_equal(ref[k], tensors[k]), k
        with safe_open(str(tmp_path / fname), "pt") as f:
            assert f.metadata() == {"format": "pt"}
    with SafeTensorsSource(tmp_path) as src:
        assert src.keys() == list(tensors)  # written in expected order (same element size within a shard here)
        for k, t in tensors.items():
            assert _bits_equal(src[k], t)
    assert not [f for f in os.listdir(tmp_path) if "tmp" in f]
    assert not [t for t in threading.enumerate() if t.name in ("writeback", "direct-hash", "direct-write")]  # ended


@pytest.mark.parametrize("direct", ["1", "0"])
def test_writer_starts_a_writeback_thread_only_for_page_cache_writes(tmp_path, monkeypatch, direct):
    """Where the shards are written with O_DIRECT, no write-back thread is started (nothing would use it); written
    through the page cache (``MEGATRON_BRIDGE_DIRECT_IO=0``), the write-back of each range starts on its own thread."""
    from megatron_bridge_ext.io import direct_io

    monkeypatch.setenv(direct_io.DIRECT_IO_ENV, direct)
    probe = tmp_path / ".probe"
    probe.write_bytes(b"")
    try:
        os.close(os.open(probe, os.O_WRONLY | os.O_DIRECT))
        takes_direct = True
    except OSError:
        takes_direct = False
    tensors = {f"w{i}": torch.randn(64, 257).to(torch.bfloat16) for i in range(4)}
    seen = set()
    w = SafeTensorsWriter(tmp_path / "out", _specs(tensors), max_shard_bytes=1 << 20, fsync=True)
    for k, t in tensors.items():
        w.add(k, t)
        seen |= {t.name for t in threading.enumerate()}
    w.close()
    assert ("writeback" in seen) == (direct == "0" or not takes_direct), sorted(seen)
    with SafeTensorsSource(tmp_path / "out") as src:
        assert all(_bits_equal(src[k], t) for k, t in tensors.items())


def test_writer_abort_ends_its_writeback_thread(tmp_path):
    tensors = _sample()
    w = SafeTensorsWriter(tmp_path / "out", _specs(tensors), max_shard_bytes=200, fsync=True)
    w.add(*next(iter(tensors.items())))
    w.abort()
    assert not [t for t in threading.enumerate() if t.name in ("writeback", "direct-hash", "direct-write")]
    assert not os.path.exists(tmp_path / "out") or not os.listdir(tmp_path / "out")


def test_writer_single_shard_name_and_no_index(tmp_path):
    tensors = _sample(3)
    summary = save_hf_tensors(tmp_path, reversed(list(tensors.items())), _specs(tensors), show_progress=True)
    assert sorted(os.listdir(tmp_path)) == [SAFE_WEIGHTS_NAME]
    assert summary["index"] is None and summary["files"] == [str(tmp_path / SAFE_WEIGHTS_NAME)]
    ref = load_file(str(tmp_path / SAFE_WEIGHTS_NAME))
    assert all(_bits_equal(ref[k], t) for k, t in tensors.items())


def test_shards_appear_as_soon_as_complete_out_of_order(tmp_path):
    tensors = {f"k{i}": torch.full((16,), float(i)) for i in range(6)}  # 64 bytes each
    w = SafeTensorsWriter(tmp_path, _specs(tensors), max_shard_bytes=128)  # 3 shards of 2
    assert w.shard_plan == {
        "model-00001-of-00003.safetensors": ["k0", "k1"],
        "model-00002-of-00003.safetensors": ["k2", "k3"],
        "model-00003-of-00003.safetensors": ["k4", "k5"],
    }
    def visible():  # shards appear in the staging directory; the output directory gets them all at close()
        return sorted(f for f in os.listdir(w.work_dir) if not f.startswith("."))

    assert w.add("k5", tensors["k5"]) is None
    k2 = tensors["k2"].clone()
    assert w.add("k2", k2) is None
    assert visible() == []  # only hidden temporary files so far
    # the tensor was written to its place at once: the writer keeps no reference to it
    k2_ref = weakref.ref(k2)
    del k2
    assert k2_ref() is None
    written = w.add("k3", tensors["k3"])
    assert written == os.path.join(w.work_dir, "model-00002-of-00003.safetensors")
    assert visible() == ["model-00002-of-00003.safetensors"]
    assert torch.equal(load_file(written)["k3"], tensors["k3"])
    assert torch.equal(load_file(written)["k2"], tensors["k2"])
    w.add("k4", tensors["k4"])
    assert "model-00003-of-00003.safetensors" in os.listdir(w.work_dir)
    assert SAFE_WEIGHTS_INDEX_NAME not in os.listdir(w.work_dir)
    w.add("k0", tensors["k0"])
    w.add("k1", tensors["k1"])
    assert SAFE_WEIGHTS_INDEX_NAME not in os.listdir(w.work_dir)  # the index comes last
    assert os.listdir(tmp_path) == []  # nothing in the output directory before the swap
    w.close()
    assert SAFE_WEIGHTS_INDEX_NAME in os.listdir(tmp_path)


def test_writer_rejects_bad_tensors(tmp_path):
    tensors = _sample(3)
    w = SafeTensorsWriter(tmp_path, _specs(tensors))
    with pytest.raises(ValueError, match="unexpected tensor 'bogus'"):
        w.add("bogus", torch.zeros(1))
    w.add("layers.0.w", tensors["layers.0.w"])
    with pytest.raises(ValueError, match="'layers.0.w' was already added"):
        w.add("layers.0.w", tensors["layers.0.w"])
    with pytest.raises(ValueError, match=r"'layers.1.w': got shape \(9, 5\).*expected \(9, 4\)"):
        w.add("layers.1.w", torch.zeros(9, 5, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match=r"'layers.1.w': got shape \(9, 4\) torch.float32, expected \(9, 4\) torch.b"):
        w.add("layers.1.w", torch.zeros(9, 4))
    w.abort()
    with pytest.raises(ValueError, match="closed"):
        w.add("layers.1.w", tensors["layers.1.w"])
    with pytest.raises(ValueError, match="no expected tensors"):
        SafeTensorsWriter(tmp_path, {})


def test_strict_failure_leaves_no_index(tmp_path):
    tensors = {f"k{i}": torch.full((16,), float(i)) for i in range(6)}
    w = SafeTensorsWriter(tmp_path, _specs(tensors), max_shard_bytes=128)
    for k in ("k0", "k1", "k2", "k5"):
        w.add(k, tensors[k])
    with pytest.raises(ValueError, match=r"2 of 6 expected tensors never arrived: \['k3', 'k4'\]"):
        w.close()
    # the whole save is staged: the output directory is left as it was (empty), and no staging directory remains
    assert os.listdir(tmp_path) == []
    assert not [f for f in os.listdir(tmp_path.parent) if f.startswith(f".{tmp_path.name}.")]
    with pytest.raises(FileNotFoundError):
        SafeTensorsSource(tmp_path)


def test_strict_failure_single_shard_leaves_nothing(tmp_path):
    tensors = _sample(3)
    with pytest.raises(ValueError, match=r"never arrived: \['layers.2.w'\]"):
        with SafeTensorsWriter(tmp_path, _specs(tensors)) as w:
            w.add("layers.0.w", tensors["layers.0.w"])
            w.add("layers.1.w", tensors["layers.1.w"])
    assert os.listdir(tmp_path) == []


def test_exception_inside_with_leaves_no_index(tmp_path):
    tensors = {f"k{i}": torch.full((16,), float(i)) for i in range(4)}
    with pytest.raises(RuntimeError, match="boom"):
        with SafeTensorsWriter(tmp_path, _specs(tensors), max_shard_bytes=128) as w:
            for k, t in tensors.items():
                w.add(k, t)  # both shards complete and written
            raise RuntimeError("boom")
    assert SAFE_WEIGHTS_INDEX_NAME not in os.listdir(tmp_path)


def test_non_strict_writes_what_arrived(tmp_path):
    tensors = {f"k{i}": torch.full((16,), float(i)) for i in range(6)}
    w = SafeTensorsWriter(tmp_path, _specs(tensors), max_shard_bytes=128, strict=False)
    for k in ("k0", "k2", "k3", "k5"):
        w.add(k, tensors[k])
    with pytest.warns(UserWarning, match=r"\['k1', 'k4'\]"):
        summary = w.close()
    index = json.loads((tmp_path / SAFE_WEIGHTS_INDEX_NAME).read_text())
    assert set(index["weight_map"]) == {"k0", "k2", "k3", "k5"}
    assert index["metadata"]["total_size"] == 4 * 64 == summary["total_size"]
    assert summary["missing"] == ["k1", "k4"]
    with SafeTensorsSource(tmp_path) as src:
        for k in ("k0", "k2", "k3", "k5"):
            assert torch.equal(src[k], tensors[k])


def test_non_contiguous_inputs(tmp_path):
    base = torch.arange(60, dtype=torch.float32).view(6, 10)
    tensors = {"t": base.t(), "s": base[:, ::3], "e": base.expand(2, 6, 10), "z": base[2]}
    save_hf_tensors(tmp_path, tensors.items(), _specs(tensors))
    ref = load_file(str(tmp_path / SAFE_WEIGHTS_NAME))
    for k, t in tensors.items():
        assert torch.equal(ref[k], t), k
    assert base.is_contiguous() and tensors["t"].stride() == (1, 10)  # inputs untouched


def test_stale_checkpoint_files(tmp_path):
    (tmp_path / SAFE_WEIGHTS_INDEX_NAME).write_text("{}")
    (tmp_path / "model-00001-of-00009.safetensors").write_bytes(b"old")
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(FileExistsError, match="model-00001-of-00009"):
        SafeTensorsWriter(tmp_path, {"a": ((1,), torch.float32)}, overwrite=False)
    save_hf_tensors(tmp_path, [("a", torch.ones(1))], {"a": ((1,), torch.float32)})
    assert sorted(os.listdir(tmp_path)) == ["config.json", SAFE_WEIGHTS_NAME]


def test_written_checkpoint_loads_in_transformers(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=40, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(cfg)
    state = {k: v for k, v in model.state_dict().items()}
    cfg.save_pretrained(str(tmp_path))
    items = list(state.items())[::-1]  # arrival order differs from file order
    summary = save_hf_tensors(tmp_path, items, _specs(state), max_shard_bytes=16 * 1024)
    assert summary["index"] is not None and len(summary["files"]) > 2
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = LlamaForCausalLM.from_pretrained(str(tmp_path))
    for k, v in loaded.state_dict().items():
        assert torch.equal(v, state[k]), k



@pytest.mark.skipif(not hasattr(os, "posix_fadvise"), reason="needs posix_fadvise (Linux)")
def test_read_ahead_fills_the_page_cache_not_the_process(tmp_path):
    """``read_ahead`` starts the disk reads of the named tensors (their pages reach the page cache, the other
    tensor's do not) without mapping anything into the process; unknown names are ignored; after ``close`` it asks
    for nothing."""
    from page_cache import cached_fraction, wait_cached

    a, b = torch.arange(4 << 20, dtype=torch.float32), torch.arange(4 << 20, dtype=torch.float32) * 2  # 16 MiB each
    path = str(tmp_path / "two.safetensors")
    save_file({"a": a, "b": b}, path)
    real = os.path.realpath(path)
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)  # clean pages leave the page cache (not on tmpfs)
    finally:
        os.close(fd)
    with SafeTensorsSource(path) as src:
        ea, eb = src._entry("a"), src._entry("b")
        evictable = cached_fraction(real, eb.start, eb.end) < 0.5
        assert src.read_ahead(["b", "not-a-tensor"]) == eb.end - eb.start
        assert wait_cached(real, eb.start, eb.end) >= 0.99
        if evictable:  # "a" was not asked for (a page at the boundary may come with "b")
            assert cached_fraction(real, ea.start, ea.end) < 0.5
        assert _mapping_rss_kb(real) == 0  # nothing mapped into the process
        assert torch.equal(src["b"], b)
    assert src.read_ahead(["a"]) == 0
