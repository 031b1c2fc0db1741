"""NemotronH (Mamba-2 / attention / MLP hybrid) logits on a GPU against transformers: ``bash benchmarks/gpu_check.sh``
runs it, or ``python benchmarks/hybrid_check.py [--layouts 1,2] [--atol 1e-3]``.

On the CPU the conversion is proven tensor by tensor (``tests/distributed/test_nemotron_h.py``): megatron-core's
Mamba scan (``mamba_ssm``'s Triton ``mamba_chunk_scan_combined`` / ``mamba_split_conv1d_scan_combined``) has no torch
fallback, so the Mamba layers cannot run there. Here, with a GPU and ``mamba_ssm``: the tiny hybrid checkpoint of
that test (pattern ``M-*-M*M-``, random weights) is imported into megatron-core's ``HybridModel`` (this package's
local spec: torch norms, megatron's Mamba mixer with the real kernels) at each TP size of ``--layouts`` and its
logits on a fixed batch are compared with transformers' ``NemotronHForCausalLM`` (fp32 both).

The checkpoint sets ``time_step_min=0``: transformers clamps the Mamba time step from below at ``time_step_min``
(``dt_limit``) and megatron's kernels do not (see ``models/nemotron_h.py``), so with the default 1e-3 a step below it
would differ by design. Ranks: NCCL with one GPU per rank when enough are visible; otherwise every rank on ``cuda:0``
over gloo. Prints one line per check; exits non-zero when a check fails or cannot run (no GPU, no ``mamba_ssm``,
megatron-core < 0.19).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests", "distributed"))


def _worker(rank: int, world: int, ckpt: str, tokens: torch.Tensor) -> dict:
    import torch.distributed as dist
    from megatron.core import parallel_state

    from megatron_bridge_ext.auto_bridge import AutoBridge
    from megatron_bridge_ext.mcore.model_builder import init_parallel

    torch.cuda.set_device(rank % torch.cuda.device_count() if dist.get_backend() == "nccl" else 0)
    init_parallel(tp=world, pp=1)
    chunk = AutoBridge.from_hf_pretrained(ckpt).to_megatron_model(params_dtype=torch.float32)[0]
    chunk = chunk.cuda().eval()
    device = next(chunk.parameters()).device
    ids = tokens.to(device)
    pos = torch.arange(ids.shape[1], device=device).unsqueeze(0).expand_as(ids)
    with torch.no_grad():
        out = chunk(input_ids=ids, position_ids=pos, attention_mask=None)  # [b, s, padded vocab / tp]
    group = parallel_state.get_tensor_model_parallel_group()
    parts = [torch.empty_like(out) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, out.contiguous(), group=group)
    logits = torch.cat(parts, dim=-1)[..., :chunk.unpadded_vocab_size].float().cpu()
    return {"logits": logits, "model": type(chunk).__name__}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layouts", default="1,2", help="TP sizes to import the checkpoint at (default 1,2)")
    parser.add_argument("--atol", type=float, default=1e-3, help="max |logit difference| against transformers")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("hybrid_check: no GPU (torch.cuda.is_available() is False)")
        return 1
    try:
        import mamba_ssm  # noqa: F401
    except ImportError as e:
        print(f"hybrid_check: mamba_ssm does not import ({e}); megatron-core's Mamba layers need it to run")
        return 1
    from megatron_bridge_ext.mcore.versions import MEGATRON_CORE_0_19, unmet_megatron_core

    if unmet_megatron_core(MEGATRON_CORE_0_19):
        print("hybrid_check: megatron-core < 0.19 has no HybridModel (NemotronH is refused there)")
        return 1
    import test_nemotron_h as nemotron_h
    import transformers

    from _logits_check import check_layouts
    from megatron_bridge_ext.testing.tiny_models import make_tiny_checkpoint

    failures = 0
    with tempfile.TemporaryDirectory(prefix="hybrid_check_") as root:
        path = os.path.join(root, "hf_nemotron_h")
        make_tiny_checkpoint(path, "NemotronH", {**nemotron_h._config("hybrid"), "time_step_min": 0.0}, seed=50,
                             norm=(1.0, 0.3), rest=(0.0, 0.1),
                             rules=[(lambda n: n.endswith(("A_log", ".D", "dt_bias")), 0.5, 0.3)])
        hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).cuda().eval()
        tokens = torch.randint(0, hf.config.vocab_size, (2, 32), generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            expected = hf(tokens.cuda(), use_cache=False).logits.float().cpu()
        del hf
        failures += check_layouts(f"NemotronH {nemotron_h.CHECKPOINTS['hybrid']['pattern']}", args.layouts, _worker,
                                  (path, tokens), expected, args.atol, lambda r: r["model"])
    print("hybrid_check: all checks passed" if not failures else f"hybrid_check: {failures} check(s) failed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
