"""Reading megatron-core ``torch_dist`` checkpoints without running anything they contain.

A ``torch_dist`` checkpoint directory (megatron-core's ``dist_checkpointing`` over ``torch.distributed.checkpoint``)::

    metadata.json       {"sharded_backend": "torch_dist", ...}
    .metadata           a pickle: torch.distributed.checkpoint's ``Metadata`` (every tensor's global shape, dtype and
                        stored chunks; every sharded object's key; where the bytes of each are: file, offset, length)
    __R_T.distcp        the bytes: one ``torch.save`` archive per stored chunk or sharded object, back to back
    common.pt           the common state (megatron-core <= 0.18); 0.19 stores it as the sharded object
                        ``common_state`` inside the ``.distcp`` files instead and writes no ``common.pt``

torch.distributed.checkpoint's ``FileSystemReader`` unpickles ``.metadata`` with plain ``pickle.load`` and loads
sharded objects with ``torch.load(weights_only=False)``, so a downloaded checkpoint can run code on the machine
reading it. Here nothing from the directory is run:

- ``.metadata`` goes through a restricted unpickler that resolves only :data:`METADATA_GLOBALS` (the metadata
  dataclasses of torch.distributed.checkpoint, ``torch.Size``, dtypes, layouts); any other class is refused, naming
  the file and the class, before anything is constructed.
- every ``torch.save`` archive (a tensor chunk, a sharded object, the common state) is first scanned by an unpickler
  that calls nothing (every class it names becomes an inert placeholder) to collect the classes it names; one
  outside :data:`TENSOR_GLOBALS` (tensor chunks) or :data:`OBJECT_GLOBALS` (sharded objects and the common state) is
  refused, naming the file, the tensor or object key and the class. Only then is it read: a tensor chunk in the plain
  form ``torch.save`` gives a contiguous tensor (one little-endian storage, stored uncompressed, exactly the tensor)
  has its bytes read straight into the destination, the pickle having said nothing else; any other archive is loaded
  with ``torch.load(weights_only=True)``, with exactly the extra classes of that list admitted.
- megatron-core's own classes that a Megatron-LM common state holds (enums such as ``AttnBackend`` in ``args``,
  ``OptimizerConfig``) are never imported: they load as :class:`StoredObject` records of what they were built from.

The structure is checked when the checkpoint is opened (:class:`TorchDistCheckpoint`), before a byte of tensor data
is read, and every fault names the file and, where there is one, the tensor key: ``metadata.json`` of another backend;
a storage entry naming a file that is missing or not a plain name in the directory, reaching past the end of its file
(a truncated ``.distcp``) or overlapping another; a tensor chunk or object whose bytes no entry holds; chunks outside
their tensor, overlapping each other or leaving part of it uncovered. Reading a chunk checks that the archive holds
one tensor of the chunk's shape and of the tensor's dtype.

The reading API works on global coordinates, so a caller can take any slice of any tensor from whichever stored
chunks overlap it, without a model: :meth:`TorchDistCheckpoint.read_slice` (``offsets``, ``sizes``),
:meth:`~TorchDistCheckpoint.read_tensor`, :meth:`~TorchDistCheckpoint.read_chunk`; sharded objects by their unique
key (:meth:`~TorchDistCheckpoint.read_object`); the common state of either layout (:meth:`~TorchDistCheckpoint.common_state`).
"""

from __future__ import annotations

import _compat_pickle
import bisect
import contextlib
import functools
import io
import json
import math
import mmap
import os
import pickle
import sys
import warnings
import zipfile
from dataclasses import dataclass, field
from typing import Any, Dict, FrozenSet, Iterator, List, Optional, Sequence, Tuple

import torch

from megatron_bridge_ext.io.read_ahead import WillNeedFiles

__all__ = [
    "METADATA_NAME",
    "CONFIG_NAME",
    "COMMON_NAME",
    "COMMON_STATE_KEY",
    "METADATA_GLOBALS",
    "TENSOR_GLOBALS",
    "OBJECT_GLOBALS",
    "CheckpointFormatError",
    "UnsafeCheckpointError",
    "StoredObject",
    "ChunkEntry",
    "TensorEntry",
    "ObjectEntry",
    "TorchDistCheckpoint",
    "sharded_object_key",
    "read_backend",
]

METADATA_NAME = ".metadata"
CONFIG_NAME = "metadata.json"
COMMON_NAME = "common.pt"
#: the key of the sharded object that holds the common state since megatron-core 0.19
COMMON_STATE_KEY = "common_state"
_BACKEND = "torch_dist"

# ---------------------------------------------------------------------------------------------------------------------
# The allowlist: every class a file of a torch_dist checkpoint may name. One place; the tests load files written by
# megatron-core 0.16.1 and 0.19.2 through it.
# ---------------------------------------------------------------------------------------------------------------------

_DCP_MD = "torch.distributed.checkpoint.metadata"
_DCP_PLAN = "torch.distributed.checkpoint.planner"
_DCP_FS = "torch.distributed.checkpoint.filesystem"


def _torch_names(kind: type) -> FrozenSet[Tuple[str, str]]:
    return frozenset(("torch", n) for n, v in vars(torch).items() if isinstance(v, kind))


_DTYPES = _torch_names(torch.dtype)
_LAYOUTS = {str(v): v for v in vars(torch).values() if isinstance(v, torch.layout)}

#: ``.metadata``: torch.distributed.checkpoint's metadata dataclasses (and the save plans megatron-core caches there
#: as ``all_local_plans``), ``torch.Size``, dtypes, and layouts (pickled by name through ``_get_layout``).
METADATA_GLOBALS: FrozenSet[Tuple[str, str]] = frozenset({
    (_DCP_MD, "Metadata"), (_DCP_MD, "TensorStorageMetadata"), (_DCP_MD, "BytesStorageMetadata"),
    (_DCP_MD, "ChunkStorageMetadata"), (_DCP_MD, "TensorProperties"), (_DCP_MD, "_MEM_FORMAT_ENCODING"),
    (_DCP_MD, "MetadataIndex"), (_DCP_MD, "StorageMeta"),
    (_DCP_FS, "_StorageInfo"),
    (_DCP_PLAN, "SavePlan"), (_DCP_PLAN, "WriteItem"), (_DCP_PLAN, "WriteItemType"), (_DCP_PLAN, "TensorWriteData"),
    ("torch", "Size"), ("torch.serialization", "_get_layout"),
}) | _DTYPES

