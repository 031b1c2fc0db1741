"""The safetensors file format: dtype names, header parsing and validation, file layout, one-file writes.

Shared by the HF checkpoint source and writer (and by nothing that knows about mappings or the engine).
"""

from __future__ import annotations

import json
import math
import os
import re
import struct
import sys
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch

__all__ = [
    "SAFETENSORS_DTYPES",
    "SAFE_WEIGHTS_NAME",
    "SAFE_WEIGHTS_INDEX_NAME",
    "CONFIG_NAME",
    "SHARD_RE",
    "ITEMSIZE",
    "TORCH_TO_SAFETENSORS",
    "Entry",
    "read_header",
    "read_json_object",
    "parse_metadata",
    "parse_entries",
    "shard_name",
    "tensor_bytes",
    "file_layout",
    "write_safetensors",
    "ShapeLike",
]

SAFE_WEIGHTS_NAME = "model.safetensors"
SAFE_WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
CONFIG_NAME = "config.json"

HEADER_LEN_BYTES = 8
SHARD_RE = re.compile(r"^model-\d+-of-(\d+)\.safetensors$")
# A header larger than this is certainly corrupt (the safetensors format itself caps it at 100 MB).
MAX_HEADER_BYTES = 100_000_000
# torch sizes, strides and element counts are int64
MAX_INT64 = 2**63 - 1


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
TORCH_TO_SAFETENSORS: Dict[torch.dtype, str] = {v: k for k, v in SAFETENSORS_DTYPES.items()}


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


ITEMSIZE: Dict[torch.dtype, int] = {dt: _itemsize(dt) for dt in SAFETENSORS_DTYPES.values()}



@dataclass(frozen=True)
class Entry:
    """Where one tensor lives: shard index, dtype, shape and absolute byte range in the file."""

    shard: int
    dtype: torch.dtype
    shape: Tuple[int, ...]
    start: int  # absolute offset in the file
    end: int


class _DuplicateKey(ValueError):
    pass


def _no_duplicates(pairs: List[Tuple[str, Any]]) -> Dict[str, Any]:
    """``json`` object hook: a name given twice is refused (``json.loads`` would silently keep the last one)."""
    out: Dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise _DuplicateKey(key)
        out[key] = value
    return out


def _loads(raw: Union[str, bytes], where: str, what: str) -> Any:
    try:
        text = raw.decode("utf-8") if isinstance(raw, bytes) else raw
        return json.loads(text, object_pairs_hook=_no_duplicates)
    except _DuplicateKey as e:
        raise ValueError(f"{where}: {what} names {e.args[0]!r} twice (which one is meant is ambiguous)") from None
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise ValueError(f"{where}: corrupt {what}: {e}") from None


def read_json_object(path: str, what: str = "JSON") -> Dict[str, Any]:
    """Parses a JSON file that must hold one object (config.json, an index), refusing duplicate names.

    Raises:
        FileNotFoundError: no such file.
        ValueError: corrupt JSON, a name given twice in one object, or not an object (the file named).
    """
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} is missing") from None
    value = _loads(raw, path, what)
    if not isinstance(value, dict):
        raise ValueError(f"{path}: {what} is a JSON {type(value).__name__}, expected an object")
    return value


def read_header(path: str) -> Tuple[int, Dict[str, Any], int]:
    """Parses one safetensors header. Returns (data section start, header dict, file size).

    Raises:
        FileNotFoundError: no such file.
        ValueError: naming the file: truncated, a header length beyond the file, corrupt JSON, a tensor named twice.
    """
    try:
        size = os.path.getsize(path)
    except FileNotFoundError:
        raise FileNotFoundError(f"safetensors file not found: {path}") from None
    if size < HEADER_LEN_BYTES:
        raise ValueError(
            f"{path}: file is {size} bytes, too small to hold the {HEADER_LEN_BYTES}-byte safetensors header length "
            "(truncated or not a safetensors file)"
        )
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(HEADER_LEN_BYTES))
        if n > size - HEADER_LEN_BYTES:
            raise ValueError(
                f"{path}: header length {n} is larger than the file allows ({size} bytes in all; "
                "truncated or not a safetensors file)"
            )
        if n > MAX_HEADER_BYTES:
            raise ValueError(f"{path}: header length {n} exceeds {MAX_HEADER_BYTES} bytes (corrupt header)")
        raw = f.read(n)
    header = _loads(raw, path, f"safetensors header ({n} bytes of JSON expected)")
    if not isinstance(header, dict):
        raise ValueError(f"{path}: safetensors header is a {type(header).__name__}, expected a JSON object")
    return HEADER_LEN_BYTES + n, header, size


def parse_metadata(path: str, header: Mapping[str, Any]) -> Dict[str, str]:
    """The ``__metadata__`` of a header: a string -> string object (the format's rule), or empty."""
    meta = header.get("__metadata__")
    if meta is None:
        return {}
    if not isinstance(meta, dict):
        raise ValueError(f"{path}: __metadata__ is a {type(meta).__name__}, expected a JSON object")
    bad = {k: v for k, v in meta.items() if not isinstance(v, str)}
    if bad:
        raise ValueError(f"{path}: __metadata__ values must be strings, got {bad}")
    return dict(meta)


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)  # JSON true/false are ints to Python


