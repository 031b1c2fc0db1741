"""``export MEGATRON_DIR HF_DIR [--tp N --pp N ...] [--hf-source DIR | --hf-architecture NAME]``: a Megatron
distributed checkpoint -> a complete HF checkpoint (sharded safetensors + index, ``config.json``).

The model is rebuilt from the config stored in the checkpoint (no HF directory needed): ``config.json`` is generated
from the Megatron side and the tensors keep the checkpoint's dtype. With ``--hf-source`` the source's
``config.json``, tokenizer and other side files are copied, its dtypes and key set reproduced, and the source is
checked against the checkpoint first (architecture, model config). A checkpoint that Megatron-LM trained (no config of
this package) is exported with ``--hf-source`` (checked against the checkpoint's ``args``) or ``--hf-architecture``
(the config rebuilt from ``args``); either way every tensor's shape is checked against the config before anything is
written. The checkpoint's keys may be a Transformer Engine spec's or the local spec's (``_extra_state`` objects, FP8
scaling state included, are not read). The checkpoint is read at the layout given (default TP1 PP1: any layout
reshards from the one it was written at), through the restricted reader (nothing in it is run; its structure is
checked before anything is written), after checking its files against its checksum manifest (``integrity.json``) when
it has one (``--no-checksums`` skips that). ``--quantize fp8`` writes the linear weights in FP8 with their
``weight_scale_inv`` (DeepSeek-V3's layout, :mod:`megatron_bridge_ext.engine.quantize`) on either path.
"""

from __future__ import annotations

import argparse
import os
from typing import Any, Dict, List, Optional, Tuple

__all__ = ["add_arguments", "run", "export_checkpoint", "check_source_agrees", "model_config_for",
           "stream_chunks"]

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


def model_config_for(info: Any, hf_source: Optional[str], hf_architecture: Optional[str]) -> Tuple[Any, Any, str]:
    """(AutoBridge, model config, where the config came from) for exporting the checkpoint ``info`` describes: the
    config this package stored; else (a checkpoint Megatron-LM trained) the HF source's config, checked against the
    checkpoint's ``args``; else one rebuilt from ``args`` for ``hf_architecture``.

    Raises:
        ValueError: the HF source or ``hf_architecture`` disagrees with the checkpoint (every field named with both
            values), or a checkpoint without a stored config is given neither.
    """
    from megatron_bridge_ext.auto_bridge import AutoBridge
    from megatron_bridge_ext.mcore.checkpoint import (
        args_disagreements,
        config_from_checkpoint,
        config_from_megatron_lm_args,
    )
    from megatron_bridge_ext.mcore.config import config_to_dict

    if hf_source is not None:
        bridge = AutoBridge.from_hf_pretrained(hf_source)
        arch = bridge.hf_config.architectures[0]
        if hf_architecture is not None and hf_architecture != arch:
            raise ValueError(f"--hf-architecture {hf_architecture} but --hf-source {hf_source} is a {arch}")
        source_config = bridge.transformer_config()
        check_source_agrees(info, config_to_dict(source_config), arch, hf_source)
        if info.model_config is not None:
            return bridge, config_from_checkpoint(info), "the config stored in the checkpoint"
        if info.args is not None:
            diff = args_disagreements(info.args, source_config)
            if diff:
                raise ValueError(f"--hf-source {hf_source} does not describe the model in {info.path} (its "
                                 "Megatron-LM args): " + "; ".join(diff).replace(", config ", ", source "))
        return bridge, source_config, f"--hf-source {hf_source}"
    if info.architecture is not None and hf_architecture is not None and info.architecture != hf_architecture:
        raise ValueError(f"--hf-architecture {hf_architecture}, but the Megatron checkpoint {info.path} holds a "
                         f"{info.architecture}")
    arch = info.architecture or hf_architecture
    if arch is None:
        raise ValueError(f"{info.path}: the checkpoint does not name its architecture (not written by "
                         "megatron_bridge_ext); give it with --hf-architecture NAME or give the HF source with "
                         "--hf-source DIR")
    bridge = AutoBridge.from_architecture(arch)
    if info.model_config is not None:
        return bridge, config_from_checkpoint(info), "the config stored in the checkpoint"
    if info.args is None:
        raise ValueError(f"{info.path}: the checkpoint stores neither a model config nor Megatron-LM args; give the "
                         "HF source with --hf-source")
    config = config_from_megatron_lm_args(info.args, bridge.model_bridge, where=info.path)
    return bridge, config, f"the checkpoint's Megatron-LM args ({arch})"


