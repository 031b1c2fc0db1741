"""``list-models``: the HF architectures with a registered bridge, one per line; a family whose layers the installed
megatron-core lacks (it refuses itself there) is marked with the release it needs."""

from __future__ import annotations

import argparse
from typing import List

__all__ = ["add_arguments", "run", "model_lines"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    pass


def model_lines() -> List[str]:
    """One line per supported architecture: its name, and, where the installed megatron-core is older than the
    family's ``min_megatron_core``, ``(needs megatron-core >= X; Y is installed)``."""
    from megatron_bridge_ext.auto_bridge import AutoBridge
    from megatron_bridge_ext.dispatch import get_bridge_class
    from megatron_bridge_ext.mcore.versions import unmet_megatron_core

    lines = []
    for arch in AutoBridge.list_supported_models():
        unmet = unmet_megatron_core(getattr(get_bridge_class(arch), "min_megatron_core", None))
        lines.append(arch if unmet is None else f"{arch}  ({unmet})")
    return lines


def run(args: argparse.Namespace) -> int:
    print("\n".join(model_lines()))
    return 0
