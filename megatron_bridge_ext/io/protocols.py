"""The declared interfaces between the engine and storage: where HF tensors come from (:class:`TensorSource`,
:class:`QuantizedTensorSource`) and where converted tensors go (:class:`TensorSink`).

Sources: :class:`~megatron_bridge_ext.io.hf_source.SafeTensorsSource` (memory-mapped safetensors),
:class:`~megatron_bridge_ext.io.quantized.QuantizedSource` (a block-quantized release, read dequantized or as
stored), :class:`~megatron_bridge_ext.io.dcp_reader.TorchDistCheckpoint` (a Megatron ``torch_dist`` checkpoint,
keyed by its own keys, tensors at their global shapes). A plain mapping of tensors (e.g. a state dict in a test or a
live job) is adapted by :func:`as_source`.

Sink: :class:`~megatron_bridge_ext.io.hf_writer.SafeTensorsWriter` (HF shards). The weight sync hands whole buckets
to its caller, and the DCP writer of the streamed import
(:class:`~megatron_bridge_ext.io.dcp_writer.StreamingDcpWriter`) takes DCP write items with their storage metadata,
not HF-named tensors: neither is a :class:`TensorSink`.
"""

from __future__ import annotations

from typing import Any, Iterator, List, Mapping, Optional, Protocol, Sequence, Tuple, Union, runtime_checkable

import torch

__all__ = ["TensorSource", "QuantizedTensorSource", "TensorSink", "MappingSource", "as_source", "is_quantized_source"]


@runtime_checkable
class TensorSource(Protocol):
    """A lazy, read-only mapping HF name -> tensor whose metadata comes without reading the data.

    ``source[name]`` is a tensor that costs nothing until used (a view of a memory map) or, for a quantized
    source, the dequantized tensor. ``release(names)`` tells the source the engine is done with those tensors (their
    pages may be dropped); ``release_tensor(t)`` the same for a tensor already written elsewhere.
    """

    def keys(self) -> Sequence[str]: ...

    def __getitem__(self, key: str) -> torch.Tensor: ...

    def __contains__(self, key: object) -> bool: ...

    def __iter__(self) -> Iterator[str]: ...

    def __len__(self) -> int: ...

    def dtype(self, key: str) -> torch.dtype: ...

    def shape(self, key: str) -> Tuple[int, ...]: ...

    def file_of(self, key: str) -> str: ...

    def release(self, keys: Union[str, Sequence[str]]) -> None: ...

    def release_tensor(self, tensor: torch.Tensor) -> None: ...

    @property
    def path(self) -> str: ...


@runtime_checkable
class QuantizedTensorSource(TensorSource, Protocol):
    """A source whose (some) weights are stored block-quantized: reading ``source[name]`` dequantizes the whole
    tensor; a mapping with a fused path takes it as stored (``quantized``) and dequantizes only the rows it keeps;
    ``experts`` dequantizes a range of a fused ``[E, ...]`` expert tensor."""

    def is_quantized(self, key: str) -> bool: ...

    def quantized(self, key: str) -> Any: ...

    def experts(self, key: str, lo: int, hi: int) -> torch.Tensor: ...


@runtime_checkable
class TensorSink(Protocol):
    """Where an export puts HF tensors, one at a time, in the order they come: ``add`` may keep the tensor only until
    it returns (the engine reuses the memory); ``close`` completes what was added (and returns a summary);
    ``abort`` leaves nothing that looks complete."""

    def add(self, name: str, tensor: torch.Tensor) -> Any: ...

    def close(self) -> Any: ...

    def abort(self) -> None: ...


def is_quantized_source(source: Any) -> bool:
    return isinstance(source, QuantizedTensorSource)


class MappingSource:
    """A plain mapping of tensors (already in memory) seen as a :class:`TensorSource`: metadata from the tensors,
    nothing to release, no files."""

    def __init__(self, tensors: Mapping[str, torch.Tensor], path: str = "the HF state") -> None:
        self._tensors = tensors
        self._path = path

    def keys(self) -> List[str]:
        return list(self._tensors.keys())

    def __getitem__(self, key: str) -> torch.Tensor:
        return self._tensors[key]

    def __contains__(self, key: object) -> bool:
        return key in self._tensors

    def __iter__(self) -> Iterator[str]:
        return iter(self._tensors)

    def __len__(self) -> int:
        return len(self._tensors)

    def get(self, key: str, default: Any = None) -> Any:
        return self._tensors.get(key, default)

    def dtype(self, key: str) -> torch.dtype:
        return self._tensors[key].dtype

    def shape(self, key: str) -> Tuple[int, ...]:
        return tuple(self._tensors[key].shape)

    def file_of(self, key: str) -> str:
        if key not in self._tensors:
            raise KeyError(key)
        return self._path

    def release(self, keys: Union[str, Sequence[str]]) -> None:
        pass

    def release_tensor(self, tensor: torch.Tensor) -> None:
        pass

    @property
    def path(self) -> str:
        return self._path

    def __repr__(self) -> str:
        return f"MappingSource({len(self._tensors)} tensors)"


def as_source(state: Any) -> Optional[TensorSource]:
    """``state`` as a :class:`TensorSource`: itself when it implements the interface, a plain mapping of tensors
    adapted (:class:`MappingSource`), None for None.

    Raises:
        TypeError: anything else, naming its type.
    """
    if state is None or isinstance(state, TensorSource):
        return state
    if isinstance(state, Mapping) or (hasattr(state, "keys") and hasattr(state, "__getitem__")):
        return MappingSource(state)
    raise TypeError(f"an HF tensor source must be a mapping of tensors or implement "
                    f"megatron_bridge_ext.io.protocols.TensorSource, got {type(state).__name__}")
