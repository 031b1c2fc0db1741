"""HF config -> megatron-core ``TransformerConfig`` translation for Llama-like models, and vocabulary padding.

megatron-core 0.16.1 keeps the rotary settings, the sequence length and embedding tying on ``GPTModel``'s constructor,
not on ``TransformerConfig``; ``GPTConfig`` (a ``TransformerConfig`` subclass) carries them so that one object
describes the whole model and ``model_builder.build_gpt_model`` needs nothing else.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Dict, Mapping, Optional

import torch
import torch.nn.functional as F
from megatron.core.transformer.transformer_config import TransformerConfig

__all__ = ["GPTConfig", "hf_to_transformer_config", "padded_vocab_size", "default_vocab_divisor"]

# megatron-core 0.16.1 RotaryEmbedding._apply_scaling hard-codes these llama3 parameters; only `factor` is settable.
_MCORE_LLAMA3_FIXED = {"low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}

_DTYPES = {
    "float32": torch.float32,
    "float": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "half": torch.float16,
}


@dataclass
class GPTConfig(TransformerConfig):
    """``TransformerConfig`` plus the ``GPTModel`` constructor settings an HF config determines."""

    vocab_size: Optional[int] = None
    """Unpadded (HF) vocabulary size."""
    make_vocab_size_divisible_by: Optional[int] = None
    """Vocabulary padding divisor (before multiplying by tp); None: the largest power of two <= 128 dividing it."""
    seq_length: int = 4096
    """Maximum sequence length (HF ``max_position_embeddings``)."""
    position_embedding_type: str = "rope"
    rotary_base: float = 10000.0
    rotary_percent: float = 1.0
    rope_scaling: bool = False
    """llama3-type RoPE frequency scaling (megatron-core fixes low/high freq factors 1/4 and 8192 positions)."""
    rope_scaling_factor: float = 8.0
    seq_len_interpolation_factor: Optional[float] = None
    """Linear RoPE scaling: positions are divided by this factor."""
    share_embeddings_and_output_weights: bool = False


def default_vocab_divisor(vocab_size: int) -> int:
    """The largest power of two <= 128 that divides ``vocab_size``."""
    if vocab_size < 1:
        raise ValueError(f"default_vocab_divisor: vocab_size must be >= 1, got {vocab_size}")
    d = 128
    while vocab_size % d:
        d //= 2
    return d


def padded_vocab_size(vocab_size: int, tp: int, make_vocab_size_divisible_by: Optional[int] = None) -> int:
    """Megatron's padded vocabulary: ``vocab_size`` rounded up to a multiple of ``divisor * tp``.

    Args:
        vocab_size: HF vocabulary size.
        tp: tensor-parallel size.
        make_vocab_size_divisible_by: divisor; None selects ``default_vocab_divisor(vocab_size)``.

    Returns:
        The padded size (>= vocab_size).
    """
    if vocab_size < 1 or tp < 1:
        raise ValueError(f"padded_vocab_size: vocab_size={vocab_size} and tp={tp} must be >= 1")
    divisor = make_vocab_size_divisible_by
    if divisor is None:
        divisor = default_vocab_divisor(vocab_size)
    if divisor < 1:
        raise ValueError(f"padded_vocab_size: make_vocab_size_divisible_by must be >= 1, got {divisor}")
    multiple = divisor * tp
    return int(math.ceil(vocab_size / multiple) * multiple)


def _get(cfg: Any, name: str, default: Any = None) -> Any:
    if isinstance(cfg, Mapping):
        return cfg.get(name, default)
    return getattr(cfg, name, default)


def _rope_settings(hf_config: Any) -> Dict[str, Any]:
    """Rotary fields of ``GPTConfig`` from HF ``rope_parameters`` (5.x) or ``rope_theta`` + ``rope_scaling`` (4.x)."""
    params = _get(hf_config, "rope_parameters")
    if isinstance(params, Mapping) and params and all(isinstance(v, Mapping) for v in params.values()):
        # per-layer-type rope parameters (e.g. {"full_attention": {...}, "sliding_attention": {...}})
        kinds = sorted(params)
        if len({tuple(sorted(v.items())) for v in params.values()}) > 1:
            raise ValueError(f"hf_to_transformer_config: per-layer-type rope_parameters differ ({kinds}); unsupported")
        params = params[kinds[0]]
    scaling = dict(params) if isinstance(params, Mapping) else dict(_get(hf_config, "rope_scaling") or {})
    theta = scaling.pop("rope_theta", None)
    if theta is None:
        theta = _get(hf_config, "rope_theta", 10000.0)
    out: Dict[str, Any] = {"rotary_base": float(theta)}
    partial = scaling.pop("partial_rotary_factor", None)
    if partial is None:
        partial = _get(hf_config, "partial_rotary_factor")
    if partial is not None:
        out["rotary_percent"] = float(partial)
    rope_type = scaling.get("rope_type", scaling.get("type", "default")) if scaling else "default"
    if rope_type == "default":
        return out
    factor = scaling.get("factor")
    if rope_type == "llama3":
        wrong = {k: scaling.get(k) for k, v in _MCORE_LLAMA3_FIXED.items() if float(scaling.get(k, v)) != float(v)}
        if wrong:
            raise ValueError(
                f"hf_to_transformer_config: llama3 rope scaling with {wrong} is not supported by megatron-core 0.16.1, "
                f"which fixes {_MCORE_LLAMA3_FIXED}"
            )
        out.update(rope_scaling=True, rope_scaling_factor=float(8.0 if factor is None else factor))
        return out
    if rope_type == "linear":
        if factor is None:
            raise ValueError("hf_to_transformer_config: linear rope scaling without a 'factor'")
        out["seq_len_interpolation_factor"] = float(factor)
        return out
    raise ValueError(
        f"hf_to_transformer_config: unsupported rope type {rope_type!r} (rope parameters {scaling}); "
        "supported: default, llama3, linear"
    )


def _hf_dtype(hf_config: Any) -> Optional[torch.dtype]:
    dt = _get(hf_config, "dtype")
    if dt is None and isinstance(hf_config, Mapping):  # older config.json files
        dt = hf_config.get("torch_dtype")
    if dt is None or isinstance(dt, torch.dtype):
        return dt
    name = str(dt).replace("torch.", "")
    if name not in _DTYPES:
        raise ValueError(f"hf_to_transformer_config: unsupported HF dtype {dt!r}; known {sorted(_DTYPES)}")
    return _DTYPES[name]


def hf_to_transformer_config(hf_config: Any, **overrides: Any) -> GPTConfig:
    """Translate a Llama-like HF config (object or dict) into a ``GPTConfig`` for megatron-core 0.16.1.

    Args:
        hf_config: a transformers ``PretrainedConfig`` or its ``to_dict()``.
        **overrides: any ``GPTConfig`` / ``TransformerConfig`` field, applied last (parallel sizes such as
            ``tensor_model_parallel_size``, ``pipeline_model_parallel_size``, ``virtual_pipeline_model_parallel_size``,
            ``expert_model_parallel_size``, ``expert_tensor_parallel_size``; ``params_dtype``; ...).

    Returns:
        The config, with CPU-friendly defaults (CPU initialisation, no weight init, fusions off, no dropout).

    Raises:
        ValueError: unsupported rope type or parameters, bias combinations megatron cannot express, unknown dtype or
            unknown override names.
    """
    known = {f.name for f in dataclasses.fields(GPTConfig)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ValueError(f"hf_to_transformer_config: unknown override(s) {unknown}")

    hidden = int(_get(hf_config, "hidden_size"))
    heads = int(_get(hf_config, "num_attention_heads"))
    kv_heads = _get(hf_config, "num_key_value_heads")
    head_dim = _get(hf_config, "head_dim")
    kw: Dict[str, Any] = dict(
        num_layers=int(_get(hf_config, "num_hidden_layers")),
        hidden_size=hidden,
        ffn_hidden_size=int(_get(hf_config, "intermediate_size")),
        num_attention_heads=heads,
        num_query_groups=int(kv_heads) if kv_heads is not None else heads,
        kv_channels=int(head_dim) if head_dim is not None else hidden // heads,
        normalization="RMSNorm",
        layernorm_epsilon=float(_get(hf_config, "rms_norm_eps", 1e-6)),
        gated_linear_unit=True,
        activation_func=F.silu,
        init_method_std=float(_get(hf_config, "initializer_range", 0.02)),
        hidden_dropout=0.0,
        attention_dropout=float(_get(hf_config, "attention_dropout", 0.0) or 0.0),
        vocab_size=int(_get(hf_config, "vocab_size")),
        seq_length=int(_get(hf_config, "max_position_embeddings", 4096)),
        position_embedding_type="rope",
        share_embeddings_and_output_weights=bool(_get(hf_config, "tie_word_embeddings", False)),
        # CPU-friendly defaults
        use_cpu_initialization=True,
        perform_initialization=False,
        bias_activation_fusion=False,
        masked_softmax_fusion=False,
        persist_layer_norm=False,
        bias_dropout_fusion=False,
        apply_rope_fusion=False,
        gradient_accumulation_fusion=False,
        sequence_parallel=False,
    )
    act = _get(hf_config, "hidden_act", "silu")
    if act not in ("silu", "swish"):
        raise ValueError(f"hf_to_transformer_config: hidden_act={act!r} is not SwiGLU (silu); unsupported")

    if "add_bias_linear" not in overrides and "add_qkv_bias" not in overrides:
        attn_bias = bool(_get(hf_config, "attention_bias", False))
        mlp_bias = bool(_get(hf_config, "mlp_bias", False))
        if attn_bias != mlp_bias:
            raise ValueError(
                f"hf_to_transformer_config: attention_bias={attn_bias} with mlp_bias={mlp_bias} cannot be expressed "
                "(megatron's add_bias_linear covers q/k/v, o_proj and the MLP together); pass add_bias_linear / "
                "add_qkv_bias explicitly"
            )
        kw["add_bias_linear"] = attn_bias
        kw["add_qkv_bias"] = attn_bias
    kw.update(_rope_settings(hf_config))

    dtype = overrides.get("params_dtype", _hf_dtype(hf_config)) or torch.float32
    kw["params_dtype"] = dtype
    kw["bf16"] = dtype == torch.bfloat16
    kw["fp16"] = dtype == torch.float16

    kw.update(overrides)
    if kw.get("pipeline_model_parallel_size", 1) > 1 and kw.get("pipeline_dtype") is None:
        kw["pipeline_dtype"] = kw["params_dtype"]
    tp = int(kw.get("tensor_model_parallel_size", 1) or 1)
    if kw["num_attention_heads"] % tp:
        raise ValueError(
            f"num_attention_heads ({kw['num_attention_heads']}) must be a multiple of tensor_model_parallel_size ({tp})"
        )
    if kw["num_query_groups"] % tp:
        raise ValueError(
            f"num_query_groups ({kw['num_query_groups']}, HF num_key_value_heads) must be a multiple of "
            f"tensor_model_parallel_size ({tp}): each TP rank holds whole query groups"
        )
    return GPTConfig(**kw)
