"""MoE conversion benchmark: a Qwen3-30B-A3B-shaped bf16 checkpoint cut to a few layers (128 experts of
moe_intermediate_size 768, hidden 2048, 32 heads / 4 kv heads of 128, vocabulary 151936; one tensor per expert, as on
the Hub), made on the fly, imported into megatron-core GPTModel chunks and exported back at EP 2 and EP 4, by this
package and by NVIDIA Megatron Bridge on the same files in the same run.

Both sides are measured the same way, in local gloo worlds of EP ranks (TP = PP = 1, sequential experts, the
all-gather dispatcher, bf16):

* the model is built without weights first (not timed) and its parameters are left untouched, as megatron allocates
  them (``perform_initialization=False``): both imports include the first touch of the parameters;
* ``import`` = the weight load (``AutoBridge.load_hf_weights``) between two barriers, the maximum over ranks;
* ``export (no write)`` = draining the export generator (every rank iterates it) by a consumer that uses each tensor
  at once (this package: ``copy=False``, which hands out views where an HF tensor is a slice of Megatron memory
  instead of a clone per tensor; Megatron Bridge has no such mode), ``export`` = writing the HF
  checkpoint (safetensors and config.json); both sides leave the flush of the written files to the OS (Megatron
  Bridge does not fsync; this package runs with ``fsync=False`` here);
* peak RSS per rank (``VmHWM`` after a reset, max over ranks) during the import, absolute and above the rank's RSS
  before its model existed, next to ``model bytes / world + largest tensor``.

Megatron Bridge runs in its own environment: 0.3.1 on megatron-core 0.16.1 (``--mb-python``, default
``/work/venv-mb/bin/python``) and 0.6.2 on megatron-core 0.19.2 (``--mb062-python``, default
``/work/venv-mb062/bin/python``), each set up and patched for a CPU-only machine as ``benchmarks/bench_reference.py``'s
docstring describes; ``--references`` picks which. This script reuses that script's patches and runs each reference
side as a subprocess with its interpreter; this package runs in the interpreter that runs this script. Every export
is compared with the source (``torch.equal`` in the source dtype; Megatron Bridge writes the local-spec norms' fp32
dtype).

One more Megatron Bridge method is wrapped (``_sequential_expert_export_patch``, applied to both versions; 0.6.2
reads the expert index from either spelling, so there it changes nothing): 0.3.1's
``MegatronParamMapping.gather_from_ep_ranks`` reads the expert index from the digits after ``.weight`` (grouped-GEMM
names, ``linear_fc1.weight{e}``), so exporting sequential experts (``local_experts.{e}.linear_fc1.weight``, the only
kind that runs on a CPU) under EP > 1 fails (``int('')``); the wrapper hands it the grouped spelling of the same
parameter. The gather itself is unchanged.

    python benchmarks/bench_moe.py                                  # 2 layers, EP 2 and 4
    python benchmarks/bench_moe.py --layers 1 --experts 16 --vocab 4096 --eps 2   # a quick check that it works
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

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))
sys.path.insert(0, HERE)

from _memio import drop_page_cache, read_files_once, reset_peak, rss  # noqa: E402

GiB = 1024**3
DEFAULT_MB_PYTHON = "/work/venv-mb/bin/python"
DEFAULT_MB062_PYTHON = "/work/venv-mb062/bin/python"


# ---------------------------------------------------------------------------------------------------------------------
# the checkpoint (either interpreter can read it: config.json in the transformers 4.x and 5.x form)
# ---------------------------------------------------------------------------------------------------------------------


def qwen3_moe_config(layers: int, experts: int, vocab: int) -> Dict[str, Any]:
    """Qwen3-30B-A3B's shapes with ``layers`` layers, ``experts`` experts and a ``vocab``-entry vocabulary."""
    return {
        "architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe", "vocab_size": vocab,
        "hidden_size": 2048, "intermediate_size": 6144, "moe_intermediate_size": 768, "num_hidden_layers": layers,
        "num_attention_heads": 32, "num_key_value_heads": 4, "head_dim": 128, "num_experts": experts,
        "num_experts_per_tok": 8, "norm_topk_prob": True, "decoder_sparse_step": 1, "mlp_only_layers": [],
        "max_position_embeddings": 40960, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "hidden_act": "silu",
        "tie_word_embeddings": False, "attention_bias": False, "use_sliding_window": False, "torch_dtype": "bfloat16",
    }


