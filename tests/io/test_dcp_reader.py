"""The restricted torch_dist reader (``io/dcp_reader.py``) on checkpoints written by megatron-core itself.

Fixtures are written by ``dist_checkpointing.save`` of megatron-core 0.16.1 (common state in ``common.pt``) and 0.19.2
(common state as the ``common_state`` object inside the ``.distcp`` files), each in a subprocess of its own
environment's interpreter (``MBE_MCORE_PYTHONS``, set by ``make test``), and read here under whichever megatron-core
runs the tests. Their tensors are compared with the tensors the writer was given (``expected.safetensors``), bit for
bit. Then payloads (a pickle that would create a marker file) are put in ``.metadata``, the common state, a tensor
chunk and a sharded object: each payload is shown to be live (loading it the unsafe way creates the marker), and the
reader refuses it naming the file and the class, with no marker created. Structural faults are each named with the
file and the tensor key.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys

import pytest
import torch

pytest.importorskip("megatron.core")

from megatron_bridge_ext.io import dcp_reader  # noqa: E402
from megatron_bridge_ext.io.dcp_reader import (  # noqa: E402
    CheckpointFormatError,
    TorchDistCheckpoint,
    UnsafeCheckpointError,
    sharded_object_key,
)

TESTS = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # tests/, which holds dcp_fixture_writer.py
ROOT = os.path.dirname(TESTS)
VERSIONS = ("0.16.1", "0.19.2")


def _pythons() -> dict:
    """megatron-core version -> interpreter of an environment that has it (MBE_MCORE_PYTHONS, else this one)."""
    found = {}
    for py in (os.environ.get("MBE_MCORE_PYTHONS", "").split() or [sys.executable]):
        if not os.path.isfile(py):
            continue
        res = subprocess.run([py, "-c", "import importlib.metadata as m; print(m.version('megatron-core'))"],
                             capture_output=True, text=True, timeout=120)
        if res.returncode == 0:
            found.setdefault(res.stdout.strip(), py)
    return found


@pytest.fixture(scope="module")
def pythons():
    return _pythons()


@pytest.fixture(scope="module")
def written(pythons, tmp_path_factory):
    """version -> a checkpoint directory written by that megatron-core's dist_checkpointing.save."""
    out = {}
    for version in VERSIONS:
        if version not in pythons:
            continue
        d = str(tmp_path_factory.mktemp(f"dcp_{version}") / "ckpt")
        env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
               "GLOO_SOCKET_IFNAME": os.environ.get("GLOO_SOCKET_IFNAME", "lo")}
        res = subprocess.run([pythons[version], os.path.join(TESTS, "dcp_fixture_writer.py"), "tensors", d],
                             capture_output=True, text=True, timeout=600, env=env)
        assert res.returncode == 0, res.stdout + res.stderr
        out[version] = d
    return out


def _fixture(written, version: str, tmp_path) -> str:
    if version not in written:
        pytest.skip(f"no environment with megatron-core {version} (MBE_MCORE_PYTHONS lists the built ones)")
    dst = str(tmp_path / f"copy_{version}")
    shutil.copytree(written[version], dst)
    return dst


def _expected(d: str) -> dict:
    from safetensors.torch import load_file

    return load_file(os.path.join(d, "expected.safetensors"))


# ---- reading what megatron-core wrote ---------------------------------------------------------------------------


