"""Writes past the page cache (``io.direct_io``): the bytes and digests against plain Python, the page cache left
untouched where the file system takes ``O_DIRECT``, the fallbacks where it does not, and errors that name the file."""

from __future__ import annotations

import errno
import hashlib
import os
import random
import threading

import pytest
import torch

from megatron_bridge_ext.io import direct_io
from megatron_bridge_ext.io.direct_io import ALIGN, DirectWriter, SequentialFile
from tests.page_cache import cached_fraction

STAGE = 4 * ALIGN


def _takes_direct(directory) -> bool:
    path = os.path.join(str(directory), ".probe")
    open(path, "wb").close()
    try:
        os.close(os.open(path, os.O_WRONLY | os.O_DIRECT))
        return True
    except OSError:
        return False
    finally:
        os.remove(path)


def _pieces(data: bytes, rng: random.Random):
    """``data`` cut at random places, some pieces empty, some larger than a staging buffer."""
    at = 0
    while at < len(data):
        n = rng.choice([0, 1, 7, ALIGN - 1, ALIGN, ALIGN + 3, STAGE - 5, 3 * STAGE + 11])
        yield data[at:at + n]
        at += n


@pytest.mark.parametrize("direct", ["1", "0"])
def test_sequential_file_bytes_and_digest(tmp_path, monkeypatch, direct):
    monkeypatch.setenv(direct_io.DIRECT_IO_ENV, direct)
    rng = random.Random(3)
    data = os.urandom(9 * STAGE + 1234)
    w = DirectWriter(stage_bytes=STAGE, stages=3)
    try:
        digest = hashlib.sha256()
        f = SequentialFile(str(tmp_path / "a.bin"), w, digest)
        for piece in _pieces(data, rng):
            assert f.write(memoryview(piece)) == len(piece)
        assert f.tell() == len(data)
        f.finish()
    finally:
        w.close()
    assert (tmp_path / "a.bin").read_bytes() == data
    assert digest.hexdigest() == hashlib.sha256(data).hexdigest()
    assert not [t for t in threading.enumerate() if t.name in ("direct-hash", "direct-write")]


def test_sequential_file_from_tensor_memory(tmp_path):
    """torch.save's own stream of a tensor (read-only memoryviews of its storage) lands byte for byte."""
    import io

    t = torch.randn(1000, 37).to(torch.bfloat16)
    ref = io.BytesIO()
    torch.save(t, ref)

    class Stream(io.RawIOBase):
        def __init__(self, f):
            self.f = f

        def writable(self):
            return True

        def write(self, b):
            return self.f.write(b)

        def tell(self):
            return self.f.tell()

    w = DirectWriter(stage_bytes=STAGE)
    try:
        f = SequentialFile(str(tmp_path / "t.pt"), w)
        torch.save(t, Stream(f))
        f.finish()
    finally:
        w.close()
    assert (tmp_path / "t.pt").read_bytes() == ref.getvalue()
    assert torch.equal(torch.load(str(tmp_path / "t.pt")), t)


def test_direct_writes_leave_the_page_cache_alone(tmp_path):
    """Where the file system takes O_DIRECT, the whole buffers never enter the page cache (only the partial tail
    goes through it); where it does not, the same bytes are written through it."""
    data = os.urandom(16 * STAGE + 100)
    w = DirectWriter(stage_bytes=STAGE)
    try:
        f = SequentialFile(str(tmp_path / "d.bin"), w)
        f.write(data)
        used_direct = f._f.dfd is not None
        f.finish()
    finally:
        w.close()
    if _takes_direct(tmp_path):  # (checked before the file is read back, which caches it)
        assert used_direct
        assert cached_fraction(str(tmp_path / "d.bin"), 0, 16 * STAGE) == 0.0
    else:
        assert not used_direct
    assert (tmp_path / "d.bin").read_bytes() == data