def hf_shapes(cfg: Dict[str, Any]) -> Dict[str, tuple]:
    D, F, V = cfg["hidden_size"], cfg["moe_intermediate_size"], cfg["vocab_size"]
    H, G, d = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]
    shapes: Dict[str, tuple] = {"model.embed_tokens.weight": (V, D)}
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}"
        shapes.update({
            f"{p}.input_layernorm.weight": (D,), f"{p}.post_attention_layernorm.weight": (D,),
            f"{p}.self_attn.q_proj.weight": (H * d, D), f"{p}.self_attn.k_proj.weight": (G * d, D),
            f"{p}.self_attn.v_proj.weight": (G * d, D), f"{p}.self_attn.o_proj.weight": (D, H * d),
            f"{p}.self_attn.q_norm.weight": (d,), f"{p}.self_attn.k_norm.weight": (d,),
            f"{p}.mlp.gate.weight": (cfg["num_experts"], D),
        })
        for e in range(cfg["num_experts"]):
            q = f"{p}.mlp.experts.{e}"
            shapes.update({f"{q}.gate_proj.weight": (F, D), f"{q}.up_proj.weight": (F, D),
                           f"{q}.down_proj.weight": (D, F)})
    shapes["model.norm.weight"] = (D,)
    shapes["lm_head.weight"] = (V, D)
    return shapes


def make_checkpoint(path: str, layers: int, experts: int, vocab: int, shard_bytes: int = GiB) -> Dict[str, Any]:
    """Random bf16 weights (fixed seed; norms around 1), sharded like save_pretrained, plus config.json."""
    from megatron_bridge_ext.io import SafeTensorsWriter

    cfg = qwen3_moe_config(layers, experts, vocab)
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
    shapes = hf_shapes(cfg)
    g = torch.Generator().manual_seed(0)
    with SafeTensorsWriter(path, {k: (s, torch.bfloat16) for k, s in shapes.items()}, max_shard_bytes=shard_bytes,
                           fsync=False) as w:
        for k, s in shapes.items():
            t = torch.randn(s, generator=g, dtype=torch.float32) * 0.02
            w.add(k, (t + 1.0 if "norm" in k else t).to(torch.bfloat16))
        w.close()
    numel = {k: torch.Size(s).numel() for k, s in shapes.items()}
    expert_bytes = 2 * sum(n for k, n in numel.items() if ".mlp.experts." in k)
    return {"params": sum(numel.values()), "bytes": 2 * sum(numel.values()), "largest_bytes": 2 * max(numel.values()),
            "expert_bytes": expert_bytes}


# ---------------------------------------------------------------------------------------------------------------------
# this package (the project's environment)
# ---------------------------------------------------------------------------------------------------------------------


def _our_rank(rank: int, world: int, ckpt: str, out: str, ep: int, bucket_bytes: int) -> Dict[str, Any]:
    from megatron_bridge_ext.mcore.cpu_compat import apply_cpu_patches

    apply_cpu_patches()
    import torch.distributed as dist

    from megatron_bridge_ext.auto_bridge import AutoBridge
    from megatron_bridge_ext.mcore.model_builder import destroy_parallel, init_parallel

    init_parallel(tp=1, pp=1, ep=ep)
    bridge = AutoBridge.from_hf_pretrained(ckpt)
    dist.barrier()
    pre_model = rss()["VmRSS"]
    chunks = bridge.to_megatron_model(load_weights=False, params_dtype=torch.bfloat16, bf16=True)
    model_bytes = sum(p.numel() * p.element_size() for c in chunks for p in c.parameters())
    dist.barrier()
    reset_ok = reset_peak()
    t0 = time.perf_counter()
    bridge.load_hf_weights(chunks, show_progress=False)
    dist.barrier()
    t_import = time.perf_counter() - t0
    peak = rss()["VmHWM"] if reset_ok else None

    t0 = time.perf_counter()
    # a consumer that uses each tensor at once (copy=False, as the writer does): views of Megatron memory where the
    # HF tensor is one (experts without expert-TP), no clone per tensor
    for _ in bridge.export_hf_weights(chunks, bucket_bytes=bucket_bytes, show_progress=False, copy=False):
        pass
    dist.barrier()
    t_nowrite = time.perf_counter() - t0

    t0 = time.perf_counter()
    bridge.save_hf_pretrained(chunks, out, bucket_bytes=bucket_bytes, show_progress=False, fsync=False)
    dist.barrier()
    t_export = time.perf_counter() - t0
    destroy_parallel()
    return {"rank": rank, "import_s": t_import, "export_nowrite_s": t_nowrite, "export_s": t_export,
            "peak_import": peak, "rss_pre_model": pre_model, "model_bytes_rank": model_bytes}


