"""HF checkpoint I/O: a lazy, memory-mapped safetensors source and a streaming, sharded safetensors writer.

:class:`SafeTensorsSource` parses the safetensors headers itself and hands out zero-copy views of a private
(copy-on-write) memory map of each shard, so a consumer that reads only some rows of a tensor touches only those pages:
each rank reads its own slice and nothing else.

:class:`SafeTensorsWriter` plans the shards up front from the expected keys, accepts tensors in any order, writes each
shard the moment its last tensor arrives and writes ``model.safetensors.index.json`` last, from what was actually
written. A failed (strict) export never leaves an index behind.
"""

from __future__ import annotations

import json
import math
import mmap
import os
import re
import struct
import sys
import warnings
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Dict, Iterable, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import torch

__all__ = [
    "SAFETENSORS_DTYPES",
    "SafeTensorsSource",
    "SafeTensorsWriter",
    "save_hf_tensors",
    "SAFE_WEIGHTS_NAME",
    "SAFE_WEIGHTS_INDEX_NAME",
    "CONFIG_NAME",
]

SAFE_WEIGHTS_NAME = "model.safetensors"
SAFE_WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
CONFIG_NAME = "config.json"

_HEADER_LEN_BYTES = 8
_SHARD_RE = re.compile(r"^model-\d+-of-(\d+)\.safetensors$")
# A header larger than this is certainly corrupt (the safetensors format itself caps it at 100 MB).
_MAX_HEADER_BYTES = 100_000_000


def _dtype_table() -> Dict[str, torch.dtype]:
    names = {
        "F64": "float64",
        "F32": "float32",
        "F16": "float16",
        "BF16": "bfloat16",
        "I64": "int64",
        "I32": "int32",
        "I16": "int16",
        "I8": "int8",
        "U64": "uint64",
        "U32": "uint32",
        "U16": "uint16",
        "U8": "uint8",
        "BOOL": "bool",
        "F8_E4M3": "float8_e4m3fn",
        "F8_E4M3FNUZ": "float8_e4m3fnuz",
        "F8_E5M2": "float8_e5m2",
        "F8_E5M2FNUZ": "float8_e5m2fnuz",
        "F8_E8M0": "float8_e8m0fnu",
        "C64": "complex64",
        "C128": "complex128",
    }
    return {st: getattr(torch, tn) for st, tn in names.items() if hasattr(torch, tn)}


#: safetensors dtype name -> torch dtype, for every safetensors dtype this torch build has.
SAFETENSORS_DTYPES: Dict[str, torch.dtype] = _dtype_table()
_TORCH_TO_SAFETENSORS: Dict[torch.dtype, str] = {v: k for k, v in SAFETENSORS_DTYPES.items()}


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


_ITEMSIZE: Dict[torch.dtype, int] = {dt: _itemsize(dt) for dt in SAFETENSORS_DTYPES.values()}


# --------------------------------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Entry:
    """Where one tensor lives: shard index, dtype, shape and absolute byte range in the file."""

    shard: int
    dtype: torch.dtype
    shape: Tuple[int, ...]
    start: int  # absolute offset in the file
    end: int


def _read_header(path: str) -> Tuple[int, Dict[str, Any], int]:
    """Parses one safetensors header. Returns (data section start, header dict, file size)."""
    try:
        size = os.path.getsize(path)
    except FileNotFoundError:
        raise FileNotFoundError(f"safetensors file not found: {path}") from None
    if size < _HEADER_LEN_BYTES:
        raise ValueError(
            f"{path}: file is {size} bytes, too small to hold the {_HEADER_LEN_BYTES}-byte safetensors header length "
            "(truncated or not a safetensors file)"
        )
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(_HEADER_LEN_BYTES))
        if n > size - _HEADER_LEN_BYTES:
            raise ValueError(
                f"{path}: header length {n} is larger than the file allows ({size} bytes in all; "
                "truncated or not a safetensors file)"
            )
        if n > _MAX_HEADER_BYTES:
            raise ValueError(f"{path}: header length {n} exceeds {_MAX_HEADER_BYTES} bytes (corrupt header)")
        raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: corrupt safetensors header ({n} bytes of JSON expected): {e}") from None
    if not isinstance(header, dict):
        raise ValueError(f"{path}: safetensors header is a {type(header).__name__}, expected a JSON object")
    return _HEADER_LEN_BYTES + n, header, size


