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

import argparse
import os
import sys
import tempfile

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))

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


def _te_logits(chunk, tokens: torch.Tensor, vocab: int, tp_group) -> torch.Tensor:
    """Full logits of a TP-split model on the GPU (one pipeline stage): TE's causal attention needs no mask."""
    import torch.distributed as dist

    device = next(chunk.parameters()).device
    ids = tokens.to(device)
    pos = torch.arange(ids.shape[1], device=device).unsqueeze(0).expand_as(ids)
    with torch.no_grad():
        out = chunk(input_ids=ids, position_ids=pos, attention_mask=None)  # [b, s, vocab / tp]
    parts = [torch.empty_like(out) for _ in range(dist.get_world_size(tp_group))]
    dist.all_gather(parts, out.contiguous(), group=tp_group)
    return torch.cat(parts, dim=-1)[..., :vocab].float().cpu()


def _worker(rank: int, world: int, ckpt: str, tokens: torch.Tensor, grouped: bool) -> dict:
    import torch.distributed as dist
    from megatron.core import dist_checkpointing, parallel_state
    from megatron.core.dist_checkpointing.validation import StrictHandling
    from te_models import build_te_chunks

    from megatron_bridge_ext.io.megatron_checkpoint import read_checkpoint_info
    from megatron_bridge_ext.mcore.checkpoint import config_from_checkpoint
    from megatron_bridge_ext.mcore.model_builder import init_parallel

    torch.cuda.set_device(rank % torch.cuda.device_count() if dist.get_backend() == "nccl" else 0)
    init_parallel(tp=world, pp=1)
    info = read_checkpoint_info(ckpt)
    config = config_from_checkpoint(info, **({"moe_grouped_gemm": True} if grouped else {}))
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
    logits = _te_logits(chunk, tokens, chunk.unpadded_vocab_size, parallel_state.get_tensor_model_parallel_group())
    return {"logits": logits, "te": type(chunk.decoder.layers[0].self_attention.linear_qkv).__mro__[1].__module__}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layouts", default="1,2", help="TP sizes to read the checkpoints at (default 1,2)")
    parser.add_argument("--atol", type=float, default=1e-3, help="max |logit difference| against transformers")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("te_check: no GPU (torch.cuda.is_available() is False)")
        return 1
    try:
        import transformer_engine  # noqa: F401
    except ImportError as e:
        print(f"te_check: Transformer Engine does not import ({e}); install transformer-engine[pytorch]")
        return 1
    import transformers

    from megatron_bridge_ext.cli.import_hf import import_checkpoint
    from _logits_check import check_layouts

    failures = 0
    with tempfile.TemporaryDirectory(prefix="te_check_") as root:
        paths = _make_checkpoints(root)
        written = {"llama": dict(tp=2), "mixtral": dict(ep=2)}
        for name, layout in written.items():
            import_checkpoint(paths[name], os.path.join(root, name), **layout, backend="gloo")
            print(f"import {name} at {layout} (CPU, gloo, --spec te): written")
        for name in written:
            hf = transformers.AutoModelForCausalLM.from_pretrained(paths[name], dtype=torch.float32).eval()
            vocab = hf.config.vocab_size
            tokens = torch.randint(0, vocab, (2, 16), generator=torch.Generator().manual_seed(0))
            with torch.no_grad():
                expected = hf(tokens, use_cache=False).logits.float()
            for grouped in ((False, True) if name == "mixtral" else (False,)):
                failures += check_layouts(f"{name}{' grouped experts' if grouped else ''}", args.layouts, _worker,
                                          (os.path.join(root, name), tokens, grouped), expected, args.atol,
                                          lambda r: f"RAISE_ALL load into {r['te']} modules")
    print("te_check: all checks passed" if not failures else f"te_check: {failures} check(s) failed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
