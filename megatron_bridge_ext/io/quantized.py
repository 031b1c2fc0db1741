"""Block-quantized HF releases read as the weights they stand for.

DeepSeek-V3 / V3.1 / V3.2, Kimi-K2 and the Qwen3 ``-FP8`` releases store their linear weights as FP8 (e4m3) with one
``weight_scale_inv`` per 128x128 block (``quantization_config``: ``quant_method="fp8"``, ``weight_block_size``);
GPT-OSS stores its experts as MXFP4 (``quant_method="mxfp4"``: ``*_blocks`` uint8 ``[..., N, K/32, 16]``, two E2M1
values a byte, and ``*_scales`` uint8 E8M0 ``[..., N, K/32]``). :class:`QuantizedSource` wraps the lazy
:class:`~megatron_bridge_ext.io.hf_source.SafeTensorsSource` of such a checkpoint and presents it as the checkpoint
of its dequantized model: the key set, shapes and dtypes are those of the unquantized parameters (scale tensors are
not keys of their own; an MXFP4 pair is one key, the parameter's name). A mapping with a fused op reads a quantized
key as stored (:meth:`QuantizedSource.quantized`, an ``ops.QuantizedWeight``) and dequantizes only the rows its rank
keeps; reading it as a tensor (``source[key]``, or :meth:`QuantizedSource.experts` for a range of experts) dequantizes it
with the extension's kernels (``ops.fp8_block_dequant``: fp32(w) * fp32(scale) rounded once, as DeepSeek's
``weight_dequant`` and transformers' ``Fp8Dequantize``; ``ops.mxfp4_dequant``: e2m1 * 2^(e - 127), transformers'
``convert_moe_packed_tensors``, whose transpose to the ``[E, in, out]`` parameter is a view here). Every family's
mappings, the model path and the streamed converter read it as they read a bf16 checkpoint; the pages of the
quantized bytes are released once dequantized.

What the files say is checked when the checkpoint is opened (headers only, plus the FP8 scales, which are small):
every quantized weight has its scales, of the right dtype and block grid; no scale without its weight; no NaN / Inf
FP8 scale; a block size of two positive integers; quantized tensors in a checkpoint whose config names no (or another)
quantization. Errors name the tensor and its file; nothing is converted before they pass.
"""

from __future__ import annotations

import math
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import torch

from megatron_bridge_ext import geometry, ops
from megatron_bridge_ext.io.hf_source import SafeTensorsSource

__all__ = ["QuantizedSource", "quantization_of", "open_source", "strip_quantization", "FP8_SCALE_SUFFIX"]

#: the scale tensor of FP8 weight ``X`` is ``X + FP8_SCALE_SUFFIX`` (``...weight`` -> ``...weight_scale_inv``)
FP8_SCALE_SUFFIX = "_scale_inv"
#: the MXFP4 tensors of parameter ``P`` are ``P + "_blocks"`` and ``P + "_scales"``
MX_BLOCKS, MX_SCALES = "_blocks", "_scales"

_FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)
_FP8_SCALE_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float8_e8m0fnu)
_SUPPORTED = ("fp8", "mxfp4")


def _config_get(config: Any, key: str, default: Any = None) -> Any:
    if isinstance(config, Mapping):
        return config.get(key, default)
    return getattr(config, key, default)


def quantization_of(raw_config: Mapping[str, Any], where: str) -> Optional[Dict[str, Any]]:
    """The ``quantization_config`` of a raw ``config.json``, checked: None for an unquantized checkpoint, else a dict
    with ``quant_method`` ``"fp8"`` (and ``weight_block_size``) or ``"mxfp4"``.

    Raises:
        ValueError: another method (AWQ, GPTQ, bitsandbytes, compressed-tensors, ...), an FP8 config without a
            block size (per-tensor FP8) or with a bad one, an ``fmt`` other than e4m3 / e5m2 (``where`` names the
            file).
    """
    quant = raw_config.get("quantization_config")
    if not quant:
        return None
    if not isinstance(quant, Mapping):
        raise ValueError(f"{where}: quantization_config is a {type(quant).__name__} ({quant!r}), expected an object")
    method = quant.get("quant_method")
    if method not in _SUPPORTED:
        raise ValueError(f"{where}: quantization_config.quant_method = {method!r} is not supported; this package "
                         "reads block-scaled FP8 ('fp8', DeepSeek-V3 / Qwen3-FP8 releases) and MXFP4 ('mxfp4', "
                         "GPT-OSS releases): dequantise other formats first")
    quant = dict(quant)
    if method == "fp8":
        block = quant.get("weight_block_size")
        if block is None:
            raise ValueError(f"{where}: quantization_config (fp8) has no weight_block_size: per-tensor FP8 is not "
                             "supported, only block-scaled FP8 (e.g. weight_block_size [128, 128])")
        if (not isinstance(block, (list, tuple)) or len(block) != 2
                or not all(isinstance(b, int) and not isinstance(b, bool) and b > 0 for b in block)):
            raise ValueError(f"{where}: quantization_config.weight_block_size = {block!r}, expected two positive "
                             "integers [block rows, block columns]")
        fmt = quant.get("fmt", "e4m3")
        if fmt not in ("e4m3", "e5m2"):
            raise ValueError(f"{where}: quantization_config.fmt = {fmt!r}, expected 'e4m3' or 'e5m2'")
    return quant