def _parse_entries(path: str, shard: int, header: Mapping[str, Any], data_start: int, size: int) -> Dict[str, _Entry]:
    """Validates every tensor entry of one header and returns name -> entry, sorted by file offset."""
    data_len = size - data_start
    out: List[Tuple[int, str, _Entry]] = []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if not isinstance(info, dict) or not {"dtype", "shape", "data_offsets"} <= info.keys():
            raise ValueError(f"{path}: tensor {name!r}: header entry {info!r} lacks dtype/shape/data_offsets")
        st_dtype = info["dtype"]
        if st_dtype not in SAFETENSORS_DTYPES:
            raise ValueError(
                f"{path}: tensor {name!r} has unknown dtype {st_dtype!r} "
                f"(supported: {', '.join(sorted(SAFETENSORS_DTYPES))})"
            )
        shape = info["shape"]
        offsets = info["data_offsets"]
        if (
            not isinstance(shape, list)
            or not all(isinstance(s, int) and s >= 0 for s in shape)
            or not isinstance(offsets, list)
            or len(offsets) != 2
            or not all(isinstance(o, int) and o >= 0 for o in offsets)
            or offsets[0] > offsets[1]
        ):
            raise ValueError(f"{path}: tensor {name!r}: invalid shape {shape!r} or data_offsets {offsets!r}")
        dtype = SAFETENSORS_DTYPES[st_dtype]
        begin, end = offsets
        expected = math.prod(shape) * _ITEMSIZE[dtype]
        if end - begin != expected:
            raise ValueError(
                f"{path}: tensor {name!r}: data_offsets {offsets} span {end - begin} bytes but shape {shape} "
                f"of {st_dtype} needs {expected}"
            )
        if end > data_len:
            raise ValueError(
                f"{path}: tensor {name!r}: data_offsets {offsets} end beyond the data section "
                f"({data_len} bytes; file truncated?)"
            )
        out.append((begin, name, _Entry(shard, dtype, tuple(shape), data_start + begin, data_start + end)))
    out.sort(key=lambda x: (x[0], x[1]))
    return {name: entry for _, name, entry in out}


