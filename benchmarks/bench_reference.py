"""Reference timing: NVIDIA Megatron Bridge (PyPI ``megatron-bridge``: 0.3.1 on megatron-core 0.16.1, 0.6.2 on 0.19.2,
each in its own environment) importing a HF Llama checkpoint into
megatron-core GPTModel chunks and exporting it back, in a local gloo world on a CPU-only machine.

Measured like ``benchmarks/bench_convert.py`` (our converter): the model is built first without weights (not timed),
then ``import`` = ``AutoBridge.load_hf_weights(model)``, ``export (no write)`` = draining
``AutoBridge.export_hf_weights(model)``, ``export`` = ``AutoBridge.save_hf_weights(model, out)`` plus the config
written by rank 0 (what ``save_hf_pretrained`` does, less the tokenizer it insists on loading; benchmark checkpoints
have none; with ``--flush fsync`` rank 0 then fsyncs every written file, inside the timed region); each ends with a
barrier and the maximum over ranks is printed. The exported safetensors are compared
with the input (``torch.equal`` per tensor in the source dtype; dtype changes are listed separately) unless
``--no-verify``; ``--check-forward`` also compares the imported model's logits with transformers' fp32 forward.
Megatron-core's local-spec torch norms keep fp32 weights whatever ``params_dtype`` is, so a bf16 checkpoint's norm
weights come back as fp32 (same values): Megatron Bridge exports the model's dtype.

This runs in its OWN environment, never the project's: Megatron Bridge 0.3.1 pins ``transformers<5`` and cannot be
installed with its declared dependencies on a CPU-only machine (``transformer-engine[pytorch]``, ``mamba-ssm``,
``causal-conv1d`` and megatron-core's ``nv-grouped-gemm`` are CUDA source builds). Setup (Python 3.11)::

    python3 -m venv /work/venv-mb
    /work/venv-mb/bin/pip install torch==2.13.0 setuptools numpy packaging      # the CPU build
    /work/venv-mb/bin/pip install --no-deps megatron-bridge==0.3.1
    /work/venv-mb/bin/pip install megatron-core==0.16.1 "transformers<5" safetensors rich omegaconf pyyaml \\
        regex tqdm six typing-extensions einops triton

Megatron Bridge 0.6.2 on megatron-core 0.19.2, the newest release, runs through the same script in a second
environment. Its wheel is pure Python; its metadata asks for Python >= 3.12 and transformers >=5.8,<=5.12.1, and
megatron-core 0.19.2's metadata for Python >= 3.12 as well (both run on 3.11: see ``_typing_override_shim``).
``nvidia-modelopt`` is imported by ``save_hf_weights``. Setup (Python 3.11)::

    python3 -m venv /work/venv-mb062
    /work/venv-mb062/bin/pip install torch==2.13.0 setuptools numpy packaging      # the CPU build
    /work/venv-mb062/bin/pip install --no-deps --ignore-requires-python megatron-bridge==0.6.2 megatron-core==0.19.2
    /work/venv-mb062/bin/pip install transformers==5.12.1 safetensors rich omegaconf pyyaml regex tqdm six \
        typing-extensions einops triton==3.9.0 psutil requests pydantic scipy ninja pulp nvidia-ml-py
    /work/venv-mb062/bin/pip install --no-deps nvidia-modelopt

    GLOO_SOCKET_IFNAME=lo /work/venv-mb062/bin/python benchmarks/bench_reference.py --make-tiny /tmp/tiny --tp 2 \
        --check-forward                                   # round trip exact, logits vs transformers

What is NOT the real stack, stated so the numbers are not misread:

* Transformer Engine is absent. ``megatron.bridge`` imports ``transformer_engine.pytorch`` unconditionally (its LoRA
  modules, through ``megatron.bridge.models.conversion``), so this script registers an inert placeholder module
  ``transformer_engine`` (``_install_te_placeholder``) AFTER megatron-core's GPT modules that probe for TE were
  imported (they keep ``HAVE_TE = False``); modules imported later that saw it (other models' bridges, heterogeneous
  specs, PEFT utils) get ``HAVE_TE = False`` set back. Every placeholder class raises if instantiated; the script
  checks that no module of the built model comes from it.
* The model uses megatron-core's local layer spec (``get_gpt_layer_local_spec``: torch norms and linears), not the TE
  spec Megatron Bridge picks by default, and all fusions are off. The weight names then differ only in the layer
  norms (``input_layernorm`` instead of ``linear_qkv.layer_norm_weight``), which Megatron Bridge's Llama mapping
  accepts.
* Python 3.11 lacks ``typing.override`` (3.12), which Megatron Bridge 0.6.2 and megatron-core 0.19's
  ``megatron.training`` import: ``_typing_override_shim`` provides PEP 698's no-op decorator. megatron-core 0.19 also
  builds hybrid layer specs when ``megatron.core.models.hybrid`` is imported, TE ones if it sees TE: that module is
  imported before the placeholder exists.
* megatron-core is patched for CPU the way our ``megatron_bridge_ext/mcore/cpu_compat.py`` does (copied here to keep the
  script self-contained): ``torch.cuda.current_device`` returns ``"cpu"``, the inference rng tracker is used.
  ``torch.cuda.synchronize`` / ``empty_cache`` are made no-ops (Megatron Bridge calls them around conversions).
* One Megatron Bridge method is wrapped: ``MegatronParamMapping.scatter_to_tp_ranks`` makes its splits contiguous.
  Without it, TP > 1 imports of row-parallel weights (``o_proj``, ``down_proj``) are silently WRONG on gloo:
  gloo's scatter ignores strides (pytorch/pytorch#24836) and the ``torch.chunk(dim=1)`` views are only copied to
  contiguous memory by ``.to("cuda")`` on a GPU. The copy is the one the CUDA path makes anyway.

Usage::

    GLOO_SOCKET_IFNAME=lo /work/venv-mb/bin/python benchmarks/bench_reference.py CKPT_DIR --tp 2
    GLOO_SOCKET_IFNAME=lo /work/venv-mb/bin/python benchmarks/bench_reference.py --make-tiny /tmp/tiny --tp 2
"""

