"""The streaming DCP writer on its own: items planned by torch's own ``DefaultSavePlanner``, written on one or two
lanes, read back by torch's own ``FileSystemReader``; every file's recorded size and SHA-256 against the file."""

from __future__ import annotations

import hashlib
import os
import threading

import pytest
import torch

from megatron_bridge_ext.io.dcp_writer import StreamingDcpWriter, write_metadata


def _state(n: int = 12):
    g = torch.Generator().manual_seed(0)
    shapes = [(64 + 32 * i, 48) for i in range(n)]
    return {f"layer{i}.weight": torch.randn(s, generator=g).to(torch.bfloat16) for i, s in enumerate(shapes)}


def _plan(state):
    from torch.distributed.checkpoint.default_planner import DefaultSavePlanner

    planner = DefaultSavePlanner()
    planner.set_up_planner(state, is_coordinator=True)
    local = planner.create_local_plan()
    plans, metadata = planner.create_global_plan([local])
    plan = planner.finish_plan(plans[0])
    return [(item, planner.resolve_data(item)) for item in plan.items], metadata


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")  # one process: what the test means
@pytest.mark.parametrize("lanes", [1, 2])
def test_written_checkpoint_loads_in_torch(tmp_path, lanes):
    import torch.distributed.checkpoint as dcp

    state = _state()
    items, metadata = _plan(state)
    d = str(tmp_path / "ckpt")
    os.makedirs(d)
    seen = []
    w = StreamingDcpWriter(d, rank=3, file_bytes=40 << 10, first_file=5, lanes=lanes, on_file=seen.append)
    for item, data in items:
        w.put(item, data)
    files = w.close()
    write_metadata(d, metadata, [r for f in files for r in f.results])

    names = sorted(f.name for f in files)
    assert names == sorted(n for n in os.listdir(d) if n.endswith(".distcp"))
    assert sorted(f.name for f in seen) == names
    numbers = sorted(int(n.split("_")[-1].split(".")[0]) for n in names)
    assert numbers == list(range(5, 5 + len(numbers))) and len(numbers) > lanes  # every lane rolled over
    lanes_used = {(n - 5) % lanes for n in numbers}
    assert lanes_used == set(range(lanes))
    for f in files:
        data = open(os.path.join(d, f.name), "rb").read()
        assert f.size == len(data) and f.sha256 == hashlib.sha256(data).hexdigest(), f.name

    back = {k: torch.zeros_like(v) for k, v in state.items()}
    dcp.load(back, storage_reader=dcp.FileSystemReader(d), no_dist=True)
    for k, v in state.items():
        assert torch.equal(back[k], v), k
    assert not [t for t in threading.enumerate() if t.name.startswith(("dcp-writer", "direct-"))]


def test_bad_lanes(tmp_path):
    with pytest.raises(ValueError, match=r"lanes \(0\)"):
        StreamingDcpWriter(str(tmp_path), lanes=0)
