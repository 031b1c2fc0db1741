"""``verify HF_DIR MEGATRON_DIR [--tp N --pp N ...] [--checksums]``: does a Megatron checkpoint hold exactly the HF
checkpoint? ``verify --checksums MEGATRON_DIR``: are its files those it was written with?

The Megatron checkpoint is loaded at the given layout (default TP1 PP1) through the restricted reader and exported in
memory, tensor by tensor, and every HF tensor is compared bit for bit (``torch.equal`` in the checkpoint's dtype: an
HF tensor of another dtype is cast to it first, as import does). Then the Megatron model's logits on a few fixed
batches are compared with the HF model's own (transformers, fp32). Prints a table; exits 1 naming every mismatching
tensor.

``--no-logits`` without a layout streams instead, as ``export`` does: one process, no model built, each bucket of
parameters read from the checkpoint's files (the chunks each HF tensor needs), converted, compared and dropped, so
memory is bounded by the bucket (``--bucket-bytes``) plus the largest tensor whatever the model's size
(``--via-model`` loads the model anyway; the logits always need it).

With ``--checksums`` every file of the checkpoint is first checked against its manifest (``integrity.json``,
megatron-core's ``verify_integrity`` format), each changed, missing or added file named; with the Megatron checkpoint
alone, that is all it checks.
"""

from __future__ import annotations

import argparse
import os
from typing import Any, Dict, List, Optional, Set

import torch

__all__ = ["add_arguments", "run", "verify_checkpoint"]

#: default max |logit difference| per checkpoint dtype (fp32 forward vs the checkpoint's dtype)
DEFAULT_ATOL = {torch.float32: 1e-4, torch.float16: 5e-2, torch.bfloat16: 2e-1}


def _tokens(vocab: int, batches: int, batch: int, seq_len: int, seed: int) -> List[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (batch, seq_len), generator=g) for _ in range(batches)]


def _worker(rank: int, world: int, hf_dir: str, meg_dir: str, layout: Dict[str, Any], logits: bool,
            batches: int, seq_len: int, show: bool, verbose: bool,
            verify_checksums: bool = False, stream: bool = False,
            bucket_bytes: Optional[int] = None) -> Optional[Dict[str, Any]]:
    import contextlib

    from megatron_bridge_ext.cli.common import (load_checkpoint_chunks, phase, quiet_third_party, timed,
                                                worker_setup)

    if stream:  # no model runs and nothing moves between ranks: one process, no CPU patches needed
        quiet_third_party(verbose)
        device = torch.device("cpu")
    else:
        device = worker_setup(verbose)
    from megatron_bridge_ext.auto_bridge import AutoBridge
    from megatron_bridge_ext.io.checksums import IntegrityError
    from megatron_bridge_ext.io.megatron_checkpoint import check_checksums, read_checkpoint_info
    from megatron_bridge_ext.mcore.checkpoint import args_disagreements, config_from_checkpoint
    from megatron_bridge_ext.mcore.forward import megatron_logits
    from megatron_bridge_ext.mcore.model_builder import destroy_parallel, init_parallel

    show = show and rank == 0
    init_parallel(**layout)
    try:
        clock = timed()
        if verify_checksums:
            try:
                with phase(f"Checking {meg_dir} against its checksum manifest", show):
                    checked = check_checksums(meg_dir, required=True)
            except IntegrityError as e:  # reported as the verdict, not as a failure to verify
                return {"checksum_problems": e.problems, "info": meg_dir} if rank == 0 else None
        info = read_checkpoint_info(meg_dir)
        bridge = AutoBridge.from_hf_pretrained(hf_dir)
        arch = bridge.hf_config.architectures[0]
        if info.architecture is not None and info.architecture != arch:
            raise ValueError(f"{hf_dir} is a {arch}, the Megatron checkpoint {info.path} holds a {info.architecture}")
        if info.model_config is not None:
            config, described_by = config_from_checkpoint(info), "the config stored in the checkpoint"
        else:  # a checkpoint Megatron-LM trained: the HF checkpoint's config, which its args must agree with
            config, described_by = bridge.transformer_config(), f"the config of {hf_dir}"
            diff = args_disagreements(info.args, config) if info.args is not None else []
            if diff:
                raise ValueError(f"{hf_dir} does not describe the model in {info.path} (its Megatron-LM args): "
                                 + "; ".join(diff).replace(", config ", ", HF "))
        opened = contextlib.ExitStack()
        materialize = None
        if stream:
            from megatron_bridge_ext.cli.export import stream_chunks
            from megatron_bridge_ext.io.megatron_checkpoint import open_checkpoint

            ckpt = opened.enter_context(open_checkpoint(meg_dir))
            chunks, materialize = stream_chunks(info, config, ckpt, described_by)
        else:
            chunks = load_checkpoint_chunks(info, config, device, show, described_by)
        load_s = clock()
        src = bridge.hf_pretrained.state
        rows: Dict[str, Any] = {"mismatched": [], "missing": [], "unexpected": [], "compared": 0, "bytes": 0,
                                "dtype_cast": 0}
        # the tasks with the source's copies (a stored tied lm_head.weight is exported as a copy of the embedding)
        tasks = bridge.model_bridge.build_conversion_tasks(None, chunks, stored_keys=src.keys())
        extra = {} if bucket_bytes is None else {"bucket_bytes": bucket_bytes}
        with opened:
            exported = bridge.model_bridge.stream_weights_megatron_to_hf(
                chunks, None, hf_config=bridge.hf_config, dst=0, copy=False, show_progress=show,
                conversion_tasks=tasks, materialize=materialize, **extra)
            seen = _compare(exported, src, rows)
        if rank == 0 and bridge.model_bridge.carried_hf_params:
            seen |= _compare_carried(info.path, src, rows)
        if rank == 0:
            rows["missing"] = [name for name in src.keys() if name not in seen]
        compare_s = clock() - load_s
        result: Dict[str, Any] = {"rows": rows, "load_s": load_s, "compare_s": compare_s, "info": info.path,
                                  "dtype": str(config.params_dtype).replace("torch.", ""), "tensors": len(src),
                                  "streamed": stream}
        if materialize is not None:
            result["bytes_read"] = materialize.bytes_read
        if verify_checksums:
            result["checksums"] = checked
        if logits and not stream:
            batch_list = _tokens(bridge.hf_config.vocab_size, batches, 2, seq_len, seed=1234)
            with phase("Megatron forward on the fixed batches", show):
                meg = [megatron_logits(chunks, t) for t in batch_list]
            del chunks
            if rank == 0:
                from megatron_bridge_ext.testing.parity import hf_logits

                with phase("HF forward on the fixed batches", show):
                    ref = [hf_logits(hf_dir, t) for t in batch_list]
                result["max_logit_diff"] = max(float((m.float().cpu() - r).abs().max()) for m, r in zip(meg, ref))
                result["batches"] = f"{batches} x [2, {seq_len}]"
        return result if rank == 0 else None
    finally:
        destroy_parallel()


