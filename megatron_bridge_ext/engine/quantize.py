"""Block-quantized export: the HF tensors of an export (``save_hf_pretrained``, the ``export`` command, a
:class:`~megatron_bridge_ext.engine.sync.WeightSyncPlan`) written as FP8 in the layout of DeepSeek-V3's release.

Every 2-D linear ``*.weight`` becomes ``float8_e4m3fn`` plus ``*.weight_scale_inv`` (float32,
``[ceil(N / bn), ceil(K / bk)]``: blocks at the bottom / right edge are partial when the block size does not divide the
weight, e.g. ``[576, 7168]`` -> ``[5, 56]``). Kept as exported (the model's dtype, or the source's), as the release
keeps them: the embeddings (``embed_tokens``, an MTP layer's copy too), the output layer (``lm_head``, an MTP layer's
``shared_head.head``), every norm, the MoE routers (``mlp.gate``, Mixtral's ``block_sparse_moe.gate``, GPT-OSS's
``mlp.router``, Qwen2-MoE's ``shared_expert_gate``) and ``e_score_correction_bias``, biases, every other 1-D tensor and
every tensor of 3 or more dimensions (fused expert tensors such as ``mlp.experts.gate_up_proj``: the release has none,
and transformers expects fused FP8 experts in its own layout only).

The quantization runs per HF tensor after the export's conversion (:func:`megatron_bridge_ext.ops.fp8_block_quant`,
per block of the tensor as the plain export writes it): the FP8 bytes are those of quantizing the bf16 export.
``rule="transformers"`` (the default) is transformers' own ``Fp8Quantize`` (per block f = 448 / amax, 1 for an
all-zero block; weight = fp8(clamp(w * f, -448, 448)), scale_inv = 1 / f): transformers quantizing the bf16 export
itself gives the same bytes. ``rule="deepseek"`` is DeepSeek-V3's formula (scale = max(amax, 1e-4) / 448, weight =
fp8(w / scale), scale_inv = scale). See the section comment of :mod:`megatron_bridge_ext.ops`.

The written ``config.json`` gets ``quantization_config`` (:meth:`FP8Export.hf_config`); an export without
quantization drops the one a source's ``config.json`` carries (its weights are not quantized).
"""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import torch

from megatron_bridge_ext import ops
from megatron_bridge_ext.geometry import fp8_scale_shape

__all__ = ["QUANTIZATIONS", "FP8_RULES", "DEFAULT_FP8_RULE", "KEPT_PATTERNS", "FP8Export", "export_quantization",
           "scale_inv_name", "with_quantization_config"]

#: the values ``quantization=`` accepts (None: no quantization)
QUANTIZATIONS = ("fp8",)
#: the per-block formulas (see the module docstring)
FP8_RULES = ("transformers", "deepseek")
DEFAULT_FP8_RULE = "transformers"
#: fnmatch patterns of 2-D ``*.weight`` tensors kept as exported (embeddings, output layers, norms, routers)
KEPT_PATTERNS = (
    "*embed_tokens.weight",
    "lm_head.weight",
    "*shared_head.head.weight",
    "*norm.weight",
    "*.mlp.gate.weight",
    "*.block_sparse_moe.gate.weight",
    "*.mlp.router.weight",
    "*.shared_expert_gate.weight",
)
_FLOATS = (torch.bfloat16, torch.float16, torch.float32)
_LAYER_PREFIX = re.compile(r"^(?:.*\.)?layers\.\d+\.")

Alloc = Callable[[Tuple[int, ...], torch.dtype, torch.device], torch.Tensor]


def scale_inv_name(name: str) -> str:
    """``<module>.weight`` -> ``<module>.weight_scale_inv`` (DeepSeek-V3's and transformers' name)."""
    return f"{name}_scale_inv"


