"""End-to-end conversion benchmark: a synthetic ~1B-parameter Llama-shaped bf16 checkpoint, imported into real
megatron-core GPTModel chunks and exported back, at several local world sizes (CPU and gloo, or one GPU and NCCL).

Timed as ``bench_vs_reference.py`` times both converters (between barriers, slowest rank): the import into the
untouched parameters megatron-core just allocated (as ``to_megatron_model(load_weights=True)`` gives a user; on CPU
this includes the first touch of their pages), then a second import into the now resident parameters (a live job's
resync), the export without the write (conversion and collectives only) and the export with the write (safetensors +
config.json, fsync per shard unless ``--no-fsync``). Printed per layout next to: the time to read the checkpoint files
once (page cache warm), peak RSS per rank against model bytes / world + largest tensor (the import bound), and the
writing rank's peak above its resident model against two buckets (the export bound).

    python benchmarks/bench_convert.py                 # ~1.1B parameters, worlds 1, 2, 4 (CPU, gloo)
    python benchmarks/bench_convert.py --layers 4      # smaller, quicker
    python benchmarks/bench_convert.py --device cuda --layouts 1x1   # one GPU, NCCL (world 1)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from typing import Any, Dict, List, Optional

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from megatron_bridge_ext.launch import spawn_local  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _memio import DROP_CACHES, drop_page_cache, read_files_once, reset_peak, rss  # noqa: E402

GiB = 1024**3


def llama_config(layers: int) -> Dict[str, Any]:
    """TinyLlama-1.1B shapes (22 layers: 1.10 B parameters)."""
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 32000, "hidden_size": 2048,
        "intermediate_size": 5632, "num_hidden_layers": layers, "num_attention_heads": 32, "num_key_value_heads": 4,
        "head_dim": 64, "max_position_embeddings": 2048, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
        "tie_word_embeddings": False, "torch_dtype": "bfloat16", "hidden_act": "silu",
    }


def hf_shapes(cfg: Dict[str, Any]) -> Dict[str, tuple]:
    D, F, V, d = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"], cfg["head_dim"]
    H, G = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    shapes = {"model.embed_tokens.weight": (V, D)}
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}"
        shapes.update({
            f"{p}.input_layernorm.weight": (D,), f"{p}.post_attention_layernorm.weight": (D,),
            f"{p}.self_attn.q_proj.weight": (H * d, D), f"{p}.self_attn.k_proj.weight": (G * d, D),
            f"{p}.self_attn.v_proj.weight": (G * d, D), f"{p}.self_attn.o_proj.weight": (D, H * d),
            f"{p}.mlp.gate_proj.weight": (F, D), f"{p}.mlp.up_proj.weight": (F, D), f"{p}.mlp.down_proj.weight": (D, F),
        })
    shapes["model.norm.weight"] = (D,)
    shapes["lm_head.weight"] = (V, D)
    return shapes


def make_checkpoint(path: str, layers: int, shard_bytes: int = GiB) -> Dict[str, Any]:
    """Random bf16 weights (fixed seed), sharded like save_pretrained, plus config.json."""
    from megatron_bridge_ext.io import SafeTensorsWriter

    cfg = llama_config(layers)
    os.makedirs(path, exist_ok=True)
    json.dump(cfg, open(os.path.join(path, "config.json"), "w"), indent=2)
    shapes = hf_shapes(cfg)
    g = torch.Generator().manual_seed(0)
    with SafeTensorsWriter(path, {k: (s, torch.bfloat16) for k, s in shapes.items()}, max_shard_bytes=shard_bytes) as w:
        for k, s in shapes.items():
            w.add(k, torch.randn(s, generator=g, dtype=torch.float32).to(torch.bfloat16) * 0.02)
        w.close()
    n = sum(torch.Size(s).numel() for s in shapes.values())
    largest = max(torch.Size(s).numel() for s in shapes.values()) * 2
    return {"params": n, "bytes": 2 * n, "largest_bytes": largest}


def _worker(rank: int, world: int, ckpt: str, out_dir: str, tp: int, pp: int, bucket_bytes: int,
            fsync: bool = True, device: str = "cpu") -> Dict[str, Any]:
    cuda = device == "cuda"
    if not cuda:
        from megatron_bridge_ext.mcore.cpu_compat import apply_cpu_patches

        apply_cpu_patches()
    import torch.distributed as dist

    from megatron_bridge_ext.auto_bridge import AutoBridge
    from megatron_bridge_ext.mcore.model_builder import destroy_parallel, init_parallel

    def barrier() -> None:
        if cuda:
            torch.cuda.synchronize()
        dist.barrier()

    init_parallel(tp=tp, pp=pp)
    bridge = AutoBridge.from_hf_pretrained(ckpt)
    barrier()
    pre_model = rss()["VmRSS"]  # interpreter, torch, megatron-core, process groups: before any parameter exists
    if cuda:  # allocated on the GPU, untouched, as in a training job (modules megatron leaves on the CPU follow)
        chunks = bridge.to_megatron_model(load_weights=False, params_dtype=torch.bfloat16, bf16=True,
                                          use_cpu_initialization=False)
        chunks = [c.cuda() for c in chunks]
    else:
        chunks = bridge.to_megatron_model(load_weights=False, params_dtype=torch.bfloat16, bf16=True)
    params = [p for c in chunks for p in c.parameters()]
    model_bytes = sum(p.numel() * p.element_size() for p in params)
    on_device = {str(p.device) for p in params}
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    barrier()
    reset_ok = reset_peak()
    t0 = time.perf_counter()
    bridge.load_hf_weights(chunks, show_progress=False)  # into untouched parameters
    barrier()
    t_import = time.perf_counter() - t0
    peak_import = rss()["VmHWM"] if reset_ok else None
    gpu_peak_import = torch.cuda.max_memory_allocated() if cuda else None

    t0 = time.perf_counter()
    bridge.load_hf_weights(chunks, show_progress=False)  # again, into resident parameters (a live job's resync)
    barrier()
    t_import_resident = time.perf_counter() - t0

    # export without writing: the conversion and the collectives only
    t0 = time.perf_counter()
    n = 0
    for _, tensor in bridge.export_hf_weights(chunks, bucket_bytes=bucket_bytes, show_progress=False, copy=False):
        n += tensor.numel() * tensor.element_size()
    barrier()
    t_export_nowrite = time.perf_counter() - t0

    reset_peak()
    before_export = rss()["VmRSS"]
    t0 = time.perf_counter()
    bridge.save_hf_pretrained(chunks, out_dir, bucket_bytes=bucket_bytes, show_progress=False, fsync=fsync)
    barrier()
    t_export = time.perf_counter() - t0
    peak_export = rss()["VmHWM"] if reset_ok else None
    destroy_parallel()
    return {"rank": rank, "import_s": t_import, "import_resident_s": t_import_resident, "rss_pre_model": pre_model,
            "export_nowrite_s": t_export_nowrite, "export_s": t_export, "peak_import": peak_import,
            "gpu_peak_import": gpu_peak_import, "rss_before_export": before_export, "peak_export": peak_export,
            "model_bytes_rank": model_bytes, "exported_bytes": n, "devices": sorted(on_device)}


def verify(src: str, dst: str) -> bool:
    from megatron_bridge_ext.io import SafeTensorsSource

    with SafeTensorsSource(src) as a, SafeTensorsSource(dst) as b:
        if set(a.keys()) != set(b.keys()):
            return False
        return all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a.keys())


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, default=22, help="decoder layers (22: ~1.1B parameters)")
    ap.add_argument("--layouts", default="1x1,2x1,4x1,2x2", help="comma-separated TPxPP layouts (world = TP*PP)")
    ap.add_argument("--bucket-mib", type=int, default=256)
    ap.add_argument("--dir", default=None, help="work directory (default: a temporary one)")
    ap.add_argument("--no-verify", action="store_true")
    ap.add_argument("--no-fsync", action="store_true", help="leave the flush of written shards to the OS")
    ap.add_argument("--drop-caches", action="store_true",
                    help=f"drop the page cache (root: {DROP_CACHES}) before each layout, then re-read the checkpoint")
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                    help="where the Megatron model lives: cpu (gloo, one process per rank sharing the cores) or cuda "
                         "(NCCL, one GPU per rank)")
    args = ap.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("bench_convert: --device cuda but torch.cuda.is_available() is False", file=sys.stderr)
        return 2

    tmp = args.dir or tempfile.mkdtemp(prefix="bench_convert_")
    ckpt = os.path.join(tmp, "hf")
    t0 = time.perf_counter()
    info = make_checkpoint(ckpt, args.layers)
    print(f"checkpoint: {info['params'] / 1e9:.2f} B parameters, {info['bytes'] / GiB:.2f} GiB bf16, largest tensor "
          f"{info['largest_bytes'] / 2**20:.0f} MiB, made in {time.perf_counter() - t0:.1f} s ({tmp}); "
          f"device {args.device}")
    read_files_once(ckpt)  # warm the page cache: every figure below reads from memory
    t_read = min(read_files_once(ckpt) for _ in range(2))
    gb = info["bytes"] / 1e9
    print(f"read the checkpoint files once (page cache warm): {t_read:.2f} s, {gb / t_read:.2f} GB/s")
    header = (f"{'layout':>8} {'import s':>9} {'GB/s':>6} {'x read':>7} {'resident s':>10} {'export s':>9} "
              f"{'no-write s':>10} {'peak RSS/rank':>14} {'- pre-model':>11} {'model/world+largest':>20} {'exact':>6}")
    print(header)
    print("-" * len(header))
    cores = os.cpu_count() or 1
    for layout in args.layouts.split(","):
        tp, pp = (int(x) for x in layout.lower().split("x"))
        world = tp * pp
        if args.device == "cuda" and world > torch.cuda.device_count():
            print(f"{layout:>8} skipped: needs {world} GPUs, {torch.cuda.device_count()} visible")
            continue
        out = os.path.join(tmp, f"out_{tp}x{pp}")
        if args.drop_caches:
            drop_page_cache(ckpt)
        res = spawn_local(_worker, world, (ckpt, out, tp, pp, args.bucket_mib * 2**20, not args.no_fsync,
                                           args.device),
                          backend="nccl" if args.device == "cuda" else "gloo", timeout=3600,
                          threads=max(1, cores // world))
        t_imp = max(r["import_s"] for r in res)
        t_res = max(r["import_resident_s"] for r in res)
        t_exp = max(r["export_s"] for r in res)
        t_nw = max(r["export_nowrite_s"] for r in res)
        peak = max((r["peak_import"] or 0) for r in res)
        above = max((r["peak_import"] or 0) - r["rss_pre_model"] for r in res)
        bound = info["bytes"] / world + info["largest_bytes"]
        ok = "-" if args.no_verify else ("yes" if verify(ckpt, out) else "NO")
        print(f"{layout:>8} {t_imp:9.2f} {gb / t_imp:6.2f} {t_imp / t_read:7.2f} {t_res:10.2f} {t_exp:9.2f} "
              f"{t_nw:10.2f} {peak / GiB:12.2f} G {above / GiB:9.2f} G {bound / GiB:18.2f} G {ok:>6}")
        exp_peak = max((r["peak_export"] or 0) - r["rss_before_export"] for r in res)
        line = (f"{'':>8} parameters on {', '.join(res[0]['devices'])}; export (with the write): writing rank's "
                f"peak RSS above its resident model {exp_peak / GiB:.2f} GiB (bound: 2 buckets = "
                f"{2 * args.bucket_mib / 1024:.2f} GiB); {gb / t_exp:.2f} GB/s with the write, "
                f"{gb / t_nw:.2f} GB/s without")
        if res[0]["gpu_peak_import"] is not None:
            line += f"; GPU peak allocated during the import {res[0]['gpu_peak_import'] / GiB:.2f} GiB"
        print(line)
        shutil.rmtree(out, ignore_errors=True)
    print("import s: into the untouched parameters megatron-core allocated (first touch included); resident s: the "
          "same import again into the now resident parameters")
    if not args.dir:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