#: a ``torch.save`` archive of one tensor chunk: the tensor rebuild, its storage class, its (empty) hooks dict.
TENSOR_GLOBALS: FrozenSet[Tuple[str, str]] = frozenset({
    ("torch._utils", "_rebuild_tensor_v2"), ("collections", "OrderedDict"), ("torch", "Size"),
}) | frozenset(("torch", n) for n, v in vars(torch).items() if n.endswith("Storage") and isinstance(v, type)) \
    | _DTYPES

#: megatron-core classes of a Megatron-LM common state, loaded as :class:`StoredObject` records (never imported):
#: megatron-core 0.19's ``safe_globals`` list, which its own loader admits.
_MEGATRON_RECORDS: FrozenSet[Tuple[str, str]] = frozenset({
    ("megatron.core.transformer.enums", "AttnBackend"), ("megatron.core.transformer.enums", "CudaGraphModule"),
    ("megatron.core.transformer.enums", "CudaGraphScope"),
    ("megatron.core.transformer.enums", "InferenceCudaGraphScope"), ("megatron.core.enums", "ModelType"),
    ("megatron.core.optimizer.optimizer_config", "OptimizerConfig"),
    ("megatron.core.rerun_state_machine", "RerunDiagnostic"), ("megatron.core.rerun_state_machine", "RerunMode"),
    ("megatron.core.rerun_state_machine", "RerunState"),
})

#: plain Python and library classes of a sharded object or a common state (``args`` is an ``argparse.Namespace``,
#: ``exit_signal`` a ``signal.Signals``; bytes pickle through ``_codecs.encode`` at protocol 2), numpy arrays and
#: scalars, and the megatron-core records above.
_OBJECT_PLAIN: FrozenSet[Tuple[str, str]] = frozenset({
    ("builtins", "set"), ("builtins", "frozenset"), ("builtins", "complex"), ("builtins", "slice"),
    ("builtins", "bytearray"), ("_codecs", "encode"), ("collections", "OrderedDict"),
    ("argparse", "Namespace"), ("types", "SimpleNamespace"), ("pathlib", "PosixPath"),
    ("pathlib", "PurePosixPath"), ("_io", "BytesIO"), ("signal", "Signals"),
    ("torch._utils", "_rebuild_parameter"), ("torch", "device"),
    ("numpy", "ndarray"), ("numpy", "dtype"),
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
})
_NUMPY_DTYPE_CLASSES = tuple(f"{k}DType" for k in (
    "Bool", "Int8", "UInt8", "Int16", "UInt16", "Int32", "UInt32", "Int64", "UInt64", "Long", "ULong", "LongLong",
    "ULongLong", "Byte", "UByte", "Short", "UShort", "Int", "UInt", "Float16", "Float32", "Float64", "LongDouble",
    "Complex64", "Complex128", "CLongDouble", "Bytes", "Str"))
OBJECT_GLOBALS: FrozenSet[Tuple[str, str]] = TENSOR_GLOBALS | _OBJECT_PLAIN | _MEGATRON_RECORDS | frozenset(
    ("numpy.dtypes", n) for n in _NUMPY_DTYPE_CLASSES)


class CheckpointFormatError(ValueError):
    """A structural fault of a ``torch_dist`` checkpoint (the message names the file and the key)."""


class UnsafeCheckpointError(CheckpointFormatError):
    """A file of the checkpoint names a class outside the allowlist (nothing of it was run)."""


class StoredObject:
    """A megatron-core object of a common state, kept as the plain data it was built from: its class is neither
    imported nor run. ``qualname`` is the class (``megatron.core.transformer.enums.AttnBackend``), ``args`` what it
    was called with (an enum's value), ``state`` what was set on it (a dataclass's fields)."""

    qualname: str = "?"

    def __init__(self, *args: Any) -> None:
        self.args = args
        self.state: Any = None

    def __setstate__(self, state: Any) -> None:
        self.state = state

    @property
    def value(self) -> Any:
        """An enum's value (its single argument)."""
        return self.args[0] if len(self.args) == 1 else None

    def __eq__(self, other: Any) -> bool:
        return (isinstance(other, StoredObject) and other.qualname == self.qualname and other.args == self.args
                and other.state == self.state)

    def __hash__(self) -> int:
        return hash((self.qualname, repr(self.args)))

    def __repr__(self) -> str:
        what = ", ".join(map(repr, self.args)) if self.state is None else repr(self.state)
        return f"{self.qualname}({what})"


def _record_class(module: str, name: str) -> type:
    return type(name, (StoredObject,), {"qualname": f"{module}.{name}", "__module__": __name__})


_RECORDS: Dict[Tuple[str, str], type] = {mn: _record_class(*mn) for mn in sorted(_MEGATRON_RECORDS)}


def _normalise(module: str, name: str) -> Tuple[str, str]:
    """Python 2 names of protocol-2 pickles (``__builtin__.set``) as Python 3 names, as ``pickle`` maps them."""
    if (module, name) in _compat_pickle.NAME_MAPPING:
        return _compat_pickle.NAME_MAPPING[(module, name)]
    return _compat_pickle.IMPORT_MAPPING.get(module, module), name


def _resolve(module: str, name: str) -> Any:
    """The object an allowlisted global stands for (imports only modules of the allowlist)."""
    if (module, name) in _RECORDS:
        return _RECORDS[(module, name)]
    if (module, name) == ("torch.serialization", "_get_layout"):
        return _layout_by_name
    import importlib

    obj: Any = importlib.import_module(module)
    for part in name.split("."):
        obj = getattr(obj, part)
    return obj


def _layout_by_name(name: str) -> torch.layout:
    if name not in _LAYOUTS:
        raise CheckpointFormatError(f"unknown tensor layout {name!r}")
    return _LAYOUTS[name]


@functools.lru_cache(maxsize=None)
def _extra_safe_globals(allowed: FrozenSet[Tuple[str, str]]) -> List[Tuple[Any, str]]:
    """The allowlisted globals that ``torch.load(weights_only=True)`` does not admit by itself, as
    ``(object, "module.name")`` pairs for ``torch.serialization.safe_globals``."""
    out = []
    for module, name in sorted(allowed):
        if module == "torch" or module.startswith("torch.") or module in ("collections", "_codecs", "builtins"):
            continue  # admitted by weights_only itself
        try:
            out.append((_resolve(module, name), f"{module}.{name}"))
        except (ImportError, AttributeError):
            continue  # not installed (numpy 1 vs 2 names): a file naming it fails to load, named
    return out


