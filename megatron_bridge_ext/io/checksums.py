"""Checksum manifests of checkpoint directories, in megatron-core's ``verify_integrity`` format.

megatron-core 0.18+ writes, with ``dist_checkpointing.save(..., verify_integrity=True)``, an ``integrity.json`` beside
the files of a distributed checkpoint and checks it with ``load(..., verify_integrity=True)``::

    {"algorithm": "sha256", "files": {"<name>": "<sha256 hex digest>", ...}}

listing every regular file of the directory by name, sorted, the manifest itself excluded, written with
``json.dump(..., indent=2)``. This module writes and checks the same file, whatever megatron-core is installed, so a
checkpoint written by either tool is checked by both. megatron-core lists only the directory's own files; this module
also lists the files of its subdirectories (the ``hf/`` side files ``import`` keeps) by relative path
(``hf/tokenizer.json``), which megatron-core's check accepts (it joins each name to the directory). For a directory
without subdirectories both write the same bytes. A manifest that lists no subdirectory file (megatron-core's) is
checked against the directory's own files only.

What it proves: that the files are those the writer wrote (a flipped bit, a truncated or replaced file, a file added
later). What it does not: that the writer was honest; whoever can replace a file can rewrite the manifest too.
"""

from __future__ import annotations

import hashlib
import heapq
import json
import mmap
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Dict, Iterable, List, Mapping, Optional, Tuple

__all__ = [
    "MANIFEST_NAME",
    "ALGORITHM",
    "IntegrityError",
    "file_digest",
    "digests",
    "manifest_files",
    "present_files",
    "write_manifest",
    "read_manifest",
    "compare",
    "verify_manifest",
]

MANIFEST_NAME = "integrity.json"
ALGORITHM = "sha256"
_CHUNK = 8 << 20


class IntegrityError(ValueError):
    """Files of a checkpoint differ from its manifest (each one named; ``problems`` has one line per file)."""

    def __init__(self, message: str, problems: Iterable[str] = ()) -> None:
        super().__init__(message)
        self.problems = list(problems)


