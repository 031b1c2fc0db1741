"""``roundtrip HF_DIR OUT_DIR --tp N --pp N [--vpp N]``: a checkpoint of yours HF -> Megatron (local gloo ranks) ->
HF, verified: same key set, bit-exact tensors, Megatron logits against the HF model's own, the time of each phase."""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any, Dict, List, Optional, Sequence

import torch

__all__ = ["add_arguments", "run", "roundtrip", "report"]


def _roundtrip_worker(rank: int, world: int, ckpt: str, out_dir: str, tp: int, pp: int, vpp: Optional[int],
                      tokens: Optional[List[List[int]]], bucket_bytes: int, verbose: bool = False) -> Dict[str, Any]:
    from megatron_bridge_ext.cli.common import worker_setup

    worker_setup(verbose)  # third-party noise off, CPU patches on CPU-only processes
    from megatron_bridge_ext.auto_bridge import AutoBridge
    from megatron_bridge_ext.mcore.model_builder import destroy_parallel, init_parallel

    init_parallel(tp=tp, pp=pp, vpp=vpp)
    try:
        bridge = AutoBridge.from_hf_pretrained(ckpt)
        show = rank == 0 and sys.stderr.isatty()
        t0 = time.perf_counter()
        chunks = bridge.to_megatron_model(load_weights=False, params_dtype=torch.float32)
        t1 = time.perf_counter()
        bridge.load_hf_weights(chunks, show_progress=show)
        t2 = time.perf_counter()
        logits = None
        if tokens is not None:
            from megatron_bridge_ext.mcore.forward import megatron_logits

            logits = megatron_logits(chunks, torch.tensor(tokens))
        t3 = time.perf_counter()
        summary = bridge.save_hf_pretrained(chunks, out_dir, bucket_bytes=bucket_bytes, show_progress=show)
        t4 = time.perf_counter()
        return {"build_s": t1 - t0, "import_s": t2 - t1, "forward_s": t3 - t2, "export_s": t4 - t3,
                "logits": logits if rank == 0 else None, "summary": summary}
    finally:
        destroy_parallel()


def roundtrip(ckpt: str, out_dir: str, *, tp: int = 2, pp: int = 1, vpp: Optional[int] = None,
              check_logits: bool = True, bucket_bytes: int = 64 * 1024 * 1024, seq_len: int = 16,
              batch: int = 2, verbose: bool = False) -> Dict[str, Any]:
    """HF ``ckpt`` -> Megatron (tp*pp local gloo ranks) -> HF ``out_dir``; returns the measurements."""
    from megatron_bridge_ext.cli.common import quiet_third_party
    from megatron_bridge_ext.launch import spawn_local
    from megatron_bridge_ext.testing.parity import compare_checkpoints

    quiet_third_party(verbose)
    from megatron_bridge_ext.io import SafeTensorsSource

    # validates the safetensors checkpoint first: a pickle-only checkpoint is refused here, never unpickled
    SafeTensorsSource(ckpt).close()
    tokens = hf_logits = None
    t_hf = 0.0
    if check_logits:
        from transformers import AutoModelForCausalLM

        t0 = time.perf_counter()
        import transformers

        dtype_kw = "dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype"
        # safetensors only: transformers never falls back to the pickle weights of the directory
        from megatron_bridge_ext.io.hf_checkpoint import hf_config_of

        # the config as the converter reads it (a model type of CONFIG_ALIASES through its aliased class)
        model = AutoModelForCausalLM.from_pretrained(ckpt, config=hf_config_of(ckpt), use_safetensors=True,
                                                     local_files_only=True, **{dtype_kw: torch.float32})
        model.eval()
        g = torch.Generator().manual_seed(1)
        ids = torch.randint(0, model.config.vocab_size, (batch, seq_len), generator=g)
        with torch.no_grad():
            hf_logits = model(ids).logits.float()
        tokens = ids.tolist()
        t_hf = time.perf_counter() - t0
    t0 = time.perf_counter()
    results = spawn_local(_roundtrip_worker, tp * pp, (ckpt, out_dir, tp, pp, vpp, tokens, bucket_bytes, verbose))
    wall = time.perf_counter() - t0
    r0 = results[0]
    cmp = compare_checkpoints(ckpt, out_dir)
    out = {**cmp, "tp": tp, "pp": pp, "vpp": vpp, "world_wall_s": wall, "hf_forward_s": t_hf,
           "import_s": max(r["import_s"] for r in results), "export_s": max(r["export_s"] for r in results),
           "build_s": max(r["build_s"] for r in results), "forward_s": max(r["forward_s"] for r in results)}
    if hf_logits is not None:
        out["max_logit_diff"] = float((r0["logits"].float() - hf_logits).abs().max())
    return out


def _print_table(rows: Sequence[Sequence[str]], title: str) -> None:
    try:
        from rich.console import Console
        from rich.table import Table

        table = Table(title=title, min_width=max(60, len(title) + 4))
        table.add_column("check")
        table.add_column("result", justify="right")
        for k, v in rows:
            table.add_row(k, v)
        Console().print(table)
    except ImportError:  # plain text
        print(title)
        width = max(len(k) for k, _ in rows)
        for k, v in rows:
            print(f"  {k:<{width}}  {v}")


def report(res: Dict[str, Any], title: str) -> bool:
    """Prints the verification table of a round trip; returns whether it passed."""
    ok = res["same_keys"] and res["bit_exact"] and res.get("max_logit_diff", 0.0) <= 1e-4
    rows = [
        ("layout", f"TP={res['tp']} PP={res['pp']}" + (f" VPP={res['vpp']}" if res["vpp"] else "")),
        ("tensors", str(res["tensors"])),
        ("bytes", f"{res['bytes']:,}"),
        ("same key set", "yes" if res["same_keys"] else f"no (missing {res['missing'][:5]}, extra {res['unexpected'][:5]})"),
        ("bit-exact round trip", "yes" if res["bit_exact"] else f"no ({res['mismatched'][:5]})"),
    ]
    if "max_logit_diff" in res:
        rows.append(("max |logit diff| Megatron vs HF", f"{res['max_logit_diff']:.3e}"))
    rows += [
        ("HF reference forward", f"{res['hf_forward_s']:.2f} s"),
        ("build Megatron chunks (slowest rank)", f"{res['build_s']:.2f} s"),
        ("import HF -> Megatron (slowest rank)", f"{res['import_s']:.3f} s"),
        ("Megatron forward", f"{res['forward_s']:.2f} s"),
        ("export Megatron -> HF + write", f"{res['export_s']:.3f} s"),
        ("whole local world (spawn, imports, all)", f"{res['world_wall_s']:.1f} s"),
        ("verdict", "PASS" if ok else "FAIL"),
    ]
    _print_table(rows, title)
    return ok


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("hf_path")
    parser.add_argument("out_dir")
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--pp", type=int, default=1)
    parser.add_argument("--vpp", type=int, default=None)
    parser.add_argument("--no-logits", action="store_true", help="skip the HF vs Megatron logits comparison")
    parser.add_argument("--json", action="store_true", help="print the measurements as JSON")
    parser.add_argument("--verbose", action="store_true", help="show third-party warnings")


def run(args: argparse.Namespace) -> int:
    res = roundtrip(args.hf_path, args.out_dir, tp=args.tp, pp=args.pp, vpp=args.vpp,
                    check_logits=not args.no_logits, verbose=args.verbose)
    if args.json:
        print(json.dumps(res, indent=2, default=str))
        return 0 if res["bit_exact"] else 1
    return 0 if report(res, f"round trip of {args.hf_path}") else 1