def run_ours(ckpt: str, out: str, ep: int, bucket_bytes: int) -> List[Dict[str, Any]]:
    from megatron_bridge_ext.launch import spawn_local

    return spawn_local(_our_rank, ep, (ckpt, out, ep, bucket_bytes), timeout=7200)


# ---------------------------------------------------------------------------------------------------------------------
# NVIDIA Megatron Bridge (its own environment; run as ``--reference-worker`` by --mb-python)
# ---------------------------------------------------------------------------------------------------------------------


def _sequential_expert_export_patch() -> None:
    """Let Megatron Bridge 0.3.1's EP gather find the expert index of sequential-expert names (see the docstring)."""
    import copy
    import re

    from megatron.bridge.models.conversion.param_mapping import MegatronParamMapping

    original = MegatronParamMapping.gather_from_ep_ranks
    if getattr(original, "_sequential_patch", False):
        return
    pattern = re.compile(r"^(.*\.experts\.)local_experts\.(\d+)\.(linear_fc\d)\.(weight|bias)$")

    def gather_from_ep_ranks(self: Any, megatron_weights: Any, megatron_module: Any, hf_param_name: Any) -> Any:
        m = pattern.match(str(self.megatron_param))
        if m is not None:
            self = copy.copy(self)
            self.megatron_param = f"{m.group(1)}{m.group(3)}.{m.group(4)}{m.group(2)}"
        return original(self, megatron_weights, megatron_module, hf_param_name)

    gather_from_ep_ranks._sequential_patch = True  # type: ignore[attr-defined]
    MegatronParamMapping.gather_from_ep_ranks = gather_from_ep_ranks  # type: ignore[method-assign]


def _reference_rank(rank: int, world: int, port: int, ckpt: str, out: str, ep: int, q: Any) -> None:
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    torch.set_num_threads(1)
    import warnings

    warnings.filterwarnings("ignore")
    try:
        import torch.distributed as dist

        import bench_reference as ref

        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
        AutoBridge = ref._import_megatron_bridge()
        _sequential_expert_export_patch()
        from megatron.bridge.models.gpt_provider import local_layer_spec
        from megatron.core import parallel_state, tensor_parallel

        parallel_state.initialize_model_parallel(tensor_model_parallel_size=1, expert_model_parallel_size=ep)
        tensor_parallel.model_parallel_cuda_manual_seed(0, inference_rng_tracker=True, force_reset_rng=True)
        bridge = AutoBridge.from_hf_pretrained(ckpt, torch_dtype=torch.bfloat16)
        provider = bridge.to_megatron_provider(load_weights=False)
        provider.tensor_model_parallel_size = 1
        provider.pipeline_model_parallel_size = 1
        provider.expert_model_parallel_size = ep
        provider.expert_tensor_parallel_size = 1
        provider.transformer_layer_spec = local_layer_spec
        # the CPU-runnable MoE settings (this package builds the same: sequential experts, all-gather dispatcher)
        provider.moe_grouped_gemm = False
        provider.moe_token_dispatcher_type = "allgather"
        provider.moe_router_load_balancing_type = "none"
        provider.moe_aux_loss_coeff = 0.0
        for flag in ("bias_activation_fusion", "masked_softmax_fusion", "persist_layer_norm", "bias_dropout_fusion",
                     "apply_rope_fusion", "gradient_accumulation_fusion", "cross_entropy_loss_fusion",
                     "moe_permute_fusion", "moe_router_fusion"):
            if hasattr(provider, flag):
                setattr(provider, flag, False)
        provider.params_dtype = torch.bfloat16
        provider.bf16 = True
        provider.fp16 = False
        provider.perform_initialization = False
        provider.finalize()
        dist.barrier()
        pre_model = rss()["VmRSS"]
        model = provider.provide_distributed_model(wrap_with_ddp=False, use_cpu_initialization=True,
                                                   mixed_precision_wrapper=None)
        te_modules = [n for c in model for n, m in c.named_modules() if isinstance(m, ref._TEPlaceholder)]
        if te_modules:
            raise RuntimeError(f"model contains transformer_engine placeholder modules: {te_modules[:5]}")
        model_bytes = sum(p.numel() * p.element_size() for c in model for p in c.parameters())
        dist.barrier()
        reset_ok = reset_peak()
        t0 = time.perf_counter()
        bridge.load_hf_weights(model)
        dist.barrier()
        t_import = time.perf_counter() - t0
        peak = rss()["VmHWM"] if reset_ok else None
        wrong = _wrong_local_experts(model, ckpt, ep, parallel_state.get_expert_model_parallel_rank())

        t0 = time.perf_counter()
        for _ in bridge.export_hf_weights(model, cpu=True, show_progress=False):
            pass
        dist.barrier()
        t_nowrite = time.perf_counter() - t0

        t0 = time.perf_counter()
        if rank == 0:  # save_hf_pretrained minus the tokenizer it insists on (benchmark checkpoints have none)
            os.makedirs(out, exist_ok=True)
            bridge.hf_pretrained.config.save_pretrained(out)
        bridge.save_hf_weights(model, out, show_progress=False)
        dist.barrier()
        t_export = time.perf_counter() - t0
        q.put({"rank": rank, "import_s": t_import, "export_nowrite_s": t_nowrite, "export_s": t_export,
               "peak_import": peak, "rss_pre_model": pre_model, "model_bytes_rank": model_bytes,
               "wrong_local_experts": wrong})
        parallel_state.destroy_model_parallel()
        dist.destroy_process_group()
    except BaseException as e:  # report to the parent, then fail the rank
        import traceback

        q.put({"rank": rank, "error": f"{type(e).__name__}: {e}\n{traceback.format_exc()}"})
        raise