def _compare(exported: Any, src: Any, rows: Dict[str, Any]) -> Set[str]:
    """Every ``(name, tensor)`` of ``exported`` against the HF source's tensor of that name (``torch.equal`` in the
    exported dtype: an HF tensor of another dtype is cast to it first, as import does), counted into ``rows``;
    returns the names exported."""
    seen = set()
    for name, tensor in exported:  # rank 0 only receives
        seen.add(name)
        if name not in src:
            rows["unexpected"].append(name)
            continue
        ref = src[name]
        if ref.dtype != tensor.dtype:
            rows["dtype_cast"] += 1
            ref = ref.to(tensor.dtype)
        rows["compared"] += 1
        rows["bytes"] += tensor.numel() * tensor.element_size()
        if ref.shape != tensor.shape or not torch.equal(ref, tensor):
            diff = "shape %s vs %s" % (tuple(ref.shape), tuple(tensor.shape)) if ref.shape != tensor.shape \
                else f"{int((ref != tensor).sum())} of {ref.numel()} values differ"
            rows["mismatched"].append(f"{name} ({diff})")
    return seen


def _compare_carried(meg_dir: str, src: Any, rows: Dict[str, Any]) -> Set[str]:
    """The carried tensors ``import`` kept beside the checkpoint (``hf/carried.safetensors``) against the source's,
    as :func:`_compare` does; returns their names (none without the file: the source's are then missing)."""
    from megatron_bridge_ext.io import SafeTensorsSource
    from megatron_bridge_ext.io.hf_checkpoint import CARRIED_TENSORS
    from megatron_bridge_ext.io.megatron_checkpoint import side_files_dir

    side = side_files_dir(meg_dir)
    path = None if side is None else os.path.join(side, CARRIED_TENSORS)
    if path is None or not os.path.isfile(path):
        return set()
    with SafeTensorsSource(path) as kept:
        return _compare(((name, kept[name]) for name in kept.keys()), src, rows)


