"""Counting the calls of module-level functions (e.g. the fused expert ops of :mod:`megatron_bridge_ext.ops`) in
this process: tests use it to check how often the engine calls an op per layer, rank and layout."""

from __future__ import annotations

from types import ModuleType
from typing import Any, Callable, Dict, Sequence

__all__ = ["count_calls"]


def count_calls(module: ModuleType, names: Sequence[str]) -> Dict[str, int]:
    """Replaces ``module.<name>`` for each name by a wrapper that counts its calls, then calls the original.

    Returns:
        the live counter (name -> calls so far; a name appears once called); clear it between phases.
    """
    calls: Dict[str, int] = {}

    def counting(name: str, original: Callable[..., Any]) -> Callable[..., Any]:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            calls[name] = calls.get(name, 0) + 1
            return original(*args, **kwargs)
        return wrapper

    for name in names:
        setattr(module, name, counting(name, getattr(module, name)))
    return calls
