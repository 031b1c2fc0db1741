"""The walk of one HF tensor through the package: the files and functions its import and its export enter.

Writes a tiny Llama checkpoint, imports it into a one-rank megatron-core model (TP1, a one-process gloo world) and
saves it back as HF, with a profiler that records every function of ``megatron_bridge_ext`` entered while the
conversion of the tensor's task is on the stack (a frame whose ``task`` is that task, or a mapping of that Megatron
parameter), in the order first entered. Also counts, over the whole operation, the calls that build conversion
tasks, walk the model's parameters or read its config, and enter the mappings. For comparing two versions of the package: run it with each on ``PYTHONPATH``.

    python benchmarks/trace_walk.py [--tensor model.layers.0.self_attn.q_proj.weight]
"""

from __future__ import annotations

import argparse
import dis
import inspect
import os
import sys
import tempfile
from collections import Counter
from typing import Any, Dict, List, Tuple

import torch

PKG = "megatron_bridge_ext"


def _mine(frame: Any, megatron_name: str) -> bool:
    while frame is not None:
        loc = frame.f_locals
        task = loc.get("task")
        if task is not None and getattr(task, "global_param_name", None) == megatron_name:
            return True
        for key in ("self", "mapping"):
            m = loc.get(key)
            if m is not None and getattr(m, "megatron_param", None) == megatron_name and hasattr(m, "hf_param"):
                return True
        frame = frame.f_back
    return False


def _resumed(frame: Any, starts: Dict[Any, int]) -> bool:
    """Whether a 'call' event is a generator being resumed rather than a function (or generator) entered."""
    code = frame.f_code
    if not code.co_flags & (inspect.CO_GENERATOR | inspect.CO_COROUTINE | inspect.CO_ASYNC_GENERATOR):
        return False
    if code not in starts:
        starts[code] = next((i.offset for i in dis.get_instructions(code) if i.opname == "RESUME"), 0)
    return frame.f_lasti > starts[code]


class Walk:
    def __init__(self, megatron_name: str, root: str) -> None:
        self.megatron_name = megatron_name
        self.root = root
        self.entered: List[Tuple[str, str]] = []
        self.counts: Counter = Counter()
        self._starts: Dict[Any, int] = {}

    def __call__(self, frame: Any, event: str, arg: Any) -> None:
        if event != "call":
            return
        path = frame.f_code.co_filename
        if not path.startswith(self.root):
            return
        if _resumed(frame, self._starts):
            return
        name = frame.f_code.co_qualname
        self.counts[name] += 1
        if _mine(frame, self.megatron_name):
            key = (os.path.relpath(path, os.path.dirname(self.root)), name)
            if key not in self.entered:
                self.entered.append(key)


def _trace(fn, megatron_name: str) -> Walk:
    import megatron_bridge_ext

    walk = Walk(megatron_name, os.path.dirname(os.path.abspath(megatron_bridge_ext.__file__)))
    sys.setprofile(walk)
    try:
        fn()
    finally:
        sys.setprofile(None)
    return walk


def _report(title: str, walk: Walk) -> None:
    print(f"\n## {title}: {len(walk.entered)} functions entered for the tensor")
    for path, name in walk.entered:
        print(f"  {path}: {name}")
    watched = {k: v for k, v in walk.counts.items()
               if k.rsplit(".", 1)[-1] in ("build_tasks", "local_params", "model_config", "padded_vocab_size_of",
                                           "hf_to_megatron", "megatron_to_hf", "megatron_shape", "hf_shapes")}
    print("  calls over the whole operation: " + ", ".join(f"{k} x{v}" for k, v in sorted(watched.items())))


def main(argv: Any = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tensor", default="model.layers.0.self_attn.q_proj.weight")
    ap.add_argument("--megatron", default="decoder.layers.0.self_attention.linear_qkv.weight",
                    help="the Megatron parameter the tensor maps to")
    args = ap.parse_args(argv)

    import torch.distributed as dist

    import megatron_bridge_ext
    from megatron_bridge_ext.auto_bridge import AutoBridge
    from megatron_bridge_ext.mcore.cpu_compat import apply_cpu_patches
    from megatron_bridge_ext.mcore.model_builder import destroy_parallel, init_parallel
    from megatron_bridge_ext.testing.tiny_models import make_tiny_llama

    print(f"# package: {os.path.dirname(megatron_bridge_ext.__file__)}; tensor {args.tensor} -> {args.megatron}")
    apply_cpu_patches()
    tmp = tempfile.mkdtemp(prefix="trace_walk_")
    dist.init_process_group("gloo", init_method=f"file://{os.path.join(tmp, 'rdzv')}", rank=0, world_size=1)
    init_parallel(tp=1, pp=1)
    src = make_tiny_llama(os.path.join(tmp, "hf"))
    bridge = AutoBridge.from_hf_pretrained(src)
    bridge.model_bridge.show_progress = False
    out: Dict[str, Any] = {}

    def do_import():
        out["chunks"] = bridge.to_megatron_model(params_dtype=torch.float32)

    def do_export():
        bridge.save_hf_pretrained(out["chunks"], os.path.join(tmp, "out"), show_progress=False)

    _report("import (to_megatron_model)", _trace(do_import, args.megatron))
    _report("export (save_hf_pretrained)", _trace(do_export, args.megatron))
    destroy_parallel()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
