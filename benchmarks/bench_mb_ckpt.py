"""NVIDIA Megatron Bridge's own offline checkpoint conversion, one command per process, for a like-for-like timing
against ``python -m megatron_bridge_ext import`` / ``export`` (``benchmarks/bench_stream.py --mb-python``).

Runs in Megatron Bridge 0.6.2's environment (megatron-core 0.19.2, CPU build of torch; setup in the docstring of
``benchmarks/bench_reference.py``, plus what ``megatron.bridge.training``, whose checkpointing ``import_ckpt`` and
``export_ckpt`` use, imports: ``/work/venv-mb062/bin/pip install datasets megatron-energon hydra-core tensorboard``,
installed as datasets 5.2.0, megatron-energon 7.4.1, hydra-core 1.3.8 (which moves omegaconf to 2.3.1), tensorboard
2.21.0) or in Megatron Bridge 0.3.1's (below), in a single-process gloo world, what Megatron Bridge's
``examples/conversion/convert_checkpoints.py`` of that release runs:

* ``import HF MEG``: ``AutoBridge.import_ckpt(HF, MEG, torch_dtype=bfloat16)``: the HF model is loaded
  (``from_hf_pretrained``), converted (``to_megatron_model``: model built, HF weights loaded into it) and saved as a
  megatron-core ``torch_dist`` checkpoint (``save_megatron_model(..., low_memory_save=True)`` through Megatron
  Bridge's training checkpointing: ``MEG/iter_0000000/`` + ``run_config.yaml`` + ``latest_checkpointed_iteration.txt``);
* ``export MEG HF2 --hf HF``: 0.6.2: ``AutoBridge.from_auto_config(MEG, HF).export_ckpt(MEG, HF2, strict=True)``;
  0.3.1, which has no ``from_auto_config``: ``AutoBridge.from_hf_pretrained(HF, trust_remote_code=True)
  .export_ckpt(MEG, HF2, strict=True)`` (its example's export; the HF weights are not loaded, only the config and, for
  ``strict``, the safetensors' names); picked by which of the two ``AutoBridge`` has. Either way the checkpoint is
  loaded into a model (``load_megatron_model``) and written as HF safetensors + config (``save_hf_pretrained``);
* ``verify HF HF2`` (not timed): per tensor ``torch.equal`` of HF2 with HF in the source dtype, names missing on
  either side, and tensors equal in value but of another dtype listed apart;
* ``versions`` (not timed): the versions of Megatron Bridge, megatron-core, transformers and torch this Python
  imports, as one JSON line (``bench_stream.py`` prints and records them).

Each timed command then fsyncs every file and directory it wrote, and prints one JSON line: ``wall_s`` from the
script's first line (before any import) to after the fsync, ``convert_s`` the same without the imports and shims
(Megatron Bridge's call plus the fsync; the training checkpointing modules the call would import on first use are
imported before it: 2.5 s in 0.3.1, where they pull in modelopt's plugins, 0.16 s in 0.6.2). The caller measures the
process's own wall clock around it.

Megatron Bridge 0.3.1 on megatron-core 0.16.1 (the newest megatron-core its ``megatron-core[dev,mlm]>=0.15.0a0,<0.17.0``
allows), transformers 4.57.6 (it asks for ``transformers<5``), hydra-core 1.3.2 (``>1.3,<=1.3.2``); of its other
declared dependencies only those an import failed on (the rest, Transformer Engine, mamba-ssm, causal-conv1d, wandb,
mlflow, ..., are never imported on this path). Setup as run (Python 3.11.7; both wheels ask for Python >= 3.10, so
``--ignore-requires-python`` changes nothing here)::

    python3.11 -m venv /work/venv-mb031
    /work/venv-mb031/bin/pip install torch==2.13.0                 # 2.13.0+cpu
    /work/venv-mb031/bin/pip install --no-deps --ignore-requires-python megatron-bridge==0.3.1 megatron-core==0.16.1
    /work/venv-mb031/bin/pip install numpy "packaging>=24.2" transformers==4.57.6 safetensors "einops~=0.8" rich \
        "omegaconf>=2.3.0" "pyyaml>=6.0.2" "regex>=2024.11.6" "tqdm>=4.67.1" "six>=1.17.0" typing-extensions \
        "hydra-core<=1.3.2,>1.3"
    /work/venv-mb031/bin/pip install triton==3.9.0                 # megatron-core's mamba mixer imports triton
    /work/venv-mb031/bin/pip install --no-deps nvidia-modelopt==0.47.0   # training.checkpointing imports modelopt
    /work/venv-mb031/bin/pip install pydantic pulp scipy           # what modelopt imports
    /work/venv-mb031/bin/pip install "datasets>=2.20.0" transformers==4.57.6
    /work/venv-mb031/bin/pip install "tensorboard>=2.19.0"
    /work/venv-mb031/bin/pip install psutil                        # megatron-core's async writer (in the save)

installed as megatron-bridge 0.3.1, megatron-core 0.16.1, torch 2.13.0+cpu, transformers 4.57.6 (huggingface-hub
0.36.2, tokenizers 0.22.2), safetensors 0.8.0, einops 0.8.2, numpy 2.4.6, hydra-core 1.3.2, omegaconf 2.3.1, triton
3.9.0, nvidia-modelopt 0.47.0, pydantic 2.14.4, PuLP 3.3.2, scipy 1.17.1, datasets 5.0.1, tensorboard 2.21.0, psutil
7.2.2 (megatron-energon, which 0.6.2 needs, is not imported by 0.3.1). No shim beyond 0.6.2's.

What differs from the real (GPU) stack, all for running on a CPU-only machine, and the same as
``benchmarks/bench_reference.py`` (whose shims are imported, not copied): the ``typing.override`` shim (Python 3.11),
the inert ``transformer_engine`` placeholder (Megatron Bridge imports TE unconditionally; nothing of it is ever
instantiated, a placeholder class raises if it is), megatron-core's CPU patches (``torch.cuda.current_device`` ->
``"cpu"``, ``synchronize`` / ``empty_cache`` no-ops). Besides:

* ``torch.cuda.get_rng_state`` returns the CPU generator's state: the training checkpointing stores a CUDA rng state
  in the checkpoint (``get_rng_state``, called even with ``save_rng=False``) and there is no CUDA here.

* The world (gloo, 1 rank) and megatron-core's model-parallel state with the inference rng tracker are set up before
  ``import_ckpt``: given no process group, Megatron Bridge's ``provide_distributed_model`` initialises NCCL and
  seeds CUDA rng state. ``export_ckpt`` sets up its own gloo world (``temporary_distributed_context``), untouched.
* The provider ``import_ckpt`` builds from the HF config gets megatron-core's local layer spec (torch norms and
  linears, ``local_layer_spec`` of Megatron Bridge) instead of the Transformer Engine spec, fusions off, and
  ``use_cpu_initialization`` (``import_ckpt`` asks for it already). The spec is saved in the checkpoint's
  ``run_config.yaml``, so ``export_ckpt`` rebuilds the same model. Weight names on disk differ from the TE spec's
  only in the layer norms (``input_layernorm`` instead of ``linear_qkv.layer_norm_weight``).
* A checkpoint without tokenizer files (the benchmark's random ones) makes Megatron Bridge's tokenizer steps fail;
  ``--no-tokenizer`` (what ``bench_stream.py`` passes) drops the tokenizer path ``import_ckpt`` records and skips
  ``save_hf_pretrained``'s tokenizer copy, nothing else.
* A bf16 checkpoint comes back in bf16 in both versions (tiny Llama, every tensor; ``verify`` would list a tensor
  exported in another dtype).

Usage (``GLOO_SOCKET_IFNAME=lo``)::

    /work/venv-mb062/bin/python benchmarks/bench_mb_ckpt.py import HF MEG --no-tokenizer
    /work/venv-mb062/bin/python benchmarks/bench_mb_ckpt.py export MEG HF2 --hf HF --no-tokenizer
    /work/venv-mb062/bin/python benchmarks/bench_mb_ckpt.py verify HF HF2
    /work/venv-mb031/bin/python benchmarks/bench_mb_ckpt.py import HF MEG --no-tokenizer    # the same for 0.3.1
"""

