"""A stand-in for Transformer Engine's module classes, so that megatron-core builds its Transformer Engine (TE) layer
spec on a CPU; test-only, never imported by the package.

What it replaces and why its keys are TE's: TE cannot be imported without a GPU, so :func:`install` puts a small
``transformer_engine`` package into ``sys.modules`` before megatron-core is imported. It holds only the classes that
megatron-core's ``extensions/transformer_engine.py`` subclasses or instantiates (``Linear``, ``LayerNormLinear``,
``GroupedLinear``, ``DotProductAttention``, ``LayerNorm``, ``RMSNorm``, plus the base classes and no-op helpers it
touches while importing: ``DelayedScaling``, ``CudaRNGStatesTracker``, ``FP8GlobalStateManager``, ``fp8_autocast``,
``QuantizedTensor``). Each module class registers exactly the parameters TE's own class registers, under TE's names
and per-partition shapes (read from TE 2.11 / 2.17 ``module/linear.py``, ``layernorm_linear.py``,
``grouped_linear.py``, ``ops/basic/*norm.py``, ``attention/dot_product_attention/dot_product_attention.py``: ``weight``
/ ``bias`` only when ``bias=True``; ``layer_norm_weight`` and, for LayerNorm only, ``layer_norm_bias``; ``weight{i}`` /
``bias{i}``; ``softmax_offset`` only for ``softmax_type="learnable"``), and answers ``get_extra_state`` as TE's
``TransformerEngineBaseModule`` and ``BasicOperation`` do without FP8 state: ``torch.empty(0, dtype=torch.uint8)``.
Everything else — which class sits where (``get_gpt_layer_with_transformer_engine_spec``, ``TESpecProvider``), the
megatron-core subclasses' ``__init__`` and ``sharded_state_dict`` (key names, TP axes, ``_extra_state`` objects,
grouped experts' per-expert split), the blocks' offsets — is megatron-core's own code, unchanged. There is no
forward: the stand-in builds models to compare checkpoint keys, shapes and loaded values, not to run them.
"""

from __future__ import annotations

import contextlib
import importlib.machinery
import sys
import types
from typing import Any, Optional

import torch
from torch.nn import Parameter

__all__ = ["install", "TE_VERSION_FOR_MCORE", "FP8_EXTRA_STATE"]

#: bytes that every module's ``get_extra_state`` returns instead of TE's empty tensor (None: TE without FP8 state);
#: TE with FP8 saves its scaling state pickled into a uint8 tensor in the same way
FP8_EXTRA_STATE: Optional[bytes] = None
#: the TE release each megatron-core line was built against (megatron-core's pins: 0.16.1 ``<2.12``, 0.19 TE 2.17.1)
TE_VERSION_FOR_MCORE = {"0.16": "2.11.0", "0.19": "2.17.1"}


def _empty_extra_state() -> torch.Tensor:
    return torch.empty(0, dtype=torch.uint8)


class _ExtraState:
    """TE's ``get_extra_state`` / ``set_extra_state`` for a module without FP8 state (FP8 never enabled here)."""

    def _init_extra_state(self) -> None:
        self.fp8 = False
        self.fp8_calibration = False
        self.fp8_meta = {"fp8_checkpoint": False}
        self.loaded_extra_state: Optional[torch.Tensor] = None

    def get_extra_state(self) -> torch.Tensor:
        if FP8_EXTRA_STATE is not None:  # a test's stand-in for a module with FP8 scaling state
            return torch.frombuffer(bytearray(FP8_EXTRA_STATE), dtype=torch.uint8)
        return _empty_extra_state()

    def set_extra_state(self, state: Any) -> None:
        # TE returns at once for None or an empty tensor; anything else it unpickles as FP8 scaling state. Kept
        # here so that a test can see what a load handed to the module.
        self.loaded_extra_state = state

    def init_fp8_metadata(self, num_gemms: int = 1) -> None:
        pass

    def forward(self, *args, **kwargs):
        raise NotImplementedError(f"{type(self).__name__}: the Transformer Engine stand-in has no forward")


def _dtype(kwargs) -> torch.dtype:
    return kwargs.get("params_dtype") or torch.get_default_dtype()


def _device(kwargs) -> str:
    device = kwargs.get("device", "cpu")
    return "meta" if str(device) == "meta" else "cpu"


def _split(size: int, tp: int, what: str) -> int:
    if size % tp:
        raise ValueError(f"{what} {size} is not divisible by tp_size {tp}")
    return size // tp