@pytest.mark.parametrize("version", VERSIONS)
def test_reads_what_megatron_core_wrote(written, version, tmp_path):
    import pathlib
    import signal

    import numpy as np
    from megatron.core.transformer.enums import AttnBackend

    d = _fixture(written, version, tmp_path)
    exp = _expected(d)
    torch.serialization.add_safe_globals([AttnBackend])  # as megatron-core does on import: the stand-in still wins
    with TorchDistCheckpoint(d) as ckpt:
        assert set(ckpt.tensors) == {"w.a", "w.grid", "w.stack", "w.ints"}
        for key in ckpt.tensors:
            got = ckpt.read_tensor(key)
            assert got.dtype == exp[key].dtype and torch.equal(got, exp[key]), key
        assert [len(ckpt.tensors[k].chunks) for k in ("w.a", "w.grid", "w.stack", "w.ints")] == [2, 4, 3, 1]
        obj = ckpt.read_object(sharded_object_key("w.obj"))
        assert obj["x"] == 1 and torch.equal(obj["t"], exp["w.obj.t"])
        common = ckpt.common_state()
        assert ckpt.has_common_file() == (version == "0.16.1")  # 0.19 keeps it inside the .distcp files
        assert (sharded_object_key("common_state") in ckpt.objects) == (version != "0.16.1")
    args = common["args"]
    assert (args.num_layers, args.hidden_size, args.params_dtype, args.data_path) == (3, 4, torch.bfloat16, ["a", "b"])
    assert args.exit_signal == signal.SIGTERM and args.save == pathlib.PosixPath("/ckpt/run")
    # megatron-core's enum is not imported: a record of the class and the value it was built from
    assert isinstance(args.attention_backend, dcp_reader.StoredObject)
    assert args.attention_backend.qualname == "megatron.core.transformer.enums.AttnBackend"
    assert args.attention_backend.value == AttnBackend.auto.value
    assert common["extra"].note == "plain" and common["extra"].blob == b"\x00\x01"
    assert np.array_equal(common["extra"].table, np.arange(3, dtype=np.int32))
    assert (common["iteration"], common["checkpoint_version"]) == (7, 3.0)


@pytest.mark.parametrize("version", VERSIONS)
def test_checkpoint_is_a_tensor_source(written, version, tmp_path):
    """A torch_dist checkpoint read through the declared source interface (io/protocols.py): its keys, global
    tensors, dtypes, shapes and files, as megatron-core wrote them."""
    from megatron_bridge_ext.io.protocols import TensorSource

    d = _fixture(written, version, tmp_path)
    exp = _expected(d)
    with TorchDistCheckpoint(d) as ckpt:
        assert isinstance(ckpt, TensorSource)
        assert set(ckpt.keys()) == set(ckpt) == {"w.a", "w.grid", "w.stack", "w.ints"} and len(ckpt) == 4
        for key in ckpt.keys():
            got = ckpt[key]
            assert got.dtype == exp[key].dtype == ckpt.dtype(key) and torch.equal(got, exp[key]), key
            assert ckpt.shape(key) == tuple(exp[key].shape)
            assert all(f.endswith(".distcp") for f in ckpt.file_of(key).split(", ")), ckpt.file_of(key)
            ckpt.release([key])
        assert "w.obj" not in ckpt
        with pytest.raises(KeyError, match="holds no tensor 'w.nope'"):
            ckpt.dtype("w.nope")


@pytest.mark.skipif(not hasattr(os, "posix_fadvise"), reason="needs posix_fadvise (Linux)")
def test_read_ahead_brings_the_chunks_into_the_page_cache(written, tmp_path):
    """``read_ahead`` (the streamed export's, on a thread of its own) gets the asked chunks' bytes into the page
    cache, returns their size, and asks for nothing once the checkpoint is closed."""
    from page_cache import wait_cached

    d = _fixture(written, sorted(written)[-1] if written else VERSIONS[-1], tmp_path)
    for name in os.listdir(d):
        if name.endswith(".distcp"):
            with open(os.path.join(d, name), "rb") as f:
                os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
    with TorchDistCheckpoint(d) as ckpt:
        chunks = ckpt.tensors["w.grid"].chunks
        assert ckpt.read_ahead(chunks) == sum(c.length for c in chunks)
        for c in chunks:
            path = os.path.join(d, c.file)
            assert wait_cached(path, c.offset, c.offset + c.length) >= 0.99, c
    assert ckpt.read_ahead(chunks) == 0


