"""Checksum manifests (``io/checksums.py``) in megatron-core's ``verify_integrity`` format: both tools write the same
file for the same directory and each accepts the other's, and a changed, missing or added file is named.

megatron-core 0.19.2's own ``save_integrity_manifest`` / ``verify_integrity_manifest`` run in a subprocess of its
environment's interpreter (``MBE_MCORE_PYTHONS``); without one those cases are skipped with the reason.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys

import pytest

from megatron_bridge_ext.io import checksums

MCORE_INTEGRITY = "megatron.core.dist_checkpointing.validation"

# megatron-core's side of the exchange, in its own interpreter: write a manifest of B, check A, flip a byte of A's
# __3_0.distcp, check A again (prints one line per step; exit 4 when this megatron-core has no verify_integrity)
_MCORE_SIDE = f"""
import sys, warnings
warnings.filterwarnings("ignore")
try:
    from {MCORE_INTEGRITY} import save_integrity_manifest, verify_integrity_manifest
except ImportError:
    sys.exit(4)
a, b = sys.argv[1], sys.argv[2]
save_integrity_manifest(b)
verify_integrity_manifest(a)
print("verified A")
with open(a + "/__3_0.distcp", "r+b") as f:
    f.seek(100); x = f.read(1); f.seek(100); f.write(bytes([x[0] ^ 1]))
try:
    verify_integrity_manifest(a)
    print("accepted the changed file")
except Exception as e:
    print("refused:", e)
"""


def _mcore_side(a: str, b: str):
    """Runs megatron-core's side in the first environment of MBE_MCORE_PYTHONS whose megatron-core has it."""
    for py in os.environ.get("MBE_MCORE_PYTHONS", "").split() or [sys.executable]:
        if not os.path.isfile(py):
            continue
        res = subprocess.run([py, "-c", _MCORE_SIDE, a, b], capture_output=True, text=True, timeout=600)
        if res.returncode != 4:
            return res
    pytest.skip("no environment with megatron-core >= 0.18 (verify_integrity) in MBE_MCORE_PYTHONS")


def _files(d, n=4):
    d.mkdir()
    for i in range(n):
        (d / f"__{i}_0.distcp").write_bytes(os.urandom(1000 + 37 * i))
    (d / ".metadata").write_bytes(b"meta")
    (d / "metadata.json").write_text('{"sharded_backend": "torch_dist"}')
    (d / "sub").mkdir()  # a subdirectory is not listed (megatron-core lists regular files only)
    return str(d)


def _ours(directory: str) -> str:
    names = checksums.manifest_files(directory)
    return checksums.write_manifest(directory, checksums.digests(directory, names, threads=2))


def _flip(path: str, at: int = 100) -> None:
    with open(path, "r+b") as f:
        f.seek(at)
        b = f.read(1)
        f.seek(at)
        f.write(bytes([b[0] ^ 1]))


def test_manifest_lists_every_file_with_its_sha256(tmp_path):
    d = _files(tmp_path / "c")
    path = _ours(d)
    data = json.load(open(path))
    assert data["algorithm"] == "sha256"
    names = sorted(n for n in os.listdir(d) if os.path.isfile(os.path.join(d, n)) and n != "integrity.json")
    assert list(data["files"]) == names
    for n in names:  # hashlib over the whole file, independently
        assert data["files"][n] == hashlib.sha256(open(os.path.join(d, n), "rb").read()).hexdigest()
    assert checksums.verify_manifest(d) == len(names)


def test_changed_missing_and_added_files_are_each_named(tmp_path):
    d = _files(tmp_path / "c")
    _ours(d)
    _flip(os.path.join(d, "__1_0.distcp"))
    os.remove(os.path.join(d, "__2_0.distcp"))
    (tmp_path / "c" / "common.pt").write_bytes(b"added later")
    with pytest.raises(checksums.IntegrityError) as e:
        checksums.verify_manifest(d)
    assert e.value.problems == [
        e.value.problems[0],
        "__2_0.distcp: missing or unreadable",
        "common.pt: not in the manifest (added after it was written)",
    ]
    assert e.value.problems[0].startswith("__1_0.distcp: changed (sha256 ")
    assert "__0_0.distcp" not in str(e.value) and "__3_0.distcp" not in str(e.value)