from __future__ import annotations

import argparse
import importlib.machinery
import json
import os
import shutil
import socket
import sys
import tempfile
import time
import types
from typing import Any, Dict, List, Optional

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _memio import reset_peak, rss  # noqa: E402


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cpu_patches() -> None:
    """The CPU patches megatron-core 0.16.x needs (see megatron_bridge_ext/mcore/cpu_compat.py)."""
    if torch.cuda.is_available():
        raise RuntimeError("bench_reference: CUDA is available; these CPU patches are for CPU-only processes")
    torch.cuda.current_device = lambda: "cpu"  # type: ignore[assignment]
    torch.cuda.synchronize = lambda *a, **k: None  # type: ignore[assignment]
    torch.cuda.empty_cache = lambda *a, **k: None  # type: ignore[assignment]

    import megatron.core.fusions.fused_softmax as fused_softmax
    import megatron.core.transformer.utils as tutils

    def causal(sq: int) -> torch.Tensor:
        return torch.triu(torch.ones(sq, sq, dtype=torch.bool), diagonal=1)

    for mod in (tutils, fused_softmax):
        mod.get_default_causal_mask = causal
    import megatron.core.transformer.moe.moe_utils as moe_utils

    if getattr(moe_utils, "te_general_gemm", None) is None:
        moe_utils.te_general_gemm = None