@pytest.mark.parametrize("version", VERSIONS)
def test_any_global_slice_from_the_chunks_it_overlaps(written, version, tmp_path):
    """read_slice assembles [offsets, offsets + sizes) from whichever stored chunks overlap it (the streaming
    converter's access: no model, global coordinates)."""
    d = _fixture(written, version, tmp_path)
    exp = _expected(d)["w.grid"]  # [4, 6] stored as a 2 x 2 grid of [2, 3] chunks
    g = torch.Generator().manual_seed(0)
    with TorchDistCheckpoint(d) as ckpt:
        entry = ckpt.tensor("w.grid")
        for _ in range(40):
            o = [int(torch.randint(0, n, (1,), generator=g)) for n in exp.shape]
            s = [int(torch.randint(1, n - oo + 1, (1,), generator=g)) for oo, n in zip(o, exp.shape)]
            ref = exp[o[0]:o[0] + s[0], o[1]:o[1] + s[1]]
            assert torch.equal(ckpt.read_slice("w.grid", o, s), ref), (o, s)
            hit = {c.offsets for c in entry.overlapping(o, s)}
            want = {(r, c) for r in (0, 2) for c in (0, 3)
                    if r < o[0] + s[0] and o[0] < r + 2 and c < o[1] + s[1] and o[1] < c + 3}
            assert hit == want, (o, s)
        out = torch.zeros(2, 6, dtype=torch.float32)  # into a caller's buffer, cast on copy
        ckpt.read_slice("w.grid", (1, 0), (2, 6), out=out)
        assert torch.equal(out, exp[1:3].float())
        with pytest.raises(ValueError, match=r"outside w\.grid's shape \[4, 6\]"):
            ckpt.read_slice("w.grid", (3, 0), (2, 6))


@pytest.mark.parametrize("version", VERSIONS)
def test_mapped_chunks_read_what_megatron_core_wrote(written, version, tmp_path):
    """``map_chunks``: every stored chunk, and every global slice, equal to what megatron-core was given; a write to
    a mapped view leaves the file as it was; after ``unmap`` the same views still read the file's values; the views
    outlive ``close``."""
    import hashlib

    d = _fixture(written, version, tmp_path)
    exp = _expected(d)
    files = sorted(f for f in os.listdir(d) if f.endswith(".distcp"))
    digest = lambda: [hashlib.sha256(open(os.path.join(d, f), "rb").read()).hexdigest() for f in files]  # noqa: E731
    before = digest()
    views = []
    with TorchDistCheckpoint(d, map_chunks=True) as ckpt:
        for key, entry in ckpt.tensors.items():
            for chunk in entry.chunks:
                ref = exp[key][tuple(slice(o, o + n) for o, n in zip(chunk.offsets, chunk.sizes))]
                got = ckpt.read_chunk(chunk)
                assert got.dtype == ref.dtype and torch.equal(got, ref), (key, chunk.offsets)
                whole = ckpt.read_slice(key, chunk.offsets, chunk.sizes)
                assert torch.equal(whole, ref), (key, chunk.offsets)
                views.append((got, ref.clone()))
            assert torch.equal(ckpt.read_tensor(key), exp[key]), key  # assembled from several chunks
        for got, _ in views:
            got.zero_()  # private to this process: the file does not change
        assert digest() == before
        with TorchDistCheckpoint(d) as fresh:
            assert all(torch.equal(fresh.read_tensor(k), exp[k]) for k in exp if k in fresh.tensors)
        ckpt.unmap([c for e in ckpt.tensors.values() for c in e.chunks])
        kept = [got.clone() for got, _ in views]
    assert digest() == before
    for (got, _), k in zip(views, kept):  # still readable after close (a view keeps its map), unchanged
        assert torch.equal(got, k)


