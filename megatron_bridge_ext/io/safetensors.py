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
from typing import Any, Dict, List, Mapping, Sequence, Tuple, Union

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


def read_header(path: str) -> Tuple[int, Dict[str, Any], int]:
    """Parses one safetensors header. Returns (data section start, header dict, file size)."""
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
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: corrupt safetensors header ({n} bytes of JSON expected): {e}") from None
    if not isinstance(header, dict):
        raise ValueError(f"{path}: safetensors header is a {type(header).__name__}, expected a JSON object")
    return HEADER_LEN_BYTES + n, header, size


def parse_entries(path: str, shard: int, header: Mapping[str, Any], data_start: int, size: int) -> Dict[str, Entry]:
    """Validates every tensor entry of one header and returns name -> entry, sorted by file offset."""
    data_len = size - data_start
    out: List[Tuple[int, str, Entry]] = []
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
        expected = math.prod(shape) * ITEMSIZE[dtype]
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
        out.append((begin, name, Entry(shard, dtype, tuple(shape), data_start + begin, data_start + end)))
    out.sort(key=lambda x: (x[0], x[1]))
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