class SafeTensorsSource(Mapping[str, torch.Tensor]):
    """A lazy HF safetensors checkpoint: tensors are zero-copy views of a private memory map of their shard.

    Accepts a directory holding ``model.safetensors``, or shards plus ``model.safetensors.index.json``, or the path of
    one ``.safetensors`` file. Headers are parsed and validated when the source is opened; each shard is memory-mapped
    once (copy-on-write: views are writable without touching the file) on its first read.

    Args:
        path: checkpoint directory or ``.safetensors`` file.
        require_config: also require ``config.json`` in the directory.

    Raises:
        FileNotFoundError: no checkpoint, a missing shard, or a missing ``config.json`` when required.
        ValueError: a corrupt or truncated file, an unknown dtype, or an index that disagrees with its shards.
    """

    def __init__(self, path: Union[str, os.PathLike], *, require_config: bool = False) -> None:
        path = os.fspath(path)
        self.path = path
        self.index_metadata: Dict[str, Any] = {}
        self._mmaps: List[Optional[mmap.mmap]] = []
        self._closed = False
        if os.path.isfile(path):
            if not path.endswith(".safetensors"):
                raise ValueError(f"{path}: not a .safetensors file")
            self.root = os.path.dirname(os.path.abspath(path))
            files = [os.path.abspath(path)]
            index_keys: Optional[Dict[str, int]] = None
        elif os.path.isdir(path):
            self.root = os.path.abspath(path)
            files, index_keys = self._resolve_dir(self.root)
        else:
            raise FileNotFoundError(f"HF checkpoint not found: {path} is neither a directory nor a file")
        if require_config and not os.path.isfile(os.path.join(self.root, CONFIG_NAME)):
            raise FileNotFoundError(f"{self.root}: {CONFIG_NAME} is missing")
        self._files = files
        self._mmaps = [None] * len(files)
        self._entries: Dict[str, _Entry] = {}
        self._metadata: Dict[str, str] = {}
        per_file: List[Dict[str, _Entry]] = []
        for i, f in enumerate(files):
            data_start, header, size = _read_header(f)
            meta = header.get("__metadata__") or {}
            if not isinstance(meta, dict):
                raise ValueError(f"{f}: __metadata__ is a {type(meta).__name__}, expected a JSON object")
            for k, v in meta.items():
                self._metadata.setdefault(k, v)
            per_file.append(_parse_entries(f, i, header, data_start, size))
        if index_keys is None:
            for entries in per_file:
                for name, e in entries.items():
                    if name in self._entries:
                        raise ValueError(f"tensor {name!r} appears in both {self._files[self._entries[name].shard]} "
                                         f"and {self._files[e.shard]}")
                    self._entries[name] = e
        else:
            # The index is authoritative; every key it lists must be in the shard it names. Keys are kept in
            # file order: shard order, then offset within the shard.
            by_shard: List[List[str]] = [[] for _ in files]
            for name, shard in index_keys.items():
                if name not in per_file[shard]:
                    raise ValueError(
                        f"{os.path.join(self.root, SAFE_WEIGHTS_INDEX_NAME)}: tensor {name!r} is listed in "
                        f"{os.path.basename(files[shard])} but that shard does not contain it"
                    )
                by_shard[shard].append(name)
            for shard, names in enumerate(by_shard):
                entries = per_file[shard]
                for name in sorted(names, key=lambda n: entries[n].start):
                    self._entries[name] = entries[name]
        self._keys = list(self._entries)

    def _resolve_dir(self, root: str) -> Tuple[List[str], Optional[Dict[str, int]]]:
        index_path = os.path.join(root, SAFE_WEIGHTS_INDEX_NAME)
        single = os.path.join(root, SAFE_WEIGHTS_NAME)
        if os.path.isfile(index_path):
            try:
                with open(index_path, "r", encoding="utf-8") as f:
                    index = json.load(f)
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                raise ValueError(f"{index_path}: corrupt index JSON: {e}") from None
            weight_map = index.get("weight_map") if isinstance(index, dict) else None
            if not isinstance(weight_map, dict):
                raise ValueError(f"{index_path}: no 'weight_map' object")
            self.index_metadata = dict(index.get("metadata") or {})
            shard_names: Dict[str, int] = {}
            keys: Dict[str, int] = {}
            for name, fname in weight_map.items():
                if not isinstance(fname, str):
                    raise ValueError(f"{index_path}: tensor {name!r} maps to {fname!r}, expected a file name")
                if fname not in shard_names:
                    shard_names[fname] = len(shard_names)
                keys[name] = shard_names[fname]
            # Shards in name order (model-00001-of-N, ...), so keys() follows the files.
            ordered = sorted(shard_names)
            remap = {shard_names[n]: i for i, n in enumerate(ordered)}
            files = []
            for fname in ordered:
                fpath = os.path.join(root, fname)
                if not os.path.isfile(fpath):
                    listed = [k for k, s in keys.items() if s == shard_names[fname]]
                    raise FileNotFoundError(
                        f"{index_path}: shard {fname} is missing from {root} "
                        f"(it holds {len(listed)} tensors, e.g. {listed[0]!r})"
                    )
                files.append(fpath)
            return files, {k: remap[s] for k, s in keys.items()}
        if os.path.isfile(single):
            return [single], None
        found = sorted(f for f in os.listdir(root) if f.endswith(".safetensors"))
        m = _SHARD_RE.match(found[0]) if len(found) == 1 else None
        if m and int(m.group(1)) > 1:
            raise FileNotFoundError(
                f"{root}: only shard {found[0]} of {int(m.group(1))} is present and {SAFE_WEIGHTS_INDEX_NAME} is "
                "missing (incomplete checkpoint)"
            )
        if len(found) == 1:
            return [os.path.join(root, found[0])], None
        if found:
            raise FileNotFoundError(
                f"{root}: {len(found)} .safetensors files ({', '.join(found[:4])}...) but no {SAFE_WEIGHTS_INDEX_NAME}"
            )
        raise FileNotFoundError(f"{root}: no {SAFE_WEIGHTS_NAME} and no {SAFE_WEIGHTS_INDEX_NAME}")

    # ---- mapping API ----------------------------------------------------------------------------------------------

    def keys(self) -> List[str]:  # type: ignore[override]
        """All tensor names, in file order (shard by shard, by offset)."""
        return list(self._keys)

    def get_all_keys(self) -> List[str]:
        """Alias of :meth:`keys`."""
        return self.keys()

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)

    def __contains__(self, key: object) -> bool:
        return key in self._entries

    def _entry(self, key: str) -> _Entry:
        try:
            return self._entries[key]
        except KeyError:
            raise KeyError(f"tensor {key!r} is not in the HF checkpoint {self.path}") from None

    def __getitem__(self, key: str) -> torch.Tensor:
        """A zero-copy, writable (copy-on-write) view of tensor ``key``."""
        e = self._entry(key)
        numel = math.prod(e.shape)
        if numel == 0:
            return torch.empty(e.shape, dtype=e.dtype)
        mm = self._mmap(e.shard)
        itemsize = _ITEMSIZE[e.dtype]
        if e.start % itemsize:
            # Misaligned data (not produced by the standard writers): copy rather than hand out a misaligned view.
            raw = torch.frombuffer(mm, dtype=torch.uint8, count=e.end - e.start, offset=e.start)
            return raw.clone().view(e.dtype).view(e.shape)
        return torch.frombuffer(mm, dtype=e.dtype, count=numel, offset=e.start).view(e.shape)

    def get(self, key: str, default: Any = None) -> Any:  # type: ignore[override]
        """The tensor ``key``, or ``default`` when the checkpoint lacks it."""
        if key not in self._entries:
            return default
        return self[key]

    def dtype(self, key: str) -> torch.dtype:
        """torch dtype of ``key`` (no data read)."""
        return self._entry(key).dtype

    def shape(self, key: str) -> Tuple[int, ...]:
        """Shape of ``key`` (no data read)."""
        return self._entry(key).shape

    def nbytes(self, key: str) -> int:
        """Bytes of data of ``key``."""
        e = self._entry(key)
        return e.end - e.start

    def file_of(self, key: str) -> str:
        """Path of the shard holding ``key``."""
        return self._files[self._entry(key).shard]

    @property
    def files(self) -> List[str]:
        """Paths of the shard files, in order."""
        return list(self._files)

    @property
    def metadata(self) -> Dict[str, str]:
        """The ``__metadata__`` of the shards (merged; the first shard wins on conflicts)."""
        return dict(self._metadata)

    @property
    def total_size(self) -> int:
        """Bytes of tensor data in the checkpoint."""
        return sum(e.end - e.start for e in self._entries.values())

    def config(self) -> Dict[str, Any]:
        """The parsed ``config.json`` beside the weights.

        Raises:
            FileNotFoundError: when there is none.
        """
        p = os.path.join(self.root, CONFIG_NAME)
        if not os.path.isfile(p):
            raise FileNotFoundError(f"{self.root}: {CONFIG_NAME} is missing")
        with open(p, "r", encoding="utf-8") as f:
            return json.load(f)

    def _mmap(self, shard: int) -> mmap.mmap:
        if self._closed:
            raise ValueError(f"SafeTensorsSource({self.path!r}) is closed")
        mm = self._mmaps[shard]
        if mm is None:
            with open(self._files[shard], "rb") as f:  # the map keeps its own handle
                mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
            self._mmaps[shard] = mm
        return mm

    def release(self, keys: Union[str, Sequence[str]]) -> None:
        """Drop the resident pages of tensors ``keys`` (read again from the file if used later).

        A memory-mapped read keeps its pages in this process's RSS; the importer calls this after each parameter so
        that peak memory stays near the model's own size. Only pages wholly inside a tensor are dropped, and a page
        holding data written through a view is never touched by the importer (it only reads).
        """
        if self._closed or not hasattr(mmap, "MADV_DONTNEED"):
            return
        page = mmap.PAGESIZE
        for key in [keys] if isinstance(keys, str) else keys:
            e = self._entries.get(key)
            if e is None or self._mmaps[e.shard] is None:
                continue
            start = -(-e.start // page) * page
            end = (e.end // page) * page
            if end > start:
                self._mmaps[e.shard].madvise(mmap.MADV_DONTNEED, start, end - start)

    def close(self) -> None:
        """Releases the maps. Views already handed out stay valid: they keep their map alive until they die."""
        for i, mm in enumerate(self._mmaps):
            if mm is not None:
                # Unmap now only when nothing else references the map (views hold a reference to it).
                if sys.getrefcount(mm) <= 3:  # the list slot, the local name, the call argument
                    mm.close()
                self._mmaps[i] = None
        self._closed = True

    def __enter__(self) -> "SafeTensorsSource":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"SafeTensorsSource({self.path!r}, {len(self)} tensors in {len(self._files)} file(s))"


# --------------------------------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------------------------------

ShapeLike = Union[Sequence[int], torch.Size]


def _shard_name(i: int, n: int) -> str:
    return SAFE_WEIGHTS_NAME if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors"


def _tensor_bytes(t: torch.Tensor) -> memoryview:
    """The bytes of ``t`` (made contiguous here, only when needed) as a memoryview; no copy for contiguous tensors."""
    t = t.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    t = t.contiguous()
    if sys.byteorder != "little":
        raise NotImplementedError("writing safetensors on a big-endian host")
    flat = t.reshape(-1).view(torch.uint8)
    return memoryview(flat.numpy()).cast("B")


def _layout(specs: Sequence[Tuple[str, Tuple[int, ...], torch.dtype]], metadata: Mapping[str, str]):
    """Header bytes and data offsets of one safetensors file holding ``specs`` (name, shape, dtype).

    Tensors are laid out by decreasing element size (then in the given order), so every tensor is aligned to its
    element size, as the reference writer does. Returns (header bytes incl. the length prefix, {name: (start, end)}
    relative to the data section, data bytes).
    """
    order = sorted(range(len(specs)), key=lambda i: -_ITEMSIZE[specs[i][2]])
    header: Dict[str, Any] = OrderedDict()
    if metadata:
        header["__metadata__"] = dict(metadata)
    offsets: Dict[str, Tuple[int, int]] = {}
    offset = 0
    for i in order:
        name, shape, dtype = specs[i]
        n = math.prod(shape) * _ITEMSIZE[dtype]
        header[name] = {"dtype": _TORCH_TO_SAFETENSORS[dtype], "shape": list(shape), "data_offsets": [offset, offset + n]}
        offsets[name] = (offset, offset + n)
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-(len(raw) + _HEADER_LEN_BYTES) % 8)  # data section starts 8-byte aligned
    return struct.pack("<Q", len(raw)) + raw, offsets, offset


def _write_safetensors(path: str, tensors: Sequence[Tuple[str, torch.Tensor]], metadata: Mapping[str, str]) -> int:
    """Writes one safetensors file in one go. Returns the bytes of tensor data written."""
    head, offsets, total = _layout([(n, tuple(t.shape), t.dtype) for n, t in tensors], metadata)
    with open(path, "wb") as f:
        f.write(head)
        for name, t in sorted(tensors, key=lambda nt: offsets[nt[0]][0]):
            if t.numel():
                f.write(_tensor_bytes(t))
        f.flush()
        os.fsync(f.fileno())
    return total


class _OpenShard:
    """A shard being written in place: header first, each tensor at its planned offset as soon as it arrives."""

    def __init__(self, tmp: str, specs, metadata: Mapping[str, str], fsync: bool = True) -> None:
        head, self.offsets, self.data_bytes = _layout(specs, metadata)
        self.fsync = fsync
        self.tmp = tmp
        self.data_start = len(head)
        self.remaining = set(self.offsets)
        self.fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.ftruncate(self.fd, self.data_start + self.data_bytes)
        os.pwrite(self.fd, head, 0)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        start, end = self.offsets[name]
        if end > start:
            data = _tensor_bytes(tensor)
            done = 0
            while done < len(data):
                done += os.pwrite(self.fd, data[done:], self.data_start + start + done)
        self.remaining.discard(name)

    def finish(self, final: str) -> None:
        if self.fsync:
            os.fsync(self.fd)
        os.close(self.fd)
        self.fd = -1
        os.replace(self.tmp, final)

    def discard(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        if os.path.exists(self.tmp):
            os.remove(self.tmp)


class SafeTensorsWriter:
    """Streams tensors into a sharded HF safetensors checkpoint.

    Shards are planned up front, so every tensor's place in its file is known: a tensor is written there (into the
    shard's temporary file) as soon as it arrives, and nothing is kept in memory; a shard is fsynced and renamed to its
    final name as soon as its last tensor arrived. The index is written last.

    Args:
        out_dir: output directory (created if needed).
        expected: name -> (shape, dtype) of every tensor to write, in the order to write them; shards are planned
            from it up front (consecutive keys, at most ``max_shard_bytes`` of data each unless one tensor is larger).
        max_shard_bytes: shard size limit in bytes.
        strict: on :meth:`close`, fail (naming the keys) if any expected tensor never arrived.
        metadata: ``__metadata__`` of every shard (default ``{"format": "pt"}``).
        overwrite: remove checkpoint files (``model.safetensors``, ``model-*-of-*.safetensors``, the index) already in
            ``out_dir`` before writing, so that no stale file can pass for part of this checkpoint; when False their
            presence is an error.
        fsync: flush each shard to disk before renaming it to its final name (a crash then never leaves a final
            name over incomplete data); False leaves the flush to the OS (faster on slow disks).

    Raises:
        ValueError: empty ``expected``, an unsupported dtype or a bad ``max_shard_bytes``.
        FileExistsError: existing checkpoint files and ``overwrite=False``.
    """

    def __init__(
        self,
        out_dir: Union[str, os.PathLike],
        expected: Mapping[str, Tuple[ShapeLike, torch.dtype]],
        *,
        max_shard_bytes: int = 5 * 1024**3,
        strict: bool = True,
        metadata: Optional[Mapping[str, str]] = None,
        overwrite: bool = True,
        fsync: bool = True,
    ) -> None:
        if max_shard_bytes <= 0:
            raise ValueError(f"max_shard_bytes must be positive, got {max_shard_bytes}")
        if not expected:
            raise ValueError("SafeTensorsWriter: no expected tensors")
        self.out_dir = os.fspath(out_dir)
        self.strict = strict
        self.fsync = fsync
        self.metadata = dict(metadata) if metadata is not None else {"format": "pt"}
        self._expected: Dict[str, Tuple[Tuple[int, ...], torch.dtype]] = {}
        for name, spec in expected.items():
            try:
                shape, dtype = spec
            except (TypeError, ValueError):
                raise ValueError(f"expected[{name!r}] = {spec!r}: want (shape, dtype)") from None
            if dtype not in _TORCH_TO_SAFETENSORS:
                raise ValueError(f"expected[{name!r}]: dtype {dtype} has no safetensors equivalent")
            self._expected[name] = (tuple(int(s) for s in shape), dtype)

        # Plan: consecutive keys, greedily packed under the limit.
        plan: List[List[str]] = [[]]
        size = 0
        for name, (shape, dtype) in self._expected.items():
            n = math.prod(shape) * _ITEMSIZE[dtype]
            if plan[-1] and size + n > max_shard_bytes:
                plan.append([])
                size = 0
            plan[-1].append(name)
            size += n
        self._plan = plan
        self._shard_of: Dict[str, int] = {n: i for i, names in enumerate(plan) for n in names}
        self._file_names = [_shard_name(i, len(plan)) for i in range(len(plan))]
        self._open: Dict[int, _OpenShard] = {}  # shards with at least one tensor written, not yet finished
        self._received: set = set()
        self._shard_done = [False] * len(plan)
        self._weight_map: Dict[str, str] = {}
        self._written_files: List[str] = []
        self._total_size = 0
        self._closed = False

        os.makedirs(self.out_dir, exist_ok=True)
        stale = [
            f
            for f in os.listdir(self.out_dir)
            if f in (SAFE_WEIGHTS_NAME, SAFE_WEIGHTS_INDEX_NAME) or _SHARD_RE.match(f)
        ]
        if stale and not overwrite:
            raise FileExistsError(f"{self.out_dir} already holds checkpoint files: {sorted(stale)}")
        # The index goes first, so that an interrupted clean-up never leaves an index pointing at a mix of files.
        for f in sorted(stale, key=lambda f: f != SAFE_WEIGHTS_INDEX_NAME):
            os.remove(os.path.join(self.out_dir, f))

    # ---- introspection --------------------------------------------------------------------------------------------

    @property
    def num_shards(self) -> int:
        """Number of planned shards."""
        return len(self._plan)

    @property
    def shard_plan(self) -> Dict[str, List[str]]:
        """Planned file name -> keys it will hold."""
        return {f: list(names) for f, names in zip(self._file_names, self._plan)}

    @property
    def written_files(self) -> List[str]:
        """Paths of the shards written so far."""
        return list(self._written_files)

    @property
    def total_size(self) -> int:
        """Bytes of tensor data written so far."""
        return self._total_size

    def missing(self) -> List[str]:
        """Expected keys that have not arrived, in expected order."""
        return [n for n in self._expected if n not in self._received]

    # ---- writing --------------------------------------------------------------------------------------------------

    def add(self, name: str, tensor: torch.Tensor) -> Optional[str]:
        """Hands in one tensor; writes its shard if this was the shard's last missing tensor.

        Returns:
            the path of the shard written by this call, or None.

        Raises:
            ValueError: unexpected or duplicated key, shape/dtype different from the expected one, or a closed writer.
        """
        if self._closed:
            raise ValueError(f"SafeTensorsWriter({self.out_dir!r}) is closed; cannot add {name!r}")
        if name not in self._expected:
            raise ValueError(f"unexpected tensor {name!r}: not among the {len(self._expected)} expected keys")
        if name in self._received:
            raise ValueError(f"tensor {name!r} was already added")
        if not isinstance(tensor, torch.Tensor):
            raise ValueError(f"tensor {name!r}: got {type(tensor).__name__}, expected a torch.Tensor")
        shape, dtype = self._expected[name]
        if tuple(tensor.shape) != shape or tensor.dtype != dtype:
            raise ValueError(
                f"tensor {name!r}: got shape {tuple(tensor.shape)} {tensor.dtype}, expected {shape} {dtype}"
            )
        shard = self._shard_of[name]
        open_shard = self._open.get(shard)
        if open_shard is None:
            tmp = os.path.join(self.out_dir, f".{self._file_names[shard]}.tmp-{os.getpid()}")
            specs = [(n, *self._expected[n]) for n in self._plan[shard]]
            open_shard = self._open[shard] = _OpenShard(tmp, specs, self.metadata, self.fsync)
        try:
            open_shard.write(name, tensor)  # straight to its place in the file: nothing is buffered
        except BaseException:
            self.abort()
            raise
        self._received.add(name)
        if not open_shard.remaining:
            return self._finish_shard(shard)
        return None

    def _finish_shard(self, shard: int) -> str:
        open_shard = self._open.pop(shard)
        final = os.path.join(self.out_dir, self._file_names[shard])
        try:
            open_shard.finish(final)
        except BaseException:
            open_shard.discard()
            raise
        self._shard_done[shard] = True
        self._total_size += open_shard.data_bytes
        for n in self._plan[shard]:
            self._weight_map[n] = self._file_names[shard]
        self._written_files.append(final)
        return final

    def _compact_shard(self, shard: int) -> None:
        """Non-strict close of a shard that misses tensors: rewrite it with only what arrived."""
        open_shard = self._open.pop(shard)
        os.fsync(open_shard.fd)
        names = [n for n in self._plan[shard] if n in self._received]
        with open(open_shard.tmp, "rb") as f:
            blob = f.read()
        tensors = []
        for n in names:
            start, end = open_shard.offsets[n]
            shape, dtype = self._expected[n]
            raw = bytearray(blob[open_shard.data_start + start: open_shard.data_start + end])
            t = torch.frombuffer(raw, dtype=dtype) if raw else torch.empty(0, dtype=dtype)
            tensors.append((n, t.view(shape)))
        final = os.path.join(self.out_dir, self._file_names[shard])
        tmp = open_shard.tmp + ".compact"
        try:
            nbytes = _write_safetensors(tmp, tensors, self.metadata)
            os.replace(tmp, final)
        finally:
            open_shard.discard()
            if os.path.exists(tmp):
                os.remove(tmp)
        self._shard_done[shard] = True
        self._total_size += nbytes
        for n in names:
            self._weight_map[n] = self._file_names[shard]
        self._written_files.append(final)

    def close(self) -> Dict[str, Any]:
        """Finishes the checkpoint: writes the index (several shards) last, from what was written.

        Returns:
            ``{"files": [...], "total_size": bytes, "missing": [...], "index": path or None}``.

        Raises:
            ValueError: strict mode and some expected keys never arrived (all named); then no index is written and
                the incomplete shards are never written.
        """
        if self._closed:
            raise ValueError(f"SafeTensorsWriter({self.out_dir!r}) is already closed")
        self._closed = True
        missing = self.missing()
        if missing and self.strict:
            self._discard_open()
            raise ValueError(
                f"HF export to {self.out_dir} is incomplete: {len(missing)} of {len(self._expected)} expected "
                f"tensors never arrived: {missing}; no index was written"
            )
        if missing:
            warnings.warn(
                f"HF export to {self.out_dir}: {len(missing)} expected tensors never arrived and are not saved: "
                f"{missing}",
                stacklevel=2,
            )
            for shard in sorted(self._open):
                self._compact_shard(shard)
        index_path = None
        if len(self._plan) > 1 and self._weight_map:
            weight_map = {n: self._weight_map[n] for n in self._expected if n in self._weight_map}
            index = {"metadata": {"total_size": self._total_size}, "weight_map": weight_map}
            index_path = os.path.join(self.out_dir, SAFE_WEIGHTS_INDEX_NAME)
            tmp = index_path + f".tmp-{os.getpid()}"
            with open(tmp, "w", encoding="utf-8") as f:
                json.dump(index, f, indent=2)
                f.write("\n")
            os.replace(tmp, index_path)
        return {"files": self.written_files, "total_size": self._total_size, "missing": missing, "index": index_path}

    def abort(self) -> None:
        """Stops without finishing: pending tensors are dropped, no index is written."""
        self._closed = True
        self._discard_open()

    def _discard_open(self) -> None:
        """Removes every unfinished shard's temporary file."""
        for open_shard in self._open.values():
            open_shard.discard()
        self._open.clear()

    def __enter__(self) -> "SafeTensorsWriter":
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is not None:
            self.abort()
        elif not self._closed:
            self.close()

    def __repr__(self) -> str:
        return (
            f"SafeTensorsWriter({self.out_dir!r}, {len(self._expected)} tensors in {len(self._plan)} shard(s), "
            f"{len(self._received)} received, {len(self._written_files)} shard(s) written)"
        )


def save_hf_tensors(
    out_dir: Union[str, os.PathLike],
    named_tensors: Iterable[Tuple[str, torch.Tensor]],
    expected: Mapping[str, Tuple[ShapeLike, torch.dtype]],
    *,
    max_shard_bytes: int = 5 * 1024**3,
    strict: bool = True,
    metadata: Optional[Mapping[str, str]] = None,
    show_progress: bool = False,
) -> Dict[str, Any]:
    """Writes ``(name, tensor)`` pairs, in any order, to a sharded safetensors checkpoint.

    Args:
        out_dir: output directory.
        named_tensors: the tensors; consumed lazily, each shard written as soon as it is complete.
        expected: name -> (shape, dtype), in the order to write (see :class:`SafeTensorsWriter`).
        max_shard_bytes: shard size limit.
        strict: fail, naming them, if expected keys never arrive.
        metadata: shard ``__metadata__``.
        show_progress: a progress bar over the tensors.

    Returns:
        the summary of :meth:`SafeTensorsWriter.close`.
    """
    with SafeTensorsWriter(
        out_dir, expected, max_shard_bytes=max_shard_bytes, strict=strict, metadata=metadata
    ) as writer:
        if show_progress:
            from rich.progress import Progress

            with Progress(transient=True) as progress:
                task = progress.add_task("saving HF tensors", total=len(expected))
                for name, tensor in named_tensors:
                    writer.add(name, tensor)
                    progress.advance(task)
        else:
            for name, tensor in named_tensors:
                writer.add(name, tensor)
        return writer.close()