def test_unmap_gives_the_pages_back(tmp_path):
    """A large chunk read with ``map_chunks`` and touched is in the process's memory until ``unmap``, which gives
    its pages back (the streamed export's memory stays one bucket); its values are those written."""
    from torch.distributed.checkpoint.default_planner import DefaultSavePlanner

    from megatron_bridge_ext.io.dcp_writer import StreamingDcpWriter, write_metadata

    d = str(tmp_path / "ckpt")
    os.makedirs(d)
    big = torch.arange(48 << 20, dtype=torch.int32).view(-1, 1024)  # 192 MiB
    planner = DefaultSavePlanner()
    planner.set_up_planner({"w.big": big}, is_coordinator=True)
    plans, metadata = planner.create_global_plan([planner.create_local_plan()])
    w = StreamingDcpWriter(d)
    for item in planner.finish_plan(plans[0]).items:
        w.put(item, planner.resolve_data(item))
    write_metadata(d, metadata, [r for f in w.close() for r in f.results])
    with open(os.path.join(d, "metadata.json"), "w") as f:
        json.dump({"sharded_backend": "torch_dist", "sharded_backend_version": 1,
                   "common_backend": "torch", "common_backend_version": 1}, f)

    def rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    with TorchDistCheckpoint(d, map_chunks=True) as ckpt:
        (chunk,) = ckpt.tensors["w.big"].chunks
        view = ckpt.read_chunk(chunk)
        base = rss()
        assert torch.equal(view, big)  # touches every page
        grown = rss() - base
        ckpt.unmap([chunk])
        given_back = base + grown - rss()
    assert grown > 150 << 20, grown
    assert given_back > 150 << 20, (grown, given_back)


@pytest.mark.parametrize("version", VERSIONS)
def test_archives_of_other_forms_load_the_same(written, version, tmp_path):
    """A chunk that torch.save stored as a view into a larger storage, or transposed (not the plain contiguous form
    whose bytes are read directly) is loaded with torch.load(weights_only=True): the same values."""
    d = _fixture(written, version, tmp_path)
    exp = _expected(d)["w.a"]
    larger = torch.cat([exp[:3], torch.full((5, 4), 7.0)])[:3]  # its storage holds 8 rows
    transposed = exp[3:].t().contiguous().t()  # [3, 4] with strides (1, 3)
    assert not transposed.is_contiguous()
    _replace_blob(d, "w.a", _torch_bytes(larger), offsets=(0, 0))
    _replace_blob(d, "w.a", _torch_bytes(transposed), offsets=(3, 0))
    with TorchDistCheckpoint(d) as ckpt:
        assert torch.equal(ckpt.read_tensor("w.a"), exp)
        out = torch.empty(6, 4)
        ckpt.read_slice("w.a", (0, 0), (6, 4), out=out)
        assert torch.equal(out, exp)


# ---- payloads ---------------------------------------------------------------------------------------------------


class _Payload:
    """Unpickled unsafely, creates ``marker``."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').close()",))


def _metadata(d: str):
    with open(os.path.join(d, ".metadata"), "rb") as f:
        return pickle.load(f)  # the fixture was just written by megatron-core: trusted


def _save_metadata(d: str, md) -> None:
    with open(os.path.join(d, ".metadata"), "wb") as f:
        pickle.dump(md, f)


def _entry(md, fqn: str, offsets=None):
    for index, info in md.storage_data.items():
        if index.fqn == fqn and (offsets is None or tuple(index.offset) == tuple(offsets)):
            return index, info
    raise KeyError(fqn)


def _replace_blob(d: str, fqn: str, blob: bytes, offsets=None) -> str:
    """Point the storage entry of ``fqn`` (its chunk at ``offsets``) at ``blob``, appended to its file; returns the
    file's path."""
    from torch.distributed.checkpoint.filesystem import _StorageInfo

    md = _metadata(d)
    index, info = _entry(md, fqn, offsets)
    path = os.path.join(d, info.relative_path)
    start = os.path.getsize(path)
    with open(path, "ab") as f:
        f.write(blob)
    md.storage_data[index] = _StorageInfo(info.relative_path, start, len(blob))
    _save_metadata(d, md)
    return path


def _torch_bytes(obj) -> bytes:
    import io

    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _live(marker: str, load) -> None:
    """The payload runs when loaded the unsafe way (so the refusal below is a real one)."""
    assert not os.path.exists(marker)
    load()
    assert os.path.exists(marker), "the payload did not run when loaded unsafely"
    os.remove(marker)


