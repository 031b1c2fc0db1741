"""An error on one rank makes every rank fail within seconds, naming the failing rank, its error and the phase; no
rank stays blocked in a send, a receive or a barrier; survivors of a rank that died name it and the phase; a frozen
peer is bounded by the user's timeout; spawn_local reports the root cause first.

Real megatron-core and transformers, 2-rank gloo worlds (TP=2: both ranks hold shards and send to rank 0). Failures
are injected in one rank (an exception, SIGKILL, SIGSTOP) at a point of the conversion; each rank writes what it
saw (exception type, message, time) to a file before the world is torn down. A world in which a point-to-point
message failed is never reused (a receive may still be posted).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time

import pytest
import torch

pytest.importorskip("megatron.core")
transformers = pytest.importorskip("transformers")

from megatron_bridge_ext.launch import WorkerError, spawn_local  # noqa: E402
from megatron_bridge_ext.testing.tiny_models import tiny_hf_model  # noqa: E402

BASE = dict(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=8, max_position_embeddings=64, tie_word_embeddings=False)
SECONDS = 15.0  # "within seconds" on a loaded 2-core CI machine


def _snapshot(path) -> dict:
    return {f: hashlib.sha1(open(os.path.join(path, f), "rb").read()).hexdigest() for f in sorted(os.listdir(path))}


def _inject(rank: int, scenario: str) -> None:
    """Arm the failure of ``scenario`` in this rank."""
    import signal

    from megatron_bridge_ext.engine import MegatronModelBridge, transport
    from megatron_bridge_ext.io import hf_writer

    calls = {"n": 0}
    if scenario == "import_fails" and rank == 1:
        original = MegatronModelBridge._convert_one

        def convert(self, task, *a, **kw):
            if "layers.1." in task.global_param_name:
                raise RuntimeError(f"injected import failure at {task.global_param_name}")
            return original(self, task, *a, **kw)

        MegatronModelBridge._convert_one = convert
    if scenario == "writer_fails" and rank == 0:
        original_add = hf_writer.SafeTensorsWriter.add

        def add(self, name, tensor):
            calls["n"] += 1
            if calls["n"] == 4:
                raise ValueError(f"injected disk failure writing {name}")
            return original_add(self, name, tensor)

        hf_writer.SafeTensorsWriter.add = add
    if scenario in ("sender_fails", "rank_dies", "rank_freezes") and rank == 1:
        original_pack = transport._pack_part

        def pack(out, plan, index):
            calls["n"] += 1
            if calls["n"] == 3:
                if scenario == "sender_fails":
                    raise RuntimeError("injected failure packing a bucket")
                os.kill(os.getpid(), signal.SIGKILL if scenario == "rank_dies" else signal.SIGSTOP)
            return original_pack(out, plan, index)

        transport._pack_part = pack


def _worker(rank: int, world: int, ckpt: str, out: str, results: str, scenarios: list) -> None:
    from megatron_bridge_ext.mcore.cpu_compat import apply_cpu_patches

    apply_cpu_patches()
    from megatron_bridge_ext.auto_bridge import AutoBridge
    from megatron_bridge_ext.mcore.model_builder import init_parallel

    init_parallel(tp=2, pp=1)
    bridge = AutoBridge.from_hf_pretrained(ckpt)
    chunks = bridge.to_megatron_model(load_weights=False, params_dtype=torch.float32)
    if scenarios[0] != "import_fails":
        bridge.load_hf_weights(chunks, show_progress=False)
    error = None
    for scenario in scenarios:
        _inject(rank, scenario)
        record = {"rank": rank, "scenario": scenario, "type": None, "message": None, "t": None}
        try:
            if scenario == "import_fails":
                bridge.load_hf_weights(chunks, show_progress=False)
            elif scenario in ("writer_fails", "rank_dies", "rank_freezes"):
                bridge.save_hf_pretrained(chunks, out, max_shard_bytes=8 * 1024, bucket_bytes=4 * 1024,
                                          show_progress=False)
            elif scenario == "sender_fails":
                list(bridge.export_hf_weights(chunks, bucket_bytes=4 * 1024, show_progress=False))
            elif scenario == "consumer_stops":
                stream = bridge.export_hf_weights(chunks, bucket_bytes=4 * 1024, show_progress=False)
                if rank == 0:
                    next(stream)
                    stream.close()  # stops early: rank 1 would wait forever for its next receive
                else:
                    list(stream)
        except Exception as e:
            record.update(type=type(e).__name__, message=str(e), t=time.time())
            error = e
        with open(os.path.join(results, f"{scenario}.rank{rank}.json"), "w") as f:
            json.dump(record, f)
    if error is not None:
        raise error


def _world(tmp_path, ckpt, scenarios, **kw):
    results = tmp_path / "results"
    results.mkdir(exist_ok=True)
    out = str(tmp_path / "out")
    shutil.copytree(ckpt, out)  # an existing checkpoint in the output directory
    before = _snapshot(out)
    with pytest.raises(WorkerError) as e:
        spawn_local(_worker, 2, (ckpt, out, str(results), scenarios), timeout=240, **kw)
    seen = {}
    for f in os.listdir(results):
        r = json.load(open(results / f))
        seen[(r["scenario"], r["rank"])] = r
    return str(e.value), seen, out, before


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("peer_failures") / "hf")
    tiny_hf_model("Llama", BASE, seed=0).save_pretrained(path)
    return path


def test_rank_failing_in_import_then_in_save_makes_every_rank_fail(tmp_path, ckpt):
    report, seen, out, before = _world(tmp_path, ckpt, ["import_fails", "writer_fails"])
    # import: rank 1 raises while converting; rank 0, done with its own part, fails at once naming it
    own, peer = seen[("import_fails", 1)], seen[("import_fails", 0)]
    assert own["type"] == "RuntimeError" and "injected import failure" in own["message"]
    assert peer["type"] == "PeerFailure"
    assert "rank 1 of 2 failed during 'import: decoder.layers.1." in peer["message"]
    assert "injected import failure" in peer["message"]
    assert abs(peer["t"] - own["t"]) < SECONDS
    # save: rank 0's writer fails midway; rank 1, blocked in a send, fails naming rank 0 and its error
    own, peer = seen[("writer_fails", 0)], seen[("writer_fails", 1)]
    assert own["type"] == "ValueError" and "injected disk failure" in own["message"]
    assert peer["type"] == "PeerFailure" and "rank 0 of 2 failed during 'save_hf_pretrained" in peer["message"]
    assert "ValueError" in peer["message"] and "injected disk failure" in peer["message"]
    assert abs(peer["t"] - own["t"]) < SECONDS
    # the checkpoint already in the output directory is untouched
    assert _snapshot(out) == before
    # spawn_local names the root cause first (rank 0's own error), then the other rank's line
    assert report.startswith("rank 0 of 2 failed:") and "injected disk failure" in report
    assert "other ranks:\n  rank 1: megatron_bridge_ext.engine.peers.PeerFailure: rank 0 of 2 failed" in report


def test_sender_failing_makes_the_destination_fail(tmp_path, ckpt):
    report, seen, _, _ = _world(tmp_path, ckpt, ["sender_fails"])
    own, peer = seen[("sender_fails", 1)], seen[("sender_fails", 0)]
    assert own["type"] == "RuntimeError" and "injected failure packing" in own["message"]
    assert peer["type"] == "PeerFailure" and "rank 1 of 2 failed during 'export: bucket" in peer["message"]
    assert "injected failure packing a bucket" in peer["message"] and abs(peer["t"] - own["t"]) < SECONDS
    assert report.startswith("rank 1 of 2 failed:")


def test_survivor_of_a_dead_rank_names_it_and_the_phase(tmp_path, ckpt):
    report, seen, out, before = _world(tmp_path, ckpt, ["rank_dies"])
    peer = seen[("rank_dies", 0)]
    assert ("rank_dies", 1) not in seen  # killed: it wrote nothing
    assert peer["type"] == "PeerFailure"
    assert "rank 1 died during 'save_hf_pretrained: bucket" in peer["message"], peer["message"]
    assert _snapshot(out) == before
    # spawn_local: the dead rank first, then the survivor's line naming the phase
    assert report.startswith("rank 1 of 2 died (exit code -9, killed by SIGKILL) without reporting an error")
    assert "rank 0: megatron_bridge_ext.engine.peers.PeerFailure: rank 1 died during 'save_hf_pretrained: bucket" \
        in report


def test_frozen_peer_is_bounded_by_the_user_timeout(tmp_path, ckpt):
    start = time.time()
    report, seen, out, before = _world(tmp_path, ckpt, ["rank_freezes"], peer_timeout=4)
    peer = seen[("rank_freezes", 0)]
    assert peer["type"] == "PeerFailure"
    assert "waited 4 s for rank(s) [1]" in peer["message"] and "save_hf_pretrained: bucket" in peer["message"]
    assert "frozen" in peer["message"] and "MEGATRON_BRIDGE_PEER_TIMEOUT" in peer["message"]
    assert time.time() - start < 120
    assert _snapshot(out) == before
    assert report.startswith("rank 0 of 2 failed:") and "waited 4 s for rank(s) [1]" in report


def test_consumer_stopping_early_releases_the_senders(tmp_path, ckpt):
    report, seen, _, _ = _world(tmp_path, ckpt, ["consumer_stops"])
    peer = seen[("consumer_stops", 1)]
    assert seen[("consumer_stops", 0)]["type"] is None
    assert peer["type"] == "PeerFailure" and "rank 0 of 2 failed during 'export: bucket" in peer["message"]
    assert "stopped consuming the export" in peer["message"]
    assert report.startswith("rank 1 of 2 failed:")