#: the special-token ids an exported config.json takes over from the source's (or its generation config)
_TOKEN_IDS = ("bos_token_id", "eos_token_id", "pad_token_id")


def kept_side_files(info: Any) -> Tuple[Optional[str], Dict[str, Any]]:
    """The side files ``import`` kept beside the checkpoint (directory or None), and the special-token ids for
    config.json: the source ``config.json``'s (stored in the checkpoint, or kept), else its generation config's."""
    import json

    from megatron_bridge_ext.io.megatron_checkpoint import side_files_dir

    side = side_files_dir(info.path)
    sources = [info.hf_config or {}]
    for name in ("config.json", "generation_config.json"):
        path = os.path.join(side, name) if side else None
        if path and os.path.isfile(path):
            with open(path, "r", encoding="utf-8") as f:
                sources.append(json.load(f))
    extra: Dict[str, Any] = {}
    for key in _TOKEN_IDS:
        for src in sources:
            if src.get(key) is not None:
                extra[key] = src[key]
                break
    return side, extra


def stream_chunks(info: Any, config: Any, ckpt: Any, described_by: str) -> Tuple[List[Any], Any]:
    """Meta-device chunks of the checkpoint's model at TP 1 (vocabulary rows as stored) and the reader that fills
    their parameters bucket by bucket (:class:`megatron_bridge_ext.mcore.stream.CheckpointParams`)."""
    import dataclasses

    import torch

    from megatron_bridge_ext.mcore.checkpoint import cast_to_params_dtype
    from megatron_bridge_ext.mcore.model_builder import build_model_chunks
    from megatron_bridge_ext.mcore.stream import CheckpointParams
    from megatron_bridge_ext.mcore.versions import check_opt_in_layouts
    from megatron_bridge_ext.naming import WORD_EMBEDDINGS

    if info.args is not None:
        check_opt_in_layouts(info.args, f"{info.path} (its Megatron-LM args)")
    embedding = ckpt.tensors.get(WORD_EMBEDDINGS)
    if embedding is not None and config.vocab_size and embedding.shape[0] >= config.vocab_size:
        # the rows the writer padded to (any multiple of its TP size): the model is built with the same rows
        config = dataclasses.replace(config, make_vocab_size_divisible_by=int(embedding.shape[0]))
    with torch.device("meta"):
        chunks = cast_to_params_dtype(build_model_chunks(config))
    return chunks, CheckpointParams(chunks, ckpt, described_by)