class _MappedHash:
    """SHA-256 of one file, hashed in 8 MiB pieces straight from the page cache: a read-only map (no copy into this
    process; its descriptor closed at once), each piece unmapped once hashed (RSS stays one piece); hashlib releases
    the GIL on each piece. ``map`` is None for an empty file or one that cannot be mapped (then it is read instead).

    Raises:
        OSError: the file cannot be opened.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self.hash = hashlib.sha256()
        self.done = 0
        with open(path, "rb", buffering=0) as f:
            self.size = os.fstat(f.fileno()).st_size
            self.map: Optional[mmap.mmap] = None
            try:
                if self.size:
                    self.map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
            except (OSError, ValueError):
                pass

    def step(self) -> bool:
        """Hash the next piece; False once the whole file is hashed."""
        k = min(_CHUNK, self.size - self.done)
        with memoryview(self.map) as view:
            self.hash.update(view[self.done:self.done + k])
        if hasattr(self.map, "madvise"):  # unmapped again (the page cache keeps them)
            self.map.madvise(mmap.MADV_DONTNEED, self.done, k)
        self.done += k
        return self.done < self.size

    def read(self) -> None:
        """Hash the file through a buffer (it cannot be mapped)."""
        buf = bytearray(_CHUNK)
        view = memoryview(buf)
        with open(self.path, "rb", buffering=0) as f:
            while True:
                n = f.readinto(buf)
                if not n:
                    break
                self.hash.update(view[:n])

    def close(self) -> None:
        if self.map is not None:
            self.map.close()


def file_digest(path: str) -> str:
    """The SHA-256 hex digest of a file (:class:`_MappedHash`)."""
    h = _MappedHash(path)
    try:
        if h.map is None:
            h.read()
        else:
            while h.step():
                pass
    finally:
        h.close()
    return h.hash.hexdigest()


def _interleaved(directory: str, names: List[str]) -> Dict[str, Optional[str]]:
    """:func:`file_digest` of several files on one thread, the files read side by side: each next 8 MiB piece comes
    from the file least far along (by fraction of its size). A converter reading a checkpoint's tensors in order
    finds them spread over its files in the same proportion (megatron-core and this package write a rank's items over
    two files at once), so the bytes this reads are those the converter reads next: each is read from the disk once,
    for both, instead of the converter and this competing for the disk at two places. The maps hold no descriptor:
    no limit on how many files."""
    out: Dict[str, Optional[str]] = {}
    files: List[Tuple[str, _MappedHash]] = []
    try:
        for n in names:
            try:
                h = _MappedHash(os.path.join(directory, n))
                if h.map is None:
                    h.read()
            except OSError:
                out[n] = None
                continue
            files.append((n, h))
        heap = [(0.0, i) for i, (_, h) in enumerate(files) if h.map is not None]  # (fraction done, file)
        while heap:
            _, i = heapq.heappop(heap)
            h = files[i][1]
            if h.step():
                heapq.heappush(heap, (h.done / h.size, i))
        out.update((n, h.hash.hexdigest()) for n, h in files)
    finally:
        for _, h in files:
            h.close()
    return {n: out.get(n) for n in names}


def digests(directory: str, names: Iterable[str], threads: int = 1) -> Dict[str, Optional[str]]:
    """``{name: digest}`` of files of ``directory`` (None for a file that is missing or unreadable): on one thread
    side by side (:func:`_interleaved`), else ``threads`` files at a time."""
    names = list(names)

    def one(name: str) -> Optional[str]:
        try:
            return file_digest(os.path.join(directory, name))
        except OSError:
            return None

    if threads <= 1 or len(names) <= 1:
        return _interleaved(directory, names)
    with ThreadPoolExecutor(max_workers=min(threads, len(names))) as pool:
        return dict(zip(names, pool.map(one, names)))


def manifest_files(directory: str, subdirs: bool = True) -> List[str]:
    """The files a manifest of ``directory`` lists: every regular file in it (and, with ``subdirs``, in its
    subdirectories, by ``/``-separated relative path), sorted, the manifest excluded."""
    out = []
    for e in os.scandir(directory):
        if e.is_file():
            if e.name != MANIFEST_NAME:
                out.append(e.name)
        elif subdirs and e.is_dir(follow_symlinks=False):
            out.extend(f"{e.name}/{n}" for n in manifest_files(e.path, subdirs=True))
    return sorted(out)


def present_files(directory: str, manifest: Mapping[str, str]) -> List[str]:
    """The files of ``directory`` a check against ``manifest`` compares: with its subdirectories' when the manifest
    lists any (this package's), else the directory's own (megatron-core's)."""
    return manifest_files(directory, subdirs=any("/" in n for n in manifest))


def write_manifest(directory: str, files: Mapping[str, str]) -> str:
    """Write ``directory/integrity.json`` (fsynced) for ``{name: digest}``; returns its path.

    Raises:
        ValueError: ``files`` does not name exactly the files of the directory (a manifest must cover them all).
    """
    listed = sorted(files)
    present = manifest_files(directory)
    if listed != present:
        raise ValueError(f"{directory}: a manifest of {listed} does not match the files there {present}")
    path = os.path.join(directory, MANIFEST_NAME)
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump({"algorithm": ALGORITHM, "files": {n: files[n] for n in listed}}, f, indent=2)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path


def read_manifest(directory: str) -> Optional[Dict[str, str]]:
    """``{name: digest}`` of ``directory/integrity.json``, or None when there is none.

    Raises:
        IntegrityError: a manifest that is not megatron-core's format, or of another algorithm.
    """
    path = os.path.join(directory, MANIFEST_NAME)
    if not os.path.isfile(path):
        return None
    try:
        with open(path, "r", encoding="utf-8") as f:
            data = json.load(f)
    except (ValueError, UnicodeDecodeError) as e:
        raise IntegrityError(f"{path}: not valid JSON ({e})") from None
    algorithm = data.get("algorithm", ALGORITHM) if isinstance(data, dict) else None
    files = data.get("files") if isinstance(data, dict) else None
    if algorithm != ALGORITHM:
        raise IntegrityError(f"{path}: algorithm {algorithm!r}; only {ALGORITHM!r} manifests are read")
    if not isinstance(files, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in files.items()):
        raise IntegrityError(f"{path}: 'files' must map file names to {ALGORITHM} hex digests")
    for name in files:
        parts = name.split("/")
        if not name or "\\" in name or any(p in ("", ".", "..") for p in parts):
            raise IntegrityError(f"{path}: lists {name!r}, which is not a relative file name inside the directory")
    return dict(files)


def compare(manifest: Mapping[str, str], actual: Mapping[str, Optional[str]], present: Iterable[str]) -> List[str]:
    """One line per file that differs from the manifest: changed or missing (``actual``: the digests of the files the
    manifest lists, None where unreadable), or present in the directory but not listed."""
    problems = []
    for name in sorted(manifest):
        got = actual.get(name)
        if got is None:
            problems.append(f"{name}: missing or unreadable")
        elif got != manifest[name]:
            problems.append(f"{name}: changed ({ALGORITHM} {got[:16]}..., the manifest says {manifest[name][:16]}...)")
    for name in sorted(set(present) - set(manifest)):
        problems.append(f"{name}: not in the manifest (added after it was written)")
    return problems


def verify_manifest(directory: str, threads: int = 1) -> int:
    """Check every file of ``directory`` against its manifest; returns the number of files checked.

    Raises:
        FileNotFoundError: no manifest.
        IntegrityError: naming each file that changed, is missing, or is not listed.
    """
    manifest = read_manifest(directory)
    if manifest is None:
        raise FileNotFoundError(f"{directory}: no {MANIFEST_NAME} (the checkpoint was written without a checksum "
                                "manifest)")
    problems = compare(manifest, digests(directory, sorted(manifest), threads), present_files(directory, manifest))
    if problems:
        raise IntegrityError(f"{directory}: {len(problems)} file(s) differ from {MANIFEST_NAME}: "
                             + "; ".join(problems), problems)
    return len(manifest)
