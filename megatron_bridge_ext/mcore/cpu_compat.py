"""Process-global patches that let megatron-core (0.16.1, 0.19.x) run GPTModels on a CPU-only torch (gloo).

Used only by processes without CUDA; never applied on import of the package and never where CUDA is available
(``apply_cpu_patches`` raises there). ``model_builder.build_gpt_model`` calls :func:`prepare_cpu_process` before it
builds a model, so a CPU user who builds through ``AutoBridge.to_megatron_model`` needs no call of their own; the
tests, the demo and the CLI's local workers apply them up front. Every patch is idempotent.

=====================================================  ==========================================================
patch                                                  why
=====================================================  ==========================================================
``torch.cuda.current_device`` -> ``"cpu"``             RoPE (``inv_freq.to(...)``), the MoE router and several
                                                       buffer allocations ask for the current CUDA device; a CPU
                                                       torch raises "Torch not compiled with CUDA enabled".
``transformer.utils.get_default_causal_mask`` and      both build their masks with ``device="cuda"``; used when a
``get_sliding_window_causal_mask`` (and the names      forward gets ``attention_mask=None`` or a sliding window
imported into ``fusions.fused_softmax``) -> CPU        (Mistral/Gemma). Replaced by the same maths on the CPU.
``moe.moe_utils.te_general_gemm = None``               0.16.x leaves the name undefined without Transformer
                                                       Engine; every MoE router forward raises ``NameError`` (0.19
                                                       defines it as None: nothing to do there).
``multi_latent_attention.HAVE_TE = False``             0.16.x sets ``HAVE_TE=True`` with mock TE classes when TE is
                                                       absent; ``isinstance(x, TELinear)`` then fails for MLA
                                                       (0.19 sets it False itself).
``Tensor.cuda`` no-op (``cuda_moves_disabled()``,      with tied embeddings and PP > 1, ``LanguageModule`` calls
a context manager, not a global patch)                 ``weight.data.cuda()`` while the model is constructed.
rng tracker: ``seed_model_parallel_rng(seed)``         attention dropout forks the CUDA rng tracker even in eval;
(a call, after ``initialize_model_parallel``)          the inference tracker (``inference_rng_tracker=True``) forks
                                                       nothing, the plain one needs ``torch.cuda.get_rng_state``.
                                                       :func:`prepare_cpu_process` sets the inference tracker up
                                                       when none is (without touching any seed).
``torch.cuda.synchronize`` no-op                       megatron-core's distributed-checkpoint writer
(``dist_checkpoint_cpu_patches()``, also applied by    (``FileSystemWriterAsync.preload_tensors``) calls it
``apply_cpu_patches``)                                 unconditionally after staging tensors to the host.
=====================================================  ==========================================================

The checkpoint writer also needs ``psutil`` (imported optionally by megatron-core, required when it writes) and an
existing directory; ``io.megatron_checkpoint`` creates the directory, and ``psutil`` is a dependency of this package's
``megatron`` extra.

Not patched (GPU-only features, configured off instead): grouped GEMM experts, the ``alltoall``/``flex`` token
dispatchers, sequence parallelism with local norms, fused kernels. Set ``GLOO_SOCKET_IFNAME=lo`` on machines whose
hostname does not resolve (each gloo group otherwise stalls for seconds).
"""

from __future__ import annotations

import contextlib
import importlib.util
from typing import Iterator, Optional, Tuple

import torch

__all__ = ["apply_cpu_patches", "cpu_patches_applied", "cuda_moves_disabled", "seed_model_parallel_rng",
           "dist_checkpoint_cpu_patches", "prepare_cpu_process"]

_APPLIED = False


def _cpu_causal_mask(sq: int) -> torch.Tensor:
    """``get_default_causal_mask`` on the CPU: True above the diagonal (masked)."""
    return torch.triu(torch.ones(sq, sq, dtype=torch.bool), diagonal=1)


def _cpu_sliding_window_causal_mask(sq: int, skv: int, window_size: Tuple[int, int]) -> torch.Tensor:
    """``get_sliding_window_causal_mask`` on the CPU (same maths as megatron-core 0.16.1)."""
    m = torch.ones(sq, skv, dtype=torch.bool)
    mu = torch.triu(m, diagonal=skv - sq - window_size[0])
    ml = torch.tril(mu, diagonal=skv - sq + window_size[1])
    return ~ml