@pytest.mark.parametrize("version", VERSIONS)
def test_payload_in_metadata_is_refused(written, version, tmp_path):
    d = _fixture(written, version, tmp_path)
    marker = str(tmp_path / "ran")
    md = _metadata(d)
    md.planner_data = {"note": _Payload(marker)}
    _save_metadata(d, md)
    _live(marker, lambda: pickle.load(open(os.path.join(d, ".metadata"), "rb")))  # what torch's reader does
    with pytest.raises(UnsafeCheckpointError) as e:
        TorchDistCheckpoint(d)
    assert os.path.join(d, ".metadata") in str(e.value) and "builtins.exec" in str(e.value), e.value
    assert not os.path.exists(marker)


def test_metadata_cannot_change_the_classes_it_may_build(written, tmp_path):
    """A pickle's BUILD opcode sets attributes on whatever GLOBAL pushed, a class included: ``.metadata`` built as
    (None, {"pwned": 1}) applied to torch's Metadata class changes that class for the whole process when plain pickle
    reads it. The reader hands the pickle stand-ins made for the load, so torch's class stays as it was."""
    from torch.distributed.checkpoint.metadata import Metadata

    d = _fixture(written, next(iter(written)), tmp_path)
    crafted = (b"\x80\x02ctorch.distributed.checkpoint.metadata\nMetadata\n"
               b"N}X\x05\x00\x00\x00pwnedK\x01s\x86b.")
    with open(os.path.join(d, ".metadata"), "wb") as f:
        f.write(crafted)
    pickle.loads(crafted)  # what torch's reader does
    assert getattr(Metadata, "pwned", None) == 1
    del Metadata.pwned
    with pytest.raises(CheckpointFormatError, match="not torch.distributed.checkpoint Metadata"):
        TorchDistCheckpoint(d)
    assert not hasattr(Metadata, "pwned")


@pytest.mark.parametrize("version", VERSIONS)
def test_payload_in_the_common_state_is_refused(written, version, tmp_path):
    """0.16.1: common.pt; 0.19.2: the common_state object inside the .distcp files (megatron-core 0.19's own
    load_common_state_dict reads it through torch's DefaultLoadPlanner, torch.load(weights_only=False))."""
    d = _fixture(written, version, tmp_path)
    marker = str(tmp_path / "ran")
    state = {"iteration": 7, "args": None, "note": _Payload(marker)}
    if version == "0.16.1":
        path = os.path.join(d, "common.pt")
        torch.save(state, path)
        where = "the common state"
    else:
        path = _replace_blob(d, sharded_object_key("common_state"), _torch_bytes([state]))
        where = "common_state/shard_0_1"
    _live(marker, lambda: torch.load(path if version == "0.16.1" else _blob(d, sharded_object_key("common_state")),
                                     weights_only=False))
    with TorchDistCheckpoint(d) as ckpt:  # the structure is fine
        with pytest.raises(UnsafeCheckpointError) as e:
            ckpt.common_state()
    msg = str(e.value)
    assert path in msg and where in msg and "builtins.exec" in msg, msg
    assert not os.path.exists(marker)


def _blob(d: str, fqn: str, offsets=None):
    import io

    _, info = _entry(_metadata(d), fqn, offsets)
    with open(os.path.join(d, info.relative_path), "rb") as f:
        f.seek(info.offset)
        return io.BytesIO(f.read(info.length))


@pytest.mark.parametrize("version", VERSIONS)
def test_payload_in_a_tensor_chunk_is_refused(written, version, tmp_path):
    d = _fixture(written, version, tmp_path)
    marker = str(tmp_path / "ran")
    exp = _expected(d)
    path = _replace_blob(d, "w.a", _torch_bytes({"t": exp["w.a"][3:], "p": _Payload(marker)}), offsets=(3, 0))
    _live(marker, lambda: torch.load(_blob(d, "w.a", (3, 0)), weights_only=False))
    with TorchDistCheckpoint(d) as ckpt:
        assert torch.equal(ckpt.read_slice("w.a", (0, 0), (3, 4)), exp["w.a"][:3])  # the other chunk is fine
        with pytest.raises(UnsafeCheckpointError) as e:
            ckpt.read_tensor("w.a")
    msg = str(e.value)
    assert path in msg and "w.a (chunk at [3, 0])" in msg and "builtins.exec" in msg, msg
    assert not os.path.exists(marker)


