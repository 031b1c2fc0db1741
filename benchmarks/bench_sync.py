"""Weight-sync benchmark: the cost of the first sync of a :class:`WeightSyncPlan` (plan built: name gather, metadata
exchange, tasks, buckets, contexts; buffers allocated and touched) against later syncs (bytes moved and unpacked
only), and against the plan-less path (``bridge.export_hf_weights`` each time), all measured in the same run.

A synthetic Llama-shaped bf16 checkpoint (TinyLlama-1.1B widths, ``--layers`` layers) is imported into real
megatron-core GPTModel chunks on local gloo ranks (CPU), then synced ``--syncs`` times to every rank (``dst="all"``,
as an RL trainer feeding colocated inference engines) or to rank 0. Every sync is checked against the checkpoint
once (``--check``). The machine may be shared with other work: read the ratios, not the absolute times.

``--quantize fp8`` adds a second plan of the same model with ``quantization="fp8"`` (the linear weights yielded in
FP8 with their per-block scales, quantized on the receiving ranks) and times its syncs alternating with the bf16
plan's, in the same run: the ratio FP8 / bf16 sync time and the bytes each yields. ``--check`` then also compares
every FP8 weight with the quantization of the checkpoint's tensor and every kept tensor with the checkpoint.

    python benchmarks/bench_sync.py                      # 2 layers (~0.33 B parameters), TP2, dst=all
    python benchmarks/bench_sync.py --layers 4 --dst 0
    python benchmarks/bench_sync.py --quantize fp8 --check
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from typing import Any, Dict, List, Optional

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_convert import make_checkpoint  # noqa: E402

from megatron_bridge_ext.launch import spawn_local  # noqa: E402


def _consume(stream, check: Optional[Any]) -> int:
    n = 0
    for bucket in stream:
        for name, tensor in (bucket if isinstance(bucket, list) else [bucket]):
            n += tensor.numel() * tensor.element_size()
            if check is not None and not torch.equal(tensor, check[name]):
                raise RuntimeError(f"sync produced a wrong {name}")
    return n


def _consume_fp8(stream, check: Optional[Any]) -> int:
    """Bytes of an FP8 sync; with ``check`` each FP8 weight against the quantization of the checkpoint's tensor (its
    scales with it) and each kept tensor against the checkpoint's."""
    from megatron_bridge_ext import ops

    n = 0
    for bucket in stream:
        scales = {}
        for name, tensor in bucket:
            n += tensor.numel() * tensor.element_size()
            if check is None:
                continue
            if name.endswith("_scale_inv"):
                ok = torch.equal(tensor, scales.pop(name))
            elif tensor.dtype == torch.float8_e4m3fn:
                q, scales[name + "_scale_inv"] = ops.fp8_block_quant(check[name], rule="transformers")
                ok = torch.equal(tensor.view(torch.uint8), q.view(torch.uint8))
            else:
                ok = torch.equal(tensor, check[name])
            if not ok:
                raise RuntimeError(f"FP8 sync produced a wrong {name}")
    return n


