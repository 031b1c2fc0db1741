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

import argparse
import os
import sys
import tempfile

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))
sys.path.insert(0, os.path.join(ROOT, "tests", "distributed"))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))


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
    config = config_from_checkpoint(info, sequence_parallel=world > 1)
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
    device = torch.device("cuda", torch.cuda.current_device())
    ids = tokens.to(device)
    pos = torch.arange(ids.shape[1], device=device).unsqueeze(0).expand_as(ids)
    mask = torch.triu(torch.ones(1, 1, ids.shape[1], ids.shape[1], dtype=torch.bool, device=device), diagonal=1)
    with torch.no_grad():  # the causal mask as the CPU proofs pass it (mcore/forward.py): True = masked
        out = chunk(input_ids=ids, position_ids=pos, attention_mask=mask)  # [b, s, vocab / tp]
    group = parallel_state.get_tensor_model_parallel_group()
    parts = [torch.empty_like(out) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, out.contiguous(), group=group)
    logits = torch.cat(parts, dim=-1)[..., :chunk.unpadded_vocab_size].float().cpu()
    attn = chunk.decoder.layers[0].self_attention
    return {"logits": logits, "attention": f"{type(attn).__name__} / {type(attn.core_attention).__name__}"}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layouts", default="1,2", help="TP sizes to read the checkpoints at (default 1,2)")
    parser.add_argument("--atol", type=float, default=1e-3, help="max |logit difference| against transformers")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("dsa_check: no GPU (torch.cuda.is_available() is False)")
        return 1
    from megatron_bridge_ext.mcore.versions import megatron_core_version

    if megatron_core_version() < (0, 19, 0):
        print(f"dsa_check: megatron-core {megatron_core_version()} has no DeepSeek sparse attention (needs >= 0.19)")
        return 1
    try:
        import transformer_engine  # noqa: F401
    except ImportError as e:
        print(f"dsa_check: Transformer Engine does not import ({e}); install transformer-engine[pytorch]")
        return 1
    import transformers

    from megatron_bridge_ext.cli.import_hf import import_checkpoint
    from _logits_check import check_layouts

    failures = 0
    with tempfile.TemporaryDirectory(prefix="dsa_check_") as root:
        paths = _make_checkpoints(root)
        for name, path in paths.items():
            import_checkpoint(path, os.path.join(root, name), ep=2, backend="gloo")
            print(f"import {name} at EP2 (CPU, gloo, --spec te, streamed): written")
            hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
            tokens = torch.randint(0, hf.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
            with torch.no_grad():
                expected = hf(tokens, use_cache=False).logits.float()
            failures += check_layouts(name, args.layouts, _worker, (os.path.join(root, name), tokens), expected,
                                      args.atol, lambda r: f"RAISE_ALL load into {r['attention']}")
    print("dsa_check: all checks passed" if not failures else f"dsa_check: {failures} check(s) failed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
