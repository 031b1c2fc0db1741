"""Command line: ``megatron-bridge-ext`` / ``python -m megatron_bridge_ext`` with one module per subcommand.

Each subcommand module defines ``add_arguments(parser)`` and ``run(args) -> int``; it is imported
only when its subcommand runs (megatron-core and transformers are heavy imports).
"""

from __future__ import annotations

import argparse
import gc
import importlib
import logging
import os
import sys
from typing import Optional, Sequence

__all__ = ["main", "entry", "SUBCOMMANDS"]

#: subcommand -> (module, one-line help)
SUBCOMMANDS = {
    "demo": ("megatron_bridge_ext.cli.demo", "tiny embedded Llama: HF -> Megatron (local gloo ranks) -> HF, verified"),
    "roundtrip": ("megatron_bridge_ext.cli.roundtrip",
                  "HF checkpoint -> Megatron -> HF with local gloo ranks, verified"),
    "list-models": ("megatron_bridge_ext.cli.list_models", "supported HF architectures"),
    "import": ("megatron_bridge_ext.cli.import_hf", "HF checkpoint -> Megatron distributed checkpoint (any TP/PP/VPP/EP)"),
    "export": ("megatron_bridge_ext.cli.export", "Megatron distributed checkpoint -> complete HF checkpoint"),
    "verify": ("megatron_bridge_ext.cli.verify",
               "HF checkpoint vs Megatron checkpoint: every tensor bit-exact, logits on fixed batches"),
    "inspect": ("megatron_bridge_ext.cli.inspect",
                "the conversion plan of an HF checkpoint for a layout, without converting"),
}


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of ``python -m megatron_bridge_ext`` and the ``megatron-bridge-ext`` script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="megatron-bridge-ext",
                                     description="HuggingFace <-> Megatron-Core weight conversion")
    sub = parser.add_subparsers(dest="cmd", required=True)
    chosen = next((a for a in argv if a in SUBCOMMANDS), None)
    for name, (module, help_text) in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help_text)
        if name == chosen:  # only the subcommand that runs is imported
            importlib.import_module(module).add_arguments(p)
    args = parser.parse_args(argv)
    return int(importlib.import_module(SUBCOMMANDS[args.cmd][0]).run(args))


def entry() -> None:
    """The ``megatron-bridge-ext`` command's process: :func:`main`, then exit without the interpreter's teardown.

    When ``main`` returns, every file is written, fsynced and renamed, the local ranks are joined and the process
    group is gone; what the teardown would still do is unload the modules (megatron-core's and torch's operator
    registrations alone take ~0.5 s), which changes nothing on disk. Output streams and logging are flushed first.
    An exception still propagates (traceback, exit status 1).

    The cyclic garbage collector runs every 100,000 net allocations instead of 700: importing torch, megatron-core
    and transformers makes millions of long-lived objects, and the default thresholds spend ~0.8 s of the start-up
    re-scanning them; cycles are still collected."""
    gc.set_threshold(100_000, 50, 1000)
    code = int(main())
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    entry()