class _TEPlaceholder:
    """Base of every placeholder class: importable, never constructible."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        raise RuntimeError(f"transformer_engine placeholder {type(self).__name__} instantiated: TE is not installed")


def _install_te_placeholder() -> None:
    """Register an inert ``transformer_engine`` (+ ``.pytorch``, ``.pytorch.ops``) so ``megatron.bridge`` imports."""
    if "transformer_engine" in sys.modules:
        return
    names = ["transformer_engine", "transformer_engine.pytorch", "transformer_engine.pytorch.ops"]
    for name in names:
        mod = types.ModuleType(name)
        mod.__spec__ = importlib.machinery.ModuleSpec(name, None)
        mod.__path__ = []  # type: ignore[attr-defined]
        cache: Dict[str, type] = {}

        def getattr_(attr: str, _name: str = name, _cache: Dict[str, type] = cache) -> Any:
            if attr.startswith("__"):
                raise AttributeError(attr)
            if f"{_name}.{attr}" in sys.modules:
                return sys.modules[f"{_name}.{attr}"]
            if attr not in _cache:
                _cache[attr] = type(attr, (_TEPlaceholder,), {"__module__": _name})
            return _cache[attr]

        mod.__getattr__ = getattr_  # type: ignore[attr-defined]
        sys.modules[name] = mod
    sys.modules["transformer_engine"].pytorch = sys.modules["transformer_engine.pytorch"]  # type: ignore[attr-defined]
    sys.modules["transformer_engine.pytorch"].ops = sys.modules["transformer_engine.pytorch.ops"]  # type: ignore


def _contiguous_scatter_patch() -> None:
    """gloo's ``scatter`` reads non-contiguous inputs as if contiguous and silently sends wrong bytes
    (pytorch/pytorch#24836, #192920). Megatron Bridge scatters ``torch.chunk(w, tp, dim=1)`` views for row-parallel
    weights; on CUDA its ``.to(device)`` copies them, on the CPU it does not. Make each split contiguous (the copy
    the CUDA path makes anyway)."""
    from megatron.bridge.models.conversion.param_mapping import MegatronParamMapping

    original = MegatronParamMapping.scatter_to_tp_ranks
    if getattr(original, "_contiguous_patch", False):
        return

    def scatter_to_tp_ranks(self: Any, splits: Any, *args: Any, **kwargs: Any) -> Any:
        if splits:
            splits = [s.contiguous() for s in splits]
        return original(self, splits, *args, **kwargs)

    scatter_to_tp_ranks._contiguous_patch = True  # type: ignore[attr-defined]
    MegatronParamMapping.scatter_to_tp_ranks = scatter_to_tp_ranks  # type: ignore[method-assign]


def _typing_override_shim() -> None:
    """Megatron Bridge 0.6 (and the ``megatron.training`` of megatron-core 0.19 it imports) use ``typing.override``,
    new in Python 3.12; on 3.11 provide the same no-op decorator (PEP 698: it only marks the method)."""
    import typing

    if not hasattr(typing, "override"):
        def override(method: Any) -> Any:
            try:
                method.__override__ = True
            except (AttributeError, TypeError):
                pass
            return method

        typing.override = override  # type: ignore[attr-defined]


def _import_megatron_bridge() -> Any:
    """Import megatron-core first (its TE probes see no TE), then the placeholder, then megatron.bridge."""
    _typing_override_shim()
    import megatron.core  # noqa: F401
    import megatron.core.extensions.transformer_engine  # noqa: F401
    import megatron.core.models.gpt.gpt_layer_specs  # noqa: F401
    import megatron.core.transformer.multi_latent_attention as mla

    try:  # megatron-core 0.19 (Megatron Bridge 0.6): builds layer specs at import time, TE ones if it sees TE
        import megatron.core.models.hybrid.hybrid_layer_specs  # noqa: F401
    except ImportError:  # megatron-core 0.16 has no hybrid package
        pass
    mla.HAVE_TE = False
    _cpu_patches()
    _install_te_placeholder()
    from megatron.bridge import AutoBridge

    # modules that probed for TE after the placeholder existed (other models' bridges, heterogeneous specs, PEFT)
    # saw it: tell them the truth
    for name, mod in list(sys.modules.items()):
        if name.startswith("megatron.") and getattr(mod, "HAVE_TE", None) is True:
            mod.HAVE_TE = False  # type: ignore[attr-defined]
    _contiguous_scatter_patch()
    return AutoBridge


def _forward_max_diff(model: Any, ckpt: str, vocab: int) -> Optional[float]:
    """Max |logit difference| between the imported GPTModel (gathered over TP) and transformers' forward in fp32 on
    one fixed batch; None on ranks other than 0. An independent check of the import (a round trip alone would not
    see a layout error that export undoes)."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, vocab, (2, 16), generator=g)
    pos = torch.arange(16).unsqueeze(0).expand(2, -1)
    mask = torch.triu(torch.ones(1, 1, 16, 16, dtype=torch.bool), diagonal=1)
    chunk = model[0]
    chunk.eval()
    with torch.no_grad():
        local = chunk(ids, pos, mask).float()  # [b, s, V_pad / tp]
    group = parallel_state.get_tensor_model_parallel_group()
    parts = [torch.empty_like(local) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, local.contiguous(), group=group)
    if dist.get_rank() != 0:
        return None
    from transformers import LlamaForCausalLM

    ref = LlamaForCausalLM.from_pretrained(ckpt, torch_dtype=torch.float32).eval()
    with torch.no_grad():
        want = ref(ids).logits
    got = torch.cat(parts, dim=-1)[..., :vocab]
    return float((got - want).abs().max())


def _fsync_tree(path: str) -> None:
    """Flush every file under ``path`` (and the directory) to disk."""
    for name in sorted(os.listdir(path)):
        full = os.path.join(path, name)
        if os.path.isfile(full):
            fd = os.open(full, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _worker(rank: int, world: int, port: int, ckpt: str, out: str, dtype_name: str, check_forward: bool,
            q: Any, flush: str = "none", threads: int = 1) -> None:
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    torch.set_num_threads(threads)
    import warnings

    warnings.filterwarnings("ignore")
    try:
        import torch.distributed as dist

        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
        AutoBridge = _import_megatron_bridge()
        from megatron.bridge.models.gpt_provider import local_layer_spec
        from megatron.core import parallel_state, tensor_parallel

        parallel_state.initialize_model_parallel(tensor_model_parallel_size=world)
        tensor_parallel.model_parallel_cuda_manual_seed(0, inference_rng_tracker=True, force_reset_rng=True)

        dtype = getattr(torch, dtype_name)
        bridge = AutoBridge.from_hf_pretrained(ckpt, torch_dtype=dtype)
        provider = bridge.to_megatron_provider(load_weights=False)
        provider.tensor_model_parallel_size = world
        provider.pipeline_model_parallel_size = 1
        provider.transformer_layer_spec = local_layer_spec
        for flag in ("bias_activation_fusion", "masked_softmax_fusion", "persist_layer_norm", "bias_dropout_fusion",
                     "apply_rope_fusion", "gradient_accumulation_fusion", "cross_entropy_loss_fusion"):
            if hasattr(provider, flag):
                setattr(provider, flag, False)
        provider.params_dtype = dtype
        provider.bf16 = dtype == torch.bfloat16
        provider.fp16 = False
        provider.perform_initialization = False
        provider.finalize()
        model = provider.provide_distributed_model(
            wrap_with_ddp=False, use_cpu_initialization=True, mixed_precision_wrapper=None)
        te_modules = [n for c in model for n, m in c.named_modules() if isinstance(m, _TEPlaceholder)]
        if te_modules:
            raise RuntimeError(f"model contains transformer_engine placeholder modules: {te_modules[:5]}")
        dist.barrier()

        reset_ok = reset_peak()
        t0 = time.perf_counter()
        bridge.load_hf_weights(model)
        dist.barrier()
        t_import = time.perf_counter() - t0
        peak = rss()["VmHWM"] if reset_ok else None

        fwd = None
        if check_forward:
            fwd = _forward_max_diff(model, ckpt, bridge.hf_pretrained.config.vocab_size)

        t0 = time.perf_counter()
        n = 0
        for _, tensor in bridge.export_hf_weights(model, cpu=True, show_progress=False):
            n += tensor.numel() * tensor.element_size()
        dist.barrier()
        t_nowrite = time.perf_counter() - t0

        t0 = time.perf_counter()
        # save_hf_pretrained minus the tokenizer (it requires one; benchmark checkpoints have none)
        if rank == 0:
            os.makedirs(out, exist_ok=True)
            bridge.hf_pretrained.config.save_pretrained(out)
        bridge.save_hf_weights(model, out, show_progress=False)
        if flush == "fsync" and rank == 0:  # the same durability as a writer that fsyncs its files
            _fsync_tree(out)
        dist.barrier()
        t_export = time.perf_counter() - t0
        q.put({"rank": rank, "import_s": t_import, "export_nowrite_s": t_nowrite, "export_s": t_export,
               "exported_bytes": n, "forward_max_abs_diff": fwd, "peak_rss": peak,
               "layer0_params": sorted(k for k, _ in model[0].named_parameters() if ".layers.0." in k)})
        parallel_state.destroy_model_parallel()
        dist.destroy_process_group()
    except BaseException as e:  # report to the parent, then fail the rank
        import traceback

        q.put({"rank": rank, "error": f"{type(e).__name__}: {e}\n{traceback.format_exc()}"})
        raise


def make_tiny_llama(path: str, dtype: torch.dtype = torch.bfloat16) -> None:
    """A small random Llama (transformers ``LlamaForCausalLM`` + ``save_pretrained``), GQA, untied embeddings."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=512, hidden_size=128, intermediate_size=352, num_hidden_layers=2,
                      num_attention_heads=8, num_key_value_heads=2, head_dim=16, max_position_embeddings=256,
                      tie_word_embeddings=False, torch_dtype=dtype)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():  # norms are ones after init: randomise them so a lost or misplaced norm is seen
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.normal_(1.0, 0.1)
    model.to(dtype).save_pretrained(path)


def verify(src: str, dst: str) -> Dict[str, List[str]]:
    """Compare two safetensors directories: names missing on either side, with different values (compared after
    casting the exported tensor to the source dtype), and with equal values but a different dtype."""
    from safetensors import safe_open

    def load(d: str) -> Dict[str, torch.Tensor]:
        out: Dict[str, torch.Tensor] = {}
        for f in sorted(os.listdir(d)):
            if f.endswith(".safetensors"):
                with safe_open(os.path.join(d, f), "pt") as fh:
                    out.update({k: fh.get_tensor(k) for k in fh.keys()})
        return out

    a, b = load(src), load(dst)
    common = sorted(set(a) & set(b))
    values = [k for k in common if a[k].shape != b[k].shape or not torch.equal(a[k], b[k].to(a[k].dtype))]
    dtypes = [f"{k} ({a[k].dtype} -> {b[k].dtype})" for k in common if k not in values and a[k].dtype != b[k].dtype]
    return {"missing": sorted(set(a) ^ set(b)), "values": values, "dtype_only": dtypes}


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("ckpt", nargs="?", help="HF Llama checkpoint directory (config.json + *.safetensors)")
    ap.add_argument("--tp", type=int, default=1, help="tensor-parallel size = local world size")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"], help="model params dtype")
    ap.add_argument("--make-tiny", metavar="DIR", help="first write a tiny random Llama to DIR and use it")
    ap.add_argument("--out", default=None, help="export directory (default: a temporary one, removed)")
    ap.add_argument("--no-verify", action="store_true")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    ap.add_argument("--flush", choices=["none", "fsync"], default="none",
                    help="fsync: rank 0 flushes every written file inside the timed export (as a writer that fsyncs)")
    ap.add_argument("--check-forward", action="store_true",
                    help="after the (timed) import, compare logits with transformers' fp32 forward (small models)")
    args = ap.parse_args(argv)
    if args.make_tiny:
        make_tiny_llama(args.make_tiny, getattr(torch, args.dtype))
        args.ckpt = args.make_tiny
    if not args.ckpt or not os.path.isfile(os.path.join(args.ckpt, "config.json")):
        ap.error(f"checkpoint directory with config.json required, got {args.ckpt!r}")
    if args.tp < 1:
        ap.error(f"--tp must be >= 1, got {args.tp}")

    import torch.multiprocessing as mp

    out = args.out or tempfile.mkdtemp(prefix="bench_reference_")
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    port = _free_port()
    t0 = time.perf_counter()
    procs = [ctx.Process(target=_worker, args=(r, args.tp, port, args.ckpt, out, args.dtype,
                                                 args.check_forward, q, args.flush, args.threads))
             for r in range(args.tp)]
    for p in procs:
        p.start()
    results = [q.get(timeout=3600) for _ in procs]
    for p in procs:
        p.join()
    wall = time.perf_counter() - t0
    errors = [r for r in results if "error" in r]
    if errors:
        for r in errors:
            print(f"rank {r['rank']} failed:\n{r['error']}", file=sys.stderr)
        return 1
    size = sum(os.path.getsize(os.path.join(args.ckpt, f)) for f in os.listdir(args.ckpt)
               if f.endswith(".safetensors"))
    t_imp = max(r["import_s"] for r in results)
    t_nw = max(r["export_nowrite_s"] for r in results)
    t_exp = max(r["export_s"] for r in results)
    print(f"megatron-bridge reference, TP={args.tp}, {args.dtype}, checkpoint {size / 2**20:.1f} MiB ({args.ckpt})")
    rank0 = next(r for r in results if r["rank"] == 0)
    print(f"layer-0 parameters (rank 0): {rank0['layer0_params']}")
    print(f"import s {t_imp:.3f}   export s {t_exp:.3f}   export (no write) s {t_nw:.3f}   "
          f"(world wall incl. spawn and imports {wall:.1f} s)")
    peak = max((r.get("peak_rss") or 0) for r in results) or None
    print(json.dumps({"tp": args.tp, "import_s": t_imp, "export_s": t_exp, "export_nowrite_s": t_nw,
                      "peak_rss": peak, "flush": args.flush}))
    rc = 0
    if args.check_forward:
        d = next(r["forward_max_abs_diff"] for r in results if r["rank"] == 0)
        tol = 1e-4 if args.dtype == "float32" else 5e-2
        print(f"forward vs transformers fp32: max |logit diff| {d:.3g} (tolerance {tol:g} for {args.dtype})")
        rc = 0 if d <= tol else 3
    if not args.no_verify:
        res = verify(args.ckpt, out)
        ok = not res["missing"] and not res["values"]
        print(f"round trip values exact (torch.equal in the source dtype): {'yes' if ok else 'NO'}; "
              f"missing/extra names {res['missing'][:8]}, differing values {res['values'][:8]}")
        print(f"same values but another dtype: {len(res['dtype_only'])} tensors {res['dtype_only'][:4]}")
        rc = rc or (0 if ok else 2)
    if not args.out:
        shutil.rmtree(out, ignore_errors=True)
    return rc


if __name__ == "__main__":
    sys.exit(main())
