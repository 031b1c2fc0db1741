"""What the converter subcommands share: the parallel-layout options, the world they run in (their own local gloo
processes, or the one ``torchrun`` started), the terminal (progress on rank 0, ``--quiet``, third-party noise off
unless ``--verbose``) and the summary line."""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
import time
import traceback
import warnings
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence

import torch

__all__ = [
    "add_layout_arguments",
    "add_terminal_arguments",
    "layout_of",
    "world_size_for",
    "under_torchrun",
    "run_world",
    "quiet_third_party",
    "worker_setup",
    "phase",
    "show_progress",
    "summary_line",
    "fail",
    "is_rank0",
    "timed",
    "DTYPES",
    "eager_functions",
]

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}

# Third-party messages that every rank repeats and that say nothing about the conversion: megatron-core's
# "Apex is not installed ..." / "Transformer Engine ... not installed" import warnings and deprecation notes,
# transformers' advisories and loading bars, torch.distributed.checkpoint's planner notes.
_NOISY_MODULES = r"(megatron|transformers|torch\.distributed|torch\.storage|torch\._utils)(\.|$)"


def add_layout_arguments(parser: argparse.ArgumentParser, *, default_tp: int = 1) -> None:
    """``--tp --pp --vpp --ep --etp`` (the Megatron layout to build)."""
    parser.add_argument("--tp", type=int, default=default_tp, help="tensor-parallel size")
    parser.add_argument("--pp", type=int, default=1, help="pipeline-parallel size")
    parser.add_argument("--vpp", type=int, default=None, help="virtual pipeline stages per pipeline rank")
    parser.add_argument("--ep", type=int, default=1, help="expert-parallel size")
    parser.add_argument("--etp", type=int, default=None, help="expert-tensor-parallel size (default: --tp)")


def add_terminal_arguments(parser: argparse.ArgumentParser) -> None:
    """``--quiet``, ``--verbose``, ``--timeout``, ``--backend``."""
    parser.add_argument("--quiet", action="store_true", help="no progress bars; only the final summary line")
    parser.add_argument("--verbose", action="store_true",
                        help="show third-party warnings (megatron-core, transformers, torch) and full tracebacks")
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds before the local ranks are stopped")
    parser.add_argument("--backend", choices=("gloo", "nccl"), default=None,
                        help="under torchrun: the process-group backend (default nccl with GPUs, else gloo)")


def layout_of(args: argparse.Namespace) -> Dict[str, Any]:
    """The layout options as ``init_parallel`` keywords, checked.

    Raises:
        ValueError: a size below 1, or a virtual pipeline without a pipeline.
    """
    layout = {"tp": args.tp, "pp": args.pp, "vpp": args.vpp if args.vpp and args.vpp > 1 else None,
              "ep": args.ep, "etp": args.etp}
    for key in ("tp", "pp", "ep"):
        if layout[key] < 1:
            raise ValueError(f"--{key} must be >= 1, got {layout[key]}")
    if layout["etp"] is not None and layout["etp"] < 1:
        raise ValueError(f"--etp must be >= 1, got {layout['etp']}")
    if layout["vpp"] and layout["pp"] < 2:
        raise ValueError(f"--vpp {layout['vpp']} needs --pp > 1, got --pp {layout['pp']}")
    return layout


def world_size_for(layout: Dict[str, Any]) -> int:
    """The smallest world megatron accepts for a layout: a multiple of tp*pp and of etp*ep*pp."""
    from megatron_bridge_ext.mcore.topology import layout_world_size

    return layout_world_size(layout["tp"], layout["pp"], layout["ep"], layout["etp"])