def test_no_manifest_and_a_foreign_manifest(tmp_path):
    d = _files(tmp_path / "c")
    with pytest.raises(FileNotFoundError, match="no integrity.json"):
        checksums.verify_manifest(d)
    json.dump({"algorithm": "md5", "files": {}}, open(os.path.join(d, "integrity.json"), "w"))
    with pytest.raises(checksums.IntegrityError, match="algorithm 'md5'"):
        checksums.verify_manifest(d)
    for bad in ("../etc/passwd", "/etc/passwd", "hf/../../x", "hf//x", "a\\..\\b"):
        json.dump({"algorithm": "sha256", "files": {bad: "00"}}, open(os.path.join(d, "integrity.json"), "w"))
        with pytest.raises(checksums.IntegrityError, match="not a relative file name inside the directory"):
            checksums.verify_manifest(d)


def test_subdirectory_files_are_listed_and_checked(tmp_path):
    """The hf/ side files import keeps: listed by relative path, a change named; a manifest listing only the
    directory's own files (megatron-core's) is not disturbed by a subdirectory."""
    d = _files(tmp_path / "c")
    os.makedirs(os.path.join(d, "hf"))
    with open(os.path.join(d, "hf", "tokenizer.json"), "w") as f:
        f.write("{}")
    names = checksums.manifest_files(d)
    assert "hf/tokenizer.json" in names
    checksums.write_manifest(d, checksums.digests(d, names))
    assert checksums.verify_manifest(d) == len(names)
    with open(os.path.join(d, "hf", "tokenizer.json"), "w") as f:
        f.write('{"x": 1}')
    with pytest.raises(checksums.IntegrityError, match="hf/tokenizer.json: changed"):
        checksums.verify_manifest(d)
    flat = checksums.manifest_files(d, subdirs=False)
    json.dump({"algorithm": "sha256", "files": checksums.digests(d, flat)}, open(os.path.join(d, "integrity.json"), "w"))
    assert checksums.verify_manifest(d) == len(flat)


def test_same_file_as_megatron_core_and_each_accepts_the_others(tmp_path):
    """For one directory megatron-core's save_integrity_manifest and ours write byte-identical manifests; megatron-core's
    verify_integrity_manifest accepts ours and names a changed file; ours names a change in one it wrote."""
    import shutil

    a = _files(tmp_path / "a")
    b = str(tmp_path / "b")
    shutil.copytree(a, b)
    _ours(a)
    res = _mcore_side(a, b)
    assert res.returncode == 0, res.stdout + res.stderr
    lines = res.stdout.strip().splitlines()
    assert lines[0] == "verified A", res.stdout
    assert lines[1].startswith("refused:") and "__3_0.distcp: hash mismatch" in res.stdout, res.stdout
    assert open(os.path.join(a, "integrity.json"), "rb").read() == open(os.path.join(b, "integrity.json"), "rb").read()
    with pytest.raises(checksums.IntegrityError) as e:  # ours on A, whose file megatron-core changed
        checksums.verify_manifest(a)
    assert [p.split(":")[0] for p in e.value.problems] == ["__3_0.distcp"]
    assert checksums.verify_manifest(b) == 6  # megatron-core's manifest, checked by ours
    _flip(os.path.join(b, ".metadata"), at=1)
    with pytest.raises(checksums.IntegrityError) as e:
        checksums.verify_manifest(b)
    assert [p.split(":")[0] for p in e.value.problems] == [".metadata"]


def test_file_digest_equals_hashlib(tmp_path):
    """Mapped (non-empty files, across the 8 MiB pieces) or read (empty files): the digest of the bytes."""
    from megatron_bridge_ext.io.checksums import _CHUNK, file_digest

    for size in (0, 1, _CHUNK - 1, _CHUNK, 2 * _CHUNK + 12345):
        data = os.urandom(size)
        path = tmp_path / f"f{size}"
        path.write_bytes(data)
        assert file_digest(str(path)) == hashlib.sha256(data).hexdigest(), size


