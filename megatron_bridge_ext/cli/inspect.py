"""``inspect HF_DIR --tp N --pp N [--vpp N] [--ep N] [--etp N] [--json FILE|-]``: the conversion plan of an HF
checkpoint for a layout, without converting and without reading a tensor.

Every HF key -> the Megatron parameter it feeds, the parameter's tensor-parallel layout and the shape of its shard
on each rank; the bytes each rank holds; keys that nothing maps on either side; and an estimate of the peak memory
of each rank during ``import`` and of the destination rank during ``export``.

How the plan is made: :mod:`megatron_bridge_ext.engine.plan` (a whole model on the ``meta`` device, the mappings on
meta tensors per rank, megatron's even split of layers and experts).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, Dict, Optional

import torch

__all__ = ["add_arguments", "run", "plan"]


def plan(hf_dir: str, *, tp: int = 1, pp: int = 1, vpp: Optional[int] = None, ep: int = 1, etp: Optional[int] = None,
         bucket_bytes: Optional[int] = None) -> Dict[str, Any]:
    """The conversion plan of ``hf_dir`` for a layout (:func:`megatron_bridge_ext.engine.plan.conversion_plan`)."""
    from megatron_bridge_ext.auto_bridge import AutoBridge
    from megatron_bridge_ext.engine.plan import conversion_plan

    bridge = AutoBridge.from_hf_pretrained(hf_dir)
    out = conversion_plan(bridge.model_bridge, bridge.hf_pretrained, tp=tp, pp=pp, vpp=vpp, ep=ep, etp=etp,
                          bucket_bytes=bucket_bytes)
    out["hf_dir"] = hf_dir
    return out


def _gib(n: int) -> str:
    return f"{n / 2**30:.3f} GiB" if n >= 2**27 else f"{n / 2**20:.2f} MiB"


def _print(p: Dict[str, Any], keys: Optional[int]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    lay = " ".join(f"{k.upper()}={v}" for k, v in p["layout"].items() if v is not None)
    t = Table(title=f"{p['hf_dir']} ({p['architecture']}) -> Megatron {lay}, {p['world']} ranks, {p['dtype']}")
    for col in ("HF key(s)", "Megatron parameter", "mapping", "layout", "stage", "shard per rank"):
        t.add_column(col)
    shown = p["rows"] if keys is None else p["rows"][:keys]
    for r in shown:
        shapes = sorted({tuple(v) for v in r["shards"].values()})
        per = "  ".join(f"{list(s)}" for s in shapes) + ("" if len(shapes) == 1 else " (uneven)")
        hf = r["hf"][0] + (f" (+{len(r['hf']) - 1})" if len(r["hf"]) > 1 else "")
        t.add_row(hf, r["megatron"], r["mapping"], r["layout"], ",".join(r["stages"]), per)
    console.print(t)
    if keys is not None and len(p["rows"]) > keys:
        console.print(f"... {len(p['rows']) - keys} more (--keys 0 shows all)")
    rt = Table(title="bytes per rank")
    for col in ("rank", "pp", "tp", "ep", "etp", "parameters", "import peak (est.)"):
        rt.add_column(col, justify="right")
    for r in p["ranks"]:
        rt.add_row(*(str(r[k]) for k in ("rank", "pp", "tp", "ep", "etp")), _gib(r["bytes"]),
                   _gib(r["import_peak_bytes"]))
    console.print(rt)
    console.print(f"HF checkpoint: {p['hf_tensors']} tensors, {_gib(p['hf_bytes'])}; padded vocabulary "
                  f"{p['padded_vocab_size']}")
    console.print(f"export peak on the destination rank (est.: its parameters + 2 buckets of "
                  f"{_gib(p['bucket_bytes'])} + the largest task): {_gib(p['export_peak_bytes_rank0'])}")
    for title, names in (("HF keys nothing maps", p["unmapped_hf"]),
                         ("Megatron parameters nothing maps", p["unmapped_megatron"]),
                         ("HF tensors a mapping needs that the checkpoint lacks", p["missing_hf"])):
        console.print(f"{title}: {len(names)}" + ("" if not names else ": " + ", ".join(names[:20])
                                                  + (" ..." if len(names) > 20 else "")))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from megatron_bridge_ext.cli.common import add_layout_arguments

    parser.add_argument("hf_dir", help="HF checkpoint directory")
    add_layout_arguments(parser)
    parser.add_argument("--json", metavar="FILE", default=None, help="write the plan as JSON to FILE ('-': stdout)")
    parser.add_argument("--keys", type=int, default=60, help="HF keys to list in the table (0: all)")
    parser.add_argument("--verbose", action="store_true", help="show third-party warnings")


def run(args: argparse.Namespace) -> int:
    from megatron_bridge_ext.cli.common import fail, layout_of, quiet_third_party

    quiet_third_party(args.verbose)
    try:
        if not os.path.isdir(args.hf_dir):
            raise FileNotFoundError(f"HF checkpoint directory {args.hf_dir!r} does not exist (missing)")
        if not torch.cuda.is_available():
            from megatron_bridge_ext.mcore.cpu_compat import apply_cpu_patches

            apply_cpu_patches()
        p = plan(args.hf_dir, **layout_of(args))
    except Exception as e:  # noqa: BLE001
        return fail(e, args.verbose)
    if args.json == "-":
        json.dump(p, sys.stdout, indent=1)
        sys.stdout.write("\n")
        return 0
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(p, f, indent=1)
    _print(p, None if args.keys == 0 else args.keys)
    return 0