def _wrong_local_experts(model: Any, ckpt: str, ep: int, ep_rank: int) -> List[str]:
    """Sequential experts of this rank whose imported ``linear_fc1`` is not ``[gate; up]`` of HF expert
    ``e + ep_rank * E / ep`` (checked on layer 0, after the timed import)."""
    from safetensors import safe_open

    index = os.path.join(ckpt, "model.safetensors.index.json")
    files = sorted({*json.load(open(index))["weight_map"].values()}) if os.path.exists(index) else [
        "model.safetensors"]
    handles = [safe_open(os.path.join(ckpt, f), "pt") for f in files]

    def hf(name: str) -> torch.Tensor:
        return next(h.get_tensor(name) for h in handles if name in h.keys())

    wrong = []
    layer = model[0].decoder.layers[0]
    local = layer.mlp.experts.local_experts
    for e, expert in enumerate(local):
        g = ep_rank * len(local) + e
        p = f"model.layers.0.mlp.experts.{g}"
        want = torch.cat([hf(f"{p}.gate_proj.weight"), hf(f"{p}.up_proj.weight")])
        if not torch.equal(expert.linear_fc1.weight.detach(), want):
            wrong.append(f"layer 0 local expert {e} (global {g})")
    return wrong


def reference_worker(ckpt: str, out: str, ep: int) -> int:
    """The Megatron Bridge side (run by its interpreter): one local world of ``ep`` ranks; prints one JSON line."""
    import torch.multiprocessing as mp

    import bench_reference as ref

    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    port = ref._free_port()
    procs = [ctx.Process(target=_reference_rank, args=(r, ep, port, ckpt, out, ep, q)) for r in range(ep)]
    for p in procs:
        p.start()
    import queue

    results: List[Dict[str, Any]] = []
    deadline = time.monotonic() + 7200
    while len(results) < len(procs):  # fail fast: a rank that reports an error or dies stops the world
        try:
            results.append(q.get(timeout=5))
        except queue.Empty:
            dead = [(r, p.exitcode) for r, p in enumerate(procs) if p.exitcode not in (None, 0)]
            if dead or time.monotonic() > deadline:
                results.append({"rank": dead[0][0] if dead else -1,
                                "error": f"rank exited with code {dead[0][1]}" if dead else "deadline passed"})
        if any("error" in r for r in results):
            break
    for p in procs:
        if any("error" in r for r in results):
            p.terminate()
        p.join()
    errors = [r for r in results if "error" in r]
    for r in errors:
        print(f"rank {r['rank']} failed:\n{r['error']}", file=sys.stderr)
    print("RESULTS " + json.dumps(results))
    return 1 if errors else 0


