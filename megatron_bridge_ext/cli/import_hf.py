"""``import HF_DIR OUT_DIR [--dtype bf16|fp16|fp32] [--spec te|local] [--tp N --pp N ...] [--ranks N] [--buffer-bytes B]
[--resume] [--via-model]``: an HF checkpoint -> a Megatron-LM distributed checkpoint (``OUT_DIR/iter_0000000``,
``latest_checkpointed_iteration.txt``) that a training job loads with ``--load OUT_DIR`` at any layout.

By default the conversion is a stream (:mod:`megatron_bridge_ext.engine.stream`): no model is built, each tensor is
converted from the memory-mapped HF files and written at once, memory stays within ``--buffer-bytes`` (default 512 MiB)
plus the largest tensor whatever the model's size, and no GPU is needed. ``--ranks N`` shares the tensors among N
local processes; under ``torchrun`` (any number of nodes, gloo) every rank takes a share. The layout options only
set what the checkpoint records for Megatron-LM (its ``args``) and the vocabulary padding (``--tp``): the stored
tensors are the same for every layout, and megatron-core reshards them on load. A killed conversion leaves no
complete-looking checkpoint; ``--resume`` continues it from the files it completed.

``--via-model`` builds the Megatron model at the given layout in local processes (memory: the whole model, spread
over them), fills it and writes it with megatron-core's own writer: the same checkpoint, the path live jobs use.

``--spec te`` (the default) writes the keys and ``_extra_state`` objects of a Transformer Engine layer spec (what
Megatron-LM with ``--transformer-impl transformer_engine`` and Megatron Bridge build); ``--spec local`` those of
megatron-core's local spec (``--transformer-impl local``). See :mod:`megatron_bridge_ext.mcore.te_keys`.

The HF checkpoint's side files (tokenizer, ``generation_config.json``, chat template, ``config.json``) are kept in
``OUT_DIR/iter_0000000/hf/`` (the stored args name it as the ``HuggingFaceTokenizer`` model); ``export`` without an
HF source restores them.

Each rank reads only the rows of the HF tensors it keeps (memory-mapped) straight into its parameters and writes its
own shards. Runs its own local gloo processes, or, under ``torchrun``, in the world torchrun started.
"""

from __future__ import annotations

import argparse
import json
import os
from typing import Any, Dict, Optional

__all__ = ["add_arguments", "run", "import_checkpoint"]


def _worker(rank: int, world: int, hf_dir: str, out_dir: str, layout: Dict[str, Any], dtype: Optional[str],
            overwrite: bool, show: bool, verbose: bool, spec: str = "te") -> Dict[str, Any]:
    from megatron_bridge_ext.cli.common import DTYPES, phase, timed, worker_setup

    device = worker_setup(verbose)
    import torch.distributed as dist

    from megatron_bridge_ext.auto_bridge import AutoBridge
    from megatron_bridge_ext.io.safetensors import CONFIG_NAME
    from megatron_bridge_ext.mcore.checkpoint import cast_to_params_dtype, save_megatron_checkpoint
    from megatron_bridge_ext.mcore.model_builder import destroy_parallel, init_parallel

    show = show and rank == 0
    init_parallel(**layout)
    try:
        clock = timed()
        bridge = AutoBridge.from_hf_pretrained(hf_dir)
        with open(os.path.join(hf_dir, CONFIG_NAME), "r", encoding="utf-8") as f:
            hf_config = json.load(f)
        overrides = {} if dtype is None else {"params_dtype": DTYPES[dtype]}
        chunks = cast_to_params_dtype(bridge.to_megatron_model(load_weights=False, **overrides))
        if device.type == "cuda":
            chunks = [c.to(device) for c in chunks]
        bridge.load_hf_weights(chunks, show_progress=show)
        dist.barrier()
        read_s = clock()
        with phase(f"Writing the Megatron checkpoint to {out_dir}", show):
            path = save_megatron_checkpoint(chunks, out_dir, architecture=bridge.hf_config.architectures[0],
                                            hf_config=hf_config, overwrite=overwrite, spec=spec, side_files=hf_dir,
                                            carried=bridge.model_bridge.carried_hf_params)
        src = bridge.hf_pretrained.state
        return {"path": path, "tensors": len(src), "bytes": src.total_size, "read_s": read_s, "total_s": clock(),
                "dtype": str(chunks[0].config.params_dtype).replace("torch.", "")}
    finally:
        destroy_parallel()