@pytest.mark.parametrize("version", VERSIONS)
def test_payload_in_a_sharded_object_is_refused(written, version, tmp_path):
    d = _fixture(written, version, tmp_path)
    marker = str(tmp_path / "ran")
    key = sharded_object_key("w.obj")
    path = _replace_blob(d, key, _torch_bytes([{"x": 1, "p": _Payload(marker)}]))
    _live(marker, lambda: torch.load(_blob(d, key), weights_only=False))
    with TorchDistCheckpoint(d) as ckpt:
        with pytest.raises(UnsafeCheckpointError) as e:
            ckpt.read_object(key)
    msg = str(e.value)
    assert path in msg and key in msg and "builtins.exec" in msg, msg
    assert not os.path.exists(marker)


def test_only_the_allowlisted_classes_load_from_a_common_state(tmp_path):
    """A class torch's weights_only would admit once megatron-core registered it (0.19 registers its safe_globals
    process-wide on import) is still refused unless it is on this reader's list; a class on the list loads."""
    import collections
    import datetime

    d = tmp_path / "c"
    d.mkdir()
    (d / "metadata.json").write_text(json.dumps({"sharded_backend": "torch_dist"}))
    from torch.distributed.checkpoint.metadata import Metadata

    with open(d / ".metadata", "wb") as f:
        pickle.dump(Metadata(state_dict_metadata={}, storage_data={}), f)
    torch.save({"when": datetime.date(2026, 1, 1)}, d / "common.pt")
    torch.serialization.add_safe_globals([datetime.date])  # admitted process-wide, as megatron-core does for its own
    try:
        with TorchDistCheckpoint(str(d)) as ckpt, pytest.raises(UnsafeCheckpointError, match=r"datetime\.date"):
            ckpt.common_state()
    finally:
        torch.serialization._weights_only_unpickler._remove_safe_globals([datetime.date])  # type: ignore[attr-defined]
    torch.save({"order": collections.OrderedDict(a=1)}, d / "common.pt")
    with TorchDistCheckpoint(str(d)) as ckpt:
        assert ckpt.common_state() == {"order": {"a": 1}}


# ---- structural faults ------------------------------------------------------------------------------------------


def _file_of(d, fqn, offsets=None) -> str:
    return _entry(_metadata(d), fqn, offsets)[1].relative_path


def _truncate(d):
    name = _file_of(d, "w.a", (3, 0))
    _, info = _entry(_metadata(d), "w.a", (3, 0))
    with open(os.path.join(d, name), "r+b") as f:
        f.truncate(info.offset + info.length - 10)
    return name, ["w.a (chunk at [3, 0])", "past the end of the file", "truncated"]


def _missing(d):
    name = _file_of(d, "w.ints")
    os.remove(os.path.join(d, name))
    return name, ["is missing"]


def _past_end(d):
    from torch.distributed.checkpoint.filesystem import _StorageInfo

    md = _metadata(d)
    index, info = _entry(md, "w.ints")
    size = os.path.getsize(os.path.join(d, info.relative_path))
    md.storage_data[index] = _StorageInfo(info.relative_path, size - 5, info.length)
    _save_metadata(d, md)
    return info.relative_path, ["w.ints (chunk at [0])", "past the end of the file"]


def _overlap(d):
    from torch.distributed.checkpoint.filesystem import _StorageInfo

    md = _metadata(d)
    a_index, a = _entry(md, "w.stack", (0, 0, 0))
    same = [(i, s) for i, s in md.storage_data.items() if s.relative_path == a.relative_path and i != a_index]
    b_index, b = same[0]
    md.storage_data[b_index] = _StorageInfo(b.relative_path, a.offset + 8, b.length)
    _save_metadata(d, md)
    return a.relative_path, ["overlap", "w.stack (chunk at [0, 0, 0])", b_index.fqn]