def run_reference(mb_python: str, ckpt: str, out: str, ep: int) -> List[Dict[str, Any]]:
    env = {**os.environ, "GLOO_SOCKET_IFNAME": os.environ.get("GLOO_SOCKET_IFNAME", "lo")}
    env.pop("PYTHONPATH", None)
    res = subprocess.run([mb_python, os.path.abspath(__file__), "--reference-worker", ckpt, out, str(ep)],
                         capture_output=True, text=True, env=env, timeout=7200)
    line = next((x for x in res.stdout.splitlines() if x.startswith("RESULTS ")), None)
    if res.returncode != 0 or line is None:
        raise RuntimeError(f"Megatron Bridge reference (EP {ep}) failed with exit code {res.returncode}:\n"
                           f"{res.stdout[-4000:]}\n{res.stderr[-8000:]}")
    return json.loads(line[len("RESULTS "):])


# ---------------------------------------------------------------------------------------------------------------------
# comparison
# ---------------------------------------------------------------------------------------------------------------------


def verify(src: str, dst: str) -> Dict[str, Any]:
    """Names missing on either side, values that differ (after casting to the source dtype), dtype-only changes."""
    from megatron_bridge_ext.io import SafeTensorsSource

    with SafeTensorsSource(src) as a, SafeTensorsSource(dst) as b:
        missing = sorted(set(a.keys()) ^ set(b.keys()))
        common = sorted(set(a.keys()) & set(b.keys()))
        values = [k for k in common if a[k].shape != b[k].shape or not torch.equal(a[k], b[k].to(a[k].dtype))]
        dtypes = [k for k in common if k not in values and a[k].dtype != b[k].dtype]
    return {"missing": missing, "values": values, "dtype_only": dtypes}


