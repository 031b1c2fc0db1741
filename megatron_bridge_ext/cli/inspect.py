"""``inspect HF_DIR --tp N --pp N [--vpp N] [--ep N] [--etp N] [--json FILE|-]``: the conversion plan of an HF
checkpoint for a layout, without converting and without reading a tensor. ``inspect MEGATRON_DIR`` tells what a
Megatron checkpoint holds instead (:func:`describe_megatron`: its spec's keys, dtypes, FP8 state, args, side files).

Every HF key -> the Megatron parameter it feeds, the parameter's tensor-parallel layout and the shape of its shard
on each rank; the bytes each rank holds; keys that nothing maps on either side; and an estimate of the peak memory
of each rank during ``import`` and of the destination rank during ``export``.

How the plan is made: :mod:`megatron_bridge_ext.engine.plan` (a whole model on the ``meta`` device, the mappings on
meta tensors per rank, megatron's even split of layers and experts).

``inspect MEGATRON_DIR [--checksums] [--json FILE|-]``: what a Megatron ``torch_dist`` checkpoint holds, read through
the restricted reader (nothing in it is run, no tensor is read, its structure is checked): its iteration, the
architecture and layout it was written at, where its common state is (``common.pt``, or the ``common_state`` object
megatron-core 0.19 stores in the ``.distcp`` files), every tensor with its global shape, dtype and stored chunks, its
sharded objects, its files, and whether it has a checksum manifest (``--checksums`` checks every file against it).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, Dict, Optional

import torch

__all__ = ["add_arguments", "run", "plan", "describe_megatron", "is_megatron_checkpoint"]


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


def is_megatron_checkpoint(path: str) -> bool:
    """``path`` is a Megatron checkpoint root (tracker file) or a distributed checkpoint directory."""
    from megatron_bridge_ext.io.megatron_checkpoint import TRACKER_NAME, _METADATA_JSON

    return any(os.path.isfile(os.path.join(path, n)) for n in (TRACKER_NAME, _METADATA_JSON))


_TE_ONLY_EXTRA_STATE = ("input_layernorm", "pre_mlp_layernorm", "final_layernorm", "q_layernorm", "k_layernorm",
                        "post_layernorm", "enorm", "hnorm")
_ARGS_SHOWN = ("transformer_impl", "num_layers", "hidden_size", "num_attention_heads", "num_experts",
               "tensor_model_parallel_size", "pipeline_model_parallel_size", "expert_model_parallel_size",
               "params_dtype", "tokenizer_type")


def describe_megatron(path: str, *, checksums: bool = False) -> Dict[str, Any]:
    """What the Megatron checkpoint at ``path`` holds (see the module docstring), as plain data.

    Raises:
        FileNotFoundError, ValueError: see :func:`megatron_bridge_ext.io.megatron_checkpoint.open_checkpoint`;
            with ``checksums``, files that differ from the manifest (each named) or no manifest.
    """
    import math

    import collections

    from megatron_bridge_ext.io import checksums as sums
    from megatron_bridge_ext.io.megatron_checkpoint import (BRIDGE_KEY, open_checkpoint, read_checkpoint_info,
                                                            side_files_dir)
    from megatron_bridge_ext.mcore.checkpoint import _FLOAT8, extra_state_with_content
    from megatron_bridge_ext.naming import EXTRA_STATE

    info = read_checkpoint_info(path)
    with open_checkpoint(path) as ckpt:
        tensors = [{"key": t.key, "shape": list(t.shape), "dtype": str(t.dtype).replace("torch.", ""),
                    "chunks": len(t.chunks), "bytes": t.nbytes} for t in ckpt.tensors.values()]
        objects: Dict[str, int] = {}
        for o in ckpt.objects.values():
            objects[o.key] = objects.get(o.key, 0) + 1
        common = "common.pt" if ckpt.has_common_file() else "common_state object in the .distcp files"
        files = ckpt.files()
        bridge = ckpt.common_state().get(BRIDGE_KEY)
        quantized = sorted(t.key for t in ckpt.tensors.values() if t.dtype in _FLOAT8)
        fp8_state = extra_state_with_content(ckpt)
    manifest = sums.read_manifest(info.path)
    extra = sorted(k for k in objects if k.endswith("." + EXTRA_STATE))
    if isinstance(bridge, dict) and info.model_config is not None:
        spec = bridge.get("spec", "local")  # written before --spec existed: the local spec's keys
    elif any(k.rsplit(".", 2)[-2] in _TE_ONLY_EXTRA_STATE for k in extra):
        spec = "te"  # TE norms save an _extra_state object, local norms none
    else:
        spec = "local" if extra else "unknown (no _extra_state objects)"
    margs = vars(info.args) if info.args is not None else {}
    side = side_files_dir(info.path)
    out: Dict[str, Any] = {
        "path": info.path, "iteration": info.iteration, "checkpoint_version": info.checkpoint_version,
        "architecture": info.architecture, "written_at": info.parallel, "model_keys": info.model_keys,
        "written_by_megatron_bridge_ext": bridge is not None, "common_state": common,
        "tensors": tensors, "sharded_objects": objects, "files": files,
        "bytes": sum(t["bytes"] for t in tensors),
        "elements": sum(math.prod(t["shape"]) for t in tensors),
        "checksum_manifest": manifest is not None,
        "config_from": ("the config stored in the checkpoint" if info.model_config is not None else
                        "Megatron-LM args (export needs --hf-architecture or --hf-source)" if margs else "nothing"),
        "spec": spec, "dtypes": dict(collections.Counter(t["dtype"] for t in tensors)), "quantized": quantized,
        "extra_state_objects": len(extra), "fp8_state": fp8_state,
        "args": {k: str(margs.get(k)) for k in _ARGS_SHOWN if k in margs},
        "side_files": sorted(os.listdir(side)) if side else [],
    }
    if checksums:
        import time

        if manifest is None:
            raise FileNotFoundError(f"{info.path}: no {sums.MANIFEST_NAME}; the checkpoint was written without a "
                                    "checksum manifest, so --checksums cannot check it")
        start = time.perf_counter()
        problems = sums.compare(manifest, sums.digests(info.path, sorted(manifest), threads=os.cpu_count() or 1),
                                sums.present_files(info.path, manifest))
        out["checksums"] = {"files": len(manifest), "problems": problems, "seconds": time.perf_counter() - start}
    return out


def _print_megatron(d: Dict[str, Any], keys: Optional[int]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    layout = ", ".join(f"{k}={v}" for k, v in d["written_at"].items() if v is not None)
    console.print(f"{d['path']}: iteration {d['iteration']}, {d['architecture'] or 'architecture not recorded'}"
                  f"{', written at ' + layout if layout else ''}; common state in {d['common_state']}; "
                  f"{'written by megatron_bridge_ext' if d['written_by_megatron_bridge_ext'] else 'not written by megatron_bridge_ext'}")
    t = Table(title=f"{len(d['tensors'])} tensors, {_gib(d['bytes'])}")
    for col in ("key", "global shape", "dtype", "chunks"):
        t.add_column(col)
    shown = d["tensors"] if keys is None else d["tensors"][:keys]
    for r in shown:
        t.add_row(r["key"], str(r["shape"]), r["dtype"], str(r["chunks"]))
    console.print(t)
    if keys is not None and len(d["tensors"]) > keys:
        console.print(f"... {len(d['tensors']) - keys} more (--keys 0 shows all)")
    console.print(f"keys of the {d['spec']} layer spec; config from {d['config_from']}; dtypes {d['dtypes']}")
    console.print(f"{d['extra_state_objects']} _extra_state objects; FP8 scaling state in: {d['fp8_state'] or 'none'}")
    if d["quantized"]:
        console.print(f"stored quantized (export refuses them): {d['quantized'][:10]}")
    if d["args"]:
        console.print("args: " + ", ".join(f"{k}={v}" for k, v in d["args"].items()))
    console.print(f"side files kept beside it: {', '.join(d['side_files']) or 'none'}")
    objs = d["sharded_objects"]
    console.print(f"sharded objects: {sum(objs.values())} under {len(objs)} key(s)"
                  + (": " + ", ".join(sorted(objs)[:8]) + (" ..." if len(objs) > 8 else "") if objs else ""))
    console.print(f"files: {', '.join(d['files'])}")
    if "checksums" in d:
        c = d["checksums"]
        console.print(f"checksums: {c['files']} files, {'all match' if not c['problems'] else 'FAIL'} "
                      f"({c['seconds']:.2f} s)")
        for line in c["problems"]:
            console.print(f"CHANGED {line}")
    else:
        console.print(f"checksum manifest: {'integrity.json (--checksums checks it)' if d['checksum_manifest'] else 'none'}")


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
                         ("HF tensors carried unchanged (not converted)", p.get("carried_hf", [])),
                         ("Megatron parameters nothing maps", p["unmapped_megatron"]),
                         ("HF tensors a mapping needs that the checkpoint lacks", p["missing_hf"])):
        console.print(f"{title}: {len(names)}" + ("" if not names else ": " + ", ".join(names[:20])
                                                  + (" ..." if len(names) > 20 else "")))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from megatron_bridge_ext.cli.common import add_layout_arguments

    parser.add_argument("hf_dir", metavar="DIR", help="HF checkpoint directory, or a Megatron checkpoint (root or "
                                                       "iter_* directory)")
    add_layout_arguments(parser)
    parser.add_argument("--checksums", action="store_true",
                        help="Megatron checkpoint: check every file against its checksum manifest (integrity.json)")
    parser.add_argument("--json", metavar="FILE", default=None, help="write the plan as JSON to FILE ('-': stdout)")
    parser.add_argument("--keys", type=int, default=60, help="HF keys (or Megatron tensors) to list in the table "
                                                               "(0: all)")
    parser.add_argument("--verbose", action="store_true", help="show third-party warnings")


def run(args: argparse.Namespace) -> int:
    from megatron_bridge_ext.cli.common import fail, layout_of, quiet_third_party

    quiet_third_party(args.verbose)
    if os.path.isdir(args.hf_dir) and is_megatron_checkpoint(args.hf_dir):
        return _run_megatron(args)
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


def _run_megatron(args: argparse.Namespace) -> int:
    from megatron_bridge_ext.cli.common import fail

    try:
        d = describe_megatron(args.hf_dir, checksums=args.checksums)
    except Exception as e:  # noqa: BLE001
        return fail(e, args.verbose)
    if args.json == "-":
        json.dump(d, sys.stdout, indent=1, default=str)
        sys.stdout.write("\n")
    else:
        if args.json:
            with open(args.json, "w", encoding="utf-8") as f:
                json.dump(d, f, indent=1, default=str)
        _print_megatron(d, None if args.keys == 0 else args.keys)
    return 1 if d.get("checksums", {}).get("problems") else 0
