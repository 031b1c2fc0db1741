"""The streamed converter (``import`` / ``export`` without a model) against the floor of any converter: reading the
source files once plus writing the same bytes once with fsync, all measured in the same run, page cache dropped
before every step (``--drop-caches``, needs root), as a user runs the commands.

For each checkpoint:

* ``read``: every source file read once, cold (sequentially, one reused buffer);
* ``write``: the same number of bytes written to one new file with fsync;
* ``import``: ``python -m megatron_bridge_ext import HF OUT`` (streamed, ``--ranks N`` for N = ``--ranks``), wall
  clock from the command's start to its exit (every file fsynced, the checkpoint renamed into place); the CLI's own
  conversion time is reported apart, the rest being start-up (interpreter, imports);
* ``import --via-model``: the model path at TP1 (the previous default), same measurement;
* ``export``: ``export OUT HF2`` (streamed) and ``export OUT HF3 --via-model``, same measurement;
* peak RSS: the largest resident set of any process of the command (``getrusage`` of its waited-for children);
* with ``--mb-python PATH`` (a Megatron Bridge environment: 0.6.2's or 0.3.1's, whose versions, read from it, are
  printed, put in the labels and recorded), after ours and on the same source: NVIDIA Megatron Bridge's own offline
  conversion, ``AutoBridge.import_ckpt`` (HF -> megatron-core ``torch_dist`` checkpoint) and
  ``AutoBridge.export_ckpt`` (-> HF), each a fresh process of ``benchmarks/bench_mb_ckpt.py`` (one rank, gloo, every
  written file fsynced before it exits; its docstring says which CPU shims it needs), measured the same way, page
  cache dropped before each with ``--drop-caches``; then the ratios ours / Megatron Bridge (wall and conversion
  alone) and Megatron Bridge's round trip checked per tensor against the source (not timed).

Ratios: each command's time / (read + write) of the same run; the start-up-free ratio uses the CLI's own time.

    sudo python benchmarks/bench_stream.py --drop-caches                    # 1.1B Llama, 1 / 2 / 4 ranks
    sudo python benchmarks/bench_stream.py --drop-caches --model qwen3-235b-slice --layers 4 --no-via-model
    sudo python benchmarks/bench_stream.py --drop-caches --mb-python /work/venv-mb062/bin/python  # + Megatron Bridge
    sudo python benchmarks/bench_stream.py --drop-caches --mb-python /work/venv-mb031/bin/python  # + its 0.3.1
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Any, Dict, List, Optional

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))
sys.path.insert(0, HERE)

from _memio import DROP_CACHES, drop_page_cache  # noqa: E402

GiB = 1024**3

_RUN = r"""
import json, resource, subprocess, sys, time
t = time.perf_counter()
p = subprocess.run(sys.argv[1:], capture_output=True, text=True)
wall = time.perf_counter() - t
print(json.dumps({"rc": p.returncode, "wall": wall, "maxrss_kib": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss,
                  "out": p.stdout[-3000:], "err": p.stderr[-3000:]}))