def verify_checksums(meg_dir: str) -> Dict[str, Any]:
    """Check a Megatron checkpoint's files against its manifest (in this process, a thread per core); returns
    ``{"ok", "files", "problems", "info", "seconds"}``.

    Raises:
        FileNotFoundError: no checkpoint, or no manifest.
    """
    import time

    from megatron_bridge_ext.io import checksums
    from megatron_bridge_ext.io.megatron_checkpoint import resolve_checkpoint

    sub, _ = resolve_checkpoint(meg_dir)
    manifest = checksums.read_manifest(sub)
    if manifest is None:
        raise FileNotFoundError(f"{sub}: no {checksums.MANIFEST_NAME}; the checkpoint was written without a "
                                "checksum manifest, so --checksums cannot check it")
    start = time.perf_counter()
    actual = checksums.digests(sub, sorted(manifest), threads=os.cpu_count() or 1)
    problems = checksums.compare(manifest, actual, checksums.present_files(sub, manifest))
    return {"ok": not problems, "files": len(manifest), "problems": problems, "info": sub,
            "seconds": time.perf_counter() - start}


def verify_checkpoint(hf_dir: str, meg_dir: str, *, tp: int = 1, pp: int = 1, vpp: Optional[int] = None,
                      ep: int = 1, etp: Optional[int] = None, logits: bool = True, batches: int = 3,
                      seq_len: int = 16, atol: Optional[float] = None, show: bool = False, verbose: bool = False,
                      timeout: float = 3600.0, backend: Optional[str] = None,
                      checksums: bool = False, via_model: Optional[bool] = None,
                      bucket_bytes: Optional[int] = None) -> Dict[str, Any]:
    """Compare an HF checkpoint with a Megatron checkpoint (first its files with its manifest, with ``checksums``);
    returns rank 0's result with ``ok``.

    Args:
        via_model: load the checkpoint into a model built at the layout (local processes; memory: the whole model)
            instead of streaming it (one process, no model: each bucket of parameters read from the files, converted,
            compared and dropped). Default: the stream when no logits are asked for, no layout other than TP1 PP1
            EP1 is given and not under torchrun; else the model. The logits need the model.
        bucket_bytes: parameter bytes converted per step (the stream's memory bound besides the largest tensor).

    Raises:
        ValueError: ``via_model=False`` with logits or with a layout (both need the model).
    """
    from megatron_bridge_ext.cli.common import run_in_process, run_world, under_torchrun, world_size_for
    from megatron_bridge_ext.io.megatron_checkpoint import read_checkpoint_info, resolve_checkpoint

    if bucket_bytes is not None and (not isinstance(bucket_bytes, int) or bucket_bytes <= 0):
        raise ValueError(f"verify: bucket_bytes = {bucket_bytes!r}, expected a positive number of bytes")
    layout = {"tp": tp, "pp": pp, "vpp": vpp, "ep": ep, "etp": etp}
    laid_out = world_size_for(layout) > 1 or (vpp or 1) > 1
    if via_model is None:
        via_model = logits or laid_out or under_torchrun()
    if not via_model and (logits or laid_out):
        raise ValueError("verify: the streamed comparison reads at TP1 PP1 EP1 without a model; "
                         + ("the logits need the model (pass --no-logits, or drop the stream)" if logits else
                            f"the layout {layout} applies to the model path (--via-model)"))
    if not os.path.isdir(hf_dir):
        raise FileNotFoundError(f"HF checkpoint directory {hf_dir!r} does not exist (missing)")
    if checksums:
        resolve_checkpoint(meg_dir)  # the ranks check the files against the manifest before reading any
    else:
        read_checkpoint_info(meg_dir)  # its structure and its common state, before starting any process
    args = (hf_dir, meg_dir, layout, logits, batches, seq_len, show, verbose, checksums, not via_model, bucket_bytes)
    if via_model:
        res = run_world(_worker, world_size_for(layout), args, timeout=timeout, backend=backend)[0]
    else:
        res = run_in_process(_worker, args)
    if res is None:  # not rank 0 under torchrun
        return {"ok": True}
    if "checksum_problems" in res:
        res["ok"] = False
        return res
    rows = res["rows"]
    if atol is None:
        atol = DEFAULT_ATOL.get(getattr(torch, res["dtype"]), 2e-1)
    res["atol"] = atol
    res["tensors_ok"] = not (rows["mismatched"] or rows["missing"] or rows["unexpected"])
    res["logits_ok"] = res.get("max_logit_diff", 0.0) <= atol
    res["ok"] = res["tensors_ok"] and res["logits_ok"]
    return res


def _report_checksums(problems: List[str]) -> None:
    for line in problems:
        print(f"CHANGED {line}")


