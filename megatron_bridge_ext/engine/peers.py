"""Failures across ranks: an error on one rank makes every rank of the operation fail within seconds, naming the
failing rank, its error and the phase; no rank stays blocked in a send, a receive or a barrier.

Each collective entry point (import, export, save) runs under a :class:`Watch`. The side channel is the c10d store of
the default process group (the rendezvous every rank already shares):

- a rank whose code raises inside a watched operation posts an error record (rank, phase, type, message) under the
  operation's key before the exception propagates;
- every wait of a watched operation is non-blocking: point-to-point messages and broadcasts are posted as async
  work and polled in short slices (:meth:`Watch.wait`), barriers are counted in the store (:meth:`Watch.barrier`);
  between slices the store is checked for a record, so a peer's failure ends the wait with a :class:`PeerFailure`
  that names it;
- a peer whose process died is found by the transport (its connection closes) or, in a barrier, by its pid (ranks on
  this host); the survivors name it and the phase;
- a wait that makes no progress for ``peer_timeout`` seconds (a frozen or hung peer) fails naming the awaited
  rank(s), and is recorded so that the other ranks fail too. The timeout comes from the caller, else the
  ``MEGATRON_BRIDGE_PEER_TIMEOUT`` environment variable, else :data:`DEFAULT_PEER_TIMEOUT`.

Operations are numbered per process in call order, which is the same on every rank (the entry points are
collective), so records of one operation never leak into the next. A :class:`PeerFailure` caused by another rank's
record is not recorded again (the record names the root cause). Nothing here is active in a single process.
"""

from __future__ import annotations

import itertools
import json
import os
import socket
import threading
import time
from typing import Any, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

import torch.distributed as dist

from megatron_bridge_ext.io.staging import pid_alive

__all__ = ["PeerFailure", "Watch", "current_watch", "peer_timeout", "watched", "DEFAULT_PEER_TIMEOUT",
           "PEER_TIMEOUT_ENV"]

PEER_TIMEOUT_ENV = "MEGATRON_BRIDGE_PEER_TIMEOUT"
#: seconds a wait may make no progress before the awaited peer is declared frozen
DEFAULT_PEER_TIMEOUT = 600.0
_PREFIX = "megatron_bridge"
_CHECK_EVERY = 0.05  # seconds between store checks while waiting


def peer_timeout(value: Optional[float] = None) -> float:
    """The frozen-peer timeout: ``value``, else ``$MEGATRON_BRIDGE_PEER_TIMEOUT``, else :data:`DEFAULT_PEER_TIMEOUT`.

    Raises:
        ValueError: a value that is not a positive number (the setting named).
    """
    where = "peer_timeout"
    if value is None:
        raw = os.environ.get(PEER_TIMEOUT_ENV)
        if raw is None:
            return DEFAULT_PEER_TIMEOUT
        where = f"${PEER_TIMEOUT_ENV}"
        try:
            value = float(raw)
        except ValueError:
            raise ValueError(f"{where} = {raw!r} is not a number of seconds") from None
    if not value > 0:
        raise ValueError(f"{where} = {value!r} must be a positive number of seconds")
    return float(value)


class PeerFailure(RuntimeError):
    """Another rank failed, died or stopped responding during a collective operation of the bridge.

    Attributes:
        rank: the failing (or awaited) rank, when known.
        phase: the phase it failed in.
        secondary: caused by another rank's record (not recorded again).
    """

    def __init__(self, message: str, *, rank: Optional[int] = None, phase: Optional[str] = None,
                 secondary: bool = True) -> None:
        super().__init__(message)
        self.rank = rank
        self.phase = phase
        self.secondary = secondary


_ops = itertools.count()
_local = threading.local()
_registered: Dict[Any, bool] = {}


def current_watch() -> Optional["Watch"]:
    """The watch of the operation running in this thread, if any (nested entry points share it)."""
    return getattr(_local, "watch", None)


def _host() -> str:
    return socket.gethostname()