def _peak_rss_growth_kib(call: str, arg: str) -> int:
    """How much a fresh process's peak RSS grows (KiB) while it runs ``call`` (``checksums``' names in scope,
    ``sys.argv[1]`` = ``arg``)."""
    code = (
        "import resource, sys\n"
        "from megatron_bridge_ext.io.checksums import digests, file_digest\n"
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        f"{call}\n"
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before)\n"
    )
    out = subprocess.run([sys.executable, "-c", code, arg], capture_output=True, text=True, check=True,
                         cwd=os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    return int(out.stdout.strip().splitlines()[-1])


def test_file_digest_keeps_little_of_the_file_mapped(tmp_path):
    """Hashing a file larger than a few pieces raises the process's peak RSS by about one piece, not the file (the
    mapped pages count towards RSS until they are unmapped)."""
    path = tmp_path / "big"
    with open(path, "wb") as f:
        for _ in range(24):
            f.write(os.urandom(8 << 20))  # 192 MiB, in the page cache
    grown_kib = _peak_rss_growth_kib("file_digest(sys.argv[1])", str(path))
    assert grown_kib < 48 * 1024, f"peak RSS grew by {grown_kib} KiB hashing a 192 MiB file"


def test_digests_on_one_thread_read_the_files_side_by_side(tmp_path, monkeypatch):
    """One thread hashes several files side by side, each next piece from the file least far along (a converter
    reading a checkpoint in order reads its files in that proportion): every digest equals hashlib's of the file,
    a missing name or a directory gives None, and at every step no file is more than one piece further along (by
    fraction of its size) than any other."""
    from megatron_bridge_ext.io.checksums import _CHUNK, digests

    sizes = {"a": 5 * _CHUNK + 3, "b": 2 * _CHUNK, "c": 0, "d": 1, "e": 3 * _CHUNK - 7}
    data = {n: os.urandom(k) for n, k in sizes.items()}
    for n, b in data.items():
        (tmp_path / n).write_bytes(b)
    (tmp_path / "sub").mkdir()
    done = {n: 0 for n in sizes}
    steps = []
    real = hashlib.sha256

    class Recording:
        def __init__(self) -> None:
            self.h, self.name = real(), None

        def update(self, piece) -> None:
            if self.name is None:  # the file whose first piece this is
                self.name = next(n for n in sizes if done[n] == 0 and sizes[n] and data[n][:len(piece)] == piece)
            done[self.name] += len(piece)
            steps.append({n: done[n] / sizes[n] for n in sizes if sizes[n]})
            self.h.update(piece)

        def hexdigest(self) -> str:
            return self.h.hexdigest()

    monkeypatch.setattr(checksums.hashlib, "sha256", Recording)
    got = digests(str(tmp_path), ["a", "b", "c", "d", "e", "missing", "sub"], threads=1)
    monkeypatch.undo()
    assert got == {**{n: hashlib.sha256(b).hexdigest() for n, b in data.items()}, "missing": None, "sub": None}
    piece = {n: min(1.0, _CHUNK / sizes[n]) for n in sizes if sizes[n]}
    for fractions in steps:
        for x in fractions:
            for y in fractions:
                assert fractions[x] - fractions[y] <= piece[x] + 1e-9, (x, y, fractions)


def test_digests_on_one_thread_keep_little_mapped(tmp_path):
    """Two 96 MiB files hashed side by side on one thread: the peak RSS grows by a few pieces, not the files."""
    for name in ("x", "y"):
        with open(tmp_path / name, "wb") as f:
            for _ in range(12):
                f.write(os.urandom(8 << 20))
    grown_kib = _peak_rss_growth_kib("digests(sys.argv[1], ['x', 'y'], threads=1)", str(tmp_path))
    assert grown_kib < 48 * 1024, f"peak RSS grew by {grown_kib} KiB hashing two 96 MiB files"