@contextlib.contextmanager
def _only_safe_globals(extra: List[Tuple[Any, str]]) -> Iterator[None]:
    """While loading, the globals ``torch.load(weights_only=True)`` admits beyond its own are exactly ``extra``: those
    registered process-wide (megatron-core registers its ``safe_globals`` list when it is imported, the real
    ``AttnBackend`` among them) are set aside, so they neither widen the list nor take the place of a stand-in."""
    saved = torch.serialization.get_safe_globals()
    torch.serialization.clear_safe_globals()
    torch.serialization.add_safe_globals(list(extra))
    try:
        yield
    finally:
        torch.serialization.clear_safe_globals()
        torch.serialization.add_safe_globals(saved)


# ---------------------------------------------------------------------------------------------------------------------
# Unpicklers
# ---------------------------------------------------------------------------------------------------------------------


class _Refused(Exception):
    def __init__(self, what: str) -> None:
        super().__init__(what)
        self.what = what


def _fresh(obj: Any) -> Any:
    """A stand-in for an allowlisted global that a pickle cannot use to change the real one (its BUILD opcode can set
    attributes on whatever GLOBAL pushed, a class included): a dataclass becomes a subclass made for this load, an
    enum or a function a new function calling it; immutable objects (``torch.Size``, dtypes) stay as they are."""
    import dataclasses
    import enum

    if isinstance(obj, type) and issubclass(obj, enum.Enum):
        return lambda *args: obj(*args)
    if isinstance(obj, type) and dataclasses.is_dataclass(obj):
        return type(obj.__name__, (obj,), {"__module__": obj.__module__, "__qualname__": obj.__qualname__})
    if callable(obj) and not isinstance(obj, type):
        return lambda *args: obj(*args)
    return obj


class _MetadataUnpickler(pickle.Unpickler):
    """Builds ``.metadata`` from :data:`METADATA_GLOBALS` only (as stand-ins made for this load, see :func:`_fresh`);
    anything else raises before it is resolved."""

    def __init__(self, f: Any) -> None:
        super().__init__(f)
        self._made: Dict[Tuple[str, str], Any] = {}

    def find_class(self, module: str, name: str) -> Any:
        module, name = _normalise(module, name)
        if (module, name) not in METADATA_GLOBALS:
            raise _Refused(f"{module}.{name}")
        if (module, name) not in self._made:
            self._made[(module, name)] = _fresh(_resolve(module, name))
        return self._made[(module, name)]

    def persistent_load(self, pid: Any) -> Any:
        raise _Refused(f"persistent id {pid!r}")


class _Inert:
    """What every class and persistent id becomes while a pickle is scanned: it accepts anything and does nothing."""

    global_name: Tuple[str, str] = ("", "")

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        pass

    def __setitem__(self, key: Any, value: Any) -> None:
        pass

    def append(self, value: Any) -> None:
        pass

    def extend(self, values: Any) -> None:
        pass


class _StorageRef(_Inert):
    """A persistent id met while scanning (a ``torch.save`` storage: ``('storage', type, key, location, numel)``)."""

    def __init__(self, pid: Any) -> None:
        self.pid = pid