class Linear(_ExtraState, torch.nn.Module):
    """``te.pytorch.Linear``: ``weight`` ``[out, in]`` per partition (column: out / tp, row: in / tp), ``bias``."""

    def __init__(self, in_features: int, out_features: int, *, bias: bool = True, parallel_mode: Optional[str] = None,
                 tp_size: int = 1, **kwargs):
        super().__init__()
        self._init_extra_state()
        tp = tp_size or 1
        self.parallel_mode = parallel_mode
        self.tp_size = tp
        self.in_features = _split(in_features, tp, "in_features") if parallel_mode == "row" else in_features
        self.out_features = _split(out_features, tp, "out_features") if parallel_mode == "column" else out_features
        self.use_bias = bias
        dtype, device = _dtype(kwargs), _device(kwargs)
        self.weight = Parameter(torch.empty(self.out_features, self.in_features, dtype=dtype, device=device))
        if bias:
            self.bias = Parameter(torch.empty(self.out_features, dtype=dtype, device=device))
        else:
            self.bias = torch.Tensor().to(dtype=dtype, device=device)  # TE: an attribute, not a parameter


class LayerNormLinear(_ExtraState, torch.nn.Module):
    """``te.pytorch.LayerNormLinear``: ``layer_norm_weight`` (+ ``layer_norm_bias`` for LayerNorm), then a Linear."""

    def __init__(self, in_features: int, out_features: int, eps: float = 1e-5, *, bias: bool = True,
                 normalization: str = "LayerNorm", parallel_mode: Optional[str] = None, tp_size: int = 1,
                 zero_centered_gamma: bool = False, **kwargs):
        super().__init__()
        self._init_extra_state()
        tp = tp_size or 1
        self.parallel_mode = parallel_mode
        self.tp_size = tp
        self.in_features = in_features
        self.out_features = _split(out_features, tp, "out_features") if parallel_mode == "column" else out_features
        self.use_bias = bias
        self.normalization = normalization
        self.zero_centered_gamma = zero_centered_gamma
        dtype, device = _dtype(kwargs), _device(kwargs)
        self.layer_norm_weight = Parameter(torch.empty(in_features, dtype=dtype, device=device))
        if normalization == "LayerNorm":
            self.layer_norm_bias = Parameter(torch.empty(in_features, dtype=dtype, device=device))
        else:
            self.layer_norm_bias = None
        self.weight = Parameter(torch.empty(self.out_features, in_features, dtype=dtype, device=device))
        if bias:
            self.bias = Parameter(torch.empty(self.out_features, dtype=dtype, device=device))
        else:
            self.bias = torch.Tensor().to(dtype=dtype, device=device)


class GroupedLinear(_ExtraState, torch.nn.Module):
    """``te.pytorch.GroupedLinear``: ``weight0 .. weight{n-1}`` (``bias{i}``), one per GEMM (local expert)."""

    def __init__(self, num_gemms: int, in_features: int, out_features: int, *, bias: bool = True,
                 parallel_mode: Optional[str] = None, tp_size: int = 1, **kwargs):
        super().__init__()
        self._init_extra_state()
        tp = tp_size or 1
        self.num_gemms = num_gemms
        self.parallel_mode = parallel_mode
        self.tp_size = tp
        self.in_features = _split(in_features, tp, "in_features") if parallel_mode == "row" else in_features
        self.out_features = _split(out_features, tp, "out_features") if parallel_mode == "column" else out_features
        self.use_bias = bias
        dtype, device = _dtype(kwargs), _device(kwargs)
        for i in range(num_gemms):
            self.register_parameter(f"weight{i}", Parameter(
                torch.empty(self.out_features, self.in_features, dtype=dtype, device=device)))
            if bias:
                self.register_parameter(f"bias{i}", Parameter(
                    torch.empty(self.out_features, dtype=dtype, device=device)))
            else:
                setattr(self, f"bias{i}", torch.Tensor().to(dtype=dtype, device=device))


class DotProductAttention(_ExtraState, torch.nn.Module):
    """``te.pytorch.DotProductAttention``: no parameters except ``softmax_offset`` ``[heads / tp]`` (fp32) for
    ``softmax_type="learnable"``."""

    def __init__(self, num_attention_heads: int, kv_channels: Any, *, tp_size: int = 1,
                 softmax_type: str = "vanilla", **kwargs):
        super().__init__()
        self._init_extra_state()
        self.num_attention_heads = num_attention_heads
        self.tp_size = tp_size or 1
        self.softmax_type = softmax_type
        if softmax_type == "learnable":
            self.softmax_offset = Parameter(torch.empty(_split(num_attention_heads, self.tp_size, "heads"),
                                                        dtype=torch.float32))
        else:
            self.softmax_offset = None


class _Norm(_ExtraState, torch.nn.Module):
    def __init__(self, normalized_shape: Optional[int] = None, eps: float = 1e-5, *, hidden_size: Optional[int] = None,
                 zero_centered_gamma: bool = False, bias: bool = False, **kwargs):
        # TE's norms take ``normalized_shape`` (megatron-core 0.19) and the older alias ``hidden_size`` (0.16)
        hidden_size = normalized_shape if normalized_shape is not None else hidden_size
        super().__init__()
        self._init_extra_state()
        self.eps = eps
        self.zero_centered_gamma = zero_centered_gamma
        dtype, device = _dtype(kwargs), _device(kwargs)
        self.weight = Parameter(torch.empty(hidden_size, dtype=dtype, device=device))
        if bias:
            self.bias = Parameter(torch.empty(hidden_size, dtype=dtype, device=device))


