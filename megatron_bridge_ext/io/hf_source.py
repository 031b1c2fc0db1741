"""A lazy, memory-mapped HF safetensors checkpoint: :class:`SafeTensorsSource` parses the safetensors headers itself
and hands out zero-copy views of a private (copy-on-write) memory map of each shard, so a consumer that reads only some
rows of a tensor touches only those pages: each rank reads its own slice and nothing else.
"""

from __future__ import annotations

import json
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
    read_header,
)

__all__ = ["SafeTensorsSource"]


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
        self._entries: Dict[str, Entry] = {}
        self._metadata: Dict[str, str] = {}
        per_file: List[Dict[str, Entry]] = []
        for i, f in enumerate(files):
            data_start, header, size = read_header(f)
            meta = header.get("__metadata__") or {}
            if not isinstance(meta, dict):
                raise ValueError(f"{f}: __metadata__ is a {type(meta).__name__}, expected a JSON object")
            for k, v in meta.items():
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