class _TensorSpec(_Inert):
    """What ``torch._utils._rebuild_tensor_v2`` would have been called with (it is not called)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.args = args


class _ScanUnpickler(pickle.Unpickler):
    """Walks a pickle without calling anything from it, collecting the classes it names; every class becomes an
    inert placeholder (a tensor rebuild records its arguments)."""

    def __init__(self, data: bytes) -> None:
        super().__init__(io.BytesIO(data))
        self.names: List[Tuple[str, str]] = []
        self._marks: Dict[Tuple[str, str], type] = {}

    def find_class(self, module: str, name: str) -> Any:
        mn = _normalise(module, name)
        self.names.append(mn)
        if mn == ("torch._utils", "_rebuild_tensor_v2"):
            return _TensorSpec
        if mn not in self._marks:
            self._marks[mn] = type("_Placeholder", (_Inert,), {"global_name": mn})
        return self._marks[mn]

    def persistent_load(self, pid: Any) -> Any:
        return _StorageRef(pid)


def _scan(pickled: bytes) -> Tuple[List[Tuple[str, str]], Any]:
    """The classes and functions a pickle names, in order, and its inert root object (nothing is called)."""
    scan = _ScanUnpickler(pickled)
    root = scan.load()
    return scan.names, root


#: legacy storage class -> dtype (what a ``torch.save`` archive names for a tensor's storage)
_STORAGE_DTYPES: Dict[str, torch.dtype] = {}
with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # TypedStorage deprecation note
    for _n in dir(torch):
        _cls = getattr(torch, _n)
        if _n.endswith("Storage") and isinstance(_cls, type) and _n not in ("Storage", "TypedStorage", "UntypedStorage"):
            try:
                _dt = _cls.dtype
            except Exception:  # noqa: BLE001
                continue
            if isinstance(_dt, torch.dtype):
                _STORAGE_DTYPES[_n] = _dt


def _contiguous(size: Sequence[int], stride: Sequence[int]) -> bool:
    expect = 1
    for n, st in zip(reversed(size), reversed(stride)):
        if n != 1 and st != expect:
            return False
        expect *= n
    return True


@dataclass(frozen=True)
class _RawTensor:
    """A ``torch.save`` archive of one plain contiguous tensor: where its bytes are, relative to the archive."""

    dtype: torch.dtype
    shape: Tuple[int, ...]
    data_offset: int
    nbytes: int


def _raw_tensor(root: Any, z: zipfile.ZipFile, prefix: str, head: Any) -> Optional[_RawTensor]:
    """The archive's one tensor as raw bytes, when it is the plain case ``torch.save`` writes for a contiguous
    tensor (little-endian, stored uncompressed, its whole storage, no offset); None otherwise (then it is loaded with
    ``torch.load(weights_only=True)``)."""
    if not isinstance(root, _TensorSpec) or len(root.args) < 4:
        return None
    storage, offset, size, stride = root.args[:4]
    if not isinstance(storage, _StorageRef) or not isinstance(storage.pid, tuple) or len(storage.pid) != 5:
        return None
    kind, storage_cls, key, _location, numel = storage.pid
    name = getattr(storage_cls, "global_name", ("", ""))
    if kind != "storage" or name[0] != "torch" or name[1] not in _STORAGE_DTYPES or not isinstance(key, str):
        return None
    if not (isinstance(size, tuple) and isinstance(stride, tuple) and len(size) == len(stride)
            and all(_is_count(v) for v in size + stride) and offset == 0 and _is_count(numel)):
        return None
    dtype = _STORAGE_DTYPES[name[1]]
    if numel != math.prod(size) or not _contiguous(size, stride):
        return None
    try:
        info = z.getinfo(f"{prefix}data/{key}")
        order = z.read(f"{prefix}byteorder") if f"{prefix}byteorder" in z.NameToInfo else b"little"
    except KeyError:
        return None
    if order != b"little" or sys.byteorder != "little" or info.compress_type != zipfile.ZIP_STORED \
            or info.file_size != numel * _itemsize(dtype):
        return None
    head.seek(info.header_offset)
    local = head.read(30)
    if len(local) != 30 or local[:4] != b"PK\x03\x04":
        return None
    start = info.header_offset + 30 + int.from_bytes(local[26:28], "little") + int.from_bytes(local[28:30], "little")
    return _RawTensor(dtype, tuple(size), start, info.file_size)


# ---------------------------------------------------------------------------------------------------------------------
# The checkpoint
# ---------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ChunkEntry:
    """One stored chunk of a tensor: its place in the global tensor and where its ``torch.save`` archive is."""

    key: str
    offsets: Tuple[int, ...]
    sizes: Tuple[int, ...]
    file: str
    offset: int
    length: int

    @property
    def numel(self) -> int:
        return math.prod(self.sizes)


@dataclass
class TensorEntry:
    """A tensor of the checkpoint: global shape, dtype and the stored chunks that tile it."""

    key: str
    shape: Tuple[int, ...]
    dtype: torch.dtype
    chunks: List[ChunkEntry]
    _by_offsets: Dict[Tuple[int, ...], ChunkEntry] = field(default_factory=dict, repr=False)
    _starts: List[int] = field(default_factory=list, repr=False)
    _longest0: int = field(default=0, repr=False)

    @property
    def global_shape(self) -> Tuple[int, ...]:
        return self.shape

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * _itemsize(self.dtype)

    def _index(self) -> None:
        self.chunks.sort(key=lambda c: c.offsets)
        self._by_offsets = {c.offsets: c for c in self.chunks}
        if self.shape:
            self._starts = [c.offsets[0] for c in self.chunks]
            self._longest0 = max((c.sizes[0] for c in self.chunks), default=0)

    def overlapping(self, offsets: Sequence[int], sizes: Sequence[int]) -> List[ChunkEntry]:
        """The stored chunks that overlap the global slice ``[offsets, offsets + sizes)``."""
        offsets, sizes = tuple(offsets), tuple(sizes)
        exact = self._by_offsets.get(offsets)
        if exact is not None and exact.sizes == sizes:
            return [exact]
        if not self.shape:
            return list(self.chunks)
        lo = bisect.bisect_left(self._starts, offsets[0] - self._longest0 + 1)
        hi = bisect.bisect_left(self._starts, offsets[0] + sizes[0])
        return [c for c in self.chunks[lo:hi] if _intersection(c.offsets, c.sizes, offsets, sizes) is not None]


@dataclass(frozen=True)
class ObjectEntry:
    """A sharded object of the checkpoint (``key/shard_<offset>_<shape>``) and where its archive is."""

    unique_key: str
    file: str
    offset: int
    length: int

    @property
    def key(self) -> str:
        return self.unique_key.rsplit("/shard_", 1)[0]

    @property
    def is_first_shard(self) -> bool:
        """Its global offset is zero on every axis (``.../shard_<offsets joined by .>_<global shape joined by .>``)."""
        part = self.unique_key.rsplit("/shard_", 1)[-1].split("_")[0]
        return all(o in ("0", "") for o in part.split("."))


def sharded_object_key(key: str, global_offset: Sequence[int] = (0,), global_shape: Sequence[int] = (1,)) -> str:
    """megatron-core's unique key of a sharded object (``ShardedObject.unique_key``): ``key/shard_0_1``."""
    return f"{key}/shard_{'.'.join(map(str, global_offset))}_{'.'.join(map(str, global_shape))}"


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _intersection(o1: Sequence[int], s1: Sequence[int], o2: Sequence[int], s2: Sequence[int]
                  ) -> Optional[Tuple[Tuple[int, ...], Tuple[int, ...]]]:
    """The intersection ``(offsets, sizes)`` of two boxes, or None when they share no element."""
    lo = tuple(max(a, b) for a, b in zip(o1, o2))
    hi = tuple(min(a + n, b + m) for a, n, b, m in zip(o1, s1, o2, s2))
    if any(h <= l for l, h in zip(lo, hi)):
        return None
    return lo, tuple(h - l for l, h in zip(lo, hi))