class LayerNorm(_Norm):
    """``te.pytorch.LayerNorm``: ``weight``, ``bias``."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, bias=True, **kwargs)


class RMSNorm(_Norm):
    """``te.pytorch.RMSNorm``: ``weight``."""


class DelayedScaling:
    """``te.common.recipe.DelayedScaling`` (subclassed by megatron-core's ``TEDelayedScaling``; never built here)."""

    def __init__(self, *args, **kwargs):
        raise NotImplementedError("FP8 recipes are not part of the Transformer Engine stand-in")


class CudaRNGStatesTracker:
    """``te.pytorch.distributed.CudaRNGStatesTracker`` (subclassed by megatron-core; never built here)."""

    def __init__(self, *args, **kwargs):
        raise NotImplementedError("the Transformer Engine stand-in has no RNG tracker")


class FP8GlobalStateManager:
    """FP8 is never enabled."""

    @staticmethod
    def is_fp8_enabled() -> bool:
        return False

    @staticmethod
    def get_fp8_recipe():
        return None


@contextlib.contextmanager
def fp8_autocast(*args, **kwargs):
    yield


@contextlib.contextmanager
def fp8_model_init(*args, **kwargs):
    yield


class _Unavailable:
    """A TE class megatron-core names but that the stand-in does not provide."""

    def __init__(self, *args, **kwargs):
        raise NotImplementedError(f"{type(self).__name__} is not part of the Transformer Engine stand-in")


def _unavailable_function(name: str):
    def unavailable(*args, **kwargs):
        raise NotImplementedError(f"{name} is not part of the Transformer Engine stand-in")

    unavailable.__name__ = name
    return unavailable


class _UnavailableNamespace:
    """``te.pytorch.ops``: every name is :class:`_Unavailable` (megatron-core names these classes in annotations)."""

    def __getattr__(self, name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        return _Unavailable


class QuantizedTensor(torch.Tensor):
    """TE's quantized-tensor base class (``isinstance`` checks in megatron-core; no tensor here is one)."""


def _module(name: str, **attrs) -> types.ModuleType:
    mod = types.ModuleType(name)
    mod.__spec__ = importlib.machinery.ModuleSpec(name, None)  # importlib.util.find_spec asks for it
    mod.__dict__.update(attrs)
    sys.modules[name] = mod
    return mod


def install(version: Optional[str] = None) -> str:
    """Put the stand-in ``transformer_engine`` into ``sys.modules``; call before anything imports megatron-core.

    Args:
        version: the TE version it reports (default: the one the installed megatron-core was built against).

    Returns:
        The version reported.
    """
    if any(name == "megatron.core" or name.startswith("megatron.core.") for name in sys.modules):
        raise RuntimeError("te_standin.install() must run before megatron-core is imported")
    if version is None:
        from importlib.metadata import version as dist_version

        mcore = ".".join(dist_version("megatron-core").split(".")[:2])
        version = TE_VERSION_FOR_MCORE.get(mcore, TE_VERSION_FOR_MCORE["0.19"])
    recipe = types.SimpleNamespace(DelayedScaling=DelayedScaling)
    common = types.SimpleNamespace(recipe=recipe)
    distributed = types.SimpleNamespace(CudaRNGStatesTracker=CudaRNGStatesTracker)
    ops = _UnavailableNamespace()  # TE's op fuser: named in TEFusedMLP's annotations, built only with use_te_op_fuser
    fp8 = _module("transformer_engine.pytorch.fp8", FP8GlobalStateManager=FP8GlobalStateManager,
                  fp8_autocast=fp8_autocast, fp8_model_init=fp8_model_init)
    tensor = _module("transformer_engine.pytorch.tensor", QuantizedTensor=QuantizedTensor)
    # fused router kernels, imported unconditionally by megatron-core for TE >= 2.7, used only with
    # moe_router_fusion=True
    router = _module("transformer_engine.pytorch.router", **{name: _unavailable_function(name) for name in (
        "fused_compute_score_for_moe_aux_loss", "fused_moe_aux_loss", "fused_topk_with_score_function")})
    pytorch = _module(
        "transformer_engine.pytorch", Linear=Linear, LayerNormLinear=LayerNormLinear, GroupedLinear=GroupedLinear,
        DotProductAttention=DotProductAttention, LayerNorm=LayerNorm, RMSNorm=RMSNorm, distributed=distributed,
        fp8=fp8, tensor=tensor, ops=ops, router=router,
    )
    _module("transformer_engine", __version__=version, pytorch=pytorch, common=common)
    return version
