"""End-to-end conversion benchmark: a synthetic ~1B-parameter Llama-shaped bf16 checkpoint, imported into real
megatron-core GPTModel chunks and exported back, at several local world sizes (CPU, gloo).

Prints, per layout: import seconds (into resident parameters, as in a live job; the first touch of megatron's
untouched fresh allocation is reported apart) and export seconds and GB/s (checkpoint bytes / time), export without the final write,
peak RSS per rank (absolute, and above the rank's RSS before its model existed: parameters plus everything the
import adds), next to model bytes / world plus the largest tensor, and the time to simply read the checkpoint files once (page cache warm for both).

    python benchmarks/bench_convert.py                 # ~1.1B parameters, worlds 1, 2, 4
    python benchmarks/bench_convert.py --layers 4      # smaller, quicker
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


def read_files_once(path: str) -> float:
    files = [os.path.join(path, f) for f in sorted(os.listdir(path)) if f.endswith(".safetensors")]
    buf = bytearray(64 * 1024 * 1024)
    t0 = time.perf_counter()
    for f in files:
        with open(f, "rb", buffering=0) as fh:
            while fh.readinto(buf):
                pass
    return time.perf_counter() - t0


def _rss() -> Dict[str, int]:
    out = {}
    for line in open("/proc/self/status"):
        if line.startswith(("VmRSS:", "VmHWM:")):
            k, v = line.split(":")
            out[k] = int(v.split()[0]) * 1024
    return out


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _worker(rank: int, world: int, ckpt: str, out_dir: str, tp: int, pp: int, bucket_bytes: int,
            fsync: bool = True) -> Dict[str, Any]:
    from megatron_bridge_ext.mcore.cpu_compat import apply_cpu_patches

    apply_cpu_patches()
    import torch.distributed as dist

    from megatron_bridge_ext.auto_bridge import AutoBridge
    from megatron_bridge_ext.mcore.model_builder import destroy_parallel, init_parallel

    init_parallel(tp=tp, pp=pp)
    bridge = AutoBridge.from_hf_pretrained(ckpt)
    dist.barrier()
    pre_model = _rss()["VmRSS"]  # interpreter, torch, megatron-core, process groups: before any parameter exists
    chunks = bridge.to_megatron_model(load_weights=False, params_dtype=torch.bfloat16, bf16=True)
    model_bytes = sum(p.numel() * p.element_size() for c in chunks for p in c.parameters())
    # megatron allocates parameters without touching them (perform_initialization=False); a live job's parameters
    # are resident. Touch them first so that the import is timed as in a live job, and report the first touch apart.
    dist.barrier()
    t0 = time.perf_counter()
    with torch.no_grad():
        for c in chunks:
            for p in c.parameters():
                p.zero_()
    t_touch = time.perf_counter() - t0
    dist.barrier()
    before = _rss()["VmRSS"]
    reset_ok = _reset_peak()
    t0 = time.perf_counter()
    bridge.load_hf_weights(chunks, show_progress=False)
    dist.barrier()
    t_import = time.perf_counter() - t0
    peak_import = _rss()["VmHWM"] if reset_ok else None

    # export without writing: the conversion and the collectives only
    t0 = time.perf_counter()
    n = 0
    for _, tensor in bridge.export_hf_weights(chunks, bucket_bytes=bucket_bytes, show_progress=False):
        n += tensor.numel() * tensor.element_size()
    dist.barrier()
    t_export_nowrite = time.perf_counter() - t0

    _reset_peak()
    before_export = _rss()["VmRSS"]
    t0 = time.perf_counter()
    bridge.save_hf_pretrained(chunks, out_dir, bucket_bytes=bucket_bytes, show_progress=False, fsync=fsync)
    dist.barrier()
    t_export = time.perf_counter() - t0
    peak_export = _rss()["VmHWM"] if reset_ok else None
    destroy_parallel()
    return {"rank": rank, "import_s": t_import, "touch_s": t_touch, "rss_pre_model": pre_model, "export_nowrite_s": t_export_nowrite, "export_s": t_export,
            "rss_before_import": before, "peak_import": peak_import, "rss_before_export": before_export,
            "peak_export": peak_export, "model_bytes_rank": model_bytes, "exported_bytes": n}


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
    args = ap.parse_args(argv)

    tmp = args.dir or tempfile.mkdtemp(prefix="bench_convert_")
    ckpt = os.path.join(tmp, "hf")
    t0 = time.perf_counter()
    info = make_checkpoint(ckpt, args.layers)
    print(f"checkpoint: {info['params'] / 1e9:.2f} B parameters, {info['bytes'] / GiB:.2f} GiB bf16, largest tensor "
          f"{info['largest_bytes'] / 2**20:.0f} MiB, made in {time.perf_counter() - t0:.1f} s ({tmp})")
    read_files_once(ckpt)  # warm the page cache: every figure below reads from memory
    t_read = min(read_files_once(ckpt) for _ in range(2))
    gb = info["bytes"] / 1e9
    print(f"read the checkpoint files once (page cache warm): {t_read:.2f} s, {gb / t_read:.2f} GB/s")
    header = (f"{'layout':>8} {'import s':>9} {'GB/s':>6} {'x read':>7} {'export s':>9} {'no-write s':>10} "
              f"{'peak RSS/rank':>14} {'- pre-model':>11} {'model/world+largest':>20} {'exact':>6}")
    print(header)
    print("-" * len(header))
    for layout in args.layouts.split(","):
        tp, pp = (int(x) for x in layout.lower().split("x"))
        out = os.path.join(tmp, f"out_{tp}x{pp}")
        res = spawn_local(_worker, tp * pp, (ckpt, out, tp, pp, args.bucket_mib * 2**20, not args.no_fsync),
                          timeout=3600)
        t_imp = max(r["import_s"] for r in res)
        t_touch = max(r["touch_s"] for r in res)
        t_exp = max(r["export_s"] for r in res)
        t_nw = max(r["export_nowrite_s"] for r in res)
        peak = max((r["peak_import"] or 0) for r in res)
        above = max((r["peak_import"] or 0) - r["rss_pre_model"] for r in res)
        bound = info["bytes"] / (tp * pp) + info["largest_bytes"]
        ok = "-" if args.no_verify else ("yes" if verify(ckpt, out) else "NO")
        print(f"{layout:>8} {t_imp:9.2f} {gb / t_imp:6.2f} {t_imp / t_read:7.2f} {t_exp:9.2f} {t_nw:10.2f} "
              f"{peak / GiB:12.2f} G {above / GiB:9.2f} G {bound / GiB:18.2f} G {ok:>6}")
        exp_peak = max((r["peak_export"] or 0) - r["rss_before_export"] for r in res)
        print(f"{'':>8} first touch of the freshly allocated parameters (not in 'import s'): {t_touch:.2f} s")
        print(f"{'':>8} export (with the write): peak RSS above the resident model, max over ranks "
              f"{exp_peak / GiB:.2f} GiB (bucket {args.bucket_mib} MiB); "
              f"rank-0 export {info['bytes'] / 1e9 / t_exp:.2f} GB/s with the write, {gb / t_nw:.2f} GB/s without")
        shutil.rmtree(out, ignore_errors=True)
    if not args.dir:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