def _absent_bytes(d):
    md = _metadata(d)
    index, _ = _entry(md, "w.grid", (2, 3))
    del md.storage_data[index]
    _save_metadata(d, md)
    return ".metadata", ["w.grid (chunk at [2, 3])", "no storage entry holds its bytes"]


def _bytes_not_listed(d):
    from torch.distributed.checkpoint.metadata import MetadataIndex

    md = _metadata(d)
    _, info = _entry(md, "w.ints")
    md.storage_data[MetadataIndex("w.ghost", (0,))] = info
    _save_metadata(d, md)
    return info.relative_path, ["w.ghost", "does not list"]


def _chunk_outside(d):
    md = _metadata(d)
    tm = md.state_dict_metadata["w.a"]
    tm.chunks[1].sizes = torch.Size([4, 4])  # rows 3..6 of a 6-row tensor
    _save_metadata(d, md)
    return ".metadata", ["w.a", "reaches past the tensor's shape [6, 4]"]


def _chunk_gap(d):
    md = _metadata(d)
    tm = md.state_dict_metadata["w.grid"]
    gone = tm.chunks.pop(3)
    del md.storage_data[_entry(md, "w.grid", gone.offsets)[0]]
    _save_metadata(d, md)
    return ".metadata", ["w.grid", "cover 18 of its 24 elements"]


def _chunk_overlap(d):
    from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, MetadataIndex

    md = _metadata(d)
    tm = md.state_dict_metadata["w.a"]
    index, info = _entry(md, "w.a", (3, 0))
    del md.storage_data[index]
    md.storage_data[MetadataIndex("w.a", (2, 0))] = info
    tm.chunks[1] = ChunkStorageMetadata(offsets=torch.Size([2, 0]), sizes=torch.Size([3, 4]))
    _save_metadata(d, md)
    return ".metadata", ["w.a", "overlap"]


def _other_backend(d):
    with open(os.path.join(d, "metadata.json"), "w") as f:
        json.dump({"sharded_backend": "zarr", "sharded_backend_version": 1}, f)
    return "metadata.json", ["'zarr'", "torch_dist"]


def _bad_file_name(d):
    from torch.distributed.checkpoint.filesystem import _StorageInfo

    md = _metadata(d)
    index, info = _entry(md, "w.ints")
    md.storage_data[index] = _StorageInfo("../" + info.relative_path, info.offset, info.length)
    _save_metadata(d, md)
    return ".metadata", ["w.ints", "not a plain file name"]


def _transformed(d):
    from torch.distributed.checkpoint.filesystem import _StorageInfo

    md = _metadata(d)
    index, info = _entry(md, "w.ints")
    md.storage_data[index] = _StorageInfo(info.relative_path, info.offset, info.length, ["stream.zstd"])
    _save_metadata(d, md)
    return info.relative_path, ["w.ints", "stream.zstd"]


OPEN_FAULTS = {f.__name__[1:]: f for f in (_truncate, _missing, _past_end, _overlap, _absent_bytes,
                                          _bytes_not_listed, _chunk_outside, _chunk_gap, _chunk_overlap,
                                          _other_backend, _bad_file_name, _transformed)}


@pytest.mark.parametrize("fault", sorted(OPEN_FAULTS))
def test_structural_fault_is_named_when_the_checkpoint_is_opened(written, fault, tmp_path):
    version = "0.19.2" if fault in ("truncate", "overlap") else "0.16.1"  # both layouts among the cases
    if version not in written:
        version = next(iter(written))
    d = _fixture(written, version, tmp_path)
    name, fragments = OPEN_FAULTS[fault](d)
    with pytest.raises(CheckpointFormatError) as e:
        TorchDistCheckpoint(d)
    msg = str(e.value)
    assert os.path.join(d, name) in msg or (name == ".metadata" and ".metadata" in msg), msg
    for fragment in fragments:
        assert fragment in msg, (fragment, msg)