@dataclass(frozen=True)
class FP8Export:
    """How an export quantizes: ``rule`` (``transformers`` / ``deepseek``) and ``block_size`` ``(bn, bk)``."""

    rule: str = DEFAULT_FP8_RULE
    block_size: Tuple[int, int] = ops.DEFAULT_BLOCK_SIZE
    dtype: torch.dtype = torch.float8_e4m3fn

    def quantizes(self, name: str, shape: Sequence[int]) -> bool:
        """Whether the HF tensor ``name`` of ``shape`` is written as FP8 (see the module docstring)."""
        return (len(shape) == 2 and name.endswith(".weight")
                and not any(fnmatch.fnmatchcase(name, p) for p in KEPT_PATTERNS))

    def scale_shape(self, shape: Sequence[int]) -> Tuple[int, int]:
        """``[ceil(N / bn), ceil(K / bk)]`` of a ``[N, K]`` weight."""
        return fp8_scale_shape("FP8 export", int(shape[0]), int(shape[1]), self.block_size)

    def expand_specs(self, specs: Mapping[str, Tuple[Sequence[int], torch.dtype]]
                     ) -> Dict[str, Tuple[Tuple[int, ...], torch.dtype]]:
        """HF name -> (shape, dtype) of what the export writes, in order: each quantized weight in FP8 followed by
        its ``weight_scale_inv``; the other tensors unchanged.

        Raises:
            ValueError: a weight to quantize whose dtype is not bf16 / fp16 / fp32 (named), or an exported name that
                collides with a scale's.
        """
        out: Dict[str, Tuple[Tuple[int, ...], torch.dtype]] = {}
        for name, (shape, dtype) in specs.items():
            shape = tuple(int(s) for s in shape)
            if not self.quantizes(name, shape):
                out[name] = (shape, dtype)
                continue
            self._check_dtype(name, shape, dtype)
            scale = scale_inv_name(name)
            if scale in specs:
                raise ValueError(f"FP8 export: the exported tensors already hold {scale}, the name of {name}'s "
                                 "scales; refusing to write both")
            out[name] = (shape, self.dtype)
            out[scale] = (self.scale_shape(shape), torch.float32)
        return out

    def _check_dtype(self, name: str, shape: Sequence[int], dtype: torch.dtype) -> None:
        if dtype not in _FLOATS:
            raise ValueError(f"FP8 export of HF tensor {name} {tuple(shape)}: its dtype is {dtype}, the quantization "
                             f"reads {', '.join(str(d) for d in _FLOATS)}")

    def convert(self, name: str, tensor: torch.Tensor, alloc: Optional[Alloc] = None
                ) -> List[Tuple[str, torch.Tensor]]:
        """``[(name, tensor)]`` for a tensor kept as it is, ``[(name, fp8), (name_scale_inv, fp32)]`` for a weight
        that is quantized (into ``alloc``'s memory when given: valid as long as the caller's scratch area is).

        Raises:
            ValueError: the weight's dtype (named), or NaN / Inf in a block of it (the op's message, with the name).
        """
        shape = tuple(tensor.shape)
        if not self.quantizes(name, shape):
            return [(name, tensor)]
        self._check_dtype(name, shape, tensor.dtype)
        out = None
        if alloc is not None:
            out = (alloc(shape, self.dtype, tensor.device), alloc(self.scale_shape(shape), torch.float32,
                                                                  tensor.device))
        try:
            q, s = ops.fp8_block_quant(tensor, block_size=self.block_size, dtype=self.dtype, rule=self.rule, out=out)
        except RuntimeError as e:
            raise ValueError(f"FP8 export of HF tensor {name} {shape} {tensor.dtype} (block size "
                             f"{list(self.block_size)}, rule {self.rule!r}): {e}") from None
        return [(name, q), (scale_inv_name(name), s)]

    def hf_config(self, kept: Iterable[Tuple[str, Sequence[int]]] = ()) -> Dict[str, Any]:
        """The ``quantization_config`` of ``config.json``: DeepSeek-V3's, plus ``modules_to_not_convert`` naming the
        modules whose weights of 2 or more dimensions are kept (``kept``: HF (name, shape) pairs; ``lm_head`` always,
        as transformers adds it only when the list is absent), by their names inside a layer."""
        modules = {"lm_head"}
        for name, shape in kept:
            if len(shape) < 2 or self.quantizes(name, shape):
                continue
            module = _LAYER_PREFIX.sub("", name.rsplit(".", 1)[0])
            modules.add(module[len("model."):] if module.startswith("model.") else module)
        return {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                "weight_block_size": [int(b) for b in self.block_size],
                "modules_to_not_convert": sorted(modules)}


def export_quantization(quantization: Optional[str], rule: Optional[str] = None,
                        block_size: Optional[Sequence[int]] = None, *, where: str = "export") -> Optional[FP8Export]:
    """Checks an export's quantization settings; returns how to quantize, or None for none.

    Args:
        quantization: None (the model's dtype) or ``"fp8"``.
        rule: ``"transformers"`` (default) or ``"deepseek"``; only with a quantization.
        block_size: ``(bn, bk)``, two positive integers (default ``(128, 128)``); only with a quantization.
        where: what is being configured, for the messages.

    Raises:
        ValueError: an unknown quantization or rule, a bad block size, or a rule / block size without a quantization;
            each naming the setting and the value.
    """
    if quantization is None:
        if rule is not None or block_size is not None:
            given = {k: v for k, v in (("quantization_rule", rule), ("quantization_block_size", block_size))
                     if v is not None}
            raise ValueError(f"{where}: {given} given without a quantization (quantization=None); pass "
                             f"quantization='fp8' or leave them out")
        return None
    if quantization not in QUANTIZATIONS:
        raise ValueError(f"{where}: quantization={quantization!r} is not supported; supported: {list(QUANTIZATIONS)} "
                         "(or None for the model's dtype)")
    rule = DEFAULT_FP8_RULE if rule is None else rule
    if rule not in FP8_RULES:
        raise ValueError(f"{where}: quantization_rule={rule!r} is not one of {list(FP8_RULES)}")
    if block_size is None:
        block_size = ops.DEFAULT_BLOCK_SIZE
    try:
        sizes = tuple(block_size)
    except TypeError:
        sizes = ()
    if len(sizes) != 2 or not all(isinstance(b, int) and not isinstance(b, bool) and b > 0 for b in sizes):
        raise ValueError(f"{where}: quantization_block_size={block_size!r} must be two positive integers "
                         "(rows, columns), e.g. (128, 128)")
    return FP8Export(rule=rule, block_size=(int(sizes[0]), int(sizes[1])))


def with_quantization_config(config: Mapping[str, Any], quant: Optional[FP8Export],
                             kept: Iterable[Tuple[str, Sequence[int]]] = ()) -> Dict[str, Any]:
    """``config`` (a ``config.json`` as a dict) describing the weights written: without a quantization the source's
    ``quantization_config`` is dropped (the weights are not quantized), with one it is :meth:`FP8Export.hf_config`."""
    out = {k: v for k, v in config.items() if k != "quantization_config"}
    if quant is not None:
        out["quantization_config"] = quant.hf_config(kept)
    return out
