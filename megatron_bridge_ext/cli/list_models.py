"""``list-models``: the HF architectures with a registered bridge, one per line."""

from __future__ import annotations

import argparse

__all__ = ["add_arguments", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    pass


def run(args: argparse.Namespace) -> int:
    from megatron_bridge_ext.auto_bridge import AutoBridge

    print("\n".join(AutoBridge.list_supported_models()))
    return 0
