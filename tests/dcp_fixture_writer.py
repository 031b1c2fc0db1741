"""Writes torch_dist checkpoints with the installed megatron-core's own ``dist_checkpointing.save`` (run with the
interpreter of the environment whose megatron-core should write them; the tests read them under every environment).

    python tests/dcp_fixture_writer.py tensors OUT
        a hand-made sharded state dict covering what megatron-core stores: tensors split along one axis and along
        two (its CheckpointableShardedTensor path), stacked along a prepended axis (its legacy ShardedTensor path),
        fp32 / bf16 / fp16 / int64, a sharded object, and a Megatron-LM-like common state (``args`` as an
        argparse.Namespace with a dtype, a megatron-core enum, a signal, a path; a SimpleNamespace; bytes; a numpy
        array). The global tensors and the sharded object's tensor are also written to OUT/expected.safetensors.
    python tests/dcp_fixture_writer.py model HF_DIR ROOT
        the HF checkpoint imported into a GPTModel (this package, TP1, in a world of one) and written with plain
        ``dist_checkpointing.save`` as Megatron-LM would: ``{"model": sharded state dict, "args", "iteration",
        "checkpoint_version"}`` under ROOT/iter_0000000 with the tracker; no entry of this package.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import signal
import sys
import tempfile
import types


def _world() -> None:
    import torch
    import torch.distributed as dist

    torch.cuda.synchronize = lambda *a, **k: None  # megatron-core's writer calls these unconditionally
    torch.cuda.current_device = lambda: "cpu"
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    dist.init_process_group("gloo", init_method=f"file://{tempfile.mktemp()}", rank=0, world_size=1)


def tensors(out: str) -> None:
    import numpy as np
    import torch
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.mapping import ShardedObject, ShardedTensor
    from megatron.core.transformer.enums import AttnBackend
    from safetensors.torch import save_file

    _world()
    os.makedirs(out, exist_ok=True)
    g = torch.Generator().manual_seed(1234)
    a = torch.randn(6, 4, generator=g)
    grid = torch.randn(4, 6, generator=g).to(torch.float16)
    stack = torch.randn(3, 5, 2, generator=g).to(torch.bfloat16)
    ints = torch.arange(10, dtype=torch.int64) * 7 - 3
    obj_t = torch.randn(3, generator=g)
    sd = {
        "a": [ShardedTensor.from_rank_offsets("w.a", a[3 * i:3 * i + 3].clone(), (0, i, 2), replica_id=0)
              for i in range(2)],
        "grid": [ShardedTensor.from_rank_offsets("w.grid", grid[2 * i:2 * i + 2, 3 * j:3 * j + 3].clone(),
                                                 (0, i, 2), (1, j, 2), replica_id=0)
                 for i in range(2) for j in range(2)],
        "stack": [ShardedTensor.from_rank_offsets("w.stack", stack[i].clone(), (0, i, 3), replica_id=0,
                                                  prepend_axis_num=1) for i in range(3)],
        "ints": ShardedTensor.from_rank_offsets("w.ints", ints.clone(), replica_id=0),
        "obj": ShardedObject("w.obj", {"x": 1, "t": obj_t.clone()}, (1,), (0,), replica_id=0),
        "args": argparse.Namespace(num_layers=3, hidden_size=4, params_dtype=torch.bfloat16,
                                   attention_backend=AttnBackend.auto, exit_signal=signal.SIGTERM,
                                   save=pathlib.PosixPath("/ckpt/run"), data_path=["a", "b"]),
        "extra": types.SimpleNamespace(note="plain", blob=b"\x00\x01", table=np.arange(3, dtype=np.int32)),
        "iteration": 7,
        "checkpoint_version": 3.0,
    }
    dist_checkpointing.save(sd, out)
    save_file({"w.a": a, "w.grid": grid, "w.stack": stack, "w.ints": ints, "w.obj.t": obj_t},
              os.path.join(out, "expected.safetensors"))


def model(hf_dir: str, root: str) -> None:
    from megatron_bridge_ext.mcore.cpu_compat import apply_cpu_patches

    apply_cpu_patches()
    _world()
    import torch
    from megatron.core import dist_checkpointing

    from megatron_bridge_ext.auto_bridge import AutoBridge
    from megatron_bridge_ext.mcore.checkpoint import megatron_lm_args, sharded_model_state
    from megatron_bridge_ext.mcore.model_builder import init_parallel

    init_parallel(tp=1, pp=1)
    bridge = AutoBridge.from_hf_pretrained(hf_dir)
    chunks = bridge.to_megatron_model(params_dtype=torch.float32)
    it = os.path.join(root, "iter_0000000")
    os.makedirs(it, exist_ok=True)
    args = megatron_lm_args(chunks[0].config, {"tp": 1, "pp": 1, "world": 1})
    dist_checkpointing.save({**sharded_model_state(chunks), "args": args, "iteration": 0,
                             "checkpoint_version": 3.0}, it)
    with open(os.path.join(root, "latest_checkpointed_iteration.txt"), "w") as f:
        f.write("0\n")


if __name__ == "__main__":
    import warnings

    warnings.filterwarnings("ignore")
    if sys.argv[1] == "tensors":
        tensors(sys.argv[2])
    elif sys.argv[1] == "model":
        model(sys.argv[2], sys.argv[3])
    else:
        raise SystemExit(f"unknown fixture {sys.argv[1]!r}")