class Watch:
    """Failure reporting and non-blocking waits for one collective operation (see the module docstring).

    Args:
        name: the operation (``import``, ``export``, ``save_hf_pretrained``), used in messages.
        timeout: the frozen-peer timeout in seconds (see :func:`peer_timeout`).
    """

    def __init__(self, name: str, timeout: Optional[float] = None) -> None:
        self.name = name
        self.phase = name
        self.timeout = peer_timeout(timeout)
        self.active = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        self.reported = False
        self._barriers = 0
        self._last_check = 0.0
        self._entered = False
        if not self.active:
            self.rank, self.world = 0, 1
            return
        self.op = next(_ops)
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        base = dist.distributed_c10d._get_default_store()
        self._base = base
        self.store = dist.PrefixStore(f"{_PREFIX}/op{self.op}/", base)
        key = id(base)
        if not _registered.get(key):
            try:
                base.set(f"{_PREFIX}/pid{self.rank}", f"{_host()}:{os.getpid()}")
            except Exception:
                pass
            _registered[key] = True

    # ---- context: report what escapes ------------------------------------------------------------------------------

    def __enter__(self) -> "Watch":
        if current_watch() is None:
            _local.watch = self
            self._entered = True
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if self._entered:
            _local.watch = None
            self._entered = False
        if exc is not None and isinstance(exc, Exception):
            self.report(exc)

    def set_phase(self, phase: str) -> None:
        """Names what this rank is doing now (for the messages of every rank)."""
        self.phase = phase

    # ---- records ---------------------------------------------------------------------------------------------------

    def report(self, exc: BaseException) -> None:
        """Posts this rank's error for the other ranks (once; not for failures caused by another rank's record)."""
        if not self.active or self.reported:
            return
        if isinstance(exc, PeerFailure) and exc.secondary:
            return
        self.reported = True
        record = {"rank": self.rank, "phase": self.phase, "type": type(exc).__name__, "message": str(exc)[:4000]}
        try:
            n = self.store.add("nerr", 1)
            self.store.set(f"err{n}", json.dumps(record))
            self.store.set("failed", str(n))
        except Exception:  # the store is gone too: the peers see the connection drop
            pass

    def _first_record(self) -> Optional[Dict[str, Any]]:
        if not self.store.check(["failed"]):
            return None
        for _ in range(100):  # the record is set right after the counter
            if self.store.check(["err1"]):
                return json.loads(self.store.get("err1"))
            time.sleep(0.01)
        return {"rank": "?", "phase": "?", "type": "unknown", "message": "(the error record was not written)"}

    def _failure_of(self, record: Dict[str, Any]) -> PeerFailure:
        return PeerFailure(
            f"rank {record['rank']} of {self.world} failed during {record['phase']!r}: {record['type']}: "
            f"{record['message']} (seen by rank {self.rank} while in {self.phase!r})",
            rank=record["rank"] if isinstance(record["rank"], int) else None, phase=record["phase"])

    def check(self, force: bool = False) -> None:
        """Raises :class:`PeerFailure` if another rank of this operation posted an error (rate-limited)."""
        if not self.active:
            return
        now = time.monotonic()
        if not force and now - self._last_check < _CHECK_EVERY:
            return
        self._last_check = now
        try:
            record = self._first_record()
        except Exception as e:
            raise PeerFailure(f"rank {self.rank} lost the rendezvous store during {self.phase!r} (its host, usually "
                              f"rank 0, may have died): {e}", phase=self.phase, secondary=False) from e
        if record is not None and record["rank"] != self.rank:
            raise self._failure_of(record)

    # ---- waits -----------------------------------------------------------------------------------------------------

    def wait(self, works: Sequence[Tuple[Any, Optional[int]]], what: str) -> None:
        """Waits for async works (each with the peer rank it depends on, None for any other rank) in short slices.

        gloo's point-to-point work completes only inside ``wait()``, so a helper thread waits (the GIL is released
        there) while this thread watches the store; after a failure the helper stays blocked until the transport
        gives up, harmlessly.

        Raises:
            PeerFailure: a peer posted an error, died (its connection closed) or made no progress for the timeout.
        """
        if not self.active:
            for work, _ in works:
                work.wait()
            return
        if not works:
            return
        done = threading.Event()
        state: Dict[str, Any] = {"at": 0, "error": None}

        def run() -> None:
            try:
                for i, (work, _) in enumerate(works):
                    state["at"] = i
                    work.wait()
            except BaseException as e:  # handed to the watching thread
                state["error"] = e
            finally:
                done.set()

        threading.Thread(target=run, name=f"bridge-wait-{self.op}", daemon=True).start()
        start = time.monotonic()
        while not done.wait(_CHECK_EVERY):
            self.check(force=True)
            if time.monotonic() - start > self.timeout:
                peers = sorted({p for _, p in works[state["at"]:] if p is not None}) or "any other"
                raise PeerFailure(
                    f"rank {self.rank} waited {self.timeout:.0f} s for rank(s) {peers} ({what}) during "
                    f"{self.phase!r}; they posted no error: frozen or hung, or slower than peer_timeout = "
                    f"{self.timeout:.0f} s allows (set peer_timeout or ${PEER_TIMEOUT_ENV})",
                    rank=peers[0] if isinstance(peers, list) else None, phase=self.phase, secondary=False)
        if state["error"] is not None:
            raise self._lost(works[state["at"]][1], what, state["error"]) from state["error"]

    def post(self, start: Any, peer: Optional[int], what: str) -> Any:
        """Starts async work (``start()``); a transport error while posting (a peer already gone) is named as a
        failed wait would be.

        Raises:
            PeerFailure: naming the peer's record, its death or its closed connection.
        """
        try:
            return start()
        except Exception as e:
            if not self.active or isinstance(e, PeerFailure):
                raise
            raise self._lost(peer, what, e) from e

    def _lost(self, peer: Optional[int], what: str, exc: BaseException) -> PeerFailure:
        """The failure behind a transport error: a peer's record, a dead peer, or a lost connection."""
        try:
            time.sleep(0.05)  # a failing peer posts its record before its process exits
            record = self._first_record()
        except Exception:
            record = None
        if record is not None and record["rank"] != self.rank:
            return self._failure_of(record)
        candidates = [peer] if peer is not None else [r for r in range(self.world) if r != self.rank]
        dead = self.dead_ranks(candidates)
        if dead:
            who, state = f"rank(s) {dead}" if len(dead) > 1 else f"rank {dead[0]}", "died"
        else:
            who, state = (f"rank {peer}" if peer is not None else "a peer"), "closed its connection"
        return PeerFailure(f"{who} {state} during {self.phase!r} ({what}; seen by rank {self.rank}); "
                           f"transport error: {exc}", rank=dead[0] if dead else peer, phase=self.phase,
                           secondary=False)

    def dead_ranks(self, ranks: Iterable[int]) -> List[int]:
        """Those of ``ranks`` whose process is known to be gone (ranks on this host, by pid)."""
        out = []
        for r in ranks:
            try:
                key = f"{_PREFIX}/pid{r}"
                if not self._base.check([key]):
                    continue
                host, _, pid = self._base.get(key).decode().rpartition(":")
            except Exception:
                continue
            if host == _host() and not pid_alive(int(pid)):
                out.append(r)
        return out

    def barrier(self, phase: str) -> None:
        """Every rank reaches ``phase`` (counted in the store, polled: never blocks in a collective).

        Raises:
            PeerFailure: a rank posted an error, a missing rank's process died (named), or the timeout passed
                (the missing ranks named).
        """
        self.phase = phase
        if not self.active:
            return
        k = self._barriers
        self._barriers += 1
        self.store.set(f"b{k}/r{self.rank}", "1")
        if self.store.add(f"b{k}/n", 1) == self.world:
            self.store.set(f"b{k}/done", "1")
        start = time.monotonic()
        pause, last_dead_check = 0.0005, start
        while not self.store.check([f"b{k}/done"]):
            self.check(force=True)
            now = time.monotonic()
            if now - last_dead_check > 1.0 or now - start > self.timeout:
                last_dead_check = now
                missing = [r for r in range(self.world) if not self.store.check([f"b{k}/r{r}"])]
                dead = self.dead_ranks(missing)
                if dead:
                    raise PeerFailure(f"rank(s) {dead} died before reaching {phase!r} (seen by rank {self.rank})",
                                      rank=dead[0], phase=phase, secondary=False)
                if now - start > self.timeout and missing:
                    raise PeerFailure(
                        f"rank(s) {missing} did not reach {phase!r} within {self.timeout:.0f} s and posted no error "
                        f"(seen by rank {self.rank}): frozen, hung or failed outside the bridge (set peer_timeout or "
                        f"${PEER_TIMEOUT_ENV})", rank=missing[0], phase=phase, secondary=False)
            time.sleep(pause)
            pause = min(pause * 2, 0.05)


def watched(watch: "Watch", items: Iterator[Any], what: str) -> Iterator[Any]:
    """Yields from a collective generator under ``watch``: an error is reported to the other ranks, and a consumer that
    stops early (closes the iterator) is reported too, since the other ranks would wait for this rank's messages."""
    try:
        yield from items
    except GeneratorExit:
        if not watch.reported:
            watch.report(RuntimeError(f"rank {watch.rank} stopped consuming the {what} during {watch.phase!r} "
                                      "(the iterator was closed before its end)"))
        raise
    except Exception as e:
        watch.report(e)
        raise