def _worker(rank: int, world: int, ckpt: str, tp: int, pp: int, syncs: int, dst: Any, bucket_bytes: int,
            check: bool, quantize: Optional[str] = None) -> Dict[str, Any]:
    from megatron_bridge_ext.cli.common import worker_setup

    worker_setup(False)
    import torch.distributed as dist

    from megatron_bridge_ext import ops
    from megatron_bridge_ext.auto_bridge import AutoBridge
    from megatron_bridge_ext.engine.sync import WeightSyncPlan
    from megatron_bridge_ext.io import SafeTensorsSource
    from megatron_bridge_ext.mcore.model_builder import destroy_parallel, init_parallel

    counts = {"names_or_metadata": 0}
    for mod, fn in ((ops, "gather_param_names"), (dist, "all_gather_object")):
        original = getattr(mod, fn)

        def counted(*a, _f=original, **k):
            counts["names_or_metadata"] += 1
            return _f(*a, **k)
        setattr(mod, fn, counted)

    init_parallel(tp=tp, pp=pp)
    bridge = AutoBridge.from_hf_pretrained(ckpt)
    chunks = bridge.to_megatron_model(params_dtype=torch.bfloat16)
    receiving = dst == "all" or rank == dst
    src = SafeTensorsSource(ckpt) if check and receiving else None
    out: Dict[str, Any] = {}

    dist.barrier()
    counts["names_or_metadata"] = 0  # the import's own exchange is not the plan's
    t0 = time.perf_counter()
    plan = WeightSyncPlan(bridge.model_bridge, chunks, bucket_bytes=bucket_bytes, dst=dst, copy=False)
    dist.barrier()
    out["build_s"] = time.perf_counter() - t0
    out["collectives_at_build"] = counts["names_or_metadata"]
    times: List[float] = []
    for i in range(syncs):
        dist.barrier()
        t0 = time.perf_counter()
        nbytes = _consume(plan.sync(), src if i in (0, syncs - 1) else None)
        dist.barrier()
        times.append(time.perf_counter() - t0)
        if i == 0:
            out["collectives_after_first"] = counts["names_or_metadata"]
    out["collectives_after_all"] = counts["names_or_metadata"]
    out["sync_s"] = times
    out["bytes"] = nbytes
    out["buckets"] = plan.num_buckets
    plain: List[float] = []
    for _ in range(max(2, syncs // 2)):
        dist.barrier()
        t0 = time.perf_counter()
        _consume(bridge.export_hf_weights(chunks, dst=dst, bucket_bytes=bucket_bytes, show_progress=False,
                                          copy=False), None)
        dist.barrier()
        plain.append(time.perf_counter() - t0)
    out["export_s"] = plain
    if quantize:  # the same model synced plainly and quantized, alternating
        qplan = WeightSyncPlan(bridge.model_bridge, chunks, bucket_bytes=bucket_bytes, dst=dst, copy=False,
                               quantization=quantize)
        out["quantized_bytes"] = _consume_fp8(qplan.sync(), src)  # untimed: checked, buffers allocated
        pairs = {"bf16": [], quantize: []}
        for i in range(syncs):
            for kind in (("bf16", quantize) if i % 2 == 0 else (quantize, "bf16")):
                dist.barrier()
                t0 = time.perf_counter()
                if kind == "bf16":
                    _consume(plan.sync(), None)
                else:
                    _consume_fp8(qplan.sync(), None)
                dist.barrier()
                pairs[kind].append(time.perf_counter() - t0)
        out["pairs"] = pairs
    destroy_parallel()
    return out


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--tp", type=int, default=2)
    ap.add_argument("--pp", type=int, default=1)
    ap.add_argument("--syncs", type=int, default=6)
    ap.add_argument("--dst", default="all", help="'all' or a global rank")
    ap.add_argument("--bucket-mib", type=int, default=256)
    ap.add_argument("--check", action="store_true", help="compare the first and last sync with the checkpoint")
    ap.add_argument("--quantize", choices=("fp8",), default=None,
                    help="also time a plan with this quantization against the bf16 plan, alternating")
    args = ap.parse_args(argv)
    dst = args.dst if args.dst == "all" else int(args.dst)
    with tempfile.TemporaryDirectory(prefix="bench_sync_") as tmp:
        ckpt = os.path.join(tmp, "hf")
        info = make_checkpoint(ckpt, args.layers)
        res = spawn_local(_worker, args.tp * args.pp,
                          (ckpt, args.tp, args.pp, args.syncs, dst, args.bucket_mib << 20, args.check,
                           args.quantize),
                          timeout=3600, threads=1)
    r = res[0]
    first, later = r["sync_s"][0], statistics.median(r["sync_s"][1:])
    plain = statistics.median(r["export_s"])
    gb = r["bytes"] / 1e9
    print(f"weight sync: {info['params'] / 1e9:.2f} B parameters bf16 ({gb:.2f} GB per sync, {r['buckets']} buckets of "
          f"<= {args.bucket_mib} MiB), TP={args.tp} PP={args.pp}, dst={args.dst}, {args.syncs} syncs "
          f"(shared machine: ratios, not absolute times)")
    print(f"  plan build (name gather + metadata exchange, tasks, buckets): {r['build_s']:.3f} s, "
          f"{r['collectives_at_build']} name/metadata collective(s)")
    print(f"  first sync (buffers allocated):  {first:.3f} s  {gb / first:.2f} GB/s")
    print(f"  later syncs (median):            {later:.3f} s  {gb / later:.2f} GB/s")
    print(f"  build + first / later:           {(r['build_s'] + first) / later:.2f}x")
    print(f"  plan-less export_hf_weights:     {plain:.3f} s  ({plain / later:.2f}x a planned sync)")
    print(f"  name/metadata collectives after the build: "
          f"{r['collectives_after_all'] - r['collectives_at_build']} over {args.syncs} syncs")
    if args.quantize:
        q, b = statistics.median(r["pairs"][args.quantize]), statistics.median(r["pairs"]["bf16"])
        qgb = r["quantized_bytes"] / 1e9
        print(f"  {args.quantize} sync vs bf16 sync, alternating, same run (median of {args.syncs} each): "
              f"{args.quantize} {q:.3f} s ({qgb:.2f} GB yielded), bf16 {b:.3f} s ({gb:.2f} GB): {q / b:.2f}x the "
              f"time, {qgb / gb:.2f}x the bytes" + ("; checked" if args.check else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