"""


def run_cmd(cmd: List[str], env: Optional[Dict[str, str]] = None) -> Dict[str, Any]:
    """One command in a fresh wrapper process: wall clock and the peak RSS of its processes."""
    r = subprocess.run([sys.executable, "-c", _RUN, *cmd], capture_output=True, text=True, env=env)
    res = json.loads(r.stdout.strip().splitlines()[-1])
    if res["rc"] != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{res['out']}\n{res['err']}")
    res["peak_rss"] = res["maxrss_kib"] * 1024
    return res


def run_cli(args: List[str]) -> Dict[str, Any]:
    """One CLI command (``python -m megatron_bridge_ext ARGS``), see :func:`run_cmd`."""
    return run_cmd([sys.executable, "-m", "megatron_bridge_ext", *args])


def cold_read(path: str) -> float:
    files = []
    for root, _, names in os.walk(path):
        files += [os.path.join(root, n) for n in names]
    buf = bytearray(64 << 20)
    t = time.perf_counter()
    for f in sorted(files):
        with open(f, "rb", buffering=0) as fh:
            while fh.readinto(buf):
                pass
    return time.perf_counter() - t


def plain_write(path: str, nbytes: int) -> float:
    chunk = bytearray(os.urandom(1 << 20)) * 64
    t = time.perf_counter()
    with open(path, "wb", buffering=0) as f:
        left = nbytes
        while left > 0:
            n = f.write(memoryview(chunk)[:min(left, len(chunk))])
            left -= n
        os.fsync(f.fileno())
    s = time.perf_counter() - t
    os.remove(path)
    return s


def direct_write(path: str, nbytes: int) -> Optional[float]:
    """The same bytes (to the 4 KiB below) written past the page cache (``O_DIRECT`` from one aligned 64 MiB buffer)
    with fsync, as the converter's writers write them (``io.direct_io``); None where the file system refuses
    ``O_DIRECT``."""
    import mmap

    chunk = mmap.mmap(-1, 64 << 20)
    chunk.write(os.urandom(1 << 20) * 64)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_DIRECT", 0), 0o644)
    except OSError:
        return None
    t = time.perf_counter()
    try:
        left = nbytes - nbytes % 4096
        while left > 0:
            left -= os.write(fd, memoryview(chunk)[:min(left, len(chunk))])
        os.fsync(fd)
    except OSError:
        return None
    finally:
        os.close(fd)
        os.remove(path)
    return time.perf_counter() - t


def dir_bytes(path: str, suffix: str = "") -> int:
    return sum(os.path.getsize(os.path.join(r, n)) for r, _, ns in os.walk(path) for n in ns if n.endswith(suffix))


def make_source(kind: str, path: str, layers: int) -> Dict[str, Any]:
    """A random bf16 checkpoint written in the HF layout (config.json + safetensors), tensor by tensor."""
    import torch

    from megatron_bridge_ext.io import SafeTensorsWriter

    if kind in ("llama-1b", "llama-tiny"):
        from bench_convert import hf_shapes, llama_config

        cfg = llama_config(layers)
        if kind == "llama-tiny":  # the same layout at toy sizes: for checking the commands, not for timings
            cfg.update({"vocab_size": 512, "hidden_size": 128, "intermediate_size": 352, "num_attention_heads": 8,
                        "num_key_value_heads": 2, "head_dim": 16, "max_position_embeddings": 256})
        shapes = hf_shapes(cfg)
    elif kind == "qwen3-235b-slice":
        cfg = {"architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe", "hidden_size": 4096,
               "intermediate_size": 12288, "moe_intermediate_size": 1536, "num_experts": 128,
               "num_experts_per_tok": 8, "num_hidden_layers": layers, "num_attention_heads": 64,
               "num_key_value_heads": 4, "head_dim": 128, "vocab_size": 151936, "rms_norm_eps": 1e-6,
               "rope_theta": 1000000.0, "max_position_embeddings": 40960, "tie_word_embeddings": False,
               "decoder_sparse_step": 1, "mlp_only_layers": [], "norm_topk_prob": True, "dtype": "bfloat16",
               "attention_bias": False, "hidden_act": "silu", "bos_token_id": 151643, "eos_token_id": 151645}
        h, f, e, v, nh, nkv, d = 4096, 1536, 128, 151936, 64, 4, 128
        shapes = {"model.embed_tokens.weight": (v, h), "model.norm.weight": (h,), "lm_head.weight": (v, h)}
        for i in range(layers):
            p = f"model.layers.{i}."
            shapes.update({p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,),
                           p + "self_attn.q_proj.weight": (nh * d, h), p + "self_attn.k_proj.weight": (nkv * d, h),
                           p + "self_attn.v_proj.weight": (nkv * d, h), p + "self_attn.o_proj.weight": (h, nh * d),
                           p + "self_attn.q_norm.weight": (d,), p + "self_attn.k_norm.weight": (d,),
                           p + "mlp.gate.weight": (e, h)})
            for x in range(e):
                q = f"{p}mlp.experts.{x}."
                shapes.update({q + "gate_proj.weight": (f, h), q + "up_proj.weight": (f, h),
                               q + "down_proj.weight": (h, f)})
    elif kind == "deepseek-v3-slice":
        from bench_quantized import _config, _shapes

        cfg = _config(256)  # one dense and one MoE layer of the release's 256 routed experts (+ the shared one)
        shapes = _shapes(256)
    else:
        raise ValueError(f"unknown model {kind!r}")
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "config.json"), "w") as fh:
        json.dump(cfg, fh, indent=2)
    g = torch.Generator().manual_seed(0)
    dtypes = {k: torch.float32 if k.endswith("e_score_correction_bias") else torch.bfloat16 for k in shapes}
    with SafeTensorsWriter(path, {k: (s, dtypes[k]) for k, s in shapes.items()}, max_shard_bytes=4 * GiB) as w:
        for k, s in shapes.items():
            t = torch.empty(s, dtype=dtypes[k])
            t.normal_(0, 0.02, generator=g) if len(s) > 1 else t.normal_(1.0, 0.1, generator=g)
            w.add(k, t)
    largest = max(int(torch.Size(s).numel()) * dtypes[k].itemsize for k, s in shapes.items())
    return {"bytes": dir_bytes(path, ".safetensors"), "tensors": len(shapes), "largest": largest}


def measure(label: str, args: List[str], drop: bool, floor: float) -> Dict[str, Any]:
    if drop:
        drop_page_cache(None)
    r = run_cli(args)
    line = next((ln for ln in r["out"].splitlines() if ln.startswith(("import:", "export:"))), "")
    inner = None
    if " in " in line:
        try:
            inner = float(line.split(" in ")[1].split(" s ")[0])
        except ValueError:
            inner = None
    out = {"label": label, "wall_s": r["wall"], "cli_s": inner, "peak_rss": r["peak_rss"],
           "x_floor": r["wall"] / floor, "x_floor_no_startup": (inner / floor) if inner else None}
    print(f"  {label:34s} {r['wall']:7.2f} s  (conversion {inner if inner is not None else float('nan'):6.2f} s, "
          f"start-up {r['wall'] - (inner or 0):5.2f} s)  {out['x_floor']:.2f}x read+write  "
          f"{(out['x_floor_no_startup'] or float('nan')):.2f}x without start-up  peak RSS "
          f"{r['peak_rss'] / GiB:.2f} GiB", flush=True)
    return out


MB_SCRIPT = os.path.join(HERE, "bench_mb_ckpt.py")


def _mb_env() -> Dict[str, str]:
    env = dict(os.environ)
    env.setdefault("GLOO_SOCKET_IFNAME", "lo")
    env.pop("PYTHONPATH", None)  # Megatron Bridge's environment sees none of this project
    return env


def measure_mb(label: str, mb_python: str, args: List[str], drop: bool, floor: float) -> Dict[str, Any]:
    """One ``bench_mb_ckpt.py`` command (Megatron Bridge's import_ckpt / export_ckpt) measured like :func:`measure`:
    a fresh process, wall clock from its start to its exit (every written file fsynced inside)."""
    if drop:
        drop_page_cache(None)
    r = run_cmd([mb_python, MB_SCRIPT, *args], env=_mb_env())
    inner = json.loads(r["out"].strip().splitlines()[-1])["convert_s"]
    out = {"label": label, "wall_s": r["wall"], "cli_s": inner, "peak_rss": r["peak_rss"],
           "x_floor": r["wall"] / floor, "x_floor_no_startup": inner / floor}
    print(f"  {label:34s} {r['wall']:7.2f} s  (conversion {inner:6.2f} s, start-up {r['wall'] - inner:5.2f} s)  "
          f"{out['x_floor']:.2f}x read+write  {out['x_floor_no_startup']:.2f}x without start-up  peak RSS "
          f"{r['peak_rss'] / GiB:.2f} GiB", flush=True)
    return out


def mb_versions(mb_python: str) -> Dict[str, Optional[str]]:
    """Megatron Bridge's, megatron-core's, transformers' and torch's versions in the ``--mb-python`` environment (not
    timed)."""
    r = subprocess.run([mb_python, MB_SCRIPT, "versions"], capture_output=True, text=True, env=_mb_env())
    if r.returncode != 0:
        raise RuntimeError(f"bench_mb_ckpt.py versions failed:\n{r.stdout}\n{r.stderr}")
    res = json.loads(r.stdout.strip().splitlines()[-1])
    return {k: res[k] for k in ("megatron-bridge", "megatron-core", "transformers", "torch")}


def _ratio_line(ours: Dict[str, Any], mb: Dict[str, Any]) -> str:
    return (f"    {ours['label']} / {mb['label']}: wall {ours['wall_s'] / mb['wall_s']:.3f}x, "
            f"conversion {(ours['cli_s'] or float('nan')) / mb['cli_s']:.3f}x")


def run_mb(a: Any, src: str, work: str, run: Dict[str, Any], floor: float) -> None:
    """Megatron Bridge's offline import_ckpt / export_ckpt on the same source, after ours; ratios ours / MB."""
    versions = mb_versions(a.mb_python)
    name = f"Megatron Bridge {versions['megatron-bridge']}"
    print(f"  {name} on megatron-core {versions['megatron-core']}, transformers {versions['transformers']}, torch "
          f"{versions['torch']} ({a.mb_python})", flush=True)
    meg = os.path.join(work, "mb_meg")
    shutil.rmtree(meg, ignore_errors=True)
    imp = measure_mb(f"{name} import_ckpt", a.mb_python, ["import", src, meg, "--no-tokenizer"],
                     a.drop_caches, floor)
    run["steps"].append(imp)
    mb = {"versions": versions, "import": imp, "megatron_bytes": dir_bytes(meg)}
    for step in run["steps"]:
        if step["label"].startswith("import"):
            print(_ratio_line(step, imp), flush=True)
    if not a.no_export:
        hf2 = os.path.join(work, "mb_hf2")
        shutil.rmtree(hf2, ignore_errors=True)
        exp = measure_mb(f"{name} export_ckpt", a.mb_python,
                         ["export", meg, hf2, "--hf", src, "--no-tokenizer"], a.drop_caches, floor)
        run["steps"].append(exp)
        mb["export"] = exp
        for step in run["steps"]:
            if step["label"].startswith("export"):
                print(_ratio_line(step, exp), flush=True)
        v = subprocess.run([a.mb_python, MB_SCRIPT, "verify", src, hf2], capture_output=True, text=True,
                           env=_mb_env())
        if v.returncode not in (0, 2):
            raise RuntimeError(f"bench_mb_ckpt.py verify failed:\n{v.stdout}\n{v.stderr}")
        res = json.loads(v.stdout.strip().splitlines()[-1])
        print(f"    {name} round trip exact (torch.equal per tensor in the source dtype): {res['exact']}; "
              f"missing/extra {res['missing'][:4]}, differing {res['values'][:4]}; same values in another dtype: "
              f"{len(res['dtype_only'])} {res['dtype_only'][:4]}", flush=True)
        mb["roundtrip"] = res
        shutil.rmtree(hf2, ignore_errors=True)
    shutil.rmtree(meg, ignore_errors=True)
    run["mb"] = mb


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="llama-1b",
                    choices=["llama-1b", "llama-tiny", "qwen3-235b-slice", "deepseek-v3-slice"],
                    help="llama-tiny: toy sizes, to check the commands (not for timings)")
    ap.add_argument("--layers", type=int, default=None,
                    help="decoder layers (llama-1b: 22, llama-tiny: 2, the Qwen3 slice: 4; the DeepSeek-V3 slice: 2)")
    ap.add_argument("--ranks", default="1,2,4", help="comma-separated rank counts of the streamed import")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--no-via-model", action="store_true", help="skip the model path (memory: the whole model)")
    ap.add_argument("--no-export", action="store_true")
    ap.add_argument("--drop-caches", action="store_true", help=f"drop the page cache before each step ({DROP_CACHES})")
    ap.add_argument("--dir", default=None, help="working directory (default: a temporary one, removed)")
    ap.add_argument("--json", default=None, help="write the results here")
    ap.add_argument("--digest-source", action="store_true",
                    help="before the export, keep only each source tensor's SHA-256 and remove the source files (a "
                         "disk that holds two copies of the model, not three); the export is compared by digest")
    ap.add_argument("--mb-python", default=None, metavar="PATH",
                    help="Megatron Bridge's Python (e.g. /work/venv-mb062/bin/python): after ours, time its "
                         "AutoBridge.import_ckpt / export_ckpt on the same files (benchmarks/bench_mb_ckpt.py)")
    a = ap.parse_args(argv)
    if a.digest_source and (a.repeats != 1 or a.mb_python):
        ap.error("--digest-source removes the source after the first export: use it with --repeats 1 and without "
                 "--mb-python")
    if a.mb_python and a.model in ("qwen3-235b-slice", "deepseek-v3-slice"):
        ap.error("--mb-python: the Megatron Bridge comparison runs the Llama checkpoints only")
    layers = a.layers or {"llama-1b": 22, "llama-tiny": 2, "qwen3-235b-slice": 4, "deepseek-v3-slice": 2}[a.model]
    work = a.dir or tempfile.mkdtemp(prefix="bench_stream_")
    os.makedirs(work, exist_ok=True)
    results: Dict[str, Any] = {"model": a.model, "layers": layers, "runs": []}
    try:
        src = os.path.join(work, "hf")
        t = time.perf_counter()
        info = make_source(a.model, src, layers)
        print(f"{a.model}, {layers} layers: {info['tensors']} tensors, {info['bytes'] / GiB:.2f} GiB bf16, largest "
              f"tensor {info['largest'] / 2**20:.0f} MiB (made in {time.perf_counter() - t:.0f} s, {src})", flush=True)
        results.update(info)
        for rep in range(a.repeats):
            if a.drop_caches:
                drop_page_cache(None)
            read_s = cold_read(src)
            if a.drop_caches:
                drop_page_cache(None)
            write_s = plain_write(os.path.join(work, "plain.bin"), info["bytes"])
            floor = read_s + write_s
            if a.drop_caches:
                drop_page_cache(None)
            direct_s = direct_write(os.path.join(work, "direct.bin"), info["bytes"])
            print(f"repeat {rep + 1}: read {read_s:.2f} s + write with fsync {write_s:.2f} s = {floor:.2f} s"
                  + ("" if direct_s is None else f"  (the same bytes written with O_DIRECT + fsync: {direct_s:.2f} s; "
                     f"read + that = {read_s + direct_s:.2f} s)"), flush=True)
            run = {"read_s": read_s, "write_s": write_s, "direct_write_s": direct_s, "steps": []}
            out = os.path.join(work, "meg")
            for n in [int(x) for x in a.ranks.split(",")]:
                shutil.rmtree(out, ignore_errors=True)
                run["steps"].append({**measure(f"import (stream, {n} rank{'s' if n > 1 else ''})",
                                               ["import", src, out, "--quiet", "--ranks", str(n)],
                                               a.drop_caches, floor), "ranks": n})
            if not a.no_via_model:
                via = os.path.join(work, "meg_model")
                shutil.rmtree(via, ignore_errors=True)
                run["steps"].append(measure("import --via-model (TP1)", ["import", src, via, "--quiet",
                                                                          "--via-model"], a.drop_caches, floor))
                shutil.rmtree(via, ignore_errors=True)
            if not a.no_export:
                hf2 = os.path.join(work, "hf2")
                shutil.rmtree(hf2, ignore_errors=True)
                digests = None
                if a.digest_source:
                    digests = tensor_digests(src)
                    shutil.rmtree(src)
                run["steps"].append(measure("export (stream)", ["export", out, hf2, "--quiet"], a.drop_caches,
                                            floor))
                exact = _same(src, hf2) if digests is None else _same_digests(digests, hf2)
                if isinstance(exact, list):
                    print(f"    export bit-exact to the source in values; {len(exact)} tensor(s) in the Megatron "
                          f"parameter's dtype: {exact[:4]}", flush=True)
                else:
                    print(f"    export bit-exact to the source: {exact}", flush=True)
                run["export_exact"] = exact
                shutil.rmtree(hf2, ignore_errors=True)
                if not a.no_via_model:
                    run["steps"].append(measure("export --via-model (TP1)", ["export", out, hf2, "--quiet",
                                                                             "--via-model"], a.drop_caches,
                                                floor))
                    shutil.rmtree(hf2, ignore_errors=True)
            if a.mb_python:
                run_mb(a, src, work, run, floor)
            results["runs"].append(run)
        print("bound: peak RSS <= 1 GiB + the largest tensor = "
              f"{(GiB + info['largest']) / GiB:.2f} GiB (the streamed steps)")
        if a.json:
            with open(a.json, "w") as fh:
                json.dump(results, fh, indent=2)
    finally:
        if a.dir is None:
            shutil.rmtree(work, ignore_errors=True)
    return 0