def _cpu_current_device() -> str:
    return "cpu"


def _no_synchronize(device: object = None) -> None:
    """``torch.cuda.synchronize`` where there is no CUDA: nothing to wait for."""


def dist_checkpoint_cpu_patches() -> None:
    """Let megatron-core's distributed-checkpoint writer run in a CPU-only process: ``torch.cuda.synchronize``
    becomes a no-op (the writer calls it unconditionally after staging tensors to the host, which on a CPU-only torch
    raises "Torch not compiled with CUDA enabled"). Does nothing where CUDA is available; idempotent."""
    if torch.cuda.is_available():
        return
    torch.cuda.synchronize = _no_synchronize  # type: ignore[assignment]


def cpu_patches_applied() -> bool:
    """Whether ``apply_cpu_patches`` has run in this process."""
    return _APPLIED


def apply_cpu_patches() -> None:
    """Apply every process-global patch in the table above (idempotent).

    Raises:
        RuntimeError: if CUDA is available; the patches would break a GPU process.
    """
    global _APPLIED
    if _APPLIED:
        return
    if torch.cuda.is_available():
        raise RuntimeError(
            "apply_cpu_patches: CUDA is available in this process "
            f"({torch.cuda.device_count()} device(s)); the CPU patches are for CPU-only processes"
        )
    torch.cuda.current_device = _cpu_current_device  # type: ignore[assignment]
    dist_checkpoint_cpu_patches()

    import megatron.core.fusions.fused_softmax as fused_softmax
    import megatron.core.transformer.utils as tutils

    for mod in (tutils, fused_softmax):
        mod.get_default_causal_mask = _cpu_causal_mask
        mod.get_sliding_window_causal_mask = _cpu_sliding_window_causal_mask

    import megatron.core.transformer.moe.moe_utils as moe_utils

    if getattr(moe_utils, "te_general_gemm", None) is None:
        moe_utils.te_general_gemm = None

    if importlib.util.find_spec("transformer_engine") is None:
        import megatron.core.transformer.multi_latent_attention as mla

        mla.HAVE_TE = False
    _APPLIED = True


@contextlib.contextmanager
def cuda_moves_disabled() -> Iterator[None]:
    """Make ``Tensor.cuda`` return the tensor itself inside the block (model construction on the CPU).

    Restores the original method on exit. Does nothing when CUDA is available.
    """
    if torch.cuda.is_available():
        yield
        return
    original = torch.Tensor.cuda

    def _no_move(self: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
        return self

    torch.Tensor.cuda = _no_move  # type: ignore[assignment]
    try:
        yield
    finally:
        torch.Tensor.cuda = original  # type: ignore[assignment]


def seed_model_parallel_rng(seed: int, *, inference: Optional[bool] = None) -> None:
    """Seed megatron's model-parallel rng tracker after ``initialize_model_parallel``.

    Args:
        seed: base seed (megatron offsets it per TP / EP rank).
        inference: use the inference tracker (forks nothing). Defaults to True on CPU-only processes, where the
            training tracker cannot read CUDA rng states.
    """
    from megatron.core import tensor_parallel

    if inference is None:
        inference = not torch.cuda.is_available()
    torch.manual_seed(seed)
    tensor_parallel.model_parallel_cuda_manual_seed(seed, inference_rng_tracker=inference, force_reset_rng=True)


def prepare_cpu_process() -> bool:
    """What a process without CUDA needs before megatron-core builds and runs a model: :func:`apply_cpu_patches`,
    and megatron's inference rng tracker (which forks nothing) when no usable tracker is set up (the model-parallel
    groups were initialised without ``model_parallel_cuda_manual_seed``; a CUDA tracker cannot work without CUDA).
    Seeds nothing. Does nothing where CUDA is available; idempotent.

    Returns:
        True when this is a CPU-only process (and it is now prepared).
    """
    if torch.cuda.is_available():
        return False
    apply_cpu_patches()
    from megatron.core.tensor_parallel import random as mcore_random

    tracker = mcore_random._CUDA_RNG_STATE_TRACKER if mcore_random._CUDA_RNG_STATE_TRACKER_INITIALIZED else None
    usable = tracker is not None and (getattr(tracker, "is_inference_rng_tracker", False) or tracker.get_states())
    if not usable:
        mcore_random.initialize_rng_tracker(inference_rng_tracker=True, force_reset=True)
    return True