def _summary(results: List[Dict[str, Any]]) -> Dict[str, float]:
    return {"import_s": max(r["import_s"] for r in results), "export_s": max(r["export_s"] for r in results),
            "export_nowrite_s": max(r["export_nowrite_s"] for r in results),
            "peak": max((r["peak_import"] or 0) for r in results),
            "above": max((r["peak_import"] or 0) - r["rss_pre_model"] for r in results),
            "model_rank": max(r["model_bytes_rank"] for r in results)}


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, default=2, help="decoder layers (Qwen3-30B-A3B has 48)")
    ap.add_argument("--experts", type=int, default=128)
    ap.add_argument("--vocab", type=int, default=151936)
    ap.add_argument("--eps", default="2,4", help="comma-separated expert-parallel sizes (world = EP)")
    ap.add_argument("--bucket-mib", type=int, default=256)
    ap.add_argument("--mb-python", default=DEFAULT_MB_PYTHON,
                    help="interpreter of the Megatron Bridge 0.3.1 environment (megatron-core 0.16.1)")
    ap.add_argument("--mb062-python", default=DEFAULT_MB062_PYTHON,
                    help="interpreter of the Megatron Bridge 0.6.2 environment (megatron-core 0.19.2)")
    ap.add_argument("--references", default="0.3.1,0.6.2",
                    help="comma-separated Megatron Bridge references to run (0.3.1, 0.6.2), or 'none'")
    ap.add_argument("--no-reference", action="store_true", help="time this package only (= --references none)")
    ap.add_argument("--drop-caches", action="store_true",
                    help="drop the page cache (root) before each side's run and re-read the checkpoint "
                         "(bench_convert.drop_page_cache: the same memory state for both sides)")
    ap.add_argument("--dir", default=None, help="work directory (default: a temporary one, removed)")
    ap.add_argument("--reference-worker", nargs=3, metavar=("CKPT", "OUT", "EP"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.reference_worker:
        ckpt, out, ep = args.reference_worker
        return reference_worker(ckpt, out, int(ep))
    known = {"0.3.1": ("Megatron Bridge 0.3.1", "mb_python"), "0.6.2": ("Megatron Bridge 0.6.2", "mb062_python")}
    refs: Dict[str, str] = {}  # label -> interpreter
    for name in ([] if args.no_reference or args.references == "none" else
                 [r for r in args.references.split(",") if r]):
        if name not in known:
            ap.error(f"--references: unknown reference {name!r} (known: {', '.join(known)})")
        label, option = known[name]
        python = getattr(args, option)
        if not os.path.isfile(python):
            ap.error(f"--{option.replace('_', '-')} {python!r} does not exist (see benchmarks/bench_reference.py for "
                     "the setup), or leave it out with --references / --no-reference")
        refs[label] = python

    tmp = args.dir or tempfile.mkdtemp(prefix="bench_moe_")
    ckpt = os.path.join(tmp, "hf")
    t0 = time.perf_counter()
    info = make_checkpoint(ckpt, args.layers, args.experts, args.vocab)
    print(f"checkpoint: Qwen3-30B-A3B shapes, {args.layers} layers, {args.experts} experts, vocab {args.vocab}: "
          f"{info['params'] / 1e9:.2f} B parameters, {info['bytes'] / GiB:.2f} GiB bf16 (experts "
          f"{info['expert_bytes'] / GiB:.2f} GiB), largest tensor {info['largest_bytes'] / 2**20:.0f} MiB, made in "
          f"{time.perf_counter() - t0:.1f} s ({tmp})")
    read_files_once(ckpt)  # warm the page cache: both sides read from memory
    t_read = min(read_files_once(ckpt) for _ in range(2))
    gb = info["bytes"] / 1e9
    print(f"read the checkpoint files once (page cache warm): {t_read:.2f} s, {gb / t_read:.2f} GB/s")
    header = (f"{'EP':>3} {'side':>21} {'import s':>9} {'export s':>9} {'no-write s':>10} {'peak RSS/rank':>14} "
              f"{'- pre-model':>11} {'model/world+largest':>20} {'rank params':>12} {'exact':>6}")
    print(header)
    print("-" * len(header))
    rows = []
    for ep in (int(x) for x in args.eps.split(",")):
        bound = info["bytes"] / ep + info["largest_bytes"]
        sides = [("this package", run_ours, (ckpt, os.path.join(tmp, f"ours_ep{ep}"), ep, args.bucket_mib * 2**20))]
        for i, (label, python) in enumerate(refs.items()):
            sides.append((label, lambda c, o, e, _py=python: run_reference(_py, c, o, e),
                          (ckpt, os.path.join(tmp, f"mb{i}_ep{ep}"), ep)))
        row = {"ep": ep}
        for side, fn, fargs in sides:
            if args.drop_caches:
                drop_page_cache(ckpt)
            results = fn(*fargs)
            s = _summary(results)
            check = verify(ckpt, fargs[1])
            exact = "yes" if not check["missing"] and not check["values"] else "NO"
            print(f"{ep:>3} {side:>21} {s['import_s']:9.2f} {s['export_s']:9.2f} {s['export_nowrite_s']:10.2f} "
                  f"{s['peak'] / GiB:12.2f} G {s['above'] / GiB:9.2f} G {bound / GiB:18.2f} G "
                  f"{s['model_rank'] / GiB:10.2f} G {exact:>6}")
            if check["missing"] or check["values"]:
                print(f"    {side}: missing/extra {check['missing'][:4]}, differing values {check['values'][:4]}")
            wrong = [w for r in results for w in r.get("wrong_local_experts", [])]
            if wrong:
                print(f"    {side}: imported experts that are not their HF global expert: {len(wrong)} "
                      f"(e.g. {wrong[0]})")
            if check["dtype_only"]:
                print(f"    {side}: {len(check['dtype_only'])} tensors with the same values in another dtype "
                      f"(e.g. {check['dtype_only'][0]})")
            row[side] = s
            shutil.rmtree(fargs[1], ignore_errors=True)
        for label in refs:
            ours, mb = row["this package"], row[label]
            name = f"{label.replace('Megatron Bridge ', 'MB ')} / ours"
            print(f"{'':>3} {name:>21} {mb['import_s'] / ours['import_s']:8.2f}x "
                  f"{mb['export_s'] / ours['export_s']:8.2f}x "
                  f"{mb['export_nowrite_s'] / ours['export_nowrite_s']:9.2f}x")
        rows.append(row)
    print(json.dumps(rows))
    if not args.dir:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
