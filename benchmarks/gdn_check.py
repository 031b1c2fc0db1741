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

import os
import sys
import tempfile

import torch

import _logits_check as lc

from megatron_bridge_ext.mcore.versions import MEGATRON_CORE_0_19

# name -> import layout
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
    from megatron.core import parallel_state

    device = lc.init_rank(rank, world)
    chunk = lc.load_te_chunk(ckpt, device)
    gdn = [type(layer.self_attention).__name__ for layer in chunk.decoder.layers]
    logits = lc.tp_logits(chunk, tokens, chunk.unpadded_vocab_size, parallel_state.get_tensor_model_parallel_group())
    return {"logits": logits, "attention": gdn}


def main(argv=None) -> int:
    args = lc.parse_args(__doc__, argv, atol=2e-3)
    if not lc.preflight("gdn_check", ["transformer_engine", "fla"], MEGATRON_CORE_0_19,
                        "the gated delta-net families"):
        return 1
    failures = 0
    with tempfile.TemporaryDirectory(prefix="gdn_check_") as root:
        for name, layout in FAMILIES.items():
            path = _make_checkpoint(root, name)
            ckpt = lc.import_te(path, os.path.join(root, name), name, **layout)
            tokens, expected = lc.hf_reference(path, 16)
            failures += lc.check_layouts(name, args.layouts, _worker, (ckpt, tokens), expected, args.atol,
                                         lambda r: f"layers {r['attention']}")
    return lc.finish("gdn_check", failures)


if __name__ == "__main__":
    sys.exit(main())
