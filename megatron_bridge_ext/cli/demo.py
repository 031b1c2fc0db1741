"""``demo [--tp N --pp N --vpp N] [--keep DIR]``: writes an embedded tiny Llama checkpoint (fixed seed), converts it
HF -> Megatron (TP=2 on two local gloo processes by default) -> HF and prints the verification table."""

from __future__ import annotations

import argparse
import os
import tempfile

__all__ = ["add_arguments", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tp", type=int, default=2)
    parser.add_argument("--pp", type=int, default=1)
    parser.add_argument("--vpp", type=int, default=None)
    parser.add_argument("--keep", metavar="DIR", help="keep the checkpoints in DIR instead of a temporary directory")
    parser.add_argument("--verbose", action="store_true", help="show third-party warnings")


def run(args: argparse.Namespace) -> int:
    from megatron_bridge_ext.cli.common import quiet_third_party
    from megatron_bridge_ext.cli.roundtrip import report, roundtrip
    from megatron_bridge_ext.testing.tiny_models import make_tiny_llama

    quiet_third_party(args.verbose)
    with tempfile.TemporaryDirectory(prefix="bridge_demo_") as tmp:
        base = args.keep or tmp
        src, out = os.path.join(base, "hf"), os.path.join(base, "hf_roundtrip")
        make_tiny_llama(src)
        res = roundtrip(src, out, tp=args.tp, pp=args.pp, vpp=args.vpp, verbose=args.verbose)
        ok = report(res, "megatron_bridge_ext demo: tiny Llama, HF -> Megatron -> HF")
    return 0 if ok else 1
