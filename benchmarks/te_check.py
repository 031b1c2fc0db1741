"""Import checkpoints in real Transformer Engine (TE) models on a GPU: ``bash benchmarks/gpu_check.sh`` runs it, or
``python benchmarks/te_check.py [--layouts 1,2] [--atol 1e-3]``.

1. CPU side: tiny transformers checkpoints (a dense Llama with an odd vocabulary; a Mixtral, routed experts) are
   written by ``import`` (local gloo ranks on the CPU, ``--spec te``, the default) at TP2 and EP2.
2. GPU side, for each read layout (TP sizes in ``--layouts``): megatron-core's TE-spec ``GPTModel`` of the
   checkpoint's stored config (``tests/te_models.py``: ``get_gpt_decoder_block_spec(use_transformer_engine=True)``;
   Mixtral also with TE's grouped-GEMM experts) is built on the GPU with real TE, filled by
   ``dist_checkpointing.load(model.sharded_state_dict(), ..., strict=StrictHandling.RAISE_ALL)`` and
   ``load_state_dict`` (TE's core attention leaves its own extra state out of its sharded state dict; as Megatron-LM
   does, those keys are then ignored), and its logits on a fixed batch are compared with the transformers model's.

Ranks: NCCL with one GPU per rank when enough are visible; otherwise every rank on ``cuda:0`` over gloo (so two TP
layouts fit one GPU). Prints one line per check; exits non-zero when a load fails or a logit difference exceeds
``--atol`` (default 1e-3: TE's fp32 GEMMs and fused attention on the GPU against transformers' fp32 on the CPU).
"""

from __future__ import annotations

import os
import sys
import tempfile

import torch

import _logits_check as lc

MIXTRAL = dict(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, head_dim=16, max_position_embeddings=64, num_local_experts=4,
               num_experts_per_tok=2, tie_word_embeddings=False, rms_norm_eps=1e-5)


def _make_checkpoints(root: str) -> dict:
    import transformers

    from megatron_bridge_ext.testing.tiny_models import make_tiny_llama

    paths = {"llama": make_tiny_llama(os.path.join(root, "hf_llama"), seed=0)}
    torch.manual_seed(1)
    model = transformers.MixtralForCausalLM(transformers.MixtralConfig(**MIXTRAL))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.normal_(1.0, 0.1)
    paths["mixtral"] = os.path.join(root, "hf_mixtral")
    model.save_pretrained(paths["mixtral"], safe_serialization=True)
    return paths


def _worker(rank: int, world: int, ckpt: str, tokens: torch.Tensor, grouped: bool) -> dict:
    from megatron.core import parallel_state

    device = lc.init_rank(rank, world)
    chunk = lc.load_te_chunk(ckpt, device, **({"moe_grouped_gemm": True} if grouped else {}))
    logits = lc.tp_logits(chunk, tokens, chunk.unpadded_vocab_size, parallel_state.get_tensor_model_parallel_group())
    return {"logits": logits, "te": type(chunk.decoder.layers[0].self_attention.linear_qkv).__mro__[1].__module__}


def main(argv=None) -> int:
    args = lc.parse_args(__doc__, argv)
    if not lc.preflight("te_check", ["transformer_engine"]):
        return 1
    failures = 0
    with tempfile.TemporaryDirectory(prefix="te_check_") as root:
        paths = _make_checkpoints(root)
        for name, layout in {"llama": dict(tp=2), "mixtral": dict(ep=2)}.items():
            ckpt = lc.import_te(paths[name], os.path.join(root, name), name, **layout)
            tokens, expected = lc.hf_reference(paths[name], 16)
            for grouped in ((False, True) if name == "mixtral" else (False,)):
                failures += lc.check_layouts(f"{name}{' grouped experts' if grouped else ''}", args.layouts,
                                             _worker, (ckpt, tokens, grouped), expected, args.atol,
                                             lambda r: f"RAISE_ALL load into {r['te']} modules")
    return lc.finish("te_check", failures)


if __name__ == "__main__":
    sys.exit(main())
