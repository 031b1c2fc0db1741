"""DeepSeek sparse attention on a GPU: logits of DeepSeek-V3.2 / GLM-5 checkpoints, imported by this package, in
megatron-core's own Transformer Engine DSA model against transformers'. ``bash benchmarks/gpu_check.sh`` runs it
(with megatron-core >= 0.19 and transformer_engine), or ``python benchmarks/dsa_check.py [--layouts 1,2]``.

1. CPU side: the tiny checkpoints of ``tests/distributed/test_deepseek_v32.py`` (with its multi-token-prediction
   layer) and ``tests/distributed/test_glm_moe_dsa.py`` (indexer top-k sharing) are written by ``import`` (local gloo
   ranks, ``--spec te``, streamed) at EP2.
2. GPU side, for each TP size in ``--layouts``: megatron-core's TE DSA ``GPTModel``
   (``get_transformer_block_with_experimental_attention_variant_spec``, ``tests/te_models.py``) of the checkpoint's
   stored config (sequence parallel at TP > 1, which its ``AbsorbedMLASelfAttention`` asserts; DSA's PyTorch path,
   ``dsa_kernel_backend="none"``) is built on the GPU, loaded with ``strict=StrictHandling.RAISE_ALL``, and its logits
   on a fixed batch are compared with the transformers model's (fp32, on the CPU).

Ranks: NCCL with one GPU per rank when enough are visible, else every rank on ``cuda:0`` over gloo. Prints one line
per check; exits non-zero when megatron-core is older than 0.19, a load fails or a difference exceeds ``--atol``.
"""

from __future__ import annotations

import os
import sys
import tempfile

import torch

import _logits_check as lc

from megatron_bridge_ext.mcore.versions import MEGATRON_CORE_0_19


def _make_checkpoints(root: str) -> dict:
    import test_deepseek_v32 as deepseek_v32
    import test_glm_moe_dsa as glm_moe_dsa

    paths = {"deepseek_v32_mtp": os.path.join(root, "hf_deepseek_v32_mtp"),
             "glm_moe_dsa": os.path.join(root, "hf_glm_moe_dsa")}
    model = deepseek_v32._make_checkpoint(paths["deepseek_v32_mtp"] + "_base", seed=4)
    deepseek_v32._write_mtp(paths["deepseek_v32_mtp"] + "_base", paths["deepseek_v32_mtp"], model, seed=5)
    glm_moe_dsa._make_checkpoint(paths["glm_moe_dsa"], seed=4)
    return paths


def _worker(rank: int, world: int, ckpt: str, tokens: torch.Tensor) -> dict:
    from megatron.core import parallel_state

    device = lc.init_rank(rank, world)
    chunk = lc.load_te_chunk(ckpt, device, sequence_parallel=world > 1)
    logits = lc.tp_logits(chunk, tokens, chunk.unpadded_vocab_size, parallel_state.get_tensor_model_parallel_group(),
                          causal_mask=True)
    attn = chunk.decoder.layers[0].self_attention
    return {"logits": logits, "attention": f"{type(attn).__name__} / {type(attn.core_attention).__name__}"}


def main(argv=None) -> int:
    args = lc.parse_args(__doc__, argv)
    if not lc.preflight("dsa_check", ["transformer_engine"], MEGATRON_CORE_0_19, "DeepSeek sparse attention"):
        return 1
    failures = 0
    with tempfile.TemporaryDirectory(prefix="dsa_check_") as root:
        for name, path in _make_checkpoints(root).items():
            ckpt = lc.import_te(path, os.path.join(root, name), name, ep=2)
            tokens, expected = lc.hf_reference(path, 12)
            failures += lc.check_layouts(name, args.layouts, _worker, (ckpt, tokens), expected, args.atol,
                                         lambda r: f"RAISE_ALL load into {r['attention']}")
    return lc.finish("dsa_check", failures)


if __name__ == "__main__":
    sys.exit(main())