def _worker(rank: int, world: int, meg_dir: str, out_dir: str, layout: Dict[str, Any], hf_source: Optional[str],
            show: bool, verbose: bool, fsync: bool, verify_checksums: bool = True,
            hf_architecture: Optional[str] = None, stream: bool = False,
            save_kwargs: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    args = (rank, world, meg_dir, out_dir, layout, hf_source, show, verbose, fsync, verify_checksums,
            hf_architecture, stream, save_kwargs)
    if not stream:
        return _export(*args)
    from megatron_bridge_ext.cli.common import eager_functions

    with eager_functions():  # no model runs
        return _export(*args)


def _export(rank: int, world: int, meg_dir: str, out_dir: str, layout: Dict[str, Any], hf_source: Optional[str],
            show: bool, verbose: bool, fsync: bool, verify_checksums: bool, hf_architecture: Optional[str],
            stream: bool, save_kwargs: Optional[Dict[str, Any]]) -> Dict[str, Any]:
    from megatron_bridge_ext.cli.common import load_checkpoint_chunks, phase, quiet_third_party, timed, worker_setup

    if stream:  # no model runs and nothing moves between ranks: one process, no CPU patches needed
        quiet_third_party(verbose)
        import torch

        device = torch.device("cpu")
    else:
        device = worker_setup(verbose)
    import torch.distributed as dist

    from megatron_bridge_ext.io.megatron_checkpoint import ChecksumCheck, check_checksums, read_checkpoint_info
    from megatron_bridge_ext.mcore.checkpoint import extra_state_with_content
    from megatron_bridge_ext.mcore.model_builder import destroy_parallel, init_parallel

    show = show and rank == 0
    init_parallel(**layout)
    try:
        clock = timed()
        checked = None
        beside = None
        if verify_checksums and stream:
            # one process: the files are checked beside the conversion, and the output is swapped in only if they
            # match (a mismatch aborts the save: nothing is written to out_dir)
            beside = ChecksumCheck(meg_dir)
        elif verify_checksums:
            with phase(f"Checking {meg_dir} against its checksum manifest", show):
                checked = check_checksums(meg_dir, required=False)
        checksum_s = checked_at = clock()
        try:
            info = read_checkpoint_info(meg_dir)
            bridge, config, described_by = model_config_for(info, hf_source, hf_architecture)
            side, extra = (None, None) if hf_source is not None else kept_side_files(info)
            if stream:
                from megatron_bridge_ext.io.megatron_checkpoint import open_checkpoint

                with open_checkpoint(meg_dir, map_chunks=True) as ckpt:
                    chunks, params = stream_chunks(info, config, ckpt, described_by)
                    fp8_state = extra_state_with_content(ckpt)  # reported; never applied
                    read_s = clock()
                    summary = bridge.save_hf_pretrained(
                        chunks, out_dir, show_progress=show, fsync=fsync, side_files=side, config_extra=extra,
                        materialize=params, before_commit=None if beside is None else beside.result,
                        **(save_kwargs or {}))
            else:
                chunks = load_checkpoint_chunks(info, config, device, show, described_by)
                fp8_state = extra_state_with_content(info.path) if rank == 0 else []  # reported; never applied
                dist.barrier()
                read_s = clock()
                summary = bridge.save_hf_pretrained(chunks, out_dir, show_progress=show, fsync=fsync,
                                                    side_files=side, config_extra=extra, **(save_kwargs or {}))
        except BaseException:
            if beside is not None:
                beside.result()  # files that differ from the manifest explain any failure: named first
            raise
        if beside is not None:
            checked, checksum_s = beside.result(), beside.seconds
        dist.barrier()
        return {"summary": summary, "read_s": read_s - checked_at, "total_s": clock(), "source": info.path,
                "checksums": checked, "checksum_s": checksum_s, "checksums_beside": beside is not None,
                "config_from": described_by, "fp8_state": fp8_state, "streamed": stream}
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
                      checksums: bool = True, hf_architecture: Optional[str] = None,
                      via_model: Optional[bool] = None, quantization: Optional[str] = None,
                      quantization_rule: Optional[str] = None,
                      quantization_block_size: Optional[Tuple[int, int]] = None,
                      bucket_bytes: Optional[int] = None) -> Dict[str, Any]:
    """Megatron checkpoint ``meg_dir`` -> HF checkpoint ``out_dir``; returns rank 0's measurements.

    Args:
        checksums: check the checkpoint's files against its ``integrity.json`` when it has one (the default).
        via_model: read the checkpoint into a model built at the layout (local processes, memory: the whole model)
            instead of streaming it (one process, no model: each bucket of parameters read from the files, converted
            and written, then dropped). Default: the model path when a layout other than TP1 PP1 EP1 is given (or
            under torchrun), else the stream.
        quantization, quantization_rule, quantization_block_size: ``"fp8"`` writes the linear weights in FP8 with
            their scales (see :meth:`~megatron_bridge_ext.auto_bridge.AutoBridge.save_hf_pretrained`).
        bucket_bytes: parameter bytes converted per step (default 256 MiB); the streamed export reads a layer's
            experts in runs of at most this many bytes (whole experts), so it bounds that path's memory.

    Raises:
        FileNotFoundError: the checkpoint (or the HF source) is missing.
        FileExistsError: ``out_dir`` holds files and ``overwrite`` is False.
        ValueError: the HF source disagrees with the checkpoint (named fields), a layout that cannot split it, a
            structural fault or a refused class in the checkpoint (file and key named), files that differ from the
            manifest (each named), bad quantization settings (named). Nothing is written to ``out_dir`` then.
    """
    from megatron_bridge_ext.cli.common import is_rank0, run_in_process, run_world, under_torchrun, world_size_for
    from megatron_bridge_ext.engine.quantize import export_quantization
    from megatron_bridge_ext.io.megatron_checkpoint import has_checksums, read_checkpoint_info, resolve_checkpoint

    export_quantization(quantization, quantization_rule, quantization_block_size, where="export")  # before anything
    if bucket_bytes is not None and (not isinstance(bucket_bytes, int) or bucket_bytes <= 0):
        raise ValueError(f"export: bucket_bytes = {bucket_bytes!r}, expected a positive number of bytes")
    save_kwargs: Dict[str, Any] = {"quantization": quantization, "quantization_rule": quantization_rule,
                                   "quantization_block_size": quantization_block_size}
    if bucket_bytes is not None:
        save_kwargs["bucket_bytes"] = bucket_bytes

    if checksums and has_checksums(meg_dir):
        resolve_checkpoint(meg_dir)  # the ranks check the files against the manifest before reading any
    else:
        read_checkpoint_info(meg_dir)  # its structure and its common state, before starting any process
    if hf_source is not None and not os.path.isdir(hf_source):
        raise FileNotFoundError(f"--hf-source {hf_source!r} does not exist (missing)")
    _check_destination(out_dir, overwrite)  # every rank decides the same, before any process starts
    layout = {"tp": tp, "pp": pp, "vpp": vpp, "ep": ep, "etp": etp}
    if via_model is None:
        via_model = world_size_for(layout) > 1 or (vpp or 1) > 1 or under_torchrun()
    args = (meg_dir, out_dir, layout, hf_source, show, verbose, fsync, checksums, hf_architecture, not via_model,
            save_kwargs)
    if via_model:
        results: List[Any] = run_world(_worker, world_size_for(layout), args, timeout=timeout, backend=backend)
        res = results[0]
    else:
        if world_size_for(layout) > 1:
            raise ValueError("the streamed export reads at TP1 PP1 EP1 (the stored tensors are global); the layout "
                             "options apply to --via-model")
        res = run_in_process(_worker, args)
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
    parser.add_argument("--hf-architecture", default=None, metavar="NAME",
                        help="the HF architecture (e.g. LlamaForCausalLM) of a checkpoint Megatron-LM trained: the "
                             "model config is rebuilt from its args for this family (not needed for checkpoints "
                             "this package wrote, nor with --hf-source)")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty HF_DIR once the new one is complete")
    parser.add_argument("--no-fsync", action="store_true", help="do not fsync the written shards")
    parser.add_argument("--bucket-bytes", type=int, default=None, metavar="N",
                        help="parameter bytes converted per step (default 256 MiB); the streamed export reads a "
                             "layer's experts in runs of at most N bytes, which bounds its memory")
    parser.add_argument("--no-checksums", action="store_true",
                        help="do not check the checkpoint's files against its checksum manifest (integrity.json)")
    parser.add_argument("--quantize", choices=("fp8",), default=None,
                        help="write every 2-D linear weight in FP8 (float8_e4m3fn) with its weight_scale_inv per "
                             "block, as DeepSeek-V3's release; embeddings, lm_head, norms, routers, biases stay in "
                             "the model's dtype")
    parser.add_argument("--quantize-rule", choices=("transformers", "deepseek"), default=None,
                        help="per-block formula of --quantize: transformers' own FP8 quantizer (default) or "
                             "DeepSeek-V3's (scale = max(amax, 1e-4) / 448)")
    parser.add_argument("--quantize-block-size", type=int, nargs=2, default=None, metavar=("ROWS", "COLS"),
                        help="block of --quantize (default 128 128)")
    parser.add_argument("--via-model", action="store_true",
                        help="read the checkpoint into a model built at the layout (the default when a layout is "
                             "given) instead of streaming it")
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
                                checksums=not args.no_checksums, hf_architecture=args.hf_architecture,
                                via_model=True if args.via_model else None, quantization=args.quantize,
                                quantization_rule=args.quantize_rule,
                                quantization_block_size=tuple(args.quantize_block_size)
                                if args.quantize_block_size else None, bucket_bytes=args.bucket_bytes)
    except Exception as e:  # noqa: BLE001
        return fail(e, args.verbose)
    if is_rank0():
        where = " ".join(f"{k.upper()}={v}" for k, v in layout.items() if v is not None)
        sums = ("checksums skipped" if args.no_checksums else "no checksum manifest" if res["checksums"] is None
                else f"{res['checksums']} files match their checksums ({res['checksum_s']:.2f} s"
                f"{', beside the conversion' if res.get('checksums_beside') else ''})")
        rest = res["total_s"] - res["read_s"] - (0.0 if res.get("checksums_beside") else res["checksum_s"])
        if res.get("streamed"):
            detail = f"[streamed, no model; {sums}; setup {res['read_s']:.2f} s, read + convert + HF write {rest:.2f} s]"
        else:
            detail = (f"[{where}, via the model; {sums}; checkpoint read {res['read_s']:.2f} s, convert + HF write "
                      f"{rest:.2f} s]")
        if args.quantize:
            block = args.quantize_block_size or (128, 128)
            detail = (f"{detail[:-1]}; {args.quantize} weights, rule {args.quantize_rule or 'transformers'}, block "
                      f"{block[0]}x{block[1]}]")
        print(summary_line("export", res["tensors"], res["bytes"], res["total_s"], res["out_dir"], detail))
        if res.get("fp8_state"):
            print(f"note: {len(res['fp8_state'])} Transformer Engine module kind(s) carry FP8 scaling state "
                  f"(_extra_state, e.g. {res['fp8_state'][0]}); the HF checkpoint holds the stored weights, unscaled, "
                  "and no FP8 state")
    return 0