def tensor_digests(path: str) -> Dict[str, Any]:
    """``{name: (dtype, shape, SHA-256 of the bytes)}`` of every tensor of an HF checkpoint."""
    from megatron_bridge_ext.io import SafeTensorsSource

    out = {}
    with SafeTensorsSource(path) as src:
        for k in src.keys():
            t = src[k]
            out[k] = (str(t.dtype), tuple(t.shape), hashlib_digest(t))
            src.release(k)
    return out


def _same_digests(digests: Dict[str, Any], path: str) -> Any:
    """True when the HF checkpoint ``path`` has exactly the digested tensors; where only a dtype differs and the
    values convert both ways exactly (an export without its source keeps a parameter's dtype, e.g. DeepSeek-V3's
    fp32 router), the list of those tensors instead (the values are the same)."""
    import torch

    from megatron_bridge_ext.io import SafeTensorsSource

    got = tensor_digests(path)
    if set(got) != set(digests):
        return False
    recast = []
    with SafeTensorsSource(path) as out:
        for k, (dtype, shape, digest) in digests.items():
            if got[k] == (dtype, shape, digest):
                continue
            t = out[k]
            want = getattr(torch, dtype.replace("torch.", ""))
            if tuple(t.shape) != tuple(shape) or got[k][0] == dtype:
                return False
            cast = t.to(want)
            if not torch.equal(cast.to(t.dtype), t) or hashlib_digest(cast) != digest:
                return False
            recast.append(f"{k} ({dtype} -> {got[k][0]})")
    return True if not recast else recast


def hashlib_digest(t: Any) -> str:
    import hashlib

    import torch

    return hashlib.sha256(t.contiguous().view(-1).view(torch.uint8).numpy()).hexdigest()


def _same(a: str, b: str) -> bool:
    from megatron_bridge_ext.testing.parity import compare_checkpoints

    return bool(compare_checkpoints(a, b)["bit_exact"])


if __name__ == "__main__":
    sys.exit(main())
