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

import os
import sys
import tempfile

import torch

import _logits_check as lc

from megatron_bridge_ext.mcore.versions import MEGATRON_CORE_0_19


def _worker(rank: int, world: int, ckpt: str, tokens: torch.Tensor) -> dict:
    from megatron.core import parallel_state

    from megatron_bridge_ext.auto_bridge import AutoBridge

    lc.init_rank(rank, world)
    chunk = AutoBridge.from_hf_pretrained(ckpt).to_megatron_model(params_dtype=torch.float32)[0]
    chunk = chunk.cuda().eval()
    logits = lc.tp_logits(chunk, tokens, chunk.unpadded_vocab_size, parallel_state.get_tensor_model_parallel_group())
    return {"logits": logits, "model": type(chunk).__name__}


def main(argv=None) -> int:
    args = lc.parse_args(__doc__, argv)
    if not lc.preflight("hybrid_check", ["mamba_ssm"], MEGATRON_CORE_0_19, "HybridModel (NemotronH)"):
        return 1
    import test_nemotron_h as nemotron_h

    from megatron_bridge_ext.testing.tiny_models import make_tiny_checkpoint

    with tempfile.TemporaryDirectory(prefix="hybrid_check_") as root:
        path = os.path.join(root, "hf_nemotron_h")
        make_tiny_checkpoint(path, "NemotronH", {**nemotron_h._config("hybrid"), "time_step_min": 0.0}, seed=50,
                             norm=(1.0, 0.3), rest=(0.0, 0.1),
                             rules=[(lambda n: n.endswith(("A_log", ".D", "dt_bias")), 0.5, 0.3)])
        tokens, expected = lc.hf_reference(path, 32, device="cuda")
        failures = lc.check_layouts(f"NemotronH {nemotron_h.CHECKPOINTS['hybrid']['pattern']}", args.layouts,
                                    _worker, (path, tokens), expected, args.atol, lambda r: r["model"])
    return lc.finish("hybrid_check", failures)


if __name__ == "__main__":
    sys.exit(main())