def _stream_worker(rank: int, world: int, hf_dir: str, out_dir: str, layout: Dict[str, Any], dtype: Optional[str],
                   overwrite: bool, show: bool, verbose: bool, spec: str, buffer_bytes: Optional[int],
                   resume: bool, file_bytes: Optional[int] = None) -> Dict[str, Any]:
    from megatron_bridge_ext.cli.common import DTYPES, eager_functions, quiet_third_party

    quiet_third_party(verbose)  # no model runs: megatron-core's CPU patches are not needed
    with eager_functions():
        from megatron_bridge_ext.auto_bridge import AutoBridge

        return AutoBridge.from_hf_pretrained(hf_dir).save_megatron_checkpoint(
            out_dir, spec=spec, dtype=None if dtype is None else DTYPES[dtype], layout=layout,
            buffer_bytes=buffer_bytes, overwrite=overwrite, resume=resume, show_progress=show and rank == 0,
            **({} if file_bytes is None else {"file_bytes": file_bytes}))


def import_checkpoint(hf_dir: str, out_dir: str, *, tp: int = 1, pp: int = 1, vpp: Optional[int] = None,
                      ep: int = 1, etp: Optional[int] = None, dtype: Optional[str] = None, overwrite: bool = False,
                      show: bool = False, verbose: bool = False, timeout: float = 3600.0,
                      backend: Optional[str] = None, spec: str = "te", via_model: bool = False,
                      ranks: int = 1, buffer_bytes: Optional[int] = None, resume: bool = False,
                      file_bytes: Optional[int] = None) -> Dict[str, Any]:
    """HF ``hf_dir`` -> Megatron checkpoint ``out_dir`` (``spec``: whose keys, ``"te"`` or ``"local"``); returns rank
    0's measurements. A stream by default (``ranks`` local processes, or torchrun's world; the layout is recorded),
    or with ``via_model`` through a model built at the layout.

    Raises:
        FileNotFoundError: ``hf_dir`` or its config.json is missing.
        ValueError: an unsupported architecture, or a layout that cannot split the model.
    """
    from megatron_bridge_ext.cli.common import run_in_process, run_world, world_size_for

    if not os.path.isdir(hf_dir):
        raise FileNotFoundError(f"HF checkpoint directory {hf_dir!r} does not exist (missing)")
    if not os.path.isfile(os.path.join(hf_dir, "config.json")):
        raise FileNotFoundError(f"HF checkpoint {hf_dir!r} has no config.json")
    from megatron_bridge_ext.mcore.te_keys import SPECS

    if spec not in SPECS:
        raise ValueError(f"--spec must be one of {', '.join(SPECS)}, got {spec!r}")
    layout = {"tp": tp, "pp": pp, "vpp": vpp, "ep": ep, "etp": etp}
    if not via_model:
        from megatron_bridge_ext.cli.common import under_torchrun

        if ranks < 1:
            raise ValueError(f"--ranks must be >= 1, got {ranks}")
        if resume and overwrite:
            raise ValueError("--resume continues an interrupted conversion; it cannot be combined with --overwrite")
        args = (hf_dir, out_dir, layout, dtype, overwrite, show, verbose, spec, buffer_bytes, resume, file_bytes)
        if ranks == 1 and not under_torchrun():
            return run_in_process(_stream_worker, args)
        return run_world(_stream_worker, ranks, args, timeout=timeout, backend=backend or "gloo")[0]
    if resume or buffer_bytes is not None or ranks != 1 or file_bytes is not None:
        raise ValueError("--resume, --buffer-bytes, --file-bytes and --ranks are options of the streamed conversion, "
                         "not of --via-model")
    results = run_world(_worker, world_size_for(layout),
                        (hf_dir, out_dir, layout, dtype, overwrite, show, verbose, spec), timeout=timeout,
                        backend=backend)
    return results[0]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from megatron_bridge_ext.cli.common import DTYPES, add_layout_arguments, add_terminal_arguments

    parser.add_argument("hf_dir", help="HF checkpoint directory (config.json + safetensors)")
    parser.add_argument("out_dir", help="Megatron checkpoint root to write (OUT_DIR/iter_0000000)")
    add_layout_arguments(parser)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                        help="parameter dtype (default: the HF config's dtype)")
    parser.add_argument("--spec", choices=("te", "local"), default="te",
                        help="whose checkpoint keys to write: te = a Transformer Engine layer spec's (what training "
                             "builds; default), local = megatron-core's local spec's")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an existing iter_0000000 (only once the new one is complete)")
    parser.add_argument("--via-model", action="store_true",
                        help="build the Megatron model at the layout and save it with megatron-core's writer "
                             "(memory: the whole model) instead of streaming")
    parser.add_argument("--ranks", type=int, default=1,
                        help="local processes sharing the streamed conversion (under torchrun: its world)")
    parser.add_argument("--buffer-bytes", type=_byte_size, default=None,
                        help="bytes of converted tensors that may wait for the disk (default 512M; accepts K/M/G "
                             "suffixes); memory is this plus the largest tensor")
    parser.add_argument("--file-bytes", type=_byte_size, default=None,
                        help="bytes per .distcp file (default 4G): the unit a resumed conversion keeps")
    parser.add_argument("--resume", action="store_true",
                        help="continue a killed streamed conversion from the files it completed")
    add_terminal_arguments(parser)