def under_torchrun() -> bool:
    """This process was started by ``torchrun`` (or another launcher that sets the env:// variables)."""
    return "TORCHELASTIC_RUN_ID" in os.environ or all(k in os.environ for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR"))


def quiet_third_party(verbose: bool) -> None:
    """Keep the third-party noise of every rank away from the user (unless ``verbose``); idempotent."""
    if verbose:
        return
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    warnings.filterwarnings("ignore", module=_NOISY_MODULES)
    warnings.filterwarnings("ignore", message=r".*(Apex|Transformer Engine).* not installed.*")
    for name in ("megatron", "megatron.core", "transformers", "torch.distributed"):
        logging.getLogger(name).setLevel(logging.ERROR)


@contextlib.contextmanager
def eager_functions() -> Iterator[None]:
    """While a streamed conversion runs (no model runs, no kernel is compiled): ``torch.compile(fn)`` returns ``fn``
    itself. megatron-core wraps its fused functions in ``torch.compile`` when its modules are imported, and making
    that wrapper imports torch's compiler stack (``torch._inductor``, ``torch._dynamo``): about 1 s of every
    conversion's start-up for functions a conversion never calls. Functions wrapped meanwhile stay eager (plain
    PyTorch, the same results); ``torch.compile`` itself is restored on exit."""
    real = torch.compile

    def eager(model: Any = None, **kwargs: Any) -> Any:
        return model if model is not None else (lambda fn: fn)

    torch.compile = eager  # type: ignore[assignment]
    try:
        yield
    finally:
        torch.compile = real  # type: ignore[assignment]


def worker_setup(verbose: bool) -> torch.device:
    """First thing in every rank: the noise filter, the CPU patches on CPU-only processes; returns the device the
    model lives on (the local GPU under NCCL, else the CPU)."""
    quiet_third_party(verbose)
    import torch.distributed as dist

    if dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    if not torch.cuda.is_available():
        from megatron_bridge_ext.mcore.cpu_compat import apply_cpu_patches

        apply_cpu_patches()
    return torch.device("cpu")


def run_world(fn: Callable[..., Any], world: int, args: Sequence[Any], *, timeout: float = 3600.0,
              backend: Optional[str] = None) -> List[Any]:
    """Run ``fn(rank, world, *args)`` on every rank: in this process's torchrun world when there is one (returns
    ``[this rank's result]``), else on ``world`` local gloo processes of its own (returns every rank's result).

    Raises:
        ValueError: under torchrun, a world size that the layout does not divide.
        megatron_bridge_ext.launch.WorkerError: a rank failed (naming it, with its traceback).
    """
    if under_torchrun():
        import torch.distributed as dist

        size = int(os.environ["WORLD_SIZE"])
        if size % world:
            raise ValueError(f"torchrun started {size} processes; the layout needs a multiple of {world}")
        backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        if backend == "gloo" and os.environ.get("LOCAL_WORLD_SIZE") == os.environ["WORLD_SIZE"]:
            os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")  # one node: the loopback interface always resolves
        dist.init_process_group(backend)
        try:
            return [fn(dist.get_rank(), size, *args)]
        finally:
            dist.destroy_process_group()
    from megatron_bridge_ext.launch import spawn_local

    threads = max(1, (os.cpu_count() or 1) // world)
    return spawn_local(fn, world, args, timeout=timeout, threads=threads)


def run_in_process(fn: Callable[..., Any], args: Sequence[Any]) -> Any:
    """``fn(0, 1, *args)`` in this process, in a one-process gloo group of its own (or in the process group this
    process already has): the streamed conversions, which need no local world (and no second interpreter start)."""
    import torch.distributed as dist

    if dist.is_initialized():
        return fn(dist.get_rank(), dist.get_world_size(), *args)
    # an in-memory store: no rendezvous file (the command may leave through os._exit, past any cleanup)
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        return fn(0, 1, *args)
    finally:
        dist.destroy_process_group()


def is_rank0() -> bool:
    """Global rank 0 (of the current process group, or of torchrun's world once it is torn down)."""
    import torch.distributed as dist

    if dist.is_initialized():
        return dist.get_rank() == 0
    return not under_torchrun() or int(os.environ.get("RANK", "0")) == 0


def show_progress(args: argparse.Namespace) -> bool:
    """Progress bars: on rank 0, on a terminal, not ``--quiet``."""
    return not args.quiet and sys.stderr.isatty() and is_rank0()


@contextlib.contextmanager
def phase(description: str, show: bool) -> Iterator[None]:
    """A spinner with the elapsed time on rank 0 for a long phase that has no count of its own (a checkpoint
    being written or read)."""
    if not show:
        yield
        return
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    with Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(), transient=True) as bar:
        bar.add_task(description, total=None)
        yield


def load_checkpoint_chunks(info: Any, config: Any, device: torch.device, show: bool,
                           described_by: str = "the model config") -> List[torch.nn.Module]:
    """This rank's chunks built from ``config`` in its params dtype, on ``device``, filled from the Megatron checkpoint
    ``info`` describes (export and verify); ``described_by`` names where ``config`` came from in errors."""
    from megatron_bridge_ext.mcore.checkpoint import cast_to_params_dtype, load_megatron_checkpoint
    from megatron_bridge_ext.mcore.model_builder import build_model_chunks
    from megatron_bridge_ext.mcore.versions import check_opt_in_layouts

    if info.args is not None:  # a layout Megatron-LM trained with that this package does not convert
        check_opt_in_layouts(info.args, f"{info.path} (its Megatron-LM args)")
    chunks = cast_to_params_dtype(build_model_chunks(config))
    if device.type == "cuda":
        chunks = [c.to(device) for c in chunks]
    with phase(f"Reading the Megatron checkpoint {info.path}", show):
        load_megatron_checkpoint(chunks, info.path, described_by=described_by)
    return chunks


def summary_line(what: str, tensors: int, nbytes: int, seconds: float, dest: str, extra: str = "") -> str:
    """``<what>: N tensors, X GB in T s (Y GB/s) -> dest``."""
    gb = nbytes / 1e9
    rate = gb / seconds if seconds > 0 else float("inf")
    return (f"{what}: {tensors} tensors, {gb:.3f} GB in {seconds:.2f} s ({rate:.2f} GB/s) -> {dest}"
            f"{'  ' + extra if extra else ''}")


def fail(error: BaseException, verbose: bool) -> int:
    """Print an error for the user (the failing rank's last line; everything with ``--verbose``); returns 1."""
    text = str(error) if not isinstance(error, str) else error
    if verbose:
        traceback.print_exception(error)
    else:
        lines = [ln for ln in text.strip().splitlines() if ln.strip()]
        head = lines[0] if lines else type(error).__name__
        last = lines[-1] if lines else ""
        if head.startswith("rank ") and last and last != head:
            text = f"{head.rstrip(':')}: {last}"
        elif not isinstance(error, (ValueError, FileNotFoundError, FileExistsError, RuntimeError)):
            text = f"{type(error).__name__}: {text}"
    print(f"error: {text}", file=sys.stderr)
    return 1


def timed() -> Callable[[], float]:
    """A stopwatch: ``t = timed(); ...; t()`` seconds since."""
    start = time.perf_counter()
    return lambda: time.perf_counter() - start
