"""Local multi-process worlds (one machine, gloo by default) for the demo, the benchmarks and the tests.

Multi-node jobs use plain ``torchrun``; this module is for running a function on ``world_size`` local ranks with a
deadline, failing fast as soon as one rank fails, and reporting the root cause first: the rank whose own error
started it (with its traceback), or the rank that died (with its exit code or signal), then one line per other rank
(typically a ``PeerFailure`` naming the root cause and the phase). A frozen rank is bounded by ``peer_timeout``.
"""

from __future__ import annotations

import datetime
import gc
import os
import pickle
import signal
import tempfile
import time
import traceback
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.multiprocessing as mp

__all__ = ["spawn_local", "WorkerError"]

#: the environment variable of the frozen-peer timeout (read by megatron_bridge_ext.engine.peers)
PEER_TIMEOUT_ENV = "MEGATRON_BRIDGE_PEER_TIMEOUT"


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
    pg_timeout: Optional[float] = None,
) -> None:
    gc.set_threshold(100_000, 50, 1000)  # the heavy imports ahead: as the CLI's process (megatron_bridge_ext.cli.entry)
    os.environ.update(env)
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    os.environ["RANK"], os.environ["WORLD_SIZE"] = str(rank), str(world_size)
    os.environ["LOCAL_RANK"], os.environ["LOCAL_WORLD_SIZE"] = str(rank), str(world_size)
    torch.set_num_threads(threads)
    try:
        import torch.distributed as dist

        kw = {} if pg_timeout is None else {"timeout": datetime.timedelta(seconds=pg_timeout)}
        if backend == "nccl":  # one GPU per local rank, chosen before the process group binds one
            torch.cuda.set_device(rank % torch.cuda.device_count())
        dist.init_process_group(backend, init_method=f"file://{rdzv_file}", rank=rank, world_size=world_size, **kw)
        try:
            out = fn(rank, world_size, *args)
        finally:
            dist.destroy_process_group()
        # plain pickle: tensors travel by value (torch's shared-memory handles die with the child process)
        results.put((rank, True, pickle.dumps(out)))
    except BaseException as e:  # report every failure, including KeyboardInterrupt/SystemExit, to the parent
        # a failure caused by another rank (a PeerFailure names it: its error, death or freeze) is not the root cause
        secondary = type(e).__name__ == "PeerFailure"
        results.put((rank, False, (traceback.format_exc(), secondary)))
        raise SystemExit(1)


def _exit_text(code: Optional[int]) -> str:
    if code is not None and code < 0:
        try:
            return f"exit code {code}, killed by {signal.Signals(-code).name}"
        except ValueError:
            pass
    return f"exit code {code}"


def _last_line(tb: str) -> str:
    lines = [ln for ln in tb.strip().splitlines() if ln.strip()]
    return lines[-1].strip() if lines else "(no traceback)"


def _failure_message(world_size: int, failures: List[Tuple[int, str, bool]], dead: Dict[int, Optional[int]]) -> str:
    """The root cause first (a rank's own error, else a rank that died, else the first report: a peer failure that
    names a frozen rank), then the rest."""
    own = [f for f in failures if not f[2]]
    if own:
        rank, tb, _ = own[0]
        head = f"rank {rank} of {world_size} failed:\n{tb}"
        root = rank
    elif dead:
        root = sorted(dead)[0]
        head = f"rank {root} of {world_size} died ({_exit_text(dead[root])}) without reporting an error"
    else:
        rank, tb, _ = failures[0]
        head = f"rank {rank} of {world_size} failed:\n{tb}"
        root = rank
    others = [f"  rank {r}: {_last_line(tb)}" for r, tb, _ in failures if r != root]
    others += [f"  rank {r} died ({_exit_text(c)})" for r, c in sorted(dead.items()) if r != root]
    return head + ("\nother ranks:\n" + "\n".join(others) if others else "")


def spawn_local(
    fn: Callable[..., Any],
    world_size: int,
    args: Sequence[Any] = (),
    *,
    backend: str = "gloo",
    timeout: float = 600.0,
    env: Optional[Dict[str, str]] = None,
    threads: int = 1,
    peer_timeout: Optional[float] = None,
    grace: float = 5.0,
) -> List[Any]:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` spawned processes joined in one process group.

    Args:
        fn: a picklable (module-level) function; its return value must be picklable.
        world_size: number of ranks.
        args: extra positional arguments for ``fn``.
        backend: torch.distributed backend (``gloo`` on CPU; ``nccl``: rank r uses GPU r mod the visible count).
        timeout: seconds before the whole world is killed.
        env: extra environment variables for the ranks.
        threads: ``torch.set_num_threads`` in each rank.
        peer_timeout: seconds a rank's collective wait may make no progress before the awaited peer is declared
            frozen (``$MEGATRON_BRIDGE_PEER_TIMEOUT`` in the ranks); the process group's own timeout becomes twice
            that plus 30 s, which bounds the collectives outside the bridge too.
        grace: after the first failure, seconds to wait for the other ranks' reports (they name the phase) before
            the world is killed.

    Returns:
        The return values of ``fn``, indexed by rank.

    Raises:
        WorkerError: the root cause first (the rank whose own error started it, with its traceback, or the rank that
            died, with its exit code or signal), then a line per other rank; or the deadline.
    """
    if world_size < 1:
        raise ValueError(f"spawn_local: world_size must be >= 1, got {world_size}")
    ctx = mp.get_context("spawn")
    results = ctx.SimpleQueue()
    out: Dict[int, Any] = {}
    env = dict(env or {})
    if peer_timeout is not None:
        env[PEER_TIMEOUT_ENV] = str(float(peer_timeout))
    with tempfile.TemporaryDirectory(prefix="bridge_world_") as tmp:
        rdzv = os.path.join(tmp, "rendezvous")
        procs = [
            ctx.Process(
                target=_worker,
                args=(r, world_size, fn, tuple(args), rdzv, backend, env, threads, results,
                      None if peer_timeout is None else 2 * float(peer_timeout) + 30),
                daemon=False,
            )
            for r in range(world_size)
        ]
        for p in procs:
            p.start()
        deadline = time.monotonic() + timeout
        failure: Optional[str] = None
        failures: List[Tuple[int, str, bool]] = []
        dead: Dict[int, Optional[int]] = {}
        failed_at: Optional[float] = None
        try:
            while len(out) < world_size and failure is None:
                while not results.empty():
                    rank, ok, payload = results.get()
                    if ok:
                        out[rank] = pickle.loads(payload)
                    else:
                        failures.append((rank, *payload))
                reported = set(out) | {r for r, _, _ in failures}
                for r, p in enumerate(procs):
                    if r not in reported and r not in dead and p.exitcode not in (None, 0) and results.empty():
                        dead[r] = p.exitcode
                now = time.monotonic()
                if (failures or dead) and failed_at is None:
                    failed_at = now
                settled = all(r in reported or r in dead or procs[r].exitcode is not None
                              for r in range(world_size))
                if failed_at is not None and (settled or now - failed_at > grace):
                    failure = _failure_message(world_size, failures, dead)
                elif now > deadline:
                    failure = f"world of {world_size} ranks ran past its {timeout:.0f} s deadline"
                    if failures or dead:
                        failure += "\n" + _failure_message(world_size, failures, dead)
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
