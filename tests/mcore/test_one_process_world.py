"""``one_process_world``: the one-process gloo world the meta-device planning and the in-process conversions make
when the caller has none. It works (a collective runs, a second call keeps the world) and leaves nothing behind in
the temporary directory (an in-memory store, no rendezvous file). Run in a subprocess with a ``TMPDIR`` of its own."""

from __future__ import annotations

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

PROBE = """
import torch, torch.distributed as dist
from megatron_bridge_ext.mcore.topology import one_process_world
one_process_world("the probe")
group = dist.group.WORLD
one_process_world("the probe, again")
assert dist.group.WORLD is group and dist.get_world_size() == 1
t = torch.arange(3.0)
dist.all_reduce(t)
assert t.tolist() == [0.0, 1.0, 2.0], t
dist.destroy_process_group()
"""


def test_one_process_world_leaves_no_files(tmp_path):
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    env = {**os.environ, "TMPDIR": str(tmp), "GLOO_SOCKET_IFNAME": os.environ.get("GLOO_SOCKET_IFNAME", "lo"),
           "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    res = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=300, env=env,
                         cwd=ROOT)
    assert res.returncode == 0, res.stderr[-3000:]
    assert sorted(os.listdir(tmp)) == []
