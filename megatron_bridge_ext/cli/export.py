"""``export MEGATRON_DIR HF_DIR [--tp N --pp N ...] [--hf-source DIR]``: a Megatron distributed checkpoint -> a
complete HF checkpoint (sharded safetensors + index, ``config.json``).

The model is rebuilt from the config stored in the checkpoint (no HF directory needed): ``config.json`` is generated
from the Megatron side and the tensors keep the checkpoint's dtype. With ``--hf-source`` the source's
``config.json``, tokenizer and other side files are copied, its dtypes and key set reproduced, and the source is
checked against the checkpoint first (architecture, model config). The checkpoint is read at the layout given
(default TP1 PP1: any layout reshards from the one it was written at), through the restricted reader (nothing in it is
run; its structure is checked before anything is written), after checking its files against its checksum manifest
(``integrity.json``) when it has one (``--no-checksums`` skips that).
"""

from __future__ import annotations

import argparse
import os
from typing import Any, Dict, List, Optional

__all__ = ["add_arguments", "run", "export_checkpoint", "check_source_agrees"]

# fields that may differ between an HF source and a checkpoint trained from it: the dtype is cast on export
_DTYPE_FIELDS = ("params_dtype", "bf16", "fp16")


def check_source_agrees(info: Any, source_fields: Dict[str, Any], source_arch: str, source_dir: str) -> None:
    """The HF source describes the model in the checkpoint: same architecture, same model config (dtypes aside).

    Raises:
        ValueError: naming every field that differs, with both values.
    """
    if info.architecture is not None and info.architecture != source_arch:
        raise ValueError(f"--hf-source {source_dir} is a {source_arch}, the Megatron checkpoint {info.path} holds a "
                         f"{info.architecture}")
    if info.model_config is None:
        return
    from megatron_bridge_ext.mcore.versions import drop_runtime_only_fields

    # runtime-feature fields that differ between megatron-core versions say nothing about the model
    stored, source_fields = drop_runtime_only_fields(info.model_config), drop_runtime_only_fields(source_fields)
    diff = []
    for key in sorted(set(stored) | set(source_fields)):
        if key in _DTYPE_FIELDS:
            continue
        a, b = stored.get(key), source_fields.get(key)
        if a != b:
            diff.append(f"{key}: checkpoint {a!r}, source {b!r}")
    if diff:
        raise ValueError(f"--hf-source {source_dir} does not describe the model in {info.path}: "
                         + "; ".join(diff))


def _worker(rank: int, world: int, meg_dir: str, out_dir: str, layout: Dict[str, Any], hf_source: Optional[str],
            show: bool, verbose: bool, fsync: bool, verify_checksums: bool = True) -> Dict[str, Any]:
    from megatron_bridge_ext.cli.common import load_checkpoint_chunks, phase, timed, worker_setup

    device = worker_setup(verbose)
    import torch.distributed as dist

    from megatron_bridge_ext.auto_bridge import AutoBridge
    from megatron_bridge_ext.io.megatron_checkpoint import check_checksums, read_checkpoint_info
    from megatron_bridge_ext.mcore.checkpoint import config_from_checkpoint
    from megatron_bridge_ext.mcore.config import config_to_dict
    from megatron_bridge_ext.mcore.model_builder import destroy_parallel, init_parallel

    show = show and rank == 0
    init_parallel(**layout)
    try:
        clock = timed()
        checked = None
        if verify_checksums:
            with phase(f"Checking {meg_dir} against its checksum manifest", show):
                checked = check_checksums(meg_dir, required=False)
        checksum_s = clock()
        info = read_checkpoint_info(meg_dir)
        if hf_source is not None:
            bridge = AutoBridge.from_hf_pretrained(hf_source)
            source_config = bridge.transformer_config()
            check_source_agrees(info, config_to_dict(source_config), bridge.hf_config.architectures[0], hf_source)
        else:
            if info.architecture is None:
                raise ValueError(f"{info.path}: the checkpoint does not name its architecture (not written by "
                                 "megatron_bridge_ext); give the HF source with --hf-source")
            bridge = AutoBridge.from_architecture(info.architecture)
        if info.model_config is None and hf_source is not None:
            config = source_config  # a checkpoint of Megatron-LM itself: the model as the HF source describes it
        else:
            config = config_from_checkpoint(info)
        chunks = load_checkpoint_chunks(info, config, device, show)
        dist.barrier()
        read_s = clock()
        summary = bridge.save_hf_pretrained(chunks, out_dir, show_progress=show, fsync=fsync)
        dist.barrier()
        return {"summary": summary, "read_s": read_s - checksum_s, "total_s": clock(), "source": info.path,
                "checksums": checked, "checksum_s": checksum_s}
    finally:
        destroy_parallel()


