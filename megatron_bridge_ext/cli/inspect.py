"""``inspect HF_DIR --tp N --pp N [--vpp N] [--ep N] [--etp N] [--json FILE|-]``: the conversion plan of an HF
checkpoint for a layout, without converting and without reading a tensor. ``inspect MEGATRON_DIR`` tells what a
Megatron checkpoint holds instead (:func:`megatron_summary`: its spec's keys, dtypes, FP8 state, args, side files).

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


_TE_ONLY_EXTRA_STATE = ("input_layernorm", "pre_mlp_layernorm", "final_layernorm", "q_layernorm", "k_layernorm",
                        "post_layernorm", "enorm", "hnorm")


def megatron_summary(path: str) -> Dict[str, Any]:
    """What a Megatron checkpoint holds, without loading a weight: architecture and where its config comes from, the
    layer spec whose keys it has (stored by ``import``; else told by its ``_extra_state`` objects: TE norms save one,
    local norms none), tensors by dtype (quantized ones named), the ``_extra_state`` objects that carry FP8 scaling
    state, the Megatron-LM args that matter, the side files kept beside it."""
    import collections
    import tempfile

    import torch.distributed as dist
    from megatron.core.dist_checkpointing.mapping import ShardedObject
    from megatron.core.dist_checkpointing.serialization import load_sharded_metadata

    from megatron_bridge_ext.io.megatron_checkpoint import read_checkpoint_info, side_files_dir, tensor_metadata
    from megatron_bridge_ext.mcore.checkpoint import _FLOAT8, extra_state_with_content

    info = read_checkpoint_info(path)
    bridge = {}
    tensors = tensor_metadata(info.path)
    objects = sorted({v.key for v in load_sharded_metadata(info.path).values() if isinstance(v, ShardedObject)
                      and v.key.endswith("._extra_state")})
    spec = None
    if info.model_config is not None:
        from megatron_bridge_ext.io.megatron_checkpoint import BRIDGE_KEY, _load_common

        bridge = _load_common(info.path).get(BRIDGE_KEY) or {}
        spec = bridge.get("spec", "local")  # written before --spec existed: the local spec's keys
    if spec is None:
        te = any(k.rsplit(".", 2)[-2] in _TE_ONLY_EXTRA_STATE for k in objects)
        spec = "te" if te else ("local" if objects else "unknown (no _extra_state objects)")
    dtypes = collections.Counter(str(t.dtype).replace("torch.", "") for t in tensors.values())
    nbytes = sum(int(torch.Size(t.global_shape).numel()) * t.dtype.itemsize for t in tensors.values())
    started = None
    if not dist.is_initialized():  # reading _extra_state objects is a (one-process) collective
        started = tempfile.mkdtemp(prefix="inspect_")
        dist.init_process_group("gloo", init_method=f"file://{os.path.join(started, 'rendezvous')}", rank=0,
                                world_size=1)
    try:
        fp8 = extra_state_with_content(info.path)
    finally:
        if started is not None:
            import shutil

            dist.destroy_process_group()
            shutil.rmtree(started, ignore_errors=True)
    args = vars(info.args) if info.args is not None else {}
    side = side_files_dir(info.path)
    return {
        "path": info.path, "iteration": info.iteration, "architecture": info.architecture,
        "config_from": ("the config stored in the checkpoint" if info.model_config is not None else
                        "Megatron-LM args (export needs --hf-architecture or --hf-source)" if args else "nothing"),
        "spec": spec, "tensors": len(tensors), "bytes": nbytes, "dtypes": dict(dtypes),
        "quantized": sorted(k for k, t in tensors.items() if t.dtype in _FLOAT8),
        "extra_state_objects": len(objects), "fp8_state": fp8,
        "args": {k: str(args.get(k)) for k in ("transformer_impl", "num_layers", "hidden_size", "num_attention_heads",
                                               "num_experts", "tensor_model_parallel_size",
                                               "pipeline_model_parallel_size", "expert_model_parallel_size",
                                               "params_dtype", "tokenizer_type") if k in args},
        "side_files": sorted(os.listdir(side)) if side else [],
    }


def _is_megatron_checkpoint(path: str) -> bool:
    from megatron_bridge_ext.io.megatron_checkpoint import TRACKER_NAME

    return os.path.isfile(os.path.join(path, TRACKER_NAME)) or os.path.isfile(os.path.join(path, "metadata.json"))


def _print_megatron(s: Dict[str, Any]) -> None:
    print(f"{s['path']}: iteration {s['iteration']}, {s['architecture'] or 'architecture not stored'}, config from "
          f"{s['config_from']}")
    print(f"  keys of the {s['spec']} layer spec; {s['tensors']} tensors, {_gib(s['bytes'])}, dtypes {s['dtypes']}")
    print(f"  {s['extra_state_objects']} _extra_state objects; FP8 scaling state in: {s['fp8_state'] or 'none'}")
    if s["quantized"]:
        print(f"  stored quantized (export refuses them until issue #21): {s['quantized'][:10]}")
    if s["args"]:
        print("  args: " + ", ".join(f"{k}={v}" for k, v in s["args"].items()))
    print(f"  side files kept beside it: {', '.join(s['side_files']) or 'none'}")


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

    parser.add_argument("hf_dir", help="HF checkpoint directory (or a Megatron checkpoint: what it holds, no plan)")
    add_layout_arguments(parser)
    parser.add_argument("--json", metavar="FILE", default=None, help="write the plan as JSON to FILE ('-': stdout)")
    parser.add_argument("--keys", type=int, default=60, help="HF keys to list in the table (0: all)")
    parser.add_argument("--verbose", action="store_true", help="show third-party warnings")


def run(args: argparse.Namespace) -> int:
    from megatron_bridge_ext.cli.common import fail, layout_of, quiet_third_party

    quiet_third_party(args.verbose)
    if os.path.isdir(args.hf_dir) and _is_megatron_checkpoint(args.hf_dir):
        try:
            summary = megatron_summary(args.hf_dir)
        except Exception as e:  # noqa: BLE001
            return fail(e, args.verbose)
        if args.json:
            with (sys.stdout if args.json == "-" else open(args.json, "w", encoding="utf-8")) as f:
                json.dump(summary, f, indent=1)
                f.write("\n")
            if args.json == "-":
                return 0
        _print_megatron(summary)
        return 0
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
