"""A lazy, memory-mapped HF safetensors checkpoint: :class:`SafeTensorsSource` parses the safetensors headers itself
and hands out zero-copy views of a private (copy-on-write) memory map of each shard, so a consumer that reads only some
rows of a tensor touches only those pages: each rank reads its own slice and nothing else.

The checkpoint directory is a trust boundary. What the files *say* is checked before anything is mapped:

- an index entry is a relative path that stays inside the directory as written: no absolute path, no ``..``, ``.``
  or empty component, no NUL. "Inside" is judged on the name, not on where a symlink leads: the directory's own
  symlinks are its owner's choice and are followed (an HF cache snapshot links every file to ``../../blobs/<hash>``),
  while a name in the index that climbs out (``../../etc/passwd``) is refused. What an entry names must be a regular
  file (not a device or a pipe).
- a tensor listed in two shards, a shard holding a tensor its index does not list (or lists under another shard), a
  name given twice in one header or in the index, overlapping or out-of-range byte ranges, shapes that are not
  non-negative integers and dtypes that do not match the byte length are refused, naming the file and the tensor
  (see :func:`~megatron_bridge_ext.io.safetensors.parse_entries`).
- weights in pickle files (``*.bin``, ``*.pt``, ``*.pth``) are never unpickled (unpickling runs code): a checkpoint
  with only those is refused with a message saying that safetensors is required.
"""

from __future__ import annotations

import math
import mmap
import os
import sys
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import torch

from megatron_bridge_ext.io.safetensors import (
    CONFIG_NAME,
    ITEMSIZE,
    SAFE_WEIGHTS_INDEX_NAME,
    SAFE_WEIGHTS_NAME,
    SHARD_RE,
    Entry,
    parse_entries,
    parse_metadata,
    read_header,
    read_json_object,
)
from megatron_bridge_ext.io.read_ahead import WillNeedFiles
from megatron_bridge_ext.io.staging import interrupted_save_hint

__all__ = ["SafeTensorsSource", "PICKLE_SUFFIXES", "pickle_weight_files", "refuse_pickle_only", "entry_path"]

#: weight files in Python's pickle format: never opened here
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
_PICKLE_INDEXES = ("pytorch_model.bin.index.json",)


def pickle_weight_files(root: str) -> List[str]:
    """Names of the pickle weight files (and pickle indexes) at the top of a directory, sorted."""
    try:
        names = os.listdir(root)
    except OSError:
        return []
    return sorted(n for n in names if (n.endswith(PICKLE_SUFFIXES) or n in _PICKLE_INDEXES)
                  and os.path.isfile(os.path.join(root, n)))


def refuse_pickle_only(root: str) -> None:
    """Raises when ``root`` holds pickle weights and no safetensors weights (it never unpickles them).

    Raises:
        ValueError: naming the pickle files and saying that safetensors is required.
    """
    try:
        has_safetensors = any(n.endswith(".safetensors") or n == SAFE_WEIGHTS_INDEX_NAME for n in os.listdir(root))
    except OSError:
        return
    found = pickle_weight_files(root)
    if found and not has_safetensors:
        raise ValueError(
            f"{root}: holds only pickle weights ({', '.join(found[:4])}{' ...' if len(found) > 4 else ''}); "
            "safetensors is required. Pickle files can run arbitrary code when loaded, so they are never unpickled "
            "here: convert them to safetensors where you trust them (e.g. transformers' save_pretrained with "
            "safe_serialization=True)"
        )