def strip_quantization(raw_config: Mapping[str, Any]) -> Dict[str, Any]:
    """A raw config without its ``quantization_config``: what describes the dequantized weights this package writes."""
    return {k: v for k, v in raw_config.items() if k != "quantization_config"}


def _dequant_dtype(raw_config: Mapping[str, Any]) -> torch.dtype:
    """The dtype quantized weights are read as: the checkpoint's ``torch_dtype`` / ``dtype`` when it is a floating
    type wider than 8 bits, else bfloat16 (what the quantized releases were trained in)."""
    name = raw_config.get("torch_dtype") or raw_config.get("dtype")
    dtype = getattr(torch, name, None) if isinstance(name, str) else None
    if isinstance(dtype, torch.dtype) and dtype in (torch.bfloat16, torch.float16, torch.float32):
        return dtype
    return torch.bfloat16


class QuantizedSource(Mapping[str, torch.Tensor]):
    """An FP8 block-scaled or MXFP4 HF checkpoint presented as its dequantized tensors (see the module doc).

    Args:
        source: the checkpoint's lazy safetensors source (owned: closed with this one).
        quant: its checked ``quantization_config`` (:func:`quantization_of`).
        dtype: the dtype quantized weights are read as.

    Raises:
        ValueError: a quantized weight without its scales or with scales of the wrong dtype / shape, a scale tensor
            without its weight, an FP8 scale that is NaN or Inf (tensor and file named).
    """

    def __init__(self, source: SafeTensorsSource, quant: Mapping[str, Any], dtype: torch.dtype = torch.bfloat16
                 ) -> None:
        self.source = source
        self.quant = dict(quant)
        self.method = self.quant["quant_method"]
        self.dtype_out = dtype
        self.block_size: Tuple[int, int] = tuple(self.quant.get("weight_block_size") or (0, 0))  # type: ignore
        # exposed name -> (weight key, scale key) for quantized tensors; plain keys map to themselves
        self._quantized: Dict[str, Tuple[str, str]] = {}
        self._shapes: Dict[str, Tuple[int, ...]] = {}
        hidden = set()
        if self.method == "fp8":
            self._index_fp8(hidden)
        else:
            self._index_mxfp4(hidden)
        keys: List[str] = []
        for k in source.keys():
            if k in hidden:
                continue
            keys.append(k[:-len(MX_BLOCKS)] if self.method == "mxfp4" and k.endswith(MX_BLOCKS)
                        and k[:-len(MX_BLOCKS)] in self._quantized else k)
        self._keys = keys
        self._key_set = set(keys)

    # ---- indexing (headers, and the FP8 scales' values) ------------------------------------------------------------

    def _where(self, key: str) -> str:
        return f"tensor {key!r} in {self.source.file_of(key)}"

    def _index_fp8(self, hidden: set) -> None:
        src, op = self.source, "fp8 checkpoint"
        for key in src.keys():
            dt = src.dtype(key)
            if key.endswith(FP8_SCALE_SUFFIX):
                weight = key[:-len(FP8_SCALE_SUFFIX)]
                if weight not in src:
                    raise ValueError(f"{self._where(key)}: a block scale whose weight {weight!r} is not in the "
                                     "checkpoint")
                if src.dtype(weight) not in _FP8_DTYPES:
                    raise ValueError(f"{self._where(key)}: a block scale for {weight!r}, which is stored as "
                                     f"{src.dtype(weight)}, not as FP8")
                hidden.add(key)
                continue
            if dt not in _FP8_DTYPES:
                continue
            scale = key + FP8_SCALE_SUFFIX
            if scale not in src:
                raise ValueError(f"{self._where(key)}: an FP8 weight ({dt}) without its block scales {scale!r}; the "
                                 "checkpoint is incomplete (a block-quantized weight cannot be read without them)")
            shape = tuple(src.shape(key))
            if len(shape) < 2:
                raise ValueError(f"{self._where(key)}: an FP8 weight of shape {list(shape)}; block-scaled weights are "
                                 "matrices (or stacks of matrices)")
            sdt = src.dtype(scale)
            if sdt not in _FP8_SCALE_DTYPES:
                raise ValueError(f"{self._where(scale)}: block scales stored as {sdt}, expected one of "
                                 f"{[str(d).replace('torch.', '') for d in _FP8_SCALE_DTYPES]}")
            want = (*shape[:-2], *geometry.fp8_scale_shape(op, shape[-2], shape[-1], self.block_size))
            got = tuple(src.shape(scale))
            if got != want:
                raise ValueError(f"{self._where(scale)}: block scales of shape {list(got)} for the FP8 weight "
                                 f"{key!r} of shape {list(shape)}; weight_block_size {list(self.block_size)} gives "
                                 f"{list(want)}")
            s = src[scale]
            finite = torch.isfinite(s.float()) if sdt != torch.float8_e8m0fnu else s.view(torch.uint8) != 255
            if not bool(finite.all()):
                bad = int((~finite).sum())
                raise ValueError(f"{self._where(scale)}: {bad} of its {s.numel()} block scales are NaN or Inf "
                                 "(a damaged checkpoint)")
            src.release(scale)
            self._quantized[key] = (key, scale)
            self._shapes[key] = shape

    def _index_mxfp4(self, hidden: set) -> None:
        src, op = self.source, "mxfp4 checkpoint"
        for key in src.keys():
            if key.endswith(MX_SCALES):
                param = key[:-len(MX_SCALES)]
                if param + MX_BLOCKS not in src:
                    raise ValueError(f"{self._where(key)}: MXFP4 scales without their blocks {param + MX_BLOCKS!r}")
                hidden.add(key)
                continue
            if src.dtype(key) in _FP8_DTYPES:
                raise ValueError(f"{self._where(key)}: stored as {src.dtype(key)} in an MXFP4 checkpoint "
                                 "(quantization_config.quant_method = 'mxfp4')")
            if not key.endswith(MX_BLOCKS):
                continue
            param = key[:-len(MX_BLOCKS)]
            scales = param + MX_SCALES
            if scales not in src:
                raise ValueError(f"{self._where(key)}: MXFP4 blocks without their scales {scales!r}; the checkpoint is "
                                 "incomplete")
            if param in src:
                raise ValueError(f"{self._where(key)}: the checkpoint holds both {param!r} and its MXFP4 blocks")
            shape, sshape = tuple(src.shape(key)), tuple(src.shape(scales))
            for name, dt in ((key, src.dtype(key)), (scales, src.dtype(scales))):
                if dt != torch.uint8:
                    raise ValueError(f"{self._where(name)}: stored as {dt}, expected uint8 (MXFP4 "
                                     f"{'blocks' if name == key else 'E8M0 scales'})")
            if len(shape) < 3:
                raise ValueError(f"{self._where(key)}: MXFP4 blocks of shape {list(shape)}, expected "
                                 "[..., N, K/32, 16]")
            n, k = geometry.mxfp4_matrix_shape(op, key, shape[-3:])
            if sshape != shape[:-1]:
                raise ValueError(f"{self._where(scales)}: MXFP4 scales of shape {list(sshape)} for blocks {key!r} of "
                                 f"shape {list(shape)}; expected {list(shape[:-1])}")
            self._quantized[param] = (key, scales)
            # the parameter is the dequantized [..., N, K] with its last two dims swapped (GPT-OSS's [E, in, out])
            self._shapes[param] = (*shape[:-3], k, n)

    # ---- the mapping API ---------------------------------------------------------------------------------------------

    def is_quantized(self, key: str) -> bool:
        """Whether ``key`` is stored quantized (read dequantized)."""
        return key in self._quantized

    def stored_keys(self, key: str) -> Tuple[str, ...]:
        """The tensors of the files that hold ``key`` (the weight and its scales for a quantized one)."""
        return self._quantized.get(key, (key,))

    def keys(self) -> List[str]:  # type: ignore[override]
        return list(self._keys)

    def get_all_keys(self) -> List[str]:
        return self.keys()

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)

    def __contains__(self, key: object) -> bool:
        return key in self._key_set

    def _check(self, key: str) -> None:
        if key not in self._key_set:
            raise KeyError(f"tensor {key!r} is not in the HF checkpoint {self.source.path}")

    def __getitem__(self, key: str) -> torch.Tensor:
        """Tensor ``key``: a view of the file for a plain one, dequantized (a new tensor) for a quantized one."""
        self._check(key)
        if key not in self._quantized:
            return self.source[key]
        out = self._dequantize(key, self.quantized(key))
        self.source.release(list(self._quantized[key]))  # the quantized bytes are read: their pages can go
        return out

    def quantized(self, key: str) -> ops.QuantizedWeight:
        """Quantized tensor ``key`` as stored (views of the file), for a mapping whose fused op dequantizes only what
        its rank keeps."""
        self._check(key)
        w_key, s_key = self._quantized[key]
        return ops.QuantizedWeight(self.source[w_key], self.source[s_key], self.method,
                                   tuple(self.block_size), self.dtype_out, tuple(self._shapes[key]))

    def experts(self, key: str, lo: int, hi: int) -> torch.Tensor:
        """Experts ``[lo, hi)`` (the first dim) of a tensor fused over a layer's experts: only those are dequantized
        (a view of the file for a plain one)."""
        self._check(key)
        if key not in self._quantized:
            return self.source[key].narrow(0, lo, hi - lo)
        return self._dequantize(key, self.quantized(key).experts(lo, hi), f"experts [{lo}, {hi}) of ")

    def _dequantize(self, key: str, weight: ops.QuantizedWeight, what: str = "") -> torch.Tensor:
        try:
            return weight.dequantize()
        except (RuntimeError, ValueError) as e:
            w_key, s_key = self._quantized[key]
            raise ValueError(f"dequantizing {what}{key!r} ({w_key} + {s_key} in {self.source.file_of(w_key)}): "
                             f"{e}") from None

    def get(self, key: str, default: Any = None) -> Any:  # type: ignore[override]
        return self[key] if key in self._key_set else default

    def dtype(self, key: str) -> torch.dtype:
        self._check(key)
        return self.dtype_out if key in self._quantized else self.source.dtype(key)

    def shape(self, key: str) -> Tuple[int, ...]:
        self._check(key)
        return self._shapes[key] if key in self._quantized else self.source.shape(key)

    def nbytes(self, key: str) -> int:
        """Bytes of ``key`` as read (dequantized for a quantized one)."""
        if key in self._quantized:
            return math.prod(self._shapes[key]) * self.dtype_out.itemsize
        self._check(key)
        return self.source.nbytes(key)

    def file_of(self, key: str) -> str:
        self._check(key)
        return self.source.file_of(self.stored_keys(key)[0])

    @property
    def files(self) -> List[str]:
        return self.source.files

    @property
    def path(self) -> str:
        return self.source.path

    @property
    def root(self) -> str:
        return self.source.root

    @property
    def metadata(self) -> Dict[str, str]:
        return self.source.metadata

    @property
    def index_metadata(self) -> Dict[str, Any]:
        return self.source.index_metadata

    @property
    def total_size(self) -> int:
        """Bytes of tensor data in the files (quantized as stored)."""
        return self.source.total_size

    def config(self) -> Dict[str, Any]:
        return self.source.config()

    def release(self, keys: Union[str, Sequence[str]]) -> None:
        names = [keys] if isinstance(keys, str) else list(keys)
        self.source.release([s for k in names for s in self.stored_keys(k)])

    def release_tensor(self, tensor: torch.Tensor) -> None:
        self.source.release_tensor(tensor)

    def close(self) -> None:
        self.source.close()

    def __enter__(self) -> "QuantizedSource":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"QuantizedSource({self.method}, {len(self._quantized)} quantized of {len(self)} tensors, "
                f"{self.source!r})")


def open_source(source: SafeTensorsSource, raw_config: Mapping[str, Any], where: str
                ) -> Union[SafeTensorsSource, QuantizedSource]:
    """The tensors of a checkpoint as its model sees them: ``source`` itself, or a :class:`QuantizedSource` over it
    when ``raw_config`` (``config.json`` as written; ``where`` names it) has a supported ``quantization_config``.

    Raises:
        ValueError: an unsupported quantization (see :func:`quantization_of`), or FP8 tensors in a checkpoint whose
            config names no quantization (their block size is unknown), naming the tensor and its file.
    """
    quant = quantization_of(raw_config, where)
    if quant is None:
        for key in source.keys():
            if source.dtype(key) in _FP8_DTYPES:
                raise ValueError(f"tensor {key!r} in {source.file_of(key)} is stored as {source.dtype(key)}, but "
                                 f"{where} has no quantization_config (its block size and scales cannot be known)")
        return source
    return QuantizedSource(source, quant, _dequant_dtype(raw_config))