def parse_entries(path: str, shard: int, header: Mapping[str, Any], data_start: int, size: int) -> Dict[str, Entry]:
    """Validates every tensor entry of one header and returns name -> entry, sorted by file offset.

    Refused, with the file and the tensor named: a missing field, an unknown dtype, a shape that is not a list of
    non-negative integers (booleans and sizes past int64 included), data offsets that are not two ordered
    non-negative integers, a byte range that does not match shape x dtype, that ends beyond the file or that
    overlaps another tensor's range (one tensor would read another's bytes).
    """
    data_len = size - data_start
    out: List[Tuple[int, str, Entry]] = []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        where = f"{path}: tensor {name!r}"
        if not isinstance(info, dict) or not {"dtype", "shape", "data_offsets"} <= info.keys():
            raise ValueError(f"{where}: header entry {info!r} lacks dtype/shape/data_offsets")
        st_dtype = info["dtype"]
        if not isinstance(st_dtype, str) or st_dtype not in SAFETENSORS_DTYPES:
            raise ValueError(
                f"{where} has unknown dtype {st_dtype!r} (supported: {', '.join(sorted(SAFETENSORS_DTYPES))})"
            )
        shape = info["shape"]
        if not isinstance(shape, list) or not all(_is_int(s) and 0 <= s <= MAX_INT64 for s in shape):
            raise ValueError(f"{where}: invalid shape {shape!r} (want a list of non-negative integers)")
        if math.prod(s for s in shape if s) > MAX_INT64:
            raise ValueError(f"{where}: shape {shape} has more elements than an int64 can count")
        offsets = info["data_offsets"]
        if (
            not isinstance(offsets, list)
            or len(offsets) != 2
            or not all(_is_int(o) and o >= 0 for o in offsets)
            or offsets[0] > offsets[1]
        ):
            raise ValueError(f"{where}: invalid data_offsets {offsets!r} (want [begin, end], 0 <= begin <= end)")
        dtype = SAFETENSORS_DTYPES[st_dtype]
        begin, end = offsets
        expected = math.prod(shape) * ITEMSIZE[dtype]
        if end - begin != expected:
            raise ValueError(
                f"{where}: data_offsets {offsets} span {end - begin} bytes but shape {shape} "
                f"of {st_dtype} needs {expected}"
            )
        if end > data_len:
            raise ValueError(
                f"{where}: data_offsets {offsets} end beyond the data section "
                f"({data_len} bytes; file truncated?)"
            )
        out.append((begin, name, Entry(shard, dtype, tuple(shape), data_start + begin, data_start + end)))
    out.sort(key=lambda x: (x[0], x[2].end, x[1]))
    prev: Optional[Tuple[str, Entry]] = None
    for _, name, e in out:
        if e.end == e.start:
            continue  # an empty tensor owns no bytes
        if prev is not None and e.start < prev[1].end:
            p = prev[1]
            raise ValueError(
                f"{path}: the byte ranges of tensors {prev[0]!r} [{p.start - data_start}, {p.end - data_start}) and "
                f"{name!r} [{e.start - data_start}, {e.end - data_start}) overlap (one would read the other's bytes)"
            )
        prev = (name, e)
    return {name: entry for _, name, entry in out}


ShapeLike = Union[Sequence[int], torch.Size]


def shard_name(i: int, n: int) -> str:
    return SAFE_WEIGHTS_NAME if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors"


def tensor_bytes(t: torch.Tensor) -> memoryview:
    """The bytes of ``t`` (made contiguous here, only when needed) as a memoryview; no copy for contiguous tensors."""
    t = t.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    t = t.contiguous()
    if sys.byteorder != "little":
        raise NotImplementedError("writing safetensors on a big-endian host")
    flat = t.reshape(-1).view(torch.uint8)
    return memoryview(flat.numpy()).cast("B")


def file_layout(specs: Sequence[Tuple[str, Tuple[int, ...], torch.dtype]], metadata: Mapping[str, str]):
    """Header bytes and data offsets of one safetensors file holding ``specs`` (name, shape, dtype).

    Tensors are laid out by decreasing element size (then in the given order), so every tensor is aligned to its
    element size, as the reference writer does. Returns (header bytes incl. the length prefix, {name: (start, end)}
    relative to the data section, data bytes).
    """
    order = sorted(range(len(specs)), key=lambda i: -ITEMSIZE[specs[i][2]])
    header: Dict[str, Any] = OrderedDict()
    if metadata:
        header["__metadata__"] = dict(metadata)
    offsets: Dict[str, Tuple[int, int]] = {}
    offset = 0
    for i in order:
        name, shape, dtype = specs[i]
        n = math.prod(shape) * ITEMSIZE[dtype]
        header[name] = {"dtype": TORCH_TO_SAFETENSORS[dtype], "shape": list(shape), "data_offsets": [offset, offset + n]}
        offsets[name] = (offset, offset + n)
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-(len(raw) + HEADER_LEN_BYTES) % 8)  # data section starts 8-byte aligned
    return struct.pack("<Q", len(raw)) + raw, offsets, offset


def write_safetensors(path: str, tensors: Sequence[Tuple[str, torch.Tensor]], metadata: Mapping[str, str],
                      fsync: bool = True) -> int:
    """Writes one safetensors file in one go (flushed to disk unless ``fsync=False``). Returns the bytes of tensor
    data written."""
    head, offsets, total = file_layout([(n, tuple(t.shape), t.dtype) for n, t in tensors], metadata)
    with open(path, "wb") as f:
        f.write(head)
        for name, t in sorted(tensors, key=lambda nt: offsets[nt[0]][0]):
            if t.numel():
                f.write(tensor_bytes(t))
        f.flush()
        if fsync:
            os.fsync(f.fileno())
    return total

