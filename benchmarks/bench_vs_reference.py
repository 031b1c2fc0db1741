"""Like-for-like comparison with NVIDIA Megatron Bridge: one checkpoint, both converters back to back in one run.

A TinyLlama-1.1B-shaped bf16 checkpoint (random weights, fixed seed; ``bench_convert.make_checkpoint``) is imported
into megatron-core GPTModel chunks and exported back to safetensors at each TP size, by this package and by each
Megatron Bridge reference: 0.3.1 on megatron-core 0.16.1 (``--mb-python``) and 0.6.2 on megatron-core 0.19.2
(``--mb062-python``), each in its own environment, set up and patched for a CPU-only machine as
``benchmarks/bench_reference.py``'s docstring describes (that script runs as a subprocess of each interpreter);
``--references`` picks which. This package runs in the interpreter that runs this script (its environment's
megatron-core: run it from ``.venv-mcore-0.19.2`` to compare with 0.6.2 on the same megatron-core). All sides convert
the same files in the same run, alternating, and are timed over the same regions:

* import: the model is built without weights first (not timed) and its parameters are left untouched, as
  ``to_megatron_model(load_weights=True)`` gives a user: the timed weight load includes the first touch of the
  parameters' fresh memory on both sides; between two barriers, slowest rank;
* export: writing the HF checkpoint (safetensors + config.json) between two barriers, with the same flush policy on
  both sides: ``--flush fsync`` (default) = every written file is on disk when the timer stops (this package's writer
  fsyncs each shard; for Megatron Bridge, which does not, its rank 0 fsyncs every file it wrote inside the timed
  region), ``--flush none`` = both leave the flush to the OS.

Printed next to them, measured in the same run: reading the checkpoint files once (page cache warm), a plain
sequential write of the same bytes (with the same flush policy), the first touch of the per-rank parameter bytes
(``torch.empty`` + one write per page: the floor of any import into untouched parameters), and peak RSS per rank.
Both exports are checked bit-exact against the source (Megatron Bridge writes the local-spec norms as fp32: values
compared in the source dtype).

    python benchmarks/bench_vs_reference.py                    # 22 layers (~1.1B), TP 1 and 2, fsync
    python benchmarks/bench_vs_reference.py --layers 4 --tps 2 --flush none
    sudo python benchmarks/bench_vs_reference.py --drop-caches   # the README's numbers (see drop_page_cache)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any, Dict, List, Optional

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))
sys.path.insert(0, HERE)

from _memio import DROP_CACHES, drop_page_cache, read_files_once, reset_peak, rss  # noqa: E402
from bench_convert import make_checkpoint  # noqa: E402

GiB = 1024**3
DEFAULT_MB_PYTHON = "/work/venv-mb/bin/python"
DEFAULT_MB062_PYTHON = "/work/venv-mb062/bin/python"
#: reference name -> (label, command-line option of its interpreter)
REFERENCES = {"0.3.1": ("Megatron Bridge 0.3.1", "mb_python"), "0.6.2": ("Megatron Bridge 0.6.2", "mb062_python")}


def plain_write(path: str, nbytes: int, fsync: bool, chunk: int = 256 * 2**20) -> float:
    """Seconds to write ``nbytes`` sequentially into one file (from a resident buffer), flushed when ``fsync``."""
    buf = memoryview(bytearray(os.urandom(1 << 20)) * (chunk >> 20))
    t0 = time.perf_counter()
    with open(path, "wb", buffering=0) as f:
        left = nbytes
        while left > 0:
            left -= f.write(buf[:min(chunk, left)])
        if fsync:
            os.fsync(f.fileno())
    t = time.perf_counter() - t0
    os.remove(path)
    return t


def first_touch(nbytes: int, threads: int) -> float:
    """Seconds to allocate ``nbytes`` with torch.empty and touch every page once (as many threads as a rank)."""
    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    x = torch.empty(nbytes, dtype=torch.uint8)
    x[::4096] = 1
    t = time.perf_counter() - t0
    del x
    return t


def _our_rank(rank: int, world: int, ckpt: str, out: str, tp: int, fsync: bool) -> Dict[str, Any]:
    from megatron_bridge_ext.mcore.cpu_compat import apply_cpu_patches

    apply_cpu_patches()
    import torch.distributed as dist

    from megatron_bridge_ext.auto_bridge import AutoBridge
    from megatron_bridge_ext.mcore.model_builder import destroy_parallel, init_parallel

    init_parallel(tp=tp, pp=1)
    bridge = AutoBridge.from_hf_pretrained(ckpt)
    chunks = bridge.to_megatron_model(load_weights=False, params_dtype=torch.bfloat16, bf16=True)
    model_bytes = sum(p.numel() * p.element_size() for c in chunks for p in c.parameters())
    dist.barrier()
    reset_ok = reset_peak()
    t0 = time.perf_counter()
    bridge.load_hf_weights(chunks, show_progress=False)  # into untouched parameters
    dist.barrier()
    t_import = time.perf_counter() - t0
    peak = rss()["VmHWM"] if reset_ok else None
    dist.barrier()
    t0 = time.perf_counter()
    bridge.save_hf_pretrained(chunks, out, show_progress=False, fsync=fsync)
    dist.barrier()
    t_export = time.perf_counter() - t0
    destroy_parallel()
    return {"rank": rank, "import_s": t_import, "export_s": t_export, "peak_rss": peak, "model_bytes": model_bytes}


def run_ours(ckpt: str, out: str, tp: int, fsync: bool, threads: int) -> Dict[str, Any]:
    from megatron_bridge_ext.launch import spawn_local

    res = spawn_local(_our_rank, tp, (ckpt, out, tp, fsync), timeout=3600, threads=threads)
    return {"import_s": max(r["import_s"] for r in res), "export_s": max(r["export_s"] for r in res),
            "peak_rss": max(r["peak_rss"] or 0 for r in res), "model_bytes": max(r["model_bytes"] for r in res)}


def run_reference(mb_python: str, ckpt: str, out: str, tp: int, fsync: bool, threads: int) -> Dict[str, Any]:
    cmd = [mb_python, os.path.join(HERE, "bench_reference.py"), ckpt, "--tp", str(tp), "--out", out, "--no-verify",
           "--flush", "fsync" if fsync else "none", "--threads", str(threads)]
    env = {**os.environ, "GLOO_SOCKET_IFNAME": os.environ.get("GLOO_SOCKET_IFNAME", "lo")}
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=7200)
    if res.returncode != 0:
        raise RuntimeError(f"Megatron Bridge run failed (rc {res.returncode}):\n{res.stdout[-3000:]}\n"
                           f"{res.stderr[-3000:]}")
    line = next(ln for ln in reversed(res.stdout.splitlines()) if ln.startswith("{"))
    return json.loads(line)


def _median_ratio(num: List[Dict[str, Any]], den: List[Dict[str, Any]], key: str) -> float:
    """Median over the repeats of ``num[i][key] / den[i][key]`` (two sides paired within each repeat)."""
    return statistics.median(b[key] / a[key] for a, b in zip(den, num))


def _median_run(runs: List[Dict[str, Any]]) -> Dict[str, Any]:
    """Per field, the median over the runs (exact only if every run was exact)."""
    out = {k: statistics.median(r[k] for r in runs) for k in ("import_s", "export_s")}
    peaks = [r["peak_rss"] for r in runs if r.get("peak_rss")]
    out["peak_rss"] = max(peaks) if peaks else None
    out["exact"] = all(r["exact"] for r in runs)
    return out


def verify(src: str, dst: str) -> bool:
    """Same keys, and every tensor equal to the source's in the source dtype."""
    from megatron_bridge_ext.io import SafeTensorsSource

    with SafeTensorsSource(src) as a, SafeTensorsSource(dst) as b:
        if set(a.keys()) != set(b.keys()):
            return False
        return all(a[k].shape == b[k].shape and torch.equal(a[k], b[k].to(a[k].dtype)) for k in a.keys())


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, default=22, help="decoder layers (22: ~1.1B parameters)")
    ap.add_argument("--tps", default="1,2", help="comma-separated TP sizes (world = TP)")
    ap.add_argument("--flush", choices=["fsync", "none"], default="fsync")
    ap.add_argument("--mb-python", default=DEFAULT_MB_PYTHON,
                    help="interpreter of the Megatron Bridge 0.3.1 environment (megatron-core 0.16.1)")
    ap.add_argument("--mb062-python", default=DEFAULT_MB062_PYTHON,
                    help="interpreter of the Megatron Bridge 0.6.2 environment (megatron-core 0.19.2)")
    ap.add_argument("--references", default="0.3.1,0.6.2",
                    help=f"comma-separated Megatron Bridge references to run ({', '.join(REFERENCES)}), or 'none'")
    ap.add_argument("--dir", default=None, help="work directory (default: a temporary one)")
    ap.add_argument("--ours-only", action="store_true", help="skip Megatron Bridge (no ratios; = --references none)")
    ap.add_argument("--drop-caches", action="store_true",
                    help=f"before every measured run (each side, the plain write, the first touch): drop the page "
                         f"cache (root: {DROP_CACHES}) and re-read the checkpoint, so that every run starts from the "
                         "same memory state")
    ap.add_argument("--repeat", type=int, default=3,
                    help="runs of each side per TP size, alternating (medians printed; first-touch and disk costs "
                         "of a virtual machine vary from run to run)")
    args = ap.parse_args(argv)
    fsync = args.flush == "fsync"
    names = [] if args.ours_only or args.references == "none" else [r for r in args.references.split(",") if r]
    refs: Dict[str, str] = {}  # label -> interpreter
    for name in names:
        if name not in REFERENCES:
            ap.error(f"--references: unknown reference {name!r} (known: {', '.join(REFERENCES)})")
        label, option = REFERENCES[name]
        python = getattr(args, option)
        if not os.path.isfile(python):
            ap.error(f"--{option.replace('_', '-')} {python!r} does not exist: set up the {label} environment as "
                     "benchmarks/bench_reference.py's docstring says, or leave it out with --references")
        refs[label] = python

    tmp = args.dir or tempfile.mkdtemp(prefix="bench_vs_reference_")
    ckpt = os.path.join(tmp, "hf")
    if not os.path.isfile(os.path.join(ckpt, "config.json")):
        info = make_checkpoint(ckpt, args.layers)
    else:
        from megatron_bridge_ext.io import SafeTensorsSource

        with SafeTensorsSource(ckpt) as s:
            info = {"bytes": s.total_size, "largest_bytes": max(s.nbytes(k) for k in s.keys()),
                    "params": s.total_size // 2}
    gb = info["bytes"] / 1e9
    read_files_once(ckpt)
    t_read = min(read_files_once(ckpt) for _ in range(2))
    print(f"checkpoint: {info['params'] / 1e9:.2f} B parameters, {info['bytes'] / GiB:.2f} GiB bf16 ({tmp}); "
          f"flush policy: {args.flush}; page cache dropped before each run: {'yes' if args.drop_caches else 'no'}")
    print(f"plain read of the files (page cache warm): {t_read:.2f} s ({gb / t_read:.2f} GB/s)")
    rows = []
    cores = os.cpu_count() or 1
    for tp in (int(x) for x in args.tps.split(",")):
        threads = max(1, cores // tp)  # both sides: the machine's cores shared by the ranks
        runs: Dict[str, List[Dict[str, Any]]] = {"ours": [], **{label: [] for label in refs}}
        touches, writes = [], []
        def settle() -> None:
            if args.drop_caches:
                drop_page_cache(ckpt)

        for _ in range(args.repeat):
            settle()
            touches.append(first_touch(info["bytes"] // tp, threads))
            settle()
            writes.append(plain_write(os.path.join(tmp, "plain.bin"), info["bytes"], fsync))
            out = os.path.join(tmp, f"ours_tp{tp}")
            settle()
            r = run_ours(ckpt, out, tp, fsync, threads)
            r["write_s"] = writes[-1]
            r["exact"] = verify(ckpt, out)
            shutil.rmtree(out, ignore_errors=True)
            runs["ours"].append(r)
            for i, (label, python) in enumerate(refs.items()):
                out = os.path.join(tmp, f"mb{i}_tp{tp}")
                settle()
                r = run_reference(python, ckpt, out, tp, fsync, threads)
                r["write_s"] = writes[-1]
                r["exact"] = verify(ckpt, out)
                shutil.rmtree(out, ignore_errors=True)
                runs[label].append(r)
        rows.append((tp, threads, statistics.median(touches), statistics.median(writes), runs))

    print()
    sides = ["ours", *refs]
    short = {label: label.replace("Megatron Bridge ", "MB ") for label in refs}
    ratio_cols = "".join(f" {'x ' + short[label]:>9}" for label in refs)
    head = (f"{'TP':>3} {'side':>22} {'import s':>9}{ratio_cols} {'export s':>9}{ratio_cols} {'x write':>8} "
            f"{'peak RSS/rank':>14} {'exact':>6}")
    print(head)
    print("-" * len(head))
    for tp, threads, t_touch, t_write, runs in rows:
        for side in sides:
            r = _median_run(runs[side])
            # ratios paired within each repeat (every side and the plain write ran back to back), then the median:
            # "x MB 0.6.2" = that reference's time / this side's time
            xi = "".join(f" {_median_ratio(runs[label], runs[side], 'import_s'):9.2f}" for label in refs)
            xe = "".join(f" {_median_ratio(runs[label], runs[side], 'export_s'):9.2f}" for label in refs)
            xw = statistics.median(a["export_s"] / a["write_s"] for a in runs[side])
            peak = f"{r['peak_rss'] / GiB:12.2f} G" if r.get("peak_rss") else f"{'-':>14}"
            name = "megatron_bridge_ext" if side == "ours" else side
            print(f"{tp:>3} {name:>22} {r['import_s']:9.2f}{xi} {r['export_s']:9.2f}{xe} "
                  f"{xw:8.2f} {peak} {'yes' if r['exact'] else 'NO':>6}")
        bound = info["bytes"] / tp + info["largest_bytes"]
        print(f"{'':>3} {threads} thread(s) per rank; first touch of {info['bytes'] / tp / GiB:.2f} GiB (the parameters "
              f"of a rank): {t_touch:.2f} s; plain write of the checkpoint's bytes ({args.flush}): {t_write:.2f} s; "
              f"import memory bound model/world + largest tensor {bound / GiB:.2f} GiB")
    import megatron.core

    print(f"this package on megatron-core {megatron.core.__version__}; references: "
          + (", ".join(f"{label} ({python})" for label, python in refs.items()) or "none"))
    print(f"times: medians of {args.repeat} alternating runs per side; x MB <v>: median over the repeats of that "
          "reference's time / this side's time in the same repeat; x write: median over the repeats of the export "
          "time / the plain write's time just before it")
    print(json.dumps({"read_s": t_read, "flush": args.flush, "rows": [
        {"tp": tp, "threads": th, "first_touch_s": t, "write_s": w, "runs": runs} for tp, th, t, w, runs
        in rows]}))
    if not args.dir:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
