"""Gated delta-net families (Qwen3-Next, Qwen3.5 dense and MoE) on a GPU with megatron-core's own kernels:
``bash benchmarks/gpu_check.sh`` runs it, or ``python benchmarks/gdn_check.py [--layouts 1,2] [--atol 2e-3]``.

Needs megatron-core >= 0.19, transformers, Transformer Engine and flash-linear-attention (``fla``: megatron's
``GatedDeltaNet`` kernels, ``chunk_gated_delta_rule`` and ``causal_conv1d``); on the CPU the tests run megatron's
torch paths instead (``mcore/linear_attention.py``), so this is where the kernels are compared.

1. CPU side: the tiny checkpoints of ``tests/distributed/test_qwen3_next.py`` / ``test_qwen3_5.py`` (4 layers, linear
   / full attention alternating, MoE with a gated shared expert or dense MLPs) are written by ``import`` (local gloo
   ranks, ``--spec te``, the default) at TP2 (dense) or EP2 (MoE).
2. GPU side, for each read layout (TP sizes in ``--layouts``): megatron-core's TE-spec ``GPTModel`` of the stored
   config (``tests/te_models.py``: ``get_transformer_block_with_experimental_attention_variant_spec``, its
   ``GatedDeltaNet`` running the ``fla`` kernels) is built on the GPU with real TE, filled with
   ``strict=StrictHandling.RAISE_ALL``, and its logits on a fixed batch are compared with transformers' (fp32 on the
   CPU, transformers' torch delta rule).

Prints one line per check; exits non-zero when a load fails or a logit difference exceeds ``--atol`` (default 2e-3:
megatron's ``fla`` kernels and TE's GEMMs on the GPU against transformers' torch delta rule on the CPU, in fp32).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))
sys.path.insert(0, os.path.join(ROOT, "tests", "distributed"))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

# name -> (maker, import layout)
FAMILIES = {"qwen3_next": dict(ep=2), "qwen3_5": dict(tp=2), "qwen3_5_moe": dict(ep=2)}


def _make_checkpoint(root: str, name: str) -> str:
    import test_qwen3_5
    import test_qwen3_next

    path = os.path.join(root, f"hf_{name}")
    if name == "qwen3_next":
        test_qwen3_next.make_checkpoint(path, seed=7)
    else:
        test_qwen3_5.make_checkpoint(path, "dense" if name == "qwen3_5" else "moe", seed=7)
    return path


def _worker(rank: int, world: int, ckpt: str, tokens: torch.Tensor) -> dict:
    import torch.distributed as dist
    from megatron.core import dist_checkpointing, parallel_state
    from megatron.core.dist_checkpointing.validation import StrictHandling
    from te_check import _te_logits
    from te_models import build_te_chunks

    from megatron_bridge_ext.io.megatron_checkpoint import read_checkpoint_info
    from megatron_bridge_ext.mcore.checkpoint import config_from_checkpoint
    from megatron_bridge_ext.mcore.model_builder import init_parallel

    torch.cuda.set_device(rank % torch.cuda.device_count() if dist.get_backend() == "nccl" else 0)
    init_parallel(tp=world, pp=1)
    info = read_checkpoint_info(ckpt)
    config = config_from_checkpoint(info)
    chunk = build_te_chunks(config, device=torch.device("cuda", torch.cuda.current_device()))[0]
    for p in chunk.parameters():
        p.data.fill_(float("nan"))
    md = {"dp_cp_group": parallel_state.get_data_parallel_group(with_context_parallel=True)}
    loaded = dist_checkpointing.load({"model": chunk.sharded_state_dict(metadata=md)}, info.path,
                                     strict=StrictHandling.RAISE_ALL)
    res = chunk.load_state_dict(loaded["model"], strict=False)
    left = [k for k in res.missing_keys if not k.endswith(".core_attention._extra_state")] + res.unexpected_keys
    if left:
        raise RuntimeError(f"load_state_dict left {left[:10]}")
    chunk.eval()
    gdn = [type(layer.self_attention).__name__ for layer in chunk.decoder.layers]
    logits = _te_logits(chunk, tokens, chunk.unpadded_vocab_size, parallel_state.get_tensor_model_parallel_group())
    return {"logits": logits, "attention": gdn}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layouts", default="1,2", help="TP sizes to read the checkpoints at (default 1,2)")
    parser.add_argument("--atol", type=float, default=2e-3, help="max |logit difference| against transformers")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("gdn_check: no GPU (torch.cuda.is_available() is False)")
        return 1
    for module, what in (("transformer_engine", "transformer-engine[pytorch]"), ("fla", "flash-linear-attention")):
        try:
            __import__(module)
        except ImportError as e:
            print(f"gdn_check: {module} does not import ({e}); install {what}")
            return 1
    import transformers

    from megatron_bridge_ext.cli.import_hf import import_checkpoint
    from _logits_check import check_layouts
    from megatron_bridge_ext.mcore.versions import MEGATRON_CORE_0_19, unmet_megatron_core

    if unmet_megatron_core(MEGATRON_CORE_0_19):
        print("gdn_check: the gated delta-net families convert with megatron-core >= 0.19 only")
        return 1
    failures = 0
    with tempfile.TemporaryDirectory(prefix="gdn_check_") as root:
        for name, layout in FAMILIES.items():
            path = _make_checkpoint(root, name)
            import_checkpoint(path, os.path.join(root, name), **layout, backend="gloo")
            print(f"import {name} at {layout} (CPU, gloo, --spec te): written")
            hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
            tokens = torch.randint(0, hf.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
            with torch.no_grad():
                expected = hf(tokens, use_cache=False).logits.float()
            failures += check_layouts(name, args.layouts, _worker, (os.path.join(root, name), tokens), expected,
                                      args.atol, lambda r: f"layers {r['attention']}")
    print("gdn_check: all checks passed" if not failures else f"gdn_check: {failures} check(s) failed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