def _shape_blob(d):
    exp = _expected(d)
    return _replace_blob(d, "w.stack", _torch_bytes(torch.zeros(1, 5, 3, dtype=torch.bfloat16)),
                         offsets=(1, 0, 0)), "w.stack", ["w.stack (chunk at [1, 0, 0])", "[1, 5, 3] bfloat16",
                                                          "says [1, 5, 2] bfloat16"], exp


def _dtype_blob(d):
    exp = _expected(d)
    return _replace_blob(d, "w.a", _torch_bytes(exp["w.a"][:3].double()), offsets=(0, 0)), "w.a", \
        ["w.a (chunk at [0, 0])", "[3, 4] float64", "says [3, 4] float32"], exp


def _not_an_archive(d):
    name = _file_of(d, "w.ints")
    _, info = _entry(_metadata(d), "w.ints")
    with open(os.path.join(d, name), "r+b") as f:
        f.seek(info.offset)
        f.write(b"XXXX")
    return os.path.join(d, name), "w.ints", ["w.ints (chunk at [0])", "not a torch.save archive"], None


def _flipped_zip_byte(d):
    name = _file_of(d, "w.ints")
    _, info = _entry(_metadata(d), "w.ints")
    with open(os.path.join(d, name), "r+b") as f:  # the first byte of the archive's central directory
        f.seek(info.offset + info.length - 22 + 16)  # the end record's pointer to it
        cd = int.from_bytes(f.read(4), "little")
        f.seek(info.offset + cd)
        byte = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([byte[0] ^ 0xFF]))
    return os.path.join(d, name), "w.ints", ["w.ints (chunk at [0])", "torch.save archive"], None


def _not_a_tensor(d):
    return _replace_blob(d, "w.ints", _torch_bytes({"t": torch.arange(10)})), "w.ints", \
        ["w.ints (chunk at [0])", "holds a dict, not a tensor"], None


READ_FAULTS = {f.__name__[1:]: f for f in (_shape_blob, _dtype_blob, _not_an_archive, _flipped_zip_byte,
                                          _not_a_tensor)}


@pytest.mark.parametrize("fault", sorted(READ_FAULTS))
def test_chunk_that_disagrees_with_the_metadata_is_named_when_read(written, fault, tmp_path):
    version = "0.19.2" if fault in ("dtype_blob", "flipped_zip_byte") else "0.16.1"
    if version not in written:
        version = next(iter(written))
    d = _fixture(written, version, tmp_path)
    path, key, fragments, _ = READ_FAULTS[fault](d)
    with TorchDistCheckpoint(d) as ckpt:
        with pytest.raises(CheckpointFormatError) as e:
            ckpt.read_tensor(key)
    msg = str(e.value)
    assert path in msg, msg
    for fragment in fragments:
        assert fragment in msg, (fragment, msg)


def test_tracker_naming_a_missing_iteration_and_other_backends(written, tmp_path):
    from megatron_bridge_ext.io.megatron_checkpoint import open_checkpoint, read_checkpoint_info

    version = next(iter(written))
    root = tmp_path / "root"
    root.mkdir()
    shutil.copytree(written[version], root / "iter_0000003")
    (root / "latest_checkpointed_iteration.txt").write_text("5\n")
    with pytest.raises(FileNotFoundError, match=r"names iteration 5, but .*iter_0000005 does not exist"):
        open_checkpoint(str(root))
    (root / "latest_checkpointed_iteration.txt").write_text("3\n")
    assert read_checkpoint_info(str(root)).iteration == 7  # the common state's own iteration
    (root / "iter_0000003" / "metadata.json").write_text(json.dumps({"sharded_backend": "zarr"}))
    with pytest.raises(CheckpointFormatError, match=r"metadata\.json: sharded_backend is 'zarr'"):
        read_checkpoint_info(str(root))
