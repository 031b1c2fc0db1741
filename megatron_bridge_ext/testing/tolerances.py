"""Tolerances for computed outputs (logits) in fp32, and why.

Stored tensors are compared bit for bit (``torch.equal``): the conversion moves bytes. Computed outputs are not:
two forward passes over the same weights give the same floats only when every kernel reduces in the same order, and
that order depends on the CPU's instruction set (torch picks AVX-512, AVX2 or scalar kernels at run time:
``ATEN_CPU_CAPABILITY``), the thread count (``OMP_NUM_THREADS`` splits reductions), and the memory layout of the
operands (a transposed or differently aligned weight takes another GEMM path). So a computed output is compared with
a tolerance, stated here once and used beside each assertion:

- :data:`SAME_MODEL_ATOL` (1e-5): the same model class and the same weights, loaded twice or from two files with the
  same bytes (e.g. fused expert tensors that transformers holds in another layout). Only the reduction order can
  differ: a few ulps per op, ~1e-7 .. 1e-6 on the tiny test models' logits (measured: 2.4e-7 and 3.6e-7 for the
  fused-expert reloads on an AVX-512 machine). A real difference in the model (one wrong expert, a changed norm
  epsilon or rope setting) moves the logits by 1e-4 or more; ``tests/models/test_config_roundtrip.py`` shows it for the
  smallest such change.
- :data:`MEGATRON_VS_HF_ATOL` (1e-4): a megatron-core model against the transformers model it was converted from. Two
  implementations of the same maths: megatron fuses the QKV and gate/up GEMMs, computes RoPE, the softmax and the
  norms with its own kernels and orders, over up to four layers, so the differences are larger than between two
  loads (a few 1e-6 here) but stay two orders below what a wrong layout gives (a mismatched model differs by more
  than 100x this bound: ``tests/distributed/test_megatron_cpu.py``).
"""

from __future__ import annotations

__all__ = ["SAME_MODEL_ATOL", "MEGATRON_VS_HF_ATOL", "max_abs_diff"]

SAME_MODEL_ATOL = 1e-5
MEGATRON_VS_HF_ATOL = 1e-4


def max_abs_diff(a, b) -> float:
    """``max |a - b|`` of two tensors of the same shape, in fp32 (shapes must agree)."""
    if tuple(a.shape) != tuple(b.shape):
        raise ValueError(f"max_abs_diff: shapes differ, {tuple(a.shape)} vs {tuple(b.shape)}")
    return float((a.float() - b.float()).abs().max()) if a.numel() else 0.0
