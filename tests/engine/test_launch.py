"""spawn_local reports the root cause first: the rank whose own error started a failure (even when another rank's
report arrives first), else the rank that died (exit code and signal), then one line per other rank; the peer timeout
reaches the ranks. Plain functions, no megatron."""

from __future__ import annotations

import os
import signal
import time

import pytest

from megatron_bridge_ext.launch import PEER_TIMEOUT_ENV, WorkerError, spawn_local


class PeerFailure(RuntimeError):
    """Stands for megatron_bridge_ext.engine.peers.PeerFailure (spawn_local recognises it by name)."""


def _root_cause_late(rank: int, world: int) -> None:
    if rank == 0:
        raise PeerFailure("rank 1 of 2 failed during 'export: bucket 2 of 3': ValueError: bad tensor")
    time.sleep(0.5)  # the root cause arrives after the secondary report
    raise ValueError("bad tensor")


def _one_dies(rank: int, world: int) -> None:
    if rank == 1:
        os.kill(os.getpid(), signal.SIGKILL)
    time.sleep(0.5)
    raise PeerFailure("rank 1 died during 'save_hf_pretrained: bucket 1 of 4'")


def _env(rank: int, world: int) -> str:
    return os.environ.get(PEER_TIMEOUT_ENV, "")


def test_root_cause_is_reported_first():
    with pytest.raises(WorkerError) as e:
        spawn_local(_root_cause_late, 2, timeout=60)
    msg = str(e.value)
    assert msg.startswith("rank 1 of 2 failed:") and "ValueError: bad tensor" in msg
    assert "other ranks:\n  rank 0: test_launch.PeerFailure: rank 1 of 2 failed during 'export: bucket 2 of 3'" in msg


def test_a_dead_rank_is_named_with_its_signal_and_the_survivors_phase():
    with pytest.raises(WorkerError) as e:
        spawn_local(_one_dies, 2, timeout=60)
    msg = str(e.value)
    assert msg.startswith("rank 1 of 2 died (exit code -9, killed by SIGKILL) without reporting an error")
    assert "rank 0: test_launch.PeerFailure: rank 1 died during 'save_hf_pretrained: bucket 1 of 4'" in msg


def test_peer_timeout_reaches_the_ranks():
    assert spawn_local(_env, 2, timeout=60, peer_timeout=7) == ["7.0", "7.0"]


def test_peer_timeout_setting_is_checked(monkeypatch):
    from megatron_bridge_ext.engine.peers import DEFAULT_PEER_TIMEOUT, peer_timeout

    monkeypatch.delenv(PEER_TIMEOUT_ENV, raising=False)
    assert peer_timeout() == DEFAULT_PEER_TIMEOUT and peer_timeout(3) == 3.0
    monkeypatch.setenv(PEER_TIMEOUT_ENV, "12.5")
    assert peer_timeout() == 12.5
    monkeypatch.setenv(PEER_TIMEOUT_ENV, "soon")
    with pytest.raises(ValueError, match=rf"\${PEER_TIMEOUT_ENV} = 'soon' is not a number"):
        peer_timeout()
    with pytest.raises(ValueError, match=r"peer_timeout = -1 must be a positive"):
        peer_timeout(-1)