class _FileSlice(io.RawIOBase):
    """A read-only, seekable view of ``[start, start + length)`` of an open file."""

    def __init__(self, f: Any, start: int, length: int) -> None:
        super().__init__()
        self._f, self._start, self._length, self._pos = f, start, length, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._length}[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def readinto(self, buffer: Any) -> int:
        n = min(len(buffer), self._length - self._pos)
        if n <= 0:
            return 0
        self._f.seek(self._start + self._pos)
        got = self._f.readinto(memoryview(buffer)[:n])
        self._pos += got
        return got


#: bytes per read call (one call per chunk of a large tensor was slower from disk here: the kernel's read-ahead
#: overlaps the disk with the copy only between calls)
_READ_PIECE = int(os.environ.get("MBE_DCP_READ_PIECE", 4 << 20))


def _read_into(f: Any, start: int, nbytes: int, t: torch.Tensor, path: str, what: str) -> None:
    """Read ``nbytes`` at ``start`` of ``f`` into the contiguous CPU tensor ``t``'s memory."""
    if nbytes == 0:
        return
    view = memoryview(t.view(-1).view(torch.uint8).numpy())
    f.seek(start)
    done = 0
    while done < nbytes:
        n = f.readinto(view[done:done + _READ_PIECE])
        if not n:
            raise CheckpointFormatError(f"{path}: {what} ends after {done} of its {nbytes} bytes")
        done += n


def read_backend(directory: str) -> Dict[str, Any]:
    """``metadata.json`` of a distributed checkpoint, checked to be megatron-core's ``torch_dist`` backend.

    Raises:
        FileNotFoundError: no ``metadata.json`` (not a distributed checkpoint).
        CheckpointFormatError: not JSON, or another backend (named).
    """
    path = os.path.join(directory, CONFIG_NAME)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{directory}: no {CONFIG_NAME}; not a distributed (torch_dist) checkpoint")
    try:
        with open(path, "r", encoding="utf-8") as f:
            config = json.load(f)
    except (ValueError, UnicodeDecodeError) as e:
        raise CheckpointFormatError(f"{path}: not valid JSON ({e})") from None
    backend = config.get("sharded_backend") if isinstance(config, dict) else None
    if backend != _BACKEND:
        raise CheckpointFormatError(
            f"{path}: sharded_backend is {backend!r}; this reader reads megatron-core's {_BACKEND!r} checkpoints only "
            "(convert it with megatron-core first)")
    return config


class TorchDistCheckpoint:
    """An opened ``torch_dist`` checkpoint directory, its structure checked (see the module docstring).

    Attributes:
        path: the directory.
        tensors: ``{key: TensorEntry}``.
        objects: ``{unique_key: ObjectEntry}`` (sharded objects, ``common_state/shard_0_1`` included).

    Use as a context manager (or call :meth:`close`): files are opened once and kept open while reading.

    With ``map_chunks``, a whole stored chunk that is a plain tensor (what megatron-core writes) is returned by
    :meth:`read_chunk` / :meth:`read_slice` without ``out`` as a view of a private map of its file: nothing is copied
    and no fresh memory is touched (a fresh tensor's pages are zeroed by the kernel before the copy: on this
    package's 2-core machine that cost more than the copy itself), the pages come from the page cache as the caller
    touches them, writes to the view stay private to it, and :meth:`unmap` gives those pages back once the caller is
    done with the chunk.

    Raises:
        FileNotFoundError: no directory, no ``metadata.json`` or no ``.metadata``.
        UnsafeCheckpointError: ``.metadata`` names a class outside :data:`METADATA_GLOBALS`.
        CheckpointFormatError: every structural fault, naming the file and the key.
    """

    def __init__(self, path: str, map_chunks: bool = False) -> None:
        self.path = os.fspath(path)
        self.map_chunks = map_chunks
        self._maps: Dict[str, mmap.mmap] = {}
        if not os.path.isdir(self.path):
            raise FileNotFoundError(f"torch_dist checkpoint directory {self.path!r} does not exist")
        self.backend = read_backend(self.path)
        self._files: Dict[str, Any] = {}
        self._ahead = WillNeedFiles()  # read-only descriptors for read_ahead (any thread)
        self._cached: Optional[Tuple[ChunkEntry, torch.Tensor]] = None
        self._raw: Dict[ChunkEntry, Optional[_RawTensor]] = {}
        md = self._read_metadata()
        self.tensors, self.objects = self._entries(md)

    # -- opening -------------------------------------------------------------------------------------------------

    def _where(self, name: str) -> str:
        return os.path.join(self.path, name)

    def _read_metadata(self) -> Any:
        path = self._where(METADATA_NAME)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{self.path}: no {METADATA_NAME}; the distributed checkpoint is incomplete")
        with open(path, "rb") as f:
            try:
                md = _MetadataUnpickler(f).load()
            except _Refused as e:
                raise UnsafeCheckpointError(
                    f"{path}: refusing to load the class {e.what}: torch.distributed.checkpoint metadata holds only "
                    "its metadata classes, torch.Size and dtypes (nothing from the file was run)") from None
            except CheckpointFormatError as e:
                raise CheckpointFormatError(f"{path}: {e}") from None
            except Exception as e:  # noqa: BLE001  (a malformed pickle: truncated, wrong opcodes, bad state)
                raise CheckpointFormatError(f"{path}: not a readable torch.distributed.checkpoint metadata pickle "
                                            f"({type(e).__name__}: {e})") from None
        from torch.distributed.checkpoint.metadata import Metadata

        if not isinstance(md, Metadata):
            raise CheckpointFormatError(f"{path}: holds a {type(md).__name__}, not torch.distributed.checkpoint "
                                        "Metadata")
        return md

    def _entries(self, md: Any) -> Tuple[Dict[str, TensorEntry], Dict[str, ObjectEntry]]:
        from torch.distributed.checkpoint.filesystem import _StorageInfo
        from torch.distributed.checkpoint.metadata import (
            BytesStorageMetadata,
            ChunkStorageMetadata,
            MetadataIndex,
            TensorProperties,
            TensorStorageMetadata,
        )

        meta = self._where(METADATA_NAME)
        sdm, storage = getattr(md, "state_dict_metadata", None), getattr(md, "storage_data", None)
        if not isinstance(sdm, dict) or not isinstance(storage, dict):
            raise CheckpointFormatError(f"{meta}: state_dict_metadata and storage_data must be dicts, found "
                                        f"{type(sdm).__name__} and {type(storage).__name__}")
        # where each item's bytes are: (key, chunk offsets or None) -> (file, offset, length)
        where: Dict[Tuple[str, Optional[Tuple[int, ...]]], Tuple[str, int, int]] = {}
        for index, info in storage.items():
            if not isinstance(index, MetadataIndex) or not isinstance(index.fqn, str):
                raise CheckpointFormatError(f"{meta}: a storage_data key is a {type(index).__name__}, not a "
                                            "MetadataIndex")
            item = (index.fqn, None if index.offset is None else _ints(index.offset, meta, index.fqn, "offset"))
            if not isinstance(info, _StorageInfo):
                raise CheckpointFormatError(f"{meta}: the storage entry of {index.fqn} is a {type(info).__name__}")
            name, off, length = info.relative_path, info.offset, info.length
            if not isinstance(name, str) or not name or name != os.path.basename(name) or name in (".", "..") \
                    or "\\" in name or "\0" in name:
                raise CheckpointFormatError(f"{meta}: the storage entry of {index.fqn} names the file {name!r}, which "
                                            "is not a plain file name inside the checkpoint directory")
            if not _is_count(off) or not _is_count(length):
                raise CheckpointFormatError(f"{meta}: the storage entry of {index.fqn} in {name} has offset {off!r} "
                                            f"and length {length!r}; both must be integers >= 0")
            if getattr(info, "transform_descriptors", None):
                raise CheckpointFormatError(
                    f"{self._where(name)}: {index.fqn} is stored through the transforms "
                    f"{list(info.transform_descriptors)}; this reader reads untransformed torch.save archives only")
            if item in where:
                raise CheckpointFormatError(f"{meta}: two storage entries for {index.fqn}"
                                            f"{'' if item[1] is None else f' at {list(item[1])}'}")
            where[item] = (name, off, length)

        tensors: Dict[str, TensorEntry] = {}
        objects: Dict[str, ObjectEntry] = {}
        for key, item in sdm.items():
            if not isinstance(key, str):
                raise CheckpointFormatError(f"{meta}: a state_dict_metadata key is a {type(key).__name__}, not a str")
            if isinstance(item, BytesStorageMetadata):
                if (key, None) not in where:
                    raise CheckpointFormatError(f"{meta} lists the sharded object {key}, but no storage entry holds "
                                                "its bytes")
                name, off, length = where.pop((key, None))
                objects[key] = ObjectEntry(key, name, off, length)
                continue
            if not isinstance(item, TensorStorageMetadata):
                raise CheckpointFormatError(f"{meta}: {key} is described by a {type(item).__name__}")
            props = item.properties
            if not isinstance(props, TensorProperties) or not isinstance(props.dtype, torch.dtype):
                raise CheckpointFormatError(f"{meta}: {key} has no dtype")
            shape = _ints(item.size, meta, key, "shape")
            if not isinstance(item.chunks, list):
                raise CheckpointFormatError(f"{meta}: the chunks of {key} are a {type(item.chunks).__name__}")
            chunks = []
            for c in item.chunks:
                if not isinstance(c, ChunkStorageMetadata):
                    raise CheckpointFormatError(f"{meta}: a chunk of {key} is a {type(c).__name__}")
                offsets, sizes = _ints(c.offsets, meta, key, "chunk offsets"), _ints(c.sizes, meta, key, "chunk sizes")
                if len(offsets) != len(shape) or len(sizes) != len(shape):
                    raise CheckpointFormatError(
                        f"{meta}: {key} has shape {list(shape)}, but a chunk has offsets {list(offsets)} and sizes "
                        f"{list(sizes)}")
                if any(o + s > n for o, s, n in zip(offsets, sizes, shape)):
                    raise CheckpointFormatError(
                        f"{meta}: {key}'s chunk at {list(offsets)} of size {list(sizes)} reaches past the tensor's "
                        f"shape {list(shape)}")
                if (key, offsets) not in where:
                    raise CheckpointFormatError(f"{meta} lists {key} (chunk at {list(offsets)}), but no storage entry "
                                                "holds its bytes")
                name, off, length = where.pop((key, offsets))
                chunks.append(ChunkEntry(key, offsets, sizes, name, off, length))
            entry = TensorEntry(key, shape, props.dtype, chunks)
            entry._index()
            _check_tiling(meta, entry)
            tensors[key] = entry
        if where:
            (k, o), (name, _, _) = next(iter(where.items()))
            raise CheckpointFormatError(f"{self._where(name)} holds bytes of {k}{'' if o is None else f' at {list(o)}'}"
                                        f", which {meta} does not list")
        self._check_files(list(tensors.values()), list(objects.values()))
        return tensors, objects

    def _check_files(self, tensors: List[TensorEntry], objects: List[ObjectEntry]) -> None:
        """Every file exists, and its entries lie inside it without overlapping."""
        per_file: Dict[str, List[Tuple[int, int, str]]] = {}
        for t in tensors:
            for c in t.chunks:
                per_file.setdefault(c.file, []).append((c.offset, c.length, f"{t.key} (chunk at {list(c.offsets)})"))
        for o in objects:
            per_file.setdefault(o.file, []).append((o.offset, o.length, f"the sharded object {o.unique_key}"))
        for name, spans in sorted(per_file.items()):
            path = self._where(name)
            if not os.path.isfile(path):
                raise CheckpointFormatError(f"{path} is missing: {self._where(METADATA_NAME)} stores "
                                            f"{spans[0][2]}{f' and {len(spans) - 1} more' if len(spans) > 1 else ''} "
                                            "there")
            size = os.path.getsize(path)
            spans.sort()
            prev_end, prev_what = 0, None
            for off, length, what in spans:
                if off + length > size:
                    raise CheckpointFormatError(
                        f"{path}: {what} is stored at bytes {off}-{off + length}, past the end of the file ({size} "
                        "bytes): the file is truncated")
                if prev_what is not None and off < prev_end:
                    raise CheckpointFormatError(f"{path}: the bytes of {what} (from {off}) overlap those of "
                                                f"{prev_what} (up to {prev_end})")
                if off + length >= prev_end:
                    prev_end, prev_what = off + length, what

    # -- files -----------------------------------------------------------------------------------------------------

    def _open(self, name: str) -> Any:
        f = self._files.get(name)
        if f is None:
            f = self._files[name] = open(self._where(name), "rb")
        return f

    def read_ahead(self, chunks: Sequence[ChunkEntry]) -> int:
        """Ask the kernel to start reading these chunks' bytes into the page cache now, without waiting
        (:func:`~megatron_bridge_ext.io.read_ahead.will_need`): the streamed export calls it, on a thread of its own,
        for the next parameters' chunks while it converts the current ones. Nothing is read into this process.
        Returns the bytes asked for (none once closed)."""
        total = 0
        for chunk in chunks:
            if not self._ahead.will_need(self._where(chunk.file), chunk.offset, chunk.length):
                break
            total += chunk.length
        return total

    def close(self) -> None:
        """Close the files opened for reading. The maps are not closed here: a tensor returned as a view of one holds
        a reference to it (``torch.frombuffer``), and a map goes with its last view."""
        self._cached = None
        self._maps.clear()
        for f in self._files.values():
            f.close()
        self._files.clear()
        self._cached = None
        self._ahead.close()

    def __enter__(self) -> "TorchDistCheckpoint":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _inspect_archive(self, stream: Any, path: str, what: str, allowed: FrozenSet[Tuple[str, str]],
                         want_raw: bool = False) -> Optional[_RawTensor]:
        """Check one ``torch.save`` archive: a zip with one pickle naming only ``allowed`` classes (scanned, nothing
        called). With ``want_raw``, where the bytes of its one plain tensor are (:func:`_raw_tensor`), if it is one."""
        head = stream.read(4)
        stream.seek(0)
        if head != b"PK\x03\x04":
            raise CheckpointFormatError(f"{path}: {what} is not a torch.save archive (it starts with {head!r})")
        try:
            with zipfile.ZipFile(stream) as z:
                names = z.namelist()
                pkl = [n for n in names if n == "data.pkl" or n.endswith("/data.pkl")]
                if len(pkl) != 1 or len(set(names)) != len(names):
                    raise CheckpointFormatError(f"{path}: {what} is not a torch.save archive (entries {names[:8]})")
                pickled = z.read(pkl[0])
                try:
                    names_used, root = _scan(pickled)
                except Exception as e:  # noqa: BLE001
                    raise CheckpointFormatError(
                        f"{path}: {what} holds a malformed pickle ({type(e).__name__}: {e})") from None
                refused = [f"{m}.{n}" for m, n in names_used if (m, n) not in allowed]
                if refused:
                    raise UnsafeCheckpointError(
                        f"{path}: {what} tries to load the class {refused[0]}, which a checkpoint of tensors and "
                        "plain data does not hold; refused (nothing from the file was run)")
                return _raw_tensor(root, z, pkl[0][:-len("data.pkl")], stream) if want_raw else None
        except (zipfile.BadZipFile, EOFError, OSError, ValueError, KeyError) as e:
            if isinstance(e, CheckpointFormatError):
                raise
            raise CheckpointFormatError(f"{path}: {what} is not a readable torch.save archive ({e})") from None

    def _load_archive(self, stream: Any, path: str, what: str, allowed: FrozenSet[Tuple[str, str]]) -> Any:
        """``torch.load(weights_only=True)`` of one ``torch.save`` archive, after checking every class it names."""
        self._inspect_archive(stream, path, what, allowed)
        stream.seek(0)
        try:
            with _only_safe_globals(_extra_safe_globals(allowed)):
                return torch.load(stream, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001  (torch's zip reader and weights_only unpickler)
            raise CheckpointFormatError(f"{path}: {what} is not a readable torch.save archive ({type(e).__name__}: "
                                        f"{str(e).splitlines()[0] if str(e) else ''})") from None

    # -- tensors ---------------------------------------------------------------------------------------------------

    def tensor(self, key: str) -> TensorEntry:
        """The entry of ``key``.

        Raises:
            KeyError: naming the key and the checkpoint.
        """
        entry = self.tensors.get(key)
        if entry is None:
            raise KeyError(f"{self.path} holds no tensor {key!r}")
        return entry

    def _mismatch(self, chunk: ChunkEntry, shape: Sequence[int], dtype: torch.dtype) -> None:
        entry = self.tensor(chunk.key)
        if tuple(shape) != chunk.sizes or dtype != entry.dtype:
            raise CheckpointFormatError(
                f"{self._where(chunk.file)}: {chunk.key} (chunk at {list(chunk.offsets)}) holds a {list(shape)} "
                f"{str(dtype).replace('torch.', '')} tensor; the metadata says {list(chunk.sizes)} "
                f"{str(entry.dtype).replace('torch.', '')}")

    def read_chunk(self, chunk: ChunkEntry, out: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The stored chunk, checked to be one tensor of the chunk's shape and the tensor's dtype; into ``out`` (of the
        chunk's shape) when given. A plain contiguous tensor's bytes are read straight into ``out`` (or a new tensor)
        once its archive is checked; any other archive is loaded with ``torch.load(weights_only=True)``."""
        cached = self._cached
        if cached is not None and cached[0] == chunk:
            return cached[1] if out is None else out.copy_(cached[1])
        path = self._where(chunk.file)
        what = f"{chunk.key} (chunk at {list(chunk.offsets)})"
        f = self._open(chunk.file)
        raw = self._raw.get(chunk)
        if raw is None and chunk not in self._raw:
            raw = self._raw[chunk] = self._inspect_archive(_FileSlice(f, chunk.offset, chunk.length), path, what,
                                                           TENSOR_GLOBALS, want_raw=True)
        if raw is not None:
            self._mismatch(chunk, raw.shape, raw.dtype)
            start = chunk.offset + raw.data_offset
            if out is None and self.map_chunks and raw.nbytes and start % _itemsize(raw.dtype) == 0:
                return self._mapped(chunk, f, start, raw, path, what)  # not kept: a view costs nothing to make
            direct = out is not None and out.dtype == raw.dtype and out.is_contiguous() and out.device.type == "cpu"
            t = out if direct else torch.empty(raw.shape, dtype=raw.dtype)
            _read_into(f, start, raw.nbytes, t, path, what)
        else:
            t = self._load_archive(_FileSlice(f, chunk.offset, chunk.length), path, what, TENSOR_GLOBALS)
            if not isinstance(t, torch.Tensor):
                raise CheckpointFormatError(f"{path}: {what} holds a {type(t).__name__}, not a tensor")
            self._mismatch(chunk, t.shape, t.dtype)
            direct = False
        if direct:
            return t
        if out is not None:
            return out.copy_(t)
        self._cached = (chunk, t)
        return t

    def read_slice(self, key: str, offsets: Sequence[int], sizes: Sequence[int],
                   out: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The global slice ``[offsets, offsets + sizes)`` of tensor ``key``, assembled from the stored chunks that
        overlap it (each read once). ``out`` (of shape ``sizes``; any dtype, cast on copy) receives it if given.

        Raises:
            KeyError: no such tensor.
            ValueError: a slice outside the tensor, or ``out`` of another shape.
            CheckpointFormatError: a chunk whose archive does not hold what the metadata says.
        """
        entry = self.tensor(key)
        offsets, sizes = tuple(int(o) for o in offsets), tuple(int(s) for s in sizes)
        if len(offsets) != len(entry.shape) or len(sizes) != len(entry.shape) or any(
                o < 0 or s < 0 or o + s > n for o, s, n in zip(offsets, sizes, entry.shape)):
            raise ValueError(f"{self.path}: slice at {list(offsets)} of size {list(sizes)} is outside {key}'s shape "
                             f"{list(entry.shape)}")
        chunks = entry.overlapping(offsets, sizes)
        if out is None:
            if self.map_chunks and len(chunks) == 1 and chunks[0].offsets == offsets and chunks[0].sizes == sizes:
                return self.read_chunk(chunks[0])  # the whole chunk: a view of its map (see map_chunks)
            out = torch.empty(sizes, dtype=entry.dtype)
        elif tuple(out.shape) != sizes:
            raise ValueError(f"{self.path}: {key}: out has shape {list(out.shape)}, the slice {list(sizes)}")
        if math.prod(sizes) == 0:
            return out
        for chunk in chunks:
            if chunk.offsets == offsets and chunk.sizes == sizes:
                self.read_chunk(chunk, out=out)  # the whole chunk: straight into out
                continue
            inter = _intersection(chunk.offsets, chunk.sizes, offsets, sizes)
            if inter is None:
                continue
            lo, n = inter
            data = self.read_chunk(chunk)
            src = data[tuple(slice(a - c, a - c + m) for a, c, m in zip(lo, chunk.offsets, n))]
            dst = out[tuple(slice(a - o, a - o + m) for a, o, m in zip(lo, offsets, n))]
            dst.copy_(src)
        return out

    def _mapped(self, chunk: ChunkEntry, f: Any, start: int, raw: _RawTensor, path: str, what: str) -> torch.Tensor:
        m = self._maps.get(chunk.file)
        if m is None:
            m = self._maps[chunk.file] = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
        if start + raw.nbytes > len(m):
            raise CheckpointFormatError(f"{path}: {what} ends after {max(0, len(m) - start)} of its {raw.nbytes} "
                                        "bytes")
        t = torch.frombuffer(m, dtype=raw.dtype, count=raw.nbytes // _itemsize(raw.dtype), offset=start)
        return t.view(raw.shape)

    def unmap(self, chunks: Sequence[ChunkEntry]) -> None:
        """The caller is done with the views of these chunks (:meth:`read_chunk` with ``map_chunks``): the whole pages
        of their bytes are unmapped from this process (the page cache keeps them; a view touched again maps them
        again, as they are in the file, private writes dropped; a page shared with a neighbouring chunk stays)."""
        cached = self._cached
        for chunk in chunks:
            if cached is not None and cached[0] == chunk:
                self._cached = cached = None
            m = self._maps.get(chunk.file)
            if m is None:
                continue
            lo = -(-chunk.offset // mmap.PAGESIZE) * mmap.PAGESIZE
            hi = min(chunk.offset + chunk.length, len(m)) // mmap.PAGESIZE * mmap.PAGESIZE
            if hi > lo:
                m.madvise(mmap.MADV_DONTNEED, lo, hi - lo)

    def read_tensor(self, key: str) -> torch.Tensor:
        """The whole tensor ``key``."""
        entry = self.tensor(key)
        return self.read_slice(key, (0,) * len(entry.shape), entry.shape)

    # -- objects and the common state -----------------------------------------------------------------------------

    def read_object(self, unique_key: str) -> Any:
        """The sharded object stored under ``unique_key`` (see :func:`sharded_object_key`), loaded with
        ``torch.load(weights_only=True)`` after its classes are checked against :data:`OBJECT_GLOBALS`.

        Raises:
            KeyError: no such object.
            UnsafeCheckpointError: the object names a class outside the allowlist (named; nothing was run).
        """
        entry = self.objects.get(unique_key)
        if entry is None:
            raise KeyError(f"{self.path} holds no sharded object {unique_key!r}")
        path = self._where(entry.file)
        what = f"the sharded object {unique_key}"
        value = self._load_archive(_FileSlice(self._open(entry.file), entry.offset, entry.length), path, what,
                                   OBJECT_GLOBALS)
        # megatron-core stores the list of the saving rank's objects under one unique key (one, in practice)
        if not isinstance(value, list) or not value:
            raise CheckpointFormatError(f"{path}: {what} holds a {type(value).__name__}, not megatron-core's list of "
                                        "objects")
        return value[0]

    def has_common_file(self) -> bool:
        """The common state is in ``common.pt`` (megatron-core <= 0.18), not inside the ``.distcp`` files (0.19)."""
        return os.path.isfile(self._where(COMMON_NAME))

    def common_state(self) -> Dict[str, Any]:
        """The common state: ``common.pt`` where it exists (as megatron-core reads it first), else the
        ``common_state`` sharded object that megatron-core 0.19 writes into the ``.distcp`` files.

        Raises:
            CheckpointFormatError: neither is there, or it is not a dict.
            UnsafeCheckpointError: it names a class outside :data:`OBJECT_GLOBALS`.
        """
        if self.has_common_file():
            path = self._where(COMMON_NAME)
            with open(path, "rb") as f:
                common = self._load_archive(f, path, "the common state", OBJECT_GLOBALS)
        else:
            key = sharded_object_key(COMMON_STATE_KEY)
            if key not in self.objects:
                raise CheckpointFormatError(f"{self.path}: no {COMMON_NAME} and no {key} object in "
                                            f"{METADATA_NAME}: the checkpoint has no common state")
            common = self.read_object(key)
        if not isinstance(common, dict):
            raise CheckpointFormatError(f"{self.path}: the common state is a {type(common).__name__}, not a dict")
        return common

    def files(self) -> List[str]:
        """The files the checkpoint's metadata stores bytes in (plain names)."""
        names = {c.file for t in self.tensors.values() for c in t.chunks} | {o.file for o in self.objects.values()}
        return sorted(names)

    # -- as a tensor source (megatron_bridge_ext.io.protocols.TensorSource), keyed by the checkpoint's keys ---------

    def keys(self) -> List[str]:
        return list(self.tensors)

    def __iter__(self) -> Iterator[str]:
        return iter(self.tensors)

    def __len__(self) -> int:
        return len(self.tensors)

    def __contains__(self, key: object) -> bool:
        return key in self.tensors

    def __getitem__(self, key: str) -> torch.Tensor:
        """The whole tensor ``key`` at its global shape (:meth:`read_tensor`)."""
        return self.read_tensor(key)

    def dtype(self, key: str) -> torch.dtype:
        return self.tensor(key).dtype

    def shape(self, key: str) -> Tuple[int, ...]:
        return tuple(self.tensor(key).shape)

    def file_of(self, key: str) -> str:
        """The file(s) holding the chunks of tensor ``key`` (plain names, comma-separated)."""
        return ", ".join(sorted({c.file for c in self.tensor(key).chunks}))

    def release(self, keys: Any) -> None:
        """Nothing is kept per tensor but the last chunk read: it is dropped."""
        self._cached = None

    def release_tensor(self, tensor: torch.Tensor) -> None:
        pass


def _is_count(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def _ints(size: Any, meta: str, key: str, what: str) -> Tuple[int, ...]:
    if not isinstance(size, (torch.Size, tuple, list)) or not all(_is_count(v) for v in size):
        raise CheckpointFormatError(f"{meta}: {key}'s {what} is {size!r}, not a sequence of integers >= 0")
    return tuple(int(v) for v in size)


def _check_tiling(meta: str, entry: TensorEntry) -> None:
    """The chunks of a tensor do not overlap and cover it whole."""
    chunks = [c for c in entry.chunks if c.numel]
    total = math.prod(entry.shape)
    if len({c.sizes for c in chunks}) <= 1 and chunks and all(
            o % s == 0 for c in chunks for o, s in zip(c.offsets, c.sizes)):
        seen: set = set()  # a regular grid (megatron's even split): chunks overlap only where offsets repeat
        for c in chunks:
            if c.offsets in seen:
                raise CheckpointFormatError(f"{meta}: {entry.key} has two chunks at {list(c.offsets)}")
            seen.add(c.offsets)
    elif entry.shape:
        active: List[ChunkEntry] = []
        for c in chunks:  # sorted by offsets: a sweep along the first dimension
            active = [a for a in active if a.offsets[0] + a.sizes[0] > c.offsets[0]]
            for a in active:
                if _intersection(a.offsets, a.sizes, c.offsets, c.sizes) is not None:
                    raise CheckpointFormatError(
                        f"{meta}: {entry.key}'s chunks at {list(a.offsets)} (size {list(a.sizes)}) and "
                        f"{list(c.offsets)} (size {list(c.sizes)}) overlap")
            active.append(c)
    elif len(chunks) > 1:
        raise CheckpointFormatError(f"{meta}: the scalar {entry.key} has {len(chunks)} chunks")
    covered = sum(c.numel for c in chunks)
    if covered != total:
        raise CheckpointFormatError(f"{meta}: the chunks of {entry.key} cover {covered} of its {total} elements "
                                    f"(shape {list(entry.shape)}): part of the tensor is not stored")