def _byte_size(text: str) -> int:
    units = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
    t = text.strip().lower().removesuffix("ib").removesuffix("b")
    try:
        n = int(float(t[:-1]) * units[t[-1]]) if t and t[-1] in units else int(t)
    except (ValueError, KeyError):
        raise argparse.ArgumentTypeError(f"not a byte size: {text!r} (e.g. 1073741824, 512M, 1G)") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"a byte size must be >= 1, got {text!r}")
    return n


def run(args: argparse.Namespace) -> int:
    from megatron_bridge_ext.cli.common import fail, is_rank0, layout_of, quiet_third_party, show_progress, \
        summary_line

    quiet_third_party(args.verbose)
    try:
        layout = layout_of(args)
        res = import_checkpoint(args.hf_dir, args.out_dir, **layout, dtype=args.dtype, overwrite=args.overwrite,
                                show=show_progress(args), verbose=args.verbose, timeout=args.timeout,
                                backend=args.backend, spec=args.spec, via_model=args.via_model, ranks=args.ranks,
                                buffer_bytes=args.buffer_bytes, resume=args.resume, file_bytes=args.file_bytes)
    except Exception as e:  # noqa: BLE001  (one clear line for the user; --verbose shows the traceback)
        return fail(e, args.verbose)
    if is_rank0():
        where = " ".join(f"{k.upper()}={v}" for k, v in layout.items() if v is not None)
        if args.via_model:
            detail = (f"[{where} {res['dtype']} {args.spec} spec, via the model; HF read + convert "
                      f"{res['read_s']:.2f} s, checkpoint write {res['total_s'] - res['read_s']:.2f} s]")
        else:
            kept = f", {res['kept_files']} file(s) kept from the interrupted run" if res.get("kept_files") else ""
            detail = (f"[streamed by {res['ranks']} rank(s), layout recorded {where}, {res['dtype']} {args.spec} "
                      f"spec; convert + write {res['convert_s']:.2f} s{kept}]")
        print(summary_line("import", res["tensors"], res["bytes"], res["total_s"], res["path"], detail))
    return 0