def _check_destination(out_dir: str, overwrite: bool) -> None:
    """A new or empty ``out_dir``, or ``overwrite``: the save then replaces the old checkpoint whole, once the new one
    is complete (``save_hf_pretrained`` stages it beside ``out_dir``)."""
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise FileExistsError(f"{out_dir} exists and is not a directory")
    if os.path.isdir(out_dir) and os.listdir(out_dir) and not overwrite:
        raise FileExistsError(f"{out_dir} exists and is not empty; pass --overwrite to replace it (the old "
                              "checkpoint is replaced only once the new one is complete)")


def export_checkpoint(meg_dir: str, out_dir: str, *, tp: int = 1, pp: int = 1, vpp: Optional[int] = None,
                      ep: int = 1, etp: Optional[int] = None, hf_source: Optional[str] = None,
                      overwrite: bool = False, fsync: bool = True, show: bool = False, verbose: bool = False,
                      timeout: float = 3600.0, backend: Optional[str] = None,
                      checksums: bool = True) -> Dict[str, Any]:
    """Megatron checkpoint ``meg_dir`` -> HF checkpoint ``out_dir``; returns rank 0's measurements.

    Args:
        checksums: check the checkpoint's files against its ``integrity.json`` when it has one (the default).

    Raises:
        FileNotFoundError: the checkpoint (or the HF source) is missing.
        FileExistsError: ``out_dir`` holds files and ``overwrite`` is False.
        ValueError: the HF source disagrees with the checkpoint (named fields), a layout that cannot split it, a
            structural fault or a refused class in the checkpoint (file and key named), files that differ from the
            manifest (each named). Nothing is written to ``out_dir`` then.
    """
    from megatron_bridge_ext.cli.common import is_rank0, run_world, world_size_for
    from megatron_bridge_ext.io.megatron_checkpoint import has_checksums, read_checkpoint_info, resolve_checkpoint

    if checksums and has_checksums(meg_dir):
        resolve_checkpoint(meg_dir)  # the ranks check the files against the manifest before reading any
    else:
        read_checkpoint_info(meg_dir)  # its structure and its common state, before starting any process
    if hf_source is not None and not os.path.isdir(hf_source):
        raise FileNotFoundError(f"--hf-source {hf_source!r} does not exist (missing)")
    _check_destination(out_dir, overwrite)  # every rank decides the same, before any process starts
    layout = {"tp": tp, "pp": pp, "vpp": vpp, "ep": ep, "etp": etp}
    results: List[Any] = run_world(_worker, world_size_for(layout),
                                   (meg_dir, out_dir, layout, hf_source, show, verbose, fsync, checksums),
                                   timeout=timeout, backend=backend)
    res = results[0]
    res["out_dir"] = out_dir
    if is_rank0():
        from megatron_bridge_ext.io import SafeTensorsSource

        with SafeTensorsSource(out_dir) as written:  # headers only
            res["tensors"], res["bytes"] = len(written), written.total_size
    return res


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from megatron_bridge_ext.cli.common import add_layout_arguments, add_terminal_arguments

    parser.add_argument("megatron_dir", help="Megatron checkpoint root (or its iter_* directory)")
    parser.add_argument("hf_dir", help="HF checkpoint directory to write")
    add_layout_arguments(parser)
    parser.add_argument("--hf-source", default=None, metavar="DIR",
                        help="the HF checkpoint the model came from: copy its config.json, tokenizer and other side "
                             "files, reproduce its dtypes; checked against the checkpoint")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty HF_DIR once the new one is complete")
    parser.add_argument("--no-fsync", action="store_true", help="do not fsync the written shards")
    parser.add_argument("--no-checksums", action="store_true",
                        help="do not check the checkpoint's files against its checksum manifest (integrity.json)")
    add_terminal_arguments(parser)


def run(args: argparse.Namespace) -> int:
    from megatron_bridge_ext.cli.common import fail, is_rank0, layout_of, quiet_third_party, show_progress, \
        summary_line

    quiet_third_party(args.verbose)
    try:
        layout = layout_of(args)
        res = export_checkpoint(args.megatron_dir, args.hf_dir, **layout, hf_source=args.hf_source,
                                overwrite=args.overwrite, fsync=not args.no_fsync, show=show_progress(args),
                                verbose=args.verbose, timeout=args.timeout, backend=args.backend,
                                checksums=not args.no_checksums)
    except Exception as e:  # noqa: BLE001
        return fail(e, args.verbose)
    if is_rank0():
        where = " ".join(f"{k.upper()}={v}" for k, v in layout.items() if v is not None)
        sums = ("checksums skipped" if args.no_checksums else "no checksum manifest" if res["checksums"] is None
                else f"{res['checksums']} files match their checksums ({res['checksum_s']:.2f} s)")
        rest = res["total_s"] - res["read_s"] - res["checksum_s"]
        print(summary_line("export", res["tensors"], res["bytes"], res["total_s"],
                           res["out_dir"], f"[{where}; {sums}; checkpoint read {res['read_s']:.2f} s, convert + HF "
                                           f"write {rest:.2f} s]"))
    return 0