def report(res: Dict[str, Any], title: str) -> None:
    """The verification table, then one line per mismatching tensor (or per file that differs from the manifest)."""
    from megatron_bridge_ext.cli.roundtrip import _print_table

    if "checksum_problems" in res or "rows" not in res:
        problems = res.get("checksum_problems", res.get("problems", []))
        table = [("Megatron checkpoint", res["info"])]
        if "files" in res:
            table.append(("files checked", f"{res['files']} ({res['seconds']:.2f} s)"))
        table += [("checksums", "match" if not problems else f"NO: {len(problems)} file(s) differ"),
                  ("verdict", "PASS" if res["ok"] else "FAIL")]
        _print_table(table, title)
        _report_checksums(problems)
        return
    r = res["rows"]
    table = [
        ("Megatron checkpoint", res["info"]),
        *([("checksums", f"{res['checksums']} files match")] if "checksums" in res else []),
        ("checkpoint dtype", res["dtype"] + (f" ({r['dtype_cast']} HF tensors cast to it)" if r["dtype_cast"] else "")),
        ("HF tensors", str(res["tensors"])),
        ("compared", f"{r['compared']} ({r['bytes']:,} bytes)"),
        *([("streamed (no model)", f"{res['bytes_read']:,} bytes read")] if res.get("streamed") else []),
        ("bit-exact", "yes" if not r["mismatched"] else f"NO: {len(r['mismatched'])} tensor(s) differ"),
        ("missing from the Megatron checkpoint", str(len(r["missing"]))),
        ("not in the HF checkpoint", str(len(r["unexpected"]))),
    ]
    if "max_logit_diff" in res:
        table.append((f"max |logit diff| ({res['batches']})", f"{res['max_logit_diff']:.3e} (atol {res['atol']:.0e})"))
    table += [("load + compare", f"{res['load_s']:.2f} s + {res['compare_s']:.2f} s"),
              ("verdict", "PASS" if res["ok"] else "FAIL")]
    _print_table(table, title)
    for name in r["mismatched"]:
        print(f"MISMATCH {name}")
    for name in r["missing"]:
        print(f"MISSING {name} (in the HF checkpoint, not produced from the Megatron checkpoint)")
    for name in r["unexpected"]:
        print(f"UNEXPECTED {name} (produced from the Megatron checkpoint, not in the HF checkpoint)")
    if not res["logits_ok"]:
        print(f"LOGITS max |diff| {res['max_logit_diff']:.3e} exceeds {res['atol']:.0e}")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from megatron_bridge_ext.cli.common import add_layout_arguments, add_terminal_arguments

    parser.add_argument("paths", nargs="+", metavar="HF_DIR MEGATRON_DIR",
                        help="the HF checkpoint and the Megatron checkpoint root (or its iter_* directory); with "
                             "--checksums the Megatron checkpoint alone")
    add_layout_arguments(parser)
    parser.add_argument("--checksums", action="store_true",
                        help="check every file of the Megatron checkpoint against its checksum manifest "
                             "(integrity.json) first")
    parser.add_argument("--no-logits", action="store_true",
                        help="compare the tensors only; without a layout this streams (one process, no model, "
                             "memory bounded by --bucket-bytes plus the largest tensor)")
    parser.add_argument("--via-model", action="store_true",
                        help="load the checkpoint into a model built at the layout even with --no-logits")
    parser.add_argument("--bucket-bytes", type=int, default=None, metavar="N",
                        help="parameter bytes converted per step (default 256 MiB)")
    parser.add_argument("--batches", type=int, default=3, help="fixed batches for the logits comparison")
    parser.add_argument("--seq-len", type=int, default=16)
    parser.add_argument("--atol", type=float, default=None,
                        help="max |logit difference| (default by dtype: fp32 1e-4, fp16 5e-2, bf16 2e-1)")
    add_terminal_arguments(parser)


def run(args: argparse.Namespace) -> int:
    from megatron_bridge_ext.cli.common import fail, is_rank0, layout_of, quiet_third_party, show_progress

    quiet_third_party(args.verbose)
    try:
        if len(args.paths) > 2 or (len(args.paths) == 1 and not args.checksums):
            raise ValueError("verify takes HF_DIR MEGATRON_DIR, or --checksums MEGATRON_DIR; got "
                             f"{len(args.paths)} path(s)")
        if len(args.paths) == 1:
            res = verify_checksums(args.paths[0])
            title = f"verify the checksums of {args.paths[0]}"
        else:
            hf_dir, meg_dir = args.paths
            res = verify_checkpoint(hf_dir, meg_dir, **layout_of(args), logits=not args.no_logits,
                                    batches=args.batches, seq_len=args.seq_len, atol=args.atol,
                                    show=show_progress(args), verbose=args.verbose, timeout=args.timeout,
                                    backend=args.backend, checksums=args.checksums,
                                    via_model=True if args.via_model else None, bucket_bytes=args.bucket_bytes)
            title = f"verify {hf_dir} against {meg_dir}"
    except Exception as e:  # noqa: BLE001
        return fail(e, args.verbose)
    if not is_rank0() or ("rows" not in res and "info" not in res):
        return 0
    report(res, title)
    return 0 if res["ok"] else 1