@pytest.mark.parametrize("direct", ["1", "0"])
def test_write_at_any_order(tmp_path, monkeypatch, direct):
    """Ranges written in any order, at any offsets and lengths (aligned or not, smaller or larger than a buffer),
    give the same file as plain writes into a bytearray. Where ``O_DIRECT`` is taken, the caller's thread writes
    nothing itself, not even the partial end blocks (a buffered write would wait for the file's lock while a direct
    write holds it)."""
    monkeypatch.setenv(direct_io.DIRECT_IO_ENV, direct)
    writers = []
    real = direct_io.pwrite_all

    def recorded(fd, view, offset):
        writers.append(threading.current_thread().name)
        return real(fd, view, offset)

    monkeypatch.setattr(direct_io, "pwrite_all", recorded)
    rng = random.Random(7)
    size = 20 * STAGE + 999
    cuts = sorted(set([0, size] + [rng.randrange(size) for _ in range(40)] + [ALIGN * 5, ALIGN * 9 + 1]))
    ranges = list(zip(cuts[:-1], cuts[1:]))
    rng.shuffle(ranges)
    data = os.urandom(size)
    path = str(tmp_path / "r.bin")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.ftruncate(fd, size)
    w = DirectWriter(stage_bytes=STAGE, stages=2)
    try:
        f = w.file(fd, path)
        for a, b in ranges:
            piece = bytearray(data[a:b])
            w.write_at(f, a, memoryview(piece))
            piece[:] = b"\0" * len(piece)  # the caller's memory is free once write_at returns
        w.join()
        f.close_direct()
    finally:
        os.close(fd)
        w.close()
    assert open(path, "rb").read() == data
    if direct == "1" and _takes_direct(tmp_path):
        assert writers and set(writers) == {"direct-write"}, sorted(set(writers))
    else:
        assert threading.current_thread().name in writers


def test_refused_direct_write_falls_back(tmp_path, monkeypatch):
    """A file system that opens O_DIRECT but refuses the write (EINVAL): the file is written through the page cache
    from there on, byte for byte."""
    real = os.pwrite
    refused = []

    def pwrite(fd, buf, offset):
        if fd == state["dfd"]:
            refused.append(offset)
            raise OSError(errno.EINVAL, "Invalid argument")
        return real(fd, buf, offset)

    state = {"dfd": None}
    monkeypatch.setattr(direct_io.os, "pwrite", pwrite)
    data = os.urandom(6 * STAGE + 17)
    w = DirectWriter(stage_bytes=STAGE)
    try:
        digest = hashlib.sha256()
        f = SequentialFile(str(tmp_path / "e.bin"), w, digest)
        state["dfd"] = f._f.dfd
        f.write(data)
        f.finish()
    finally:
        w.close()
    assert (tmp_path / "e.bin").read_bytes() == data
    assert digest.hexdigest() == hashlib.sha256(data).hexdigest()
    if state["dfd"] is not None:  # the file system took O_DIRECT at open: the first whole buffer was refused
        assert refused == [0]


def test_write_error_names_the_file(tmp_path):
    """A write that fails on the thread is raised by ``join`` with the file's path."""
    path = str(tmp_path / "x.bin")
    open(path, "wb").close()
    fd = os.open(path, os.O_RDONLY)
    w = DirectWriter(stage_bytes=STAGE)
    try:
        f = w.file(fd, path)
        f.close_direct()
        f.dfd = os.open(path, os.O_RDONLY)  # the staged path is taken, and its writes fail
        w.write_at(f, 0, memoryview(os.urandom(2 * STAGE)))
        with pytest.raises(OSError) as ei:
            w.join()
        assert ei.value.errno == errno.EBADF and ei.value.filename == path
    finally:
        f.close_direct()
        os.close(fd)
        w.close()


def test_bad_settings():
    with pytest.raises(ValueError, match="stage_bytes = 100"):
        DirectWriter(stage_bytes=100)
    with pytest.raises(ValueError, match="stages = 1"):
        DirectWriter(stage_bytes=ALIGN, stages=1)