def entry_path(root: str, name: Any, where: str) -> str:
    """The path of an index entry ``name`` inside ``root``; refuses names that leave it (see the module docstring).

    Raises:
        ValueError: a non-string, absolute, empty, NUL-containing name, or one with ``..``/``.``/empty components.
        FileNotFoundError: nothing there; ValueError: something that is not a regular file.
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"{where}: {name!r} is not a file name")
    parts = name.replace("\\", "/").split("/")
    if "\0" in name or os.path.isabs(name) or any(p in ("", ".", "..") for p in parts):
        raise ValueError(
            f"{where}: {name!r} does not name a file inside the checkpoint directory {root} (absolute paths and "
            "'..', '.' or empty path components are refused)"
        )
    path = os.path.join(root, *parts)
    if not os.path.lexists(path):
        raise FileNotFoundError(f"{where}: {name} is missing from {root}")
    if not os.path.isfile(path):
        kind = "a broken symlink" if not os.path.exists(path) else "not a regular file"
        raise ValueError(f"{where}: {path} is {kind}")
    return path


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
        self._bases: List[int] = []  # each map's address, for release_tensor
        self._ahead = WillNeedFiles()  # read-only descriptors for read_ahead (any thread)
        self._closed = False
        if os.path.isfile(path):
            if path.endswith(PICKLE_SUFFIXES):
                raise ValueError(
                    f"{path}: a pickle weight file; safetensors is required (pickle files can run arbitrary code "
                    "when loaded and are never unpickled here)"
                )
            if not path.endswith(".safetensors"):
                raise ValueError(f"{path}: not a .safetensors file")
            self.root = os.path.dirname(os.path.abspath(path))
            files = [os.path.abspath(path)]
            index_keys: Optional[Dict[str, int]] = None
        elif os.path.isdir(path):
            self.root = os.path.abspath(path)
            files, index_keys = self._resolve_dir(self.root)
        else:
            raise FileNotFoundError(f"HF checkpoint not found: {path} is neither a directory nor a file"
                                    f"{interrupted_save_hint(path)}")
        if require_config and not os.path.isfile(os.path.join(self.root, CONFIG_NAME)):
            raise FileNotFoundError(f"{self.root}: {CONFIG_NAME} is missing")
        self._files = files
        self._mmaps = [None] * len(files)
        self._bases = [0] * len(files)
        self._entries: Dict[str, Entry] = {}
        self._metadata: Dict[str, str] = {}
        per_file: List[Dict[str, Entry]] = []
        for i, f in enumerate(files):
            data_start, header, size = read_header(f)
            for k, v in parse_metadata(f, header).items():
                self._metadata.setdefault(k, v)
            per_file.append(parse_entries(f, i, header, data_start, size))
        if index_keys is None:
            for entries in per_file:
                for name, e in entries.items():
                    if name in self._entries:
                        raise ValueError(f"tensor {name!r} appears in both {self._files[self._entries[name].shard]} "
                                         f"and {self._files[e.shard]}")
                    self._entries[name] = e
        else:
            # The index is authoritative and must agree with the shards exactly: every key it lists is in the shard
            # it names, and no shard holds a tensor the index does not list there (a second copy in another shard,
            # or a tensor nobody would read). Keys are kept in file order: shard order, then offset in the shard.
            index_path = os.path.join(self.root, SAFE_WEIGHTS_INDEX_NAME)
            by_shard: List[List[str]] = [[] for _ in files]
            for name, shard in index_keys.items():
                if name not in per_file[shard]:
                    raise ValueError(
                        f"{index_path}: tensor {name!r} is listed in "
                        f"{os.path.basename(files[shard])} but that shard does not contain it"
                    )
                by_shard[shard].append(name)
            for shard, entries in enumerate(per_file):
                for name in entries:
                    listed = index_keys.get(name)
                    if listed is None:
                        raise ValueError(
                            f"{files[shard]}: holds tensor {name!r}, which {index_path} does not list (the index "
                            "and its shards disagree)"
                        )
                    if listed != shard:
                        raise ValueError(
                            f"tensor {name!r} is in two shards: {files[listed]} (where {index_path} puts it) and "
                            f"{files[shard]}"
                        )
            for shard, names in enumerate(by_shard):
                entries = per_file[shard]
                for name in sorted(names, key=lambda n: entries[n].start):
                    self._entries[name] = entries[name]
        self._keys = list(self._entries)

    def _resolve_dir(self, root: str) -> Tuple[List[str], Optional[Dict[str, int]]]:
        index_path = os.path.join(root, SAFE_WEIGHTS_INDEX_NAME)
        single = os.path.join(root, SAFE_WEIGHTS_NAME)
        if os.path.isfile(index_path):
            index = read_json_object(index_path, "index JSON")
            weight_map = index.get("weight_map")
            if not isinstance(weight_map, dict):
                raise ValueError(f"{index_path}: no 'weight_map' object")
            metadata = index.get("metadata") or {}
            if not isinstance(metadata, dict):
                raise ValueError(f"{index_path}: 'metadata' is a {type(metadata).__name__}, expected an object")
            self.index_metadata = dict(metadata)
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
                listed = [k for k, s in keys.items() if s == shard_names[fname]]
                where = f"{index_path}: shard of {len(listed)} tensor(s), e.g. {listed[0]!r}"
                try:
                    files.append(entry_path(root, fname, where))
                except FileNotFoundError:
                    raise FileNotFoundError(
                        f"{index_path}: shard {fname} is missing from {root} "
                        f"(it holds {len(listed)} tensors, e.g. {listed[0]!r})"
                    ) from None
            return files, {k: remap[s] for k, s in keys.items()}
        if os.path.isfile(single):
            return [single], None
        found = sorted(f for f in os.listdir(root) if f.endswith(".safetensors"))
        if not found:
            refuse_pickle_only(root)
        m = SHARD_RE.match(found[0]) if len(found) == 1 else None
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

    def _entry(self, key: str) -> Entry:
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
        itemsize = ITEMSIZE[e.dtype]
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
        return read_json_object(p, CONFIG_NAME)

    def _mmap(self, shard: int) -> mmap.mmap:
        if self._closed:
            raise ValueError(f"SafeTensorsSource({self.path!r}) is closed")
        mm = self._mmaps[shard]
        if mm is None:
            with open(self._files[shard], "rb") as f:  # the map keeps its own handle
                mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
            self._mmaps[shard] = mm
            self._bases[shard] = torch.frombuffer(mm, dtype=torch.uint8, count=1).data_ptr() if len(mm) else 0
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

    def read_ahead(self, keys: Sequence[str]) -> int:
        """Ask the kernel to start reading tensors ``keys`` from disk into the page cache now, without waiting for
        it (``POSIX_FADV_WILLNEED``), so that their first use later finds them in memory instead of faulting each
        page in from disk. Nothing is mapped into this process (its resident memory does not grow); unknown keys are
        ignored. Returns the bytes asked for. The streamed import calls it, on a thread of its own, for the tensors
        of the next parameters while it converts the current one."""
        if self._closed or not hasattr(os, "posix_fadvise"):
            return 0
        total = 0
        for key in keys:
            e = self._entries.get(key)
            if e is None or e.end <= e.start:
                continue
            if not self._ahead.will_need(self._files[e.shard], e.start, e.end - e.start):
                break
            total += e.end - e.start
        return total

    def release_tensor(self, tensor: torch.Tensor) -> None:
        """Drop the resident pages of the map that ``tensor`` (a view handed out by this source, or a slice of one)
        covers; a tensor whose memory is not one of this source's maps is left alone. Safe from any thread. The
        streamed import calls it once a chunk written straight from the map is on its way to disk."""
        if self._closed or not hasattr(mmap, "MADV_DONTNEED") or tensor.device.type != "cpu":
            return
        ptr, nbytes = tensor.data_ptr(), tensor.numel() * tensor.element_size()
        page = mmap.PAGESIZE
        for mm, base in zip(self._mmaps, self._bases):
            if mm is None:
                continue
            if base <= ptr and ptr + nbytes <= base + len(mm):
                start = -(-(ptr - base) // page) * page
                end = ((ptr - base + nbytes) // page) * page
                if end > start:
                    mm.madvise(mmap.MADV_DONTNEED, start, end - start)
                return

    def close(self) -> None:
        """Releases the maps. Views already handed out stay valid: they keep their map alive until they die."""
        self._ahead.close()
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


