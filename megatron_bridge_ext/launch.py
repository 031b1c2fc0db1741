"""Local multi-process worlds (one machine, gloo by default) for the demo, the benchmarks and the tests.

Multi-node jobs use plain ``torchrun``; this module is for running a function on ``world_size`` local ranks with a
deadline, failing fast (and naming the rank and its traceback) as soon as one rank fails.
"""

from __future__ import annotations

import os
import pickle
import tempfile
import time
import traceback
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch
import torch.multiprocessing as mp

__all__ = ["spawn_local", "WorkerError"]


class WorkerError(RuntimeError):
    """A rank of a local world failed or the world ran past its deadline."""


def _worker(
    rank: int,
    world_size: int,
    fn: Callable[..., Any],
    args: Sequence[Any],
    rdzv_file: str,
    backend: str,
    env: Dict[str, str],
    threads: int,
    results: "mp.SimpleQueue",
) -> None:
    os.environ.update(env)
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    os.environ["RANK"], os.environ["WORLD_SIZE"] = str(rank), str(world_size)
    os.environ["LOCAL_RANK"], os.environ["LOCAL_WORLD_SIZE"] = str(rank), str(world_size)
    torch.set_num_threads(threads)
    try:
        import torch.distributed as dist

        dist.init_process_group(backend, init_method=f"file://{rdzv_file}", rank=rank, world_size=world_size)
        try:
            out = fn(rank, world_size, *args)
        finally:
            dist.destroy_process_group()
        # plain pickle: tensors travel by value (torch's shared-memory handles die with the child process)
        results.put((rank, True, pickle.dumps(out)))
    except BaseException:  # report every failure, including KeyboardInterrupt/SystemExit, to the parent
        results.put((rank, False, traceback.format_exc()))
        raise SystemExit(1)


def spawn_local(
    fn: Callable[..., Any],
    world_size: int,
    args: Sequence[Any] = (),
    *,
    backend: str = "gloo",
    timeout: float = 600.0,
    env: Optional[Dict[str, str]] = None,
    threads: int = 1,
) -> List[Any]:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` spawned processes joined in one process group.

    Args:
        fn: a picklable (module-level) function; its return value must be picklable.
        world_size: number of ranks.
        args: extra positional arguments for ``fn``.
        backend: torch.distributed backend (``gloo`` on CPU).
        timeout: seconds before the whole world is killed.
        env: extra environment variables for the ranks.
        threads: ``torch.set_num_threads`` in each rank.

    Returns:
        The return values of ``fn``, indexed by rank.

    Raises:
        WorkerError: naming the failed rank with its traceback, or the deadline.
    """
    if world_size < 1:
        raise ValueError(f"spawn_local: world_size must be >= 1, got {world_size}")
    ctx = mp.get_context("spawn")
    results = ctx.SimpleQueue()
    out: Dict[int, Any] = {}
    with tempfile.TemporaryDirectory(prefix="bridge_world_") as tmp:
        rdzv = os.path.join(tmp, "rendezvous")
        procs = [
            ctx.Process(
                target=_worker,
                args=(r, world_size, fn, tuple(args), rdzv, backend, dict(env or {}), threads, results),
                daemon=False,
            )
            for r in range(world_size)
        ]
        for p in procs:
            p.start()
        deadline = time.monotonic() + timeout
        failure: Optional[str] = None
        try:
            while len(out) < world_size and failure is None:
                while not results.empty():
                    rank, ok, payload = results.get()
                    if ok:
                        out[rank] = pickle.loads(payload)
                    else:
                        failure = f"rank {rank} of {world_size} failed:\n{payload}"
                        break
                if failure is None and len(out) < world_size:
                    dead = [r for r, p in enumerate(procs) if p.exitcode not in (None, 0) and r not in out]
                    if dead and results.empty():
                        failure = f"rank {dead[0]} of {world_size} exited with code {procs[dead[0]].exitcode}"
                    elif time.monotonic() > deadline:
                        failure = f"world of {world_size} ranks ran past its {timeout:.0f} s deadline"
                    else:
                        time.sleep(0.02)
        finally:
            if failure is not None:
                for p in procs:
                    if p.is_alive():
                        p.kill()
            for p in procs:
                p.join(timeout=30)
        if failure is not None:
            raise WorkerError(failure)
    return [out[r] for r in range(world_size)]
