"""Shared fixtures: the device parametrisation, dtypes, random byte tensors and strided layouts."""

from __future__ import annotations

import os
import sys
from typing import Sequence

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import megatron_bridge_ext  # noqa: E402,F401  (registers torch.ops.bridge)

# Every dtype the ops must move unchanged (they dispatch on element size only).
DTYPES = [
    torch.bfloat16, torch.float16, torch.float32, torch.float64,
    torch.float8_e4m3fn, torch.float8_e5m2, torch.int8, torch.uint8, torch.int32, torch.int64, torch.bool,
]


def _cuda_skip_reason() -> str:
    if not torch.cuda.is_available():
        return "no CUDA device (torch.cuda.is_available() is False)"
    if not torch._C._dispatch_has_kernel_for_dispatch_key("bridge::qkv_pack", "CUDA"):
        return "the bridge ops have no CUDA kernel in this build"
    return ""


DEVICES = [
    pytest.param("cpu", id="cpu"),
    pytest.param("cuda", id="cuda", marks=pytest.mark.skipif(bool(_cuda_skip_reason()), reason=_cuda_skip_reason())),
]


@pytest.fixture(params=DEVICES)
def device(request) -> str:
    """Every op test runs on each device that has a kernel; CUDA is skipped, with the reason, where absent."""
    return request.param


def rand(shape: Sequence[int], dtype: torch.dtype = torch.bfloat16, device="cpu", gen=None) -> torch.Tensor:
    """Random bit patterns of ``dtype`` (any dtype, NaN payloads included: the ops move bytes)."""
    shape = tuple(shape)
    if dtype == torch.bool:
        return torch.randint(0, 2, shape, generator=gen, dtype=torch.uint8).bool().to(device)
    es = torch.empty((), dtype=dtype).element_size()
    if len(shape) == 0 or 0 in shape:
        if 0 in shape:
            return torch.empty(shape, dtype=dtype, device=device)
        raw = torch.randint(0, 256, (es,), generator=gen, dtype=torch.uint8)
        return raw.view(dtype).reshape(()).to(device)
    raw = torch.randint(0, 256, (*shape[:-1], shape[-1] * es), generator=gen, dtype=torch.uint8)
    return raw.view(dtype).to(device)


LAYOUTS = ["contiguous", "transposed", "row_strided", "col_slice"]


def as_layout(x: torch.Tensor, layout: str) -> torch.Tensor:
    """A non-contiguous view holding the same values as ``x`` (2-D; 1-D tensors get a strided view)."""
    if layout == "contiguous":
        return x.contiguous()
    if x.dim() == 1:
        big = torch.empty((x.shape[0] * 2,), dtype=x.dtype, device=x.device)
        big[1::2] = x
        return big[1::2]
    if layout == "transposed":
        return x.t().contiguous().t()
    if layout == "row_strided":
        big = torch.empty((x.shape[0] * 2, *x.shape[1:]), dtype=x.dtype, device=x.device)
        big[0::2] = x
        return big[0::2]
    if layout == "col_slice":
        big = torch.empty((x.shape[0], x.shape[1] + 3), dtype=x.dtype, device=x.device)
        big[:, 2:2 + x.shape[1]] = x
        return big[:, 2:2 + x.shape[1]]
    raise ValueError(layout)


def empty_layout(shape: Sequence[int], dtype: torch.dtype, device, layout: str) -> torch.Tensor:
    """An uninitialised destination of ``shape`` in the given layout."""
    return as_layout(torch.zeros(shape, dtype=dtype, device=device), layout)