import time

T_START = time.perf_counter()

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import socket  # noqa: E402
import sys  # noqa: E402
from typing import Any, List, Optional  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

FUSIONS = ("bias_activation_fusion", "masked_softmax_fusion", "persist_layer_norm", "bias_dropout_fusion",
           "apply_rope_fusion", "gradient_accumulation_fusion", "cross_entropy_loss_fusion")


def fsync_tree(path: str) -> int:
    """fsync every file and directory under ``path`` (and ``path``); returns the number of files."""
    n = 0
    for root, dirs, files in os.walk(path, topdown=False):
        for name in files:
            fd = os.open(os.path.join(root, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            n += 1
        fd = os.open(root, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    return n


def _setup(no_tokenizer: bool) -> Any:
    """Megatron Bridge imported with bench_reference's shims; the import-side provider patch; returns AutoBridge."""
    import warnings

    warnings.filterwarnings("ignore")
    from bench_reference import _import_megatron_bridge

    AutoBridge = _import_megatron_bridge()
    # the training checkpointing import_ckpt / export_ckpt import on first use (0.3.1: 2.5 s, modelopt's plugins
    # included; 0.6.2: 0.16 s, modelopt already in): imported here, so that convert_s holds no imports
    import megatron.bridge.training.checkpointing  # noqa: F401
    import megatron.bridge.training.model_load_save  # noqa: F401
    import torch

    # the training checkpointing stores the CUDA rng state next to the (CPU) torch one; there is none here
    torch.cuda.get_rng_state = lambda *args, **kwargs: torch.get_rng_state()  # type: ignore[assignment]
    from megatron.bridge.models.gpt_provider import local_layer_spec

    original = AutoBridge.to_megatron_provider

    def to_megatron_provider(self: Any, *args: Any, **kwargs: Any) -> Any:
        provider = original(self, *args, **kwargs)
        provider.transformer_layer_spec = local_layer_spec
        for flag in FUSIONS:
            if hasattr(provider, flag):
                setattr(provider, flag, False)
        return provider

    AutoBridge.to_megatron_provider = to_megatron_provider  # type: ignore[method-assign]
    if no_tokenizer:
        import megatron.bridge.models.conversion.auto_bridge as ab

        save = ab.AutoBridge.save_megatron_model

        def save_megatron_model(self: Any, model: Any, path: Any, hf_tokenizer_path: Any = None,
                                *args: Any, **kwargs: Any) -> Any:
            return save(self, model, path, None, *args, **kwargs)

        AutoBridge.save_megatron_model = save_megatron_model  # type: ignore[method-assign]
    return AutoBridge


def _init_world() -> None:
    """A gloo world of one rank and megatron-core's parallel state (what ``temporary_distributed_context`` does,
    plus the inference rng tracker megatron-core's CPU path needs)."""
    import torch.distributed as dist
    from megatron.core import parallel_state, tensor_parallel

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    parallel_state.initialize_model_parallel()
    tensor_parallel.model_parallel_cuda_manual_seed(0, inference_rng_tracker=True, force_reset_rng=True)


def cmd_import(hf: str, meg: str, no_tokenizer: bool) -> dict:
    import torch

    AutoBridge = _setup(no_tokenizer)
    _init_world()
    t0 = time.perf_counter()
    AutoBridge.import_ckpt(hf, meg, torch_dtype=torch.bfloat16)
    files = fsync_tree(meg)
    t1 = time.perf_counter()
    import torch.distributed as dist

    dist.destroy_process_group()
    return {"step": "import", "convert_s": t1 - t0, "wall_s": t1 - T_START, "files": files}


def cmd_export(meg: str, hf2: str, hf: str, no_tokenizer: bool) -> dict:
    AutoBridge = _setup(no_tokenizer)
    if no_tokenizer:
        from megatron.bridge.models.hf_pretrained.causal_lm import PreTrainedCausalLM

        # save_artifacts copies config, generation config and tokenizer: a checkpoint without one has none to copy
        PreTrainedCausalLM._load_tokenizer = lambda self: None  # type: ignore[method-assign]
    t0 = time.perf_counter()
    if hasattr(AutoBridge, "from_auto_config"):  # 0.6: the HF config synthesised from the checkpoint's + HF's
        bridge = AutoBridge.from_auto_config(meg, hf)
    else:  # 0.3.1 has no from_auto_config; its convert_checkpoints.py export builds the bridge from HF like this
        bridge = AutoBridge.from_hf_pretrained(hf, trust_remote_code=True)
    bridge.export_ckpt(meg, hf2, show_progress=False, strict=True)
    files = fsync_tree(hf2)
    t1 = time.perf_counter()
    return {"step": "export", "convert_s": t1 - t0, "wall_s": t1 - T_START, "files": files}


def cmd_verify(src: str, dst: str) -> dict:
    from bench_reference import verify

    res = verify(src, dst)
    return {"step": "verify", "exact": not res["missing"] and not res["values"], "missing": res["missing"],
            "values": res["values"], "dtype_only": res["dtype_only"]}


def cmd_versions() -> dict:
    """The distributions this Python imports (read from the environment, nothing imported)."""
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for dist in ("megatron-bridge", "megatron-core", "transformers", "torch"):
        try:
            out[dist] = version(dist)
        except PackageNotFoundError:
            out[dist] = None
    return {"step": "versions", **out}


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("import", help="AutoBridge.import_ckpt(HF, MEG)")
    p.add_argument("hf")
    p.add_argument("meg")
    p.add_argument("--no-tokenizer", action="store_true", help="the HF directory has no tokenizer files")
    p = sub.add_parser("export", help="AutoBridge.from_auto_config(MEG, HF).export_ckpt(MEG, HF2)")
    p.add_argument("meg")
    p.add_argument("hf2")
    p.add_argument("--hf", required=True, help="the HF reference directory (config) Megatron Bridge asks for")
    p.add_argument("--no-tokenizer", action="store_true", help="the HF directory has no tokenizer files")
    p = sub.add_parser("verify", help="compare the exported HF directory with the source (not timed)")
    p.add_argument("src")
    p.add_argument("dst")
    sub.add_parser("versions", help="the versions of Megatron Bridge, megatron-core, transformers and torch")
    a = ap.parse_args(argv)
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    if a.cmd == "import":
        res = cmd_import(a.hf, a.meg, a.no_tokenizer)
    elif a.cmd == "export":
        res = cmd_export(a.meg, a.hf2, a.hf, a.no_tokenizer)
    elif a.cmd == "verify":
        res = cmd_verify(a.src, a.dst)
    else:
        res = cmd_versions()
    print(json.dumps(res), flush=True)
    return 0 if res.get("exact", True) else 2


if __name__ == "__main__":
    sys.exit(main())
