"""Model-bridge dispatch: which bridge class converts a given HF architecture.

Bridges register themselves with the :func:`register_bridge` class decorator, keyed by an HF model class or by its
class name (a string, for architectures known only by name, e.g. through ``auto_map``). :func:`get_model_bridge`
resolves a class, an instance or a name: exact type first, then the classes of its MRO, then class names.
"""

from __future__ import annotations

import importlib
import threading
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, TypeVar, Union

__all__ = [
    "register_bridge",
    "unregister_bridge",
    "get_model_bridge",
    "get_bridge_class",
    "bridge_target",
    "supported_architectures",
]

_B = TypeVar("_B", bound=type)
Source = Union[type, str]


@dataclass(frozen=True)
class _Registration:
    source: Source
    target: Union[type, str]
    bridge_class: type

    @property
    def source_name(self) -> str:
        return self.source if isinstance(self.source, str) else self.source.__name__


_lock = threading.Lock()
_by_class: Dict[type, _Registration] = {}
_by_name: Dict[str, _Registration] = {}  # string registrations


def _same_bridge(a: type, b: type) -> bool:
    # A re-import (module reload) defines a new class object with the same identity on paper.
    return a is b or (a.__module__, a.__qualname__) == (b.__module__, b.__qualname__)


def register_bridge(*, source: Source, target: Union[type, str]) -> Callable[[_B], _B]:
    """Class decorator registering a model bridge for one HF architecture.

    A bridge class that sets no ``hf_architecture`` of its own gets the source's name (the architecture it writes
    into an exported ``config.json``).

    Args:
        source: the HF model class (e.g. ``LlamaForCausalLM``) or its class name as a string.
        target: the Megatron model class the bridge builds (e.g. ``GPTModel``), or its dotted import path
            (``"megatron.core.models.gpt.GPTModel"``, imported when :func:`bridge_target` asks for it).

    Returns:
        the decorator; it returns the class unchanged.

    Raises:
        ValueError: ``source`` is neither a class nor a non-empty string, or it is already registered to a different
            bridge class.
    """
    if not (isinstance(source, type) or (isinstance(source, str) and source)):
        raise ValueError(f"register_bridge: source must be an HF model class or a class name, got {source!r}")
    if not (isinstance(target, type) or (isinstance(target, str) and "." in target.strip("."))):
        raise ValueError(f"register_bridge: target must be a Megatron model class or its dotted import path, got "
                         f"{target!r}")

    def decorator(bridge_class: _B) -> _B:
        if not isinstance(bridge_class, type):
            raise ValueError(f"register_bridge decorates a class, got {bridge_class!r}")
        reg = _Registration(source, target, bridge_class)
        table: Dict[Any, _Registration] = _by_name if isinstance(source, str) else _by_class  # type: ignore[assignment]
        with _lock:
            old = table.get(source)
            if old is not None and not _same_bridge(old.bridge_class, bridge_class):
                raise ValueError(
                    f"HF architecture {reg.source_name!r} is already bridged by {old.bridge_class.__qualname__}; "
                    f"cannot also register {bridge_class.__qualname__}"
                )
            table[source] = reg
        if "hf_architecture" not in vars(bridge_class):
            bridge_class.hf_architecture = reg.source_name  # type: ignore[attr-defined]
        return bridge_class

    return decorator


def unregister_bridge(source: Source) -> None:
    """Removes the registration of ``source`` (a class or a string, as registered); no error if absent."""
    with _lock:
        if isinstance(source, str):
            _by_name.pop(source, None)
        else:
            _by_class.pop(source, None)


def _arch_class(hf_architecture: Any) -> Optional[type]:
    if isinstance(hf_architecture, str):
        return None
    return hf_architecture if isinstance(hf_architecture, type) else type(hf_architecture)


def _lookup_name(name: str) -> Optional[_Registration]:
    reg = _by_name.get(name)
    if reg is not None:
        return reg
    for cls, r in _by_class.items():
        if cls.__name__ == name:
            return r
    return None


def _resolve(hf_architecture: Any) -> _Registration:
    with _lock:
        cls = _arch_class(hf_architecture)
        reg: Optional[_Registration] = None
        if cls is None:
            reg = _lookup_name(hf_architecture)
        else:
            reg = _by_class.get(cls)
            if reg is None:
                for base in cls.__mro__[1:]:
                    reg = _by_class.get(base)
                    if reg is not None:
                        break
            if reg is None:
                for base in cls.__mro__:
                    reg = _lookup_name(base.__name__)
                    if reg is not None:
                        break
        if reg is None:
            shown = hf_architecture if isinstance(hf_architecture, str) else getattr(cls, "__qualname__", cls)
            raise ValueError(
                f"no model bridge for HF architecture {shown!r}; supported: {', '.join(_supported()) or '(none)'}"
            )
        return reg


def get_bridge_class(hf_architecture: Union[type, str, Any]) -> type:
    """The registered bridge class for an HF class, instance or class name.

    Raises:
        ValueError: unknown architecture (the message lists the supported ones).
    """
    return _resolve(hf_architecture).bridge_class


def get_model_bridge(hf_architecture: Union[type, str, Any]) -> Any:
    """A new instance of the bridge registered for an HF class, instance or class name.

    Resolution: exact type, then the classes of its MRO (subclasses of a registered class), then class names
    (string registrations, or a registered class of the same name).

    Raises:
        ValueError: unknown architecture (the message lists the supported ones).
    """
    return _resolve(hf_architecture).bridge_class()


def bridge_target(hf_architecture: Union[type, str, Any]) -> type:
    """The Megatron model class registered for an HF class, instance or class name.

    Raises:
        ValueError: unknown architecture.
    """
    target = _resolve(hf_architecture).target
    if isinstance(target, str):
        module, _, name = target.rpartition(".")
        target = getattr(importlib.import_module(module), name)
    return target


def _supported() -> List[str]:
    names = {r.source_name for r in _by_class.values()} | set(_by_name)
    return sorted(names)


def supported_architectures() -> List[str]:
    """Sorted names of every registered HF architecture."""
    with _lock:
        return _supported()
