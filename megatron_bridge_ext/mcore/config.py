"""The Megatron side of the config translation: ``GPTConfig``, the fields every decoder family shares in both
directions (HF config -> ``TransformerConfig`` kwargs, ``TransformerConfig`` -> HF ``config.json`` fields), rotary
settings, dtypes and vocabulary padding. Family-specific settings (norms, activations, biases, q/k norms, experts)
are hooks in ``models/<family>.py`` on top of these.

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
from megatron.core.fusions.fused_bias_geglu import quick_gelu  # GPT-OSS's activation (families import it from here)
from megatron.core.transformer.transformer_config import MLATransformerConfig, TransformerConfig

from megatron_bridge_ext.mcore.versions import (
    RUNTIME_ONLY_CONFIG_FIELDS,
    check_opt_in_layouts,
    drop_runtime_only_fields,
)

__all__ = [
    "GPTConfig",
    "YarnGPTConfig",
    "MLAGPTConfig",
    "config_class",
    "yarn_settings",
    "yarn_hf_fields",
    "padded_vocab_size",
    "default_vocab_divisor",
    "config_get",
    "common_megatron_kwargs",
    "build_gpt_config",
    "common_hf_fields",
    "rope_settings",
    "per_layer_type_rope",
    "rope_hf_fields",
    "window_settings",
    "window_hf_fields",
    "uniform_window_hf_field",
    "SLIDING",
    "FULL",
    "dtype_name",
    "quick_gelu",
    "PARALLEL_FIELDS",
    "config_to_dict",
    "config_from_dict",
]

#: HF ``layer_types`` entries
SLIDING, FULL = "sliding_attention", "full_attention"

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
    embedding_scale: Optional[float] = None
    """Multiply the embedding output by this number (Gemma: sqrt(hidden_size)); None: no scaling."""
    post_self_attn_layernorm: bool = False
    """A norm on the attention output before the residual add (Gemma's ``post_attention_layernorm``)."""
    post_mlp_layernorm: bool = False
    """A norm on the MLP output before the residual add (Gemma's ``post_feedforward_layernorm``)."""
    local_rotary_base: Optional[float] = None
    """RoPE base of the sliding-window layers when it differs from ``rotary_base`` (Gemma 3); None: one RoPE."""
    moe_router_fp32_weight: bool = False
    """Keep the routers' weight (and bias) in fp32 whatever ``params_dtype`` is (HF DeepSeek-V3 / GLM-4.5 store
    ``mlp.gate.weight`` in fp32 in bf16 models; megatron-core 0.16.1's router casts it to ``params_dtype``)."""
    attn_logit_softcapping: Optional[float] = None
    """Soft-cap the attention scores: ``cap * tanh(scores / cap)`` after the query scaling, before the mask and the
    softmax (Gemma 2's ``attn_logit_softcapping``); None: no capping."""
    final_logit_softcapping: Optional[float] = None
    """Soft-cap the output logits: ``cap * tanh(logits / cap)`` (Gemma's ``final_logit_softcapping``); None: none."""


@dataclass
class YarnGPTConfig(GPTConfig):
    """``GPTConfig`` of a model with YaRN RoPE (``position_embedding_type="yarn"``): the ``yarn_*`` fields that
    megatron-core 0.16.1's ``GPTModel`` reads for its ``YarnRotaryEmbedding`` and ``SelfAttention`` for the
    concentration factor it multiplies into cos / sin. A separate class because megatron decides whether to apply
    that factor by ``hasattr(config, "yarn_rotary_scaling_factor")``."""

    yarn_rotary_scaling_factor: float = 1.0
    yarn_original_max_position_embeddings: int = 4096
    yarn_beta_fast: float = 32.0
    yarn_beta_slow: float = 1.0
    yarn_mscale: Optional[float] = None
    """With ``yarn_mscale_all_dim``: concentration ``m(s, mscale) / m(s, mscale_all_dim)``; None: ``m(s)``."""
    yarn_mscale_all_dim: Optional[float] = None
    yarn_correction_range_round_to_int: bool = True
    """HF ``truncate``: round the correction range to whole dimensions."""


@dataclass
class MLAGPTConfig(GPTConfig, MLATransformerConfig):
    """``GPTConfig`` of a multi-latent-attention model (megatron's ``MLATransformerConfig`` fields: q / kv LoRA
    ranks, nope / rope / v head dims, its own rope settings)."""

    latent_layernorm_epsilon: Optional[float] = None
    """Epsilon of the q / kv latent norms when it differs from ``layernorm_epsilon`` (HF DeepSeek-V3 fixes 1e-6
    there whatever ``rms_norm_eps`` is); None: ``layernorm_epsilon``."""


def config_class(kwargs: Mapping[str, Any]) -> type:
    """The ``GPTConfig`` class for a model's fields: :class:`MLAGPTConfig` with ``multi_latent_attention``,
    :class:`YarnGPTConfig` with ``position_embedding_type="yarn"``, else :class:`GPTConfig`."""
    if kwargs.get("multi_latent_attention"):
        return MLAGPTConfig
    if kwargs.get("position_embedding_type") == "yarn":
        return YarnGPTConfig
    return GPTConfig


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


def config_get(cfg: Any, name: str, default: Any = None) -> Any:
    """A field of an HF config object or of its dict form."""
    if isinstance(cfg, Mapping):
        return cfg.get(name, default)
    return getattr(cfg, name, default)


def per_layer_type_rope(hf_config: Any) -> Optional[Dict[str, Dict[str, Any]]]:
    """HF ``rope_parameters`` keyed by layer type (``{"full_attention": {...}, "sliding_attention": {...}}``), or
    None when the config has one set of rope parameters."""
    params = config_get(hf_config, "rope_parameters")
    if isinstance(params, Mapping) and params and all(isinstance(v, Mapping) for v in params.values()):
        return {k: dict(v) for k, v in params.items()}
    return None


def rope_settings(hf_config: Any, layer_type: Optional[str] = None, *, yarn: bool = False) -> Dict[str, Any]:
    """Rotary fields of ``GPTConfig`` from HF ``rope_parameters`` (5.x) or ``rope_theta`` + ``rope_scaling`` (4.x).

    Args:
        hf_config: the HF config (object or dict).
        layer_type: with per-layer-type rope parameters, read those of this layer type (the family handles the
            others); None requires every layer type to have the same parameters.
        yarn: the family accepts YaRN (``rope_type="yarn"``): its fields are returned as :func:`yarn_settings` gives
            them, with ``position_embedding_type="yarn"``; otherwise YaRN is refused like any unsupported type.
    """
    params = config_get(hf_config, "rope_parameters")
    per_type = per_layer_type_rope(hf_config)
    if per_type is not None and layer_type is not None:
        if layer_type not in per_type:
            raise ValueError(f"rope settings: no rope_parameters for layer type {layer_type!r} (has {sorted(per_type)})")
        params = per_type[layer_type]
    elif per_type is not None:
        # per-layer-type rope parameters (e.g. {"full_attention": {...}, "sliding_attention": {...}})
        kinds = sorted(params)
        if len({tuple(sorted(v.items())) for v in params.values()}) > 1:
            raise ValueError(f"rope settings: per-layer-type rope_parameters differ ({kinds}); unsupported")
        params = params[kinds[0]]
    scaling = dict(params) if isinstance(params, Mapping) else dict(config_get(hf_config, "rope_scaling") or {})
    theta = scaling.pop("rope_theta", None)
    if theta is None:
        theta = config_get(hf_config, "rope_theta", 10000.0)
    out: Dict[str, Any] = {"rotary_base": float(theta)}
    partial = scaling.pop("partial_rotary_factor", None)
    if partial is None:
        partial = config_get(hf_config, "partial_rotary_factor")
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
                f"rope settings: llama3 rope scaling with {wrong} is not supported by megatron-core 0.16.1, "
                f"which fixes {_MCORE_LLAMA3_FIXED}"
            )
        out.update(rope_scaling=True, rope_scaling_factor=float(8.0 if factor is None else factor))
        return out
    if rope_type == "linear":
        if factor is None:
            raise ValueError(f"rope settings: linear rope scaling without a 'factor' (rope parameters {scaling})")
        out["seq_len_interpolation_factor"] = float(factor)
        return out
    if rope_type == "yarn" and yarn:
        out.update(position_embedding_type="yarn", **yarn_settings(scaling, config_get(hf_config,
                                                                                    "max_position_embeddings")))
        return out
    raise ValueError(
        f"rope settings: unsupported rope type {rope_type!r} (rope parameters {scaling}); "
        f"supported: default, llama3, linear{', yarn' if yarn else ''}"
    )


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def yarn_settings(params: Mapping[str, Any], max_position_embeddings: Optional[int] = None) -> Dict[str, Any]:
    """``YarnGPTConfig`` ``yarn_*`` fields from HF YaRN rope parameters (transformers' ``_compute_yarn_parameters``).

    HF's attention factor is ``m(s, mscale) / m(s, mscale_all_dim)`` when both are set (non-zero), else ``m(s)``
    (``m(s, k) = 0.1 k ln s + 1``); megatron's concentration factor is the same with ``yarn_mscale`` /
    ``yarn_mscale_all_dim``, ``m(s)`` when either is None. ``truncate`` (default True) rounds the correction range.

    Raises:
        ValueError: an explicit ``attention_factor`` other than the one these give, or no
            ``original_max_position_embeddings``.
    """
    original = params.get("original_max_position_embeddings")
    if original is None:
        raise ValueError(f"rope settings: yarn rope parameters {dict(params)} lack original_max_position_embeddings")
    factor = params.get("factor")
    if factor is None:
        if max_position_embeddings is None:
            raise ValueError(f"rope settings: yarn rope parameters {dict(params)} give no factor and the config no "
                             "max_position_embeddings")
        factor = max_position_embeddings / original
    factor = float(factor)
    mscale, mscale_all_dim = params.get("mscale"), params.get("mscale_all_dim")
    both = bool(mscale) and bool(mscale_all_dim)
    implied = _yarn_mscale(factor, float(mscale)) / _yarn_mscale(factor, float(mscale_all_dim)) if both else \
        _yarn_mscale(factor)
    explicit = params.get("attention_factor")
    if explicit is not None and abs(float(explicit) - implied) > 1e-12 * max(1.0, implied):
        raise ValueError(f"rope settings: yarn attention_factor={explicit} differs from the factor megatron-core "
                         f"0.16.1 derives from factor / mscale / mscale_all_dim ({implied}); not supported")
    return dict(
        yarn_rotary_scaling_factor=factor,
        yarn_original_max_position_embeddings=int(original),
        yarn_beta_fast=float(params.get("beta_fast") or 32.0),
        yarn_beta_slow=float(params.get("beta_slow") or 1.0),
        yarn_mscale=float(mscale) if both else None,
        yarn_mscale_all_dim=float(mscale_all_dim) if both else None,
        yarn_correction_range_round_to_int=bool(params.get("truncate", True)),
    )


def yarn_hf_fields(fields: Mapping[str, Any]) -> Dict[str, Any]:
    """HF YaRN ``rope_parameters`` entries of ``yarn_*`` fields (a config's or :func:`yarn_settings`'s)."""
    out: Dict[str, Any] = dict(
        rope_type="yarn",
        factor=float(fields["yarn_rotary_scaling_factor"]),
        original_max_position_embeddings=int(fields["yarn_original_max_position_embeddings"]),
        beta_fast=float(fields["yarn_beta_fast"]),
        beta_slow=float(fields["yarn_beta_slow"]),
        truncate=bool(fields["yarn_correction_range_round_to_int"]),
    )
    if fields.get("yarn_mscale") is not None and fields.get("yarn_mscale_all_dim") is not None:
        out.update(mscale=float(fields["yarn_mscale"]), mscale_all_dim=float(fields["yarn_mscale_all_dim"]))
    return out


def window_settings(hf_config: Any, family: str) -> Dict[str, Any]:
    """Sliding-window attention fields (``window_size``, ``window_attn_skip_freq``) from HF ``sliding_window`` and
    ``layer_types``.

    HF keeps the ``sliding_window`` most recent positions including the query's own (``kv > q - W``); megatron's
    ``window_size = (W - 1, 0)`` keeps ``q - (W - 1) <= kv <= q``, the same set. Without ``layer_types`` every layer
    slides (Mistral, Phi-3); with them, megatron's per-layer list (1 = sliding) carries the pattern.

    Raises:
        ValueError: a layer type other than sliding / full attention, or a window below 1.
    """
    window = config_get(hf_config, "sliding_window")
    types = config_get(hf_config, "layer_types")
    if types is not None:
        types = list(types)
        unknown = sorted(set(types) - {SLIDING, FULL})
        if unknown:
            raise ValueError(f"{family}: layer_types {unknown} are not supported (supported: {SLIDING}, {FULL})")
        if SLIDING not in types:
            return {}
    if window is None:
        if types is not None:
            raise ValueError(f"{family}: layer_types has {SLIDING} layers but sliding_window is None")
        return {}
    window = int(window)
    if window < 1:
        raise ValueError(f"{family}: sliding_window must be >= 1, got {window}")
    out: Dict[str, Any] = {"window_size": (window - 1, 0)}
    if types is not None and FULL in types:
        out["window_attn_skip_freq"] = [1 if t == SLIDING else 0 for t in types]
    return out


def window_hf_fields(config: GPTConfig, family: str) -> Dict[str, Any]:
    """HF ``sliding_window`` and ``layer_types`` of a config's window fields (the reverse of ``window_settings``).

    Raises:
        ValueError: a window megatron allows that HF cannot express (a right-hand window, an integer skip frequency
            whose pattern does not cover the layers, ...).
    """
    if not config.window_size:
        return {"sliding_window": None, "layer_types": [FULL] * config.num_layers}
    left, right = config.window_size
    if right != 0 or left < 0:
        raise ValueError(f"{family}: window_size={tuple(config.window_size)} has no HF equivalent (HF windows are "
                         "causal: (sliding_window - 1, 0))")
    freq = config.window_attn_skip_freq
    if freq is None:
        pattern = [1] * config.num_layers
    elif isinstance(freq, int):
        pattern = [1 if (i + 1) % freq else 0 for i in range(config.num_layers)]
    else:
        pattern = [int(bool(x)) for x in freq]
        if len(pattern) != config.num_layers:
            raise ValueError(f"{family}: window_attn_skip_freq has {len(pattern)} entries for "
                             f"{config.num_layers} layers")
    return {"sliding_window": left + 1, "layer_types": [SLIDING if x else FULL for x in pattern]}


def uniform_window_hf_field(config: GPTConfig, family: str) -> Optional[int]:
    """HF ``sliding_window`` of a family whose window applies to every layer (Mistral, Phi-3); None: no window.

    Raises:
        ValueError: the config slides on some layers only.
    """
    window = window_hf_fields(config, family)
    if window["sliding_window"] is not None and len(set(window["layer_types"])) > 1:
        raise ValueError(f"{family}: a sliding window on some layers only (window_attn_skip_freq="
                         f"{config.window_attn_skip_freq}) cannot be expressed: this family's window applies to "
                         "every layer")
    return window["sliding_window"]


def _hf_dtype(hf_config: Any) -> Optional[torch.dtype]:
    dt = config_get(hf_config, "dtype")
    if dt is None and isinstance(hf_config, Mapping):  # older config.json files
        dt = hf_config.get("torch_dtype")
    if dt is None or isinstance(dt, torch.dtype):
        return dt
    name = str(dt).replace("torch.", "")
    if name not in _DTYPES:
        raise ValueError(f"unsupported HF dtype {dt!r}; known {sorted(_DTYPES)}")
    return _DTYPES[name]


def rope_hf_fields(config: GPTConfig) -> Dict[str, Any]:
    """HF ``rope_parameters`` (transformers 5.x form) for a config's rotary settings."""
    params: Dict[str, Any] = {"rope_type": "default", "rope_theta": float(config.rotary_base)}
    if config.position_embedding_type == "yarn":
        params.update(yarn_hf_fields({f: getattr(config, f) for f in _YARN_FIELDS}))
    elif config.rope_scaling:
        params.update(rope_type="llama3", factor=float(config.rope_scaling_factor), **_MCORE_LLAMA3_FIXED)
    elif config.seq_len_interpolation_factor is not None:
        params.update(rope_type="linear", factor=float(config.seq_len_interpolation_factor))
    if config.rotary_percent != 1.0:
        params["partial_rotary_factor"] = float(config.rotary_percent)
    return {"rope_parameters": params}


_YARN_FIELDS = tuple(f.name for f in dataclasses.fields(YarnGPTConfig) if f.name.startswith("yarn_"))


def dtype_name(dtype: torch.dtype) -> str:
    """HF ``dtype`` string of a torch dtype."""
    for name, dt in _DTYPES.items():
        if dt == dtype:
            return name
    raise ValueError(f"no HF dtype name for {dtype}")


def _required(hf_config: Any, name: str) -> Any:
    value = config_get(hf_config, name)
    if value is None:
        raise ValueError(f"HF config has no {name!r}; it is required to build the Megatron model")
    return value


def common_megatron_kwargs(hf_config: Any, rope_layer_type: Optional[str] = None, *, yarn: bool = False
                           ) -> Dict[str, Any]:
    """The ``GPTConfig`` fields every decoder family reads the same way from its HF config (object or dict).

    Family hooks add the rest: normalization, activation and gating, biases, q/k norms, experts, windows.
    ``rope_layer_type`` selects the model's RoPE among per-layer-type rope parameters, ``yarn`` accepts YaRN (see
    ``rope_settings``).
    """
    hidden = int(_required(hf_config, "hidden_size"))
    heads = int(_required(hf_config, "num_attention_heads"))
    kv_heads = config_get(hf_config, "num_key_value_heads")
    head_dim = config_get(hf_config, "head_dim")
    kw: Dict[str, Any] = dict(
        num_layers=int(_required(hf_config, "num_hidden_layers")),
        hidden_size=hidden,
        num_attention_heads=heads,
        num_query_groups=int(kv_heads) if kv_heads is not None else heads,
        kv_channels=int(head_dim) if head_dim is not None else hidden // heads,
        init_method_std=float(config_get(hf_config, "initializer_range", 0.02)),
        hidden_dropout=0.0,
        attention_dropout=float(config_get(hf_config, "attention_dropout", 0.0) or 0.0),
        vocab_size=int(_required(hf_config, "vocab_size")),
        seq_length=int(config_get(hf_config, "max_position_embeddings", 4096)),
        position_embedding_type="rope",
        share_embeddings_and_output_weights=bool(config_get(hf_config, "tie_word_embeddings", False)),
    )
    ffn = config_get(hf_config, "intermediate_size")
    if ffn is not None:
        kw["ffn_hidden_size"] = int(ffn)
    kw.update(rope_settings(hf_config, rope_layer_type, yarn=yarn))
    dtype = _hf_dtype(hf_config)
    if dtype is not None:
        kw["params_dtype"] = dtype
    return kw


# CPU-friendly defaults of every converted model (fusions off, no initialisation: the weights are loaded)
_RUNTIME_DEFAULTS: Dict[str, Any] = dict(
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


def build_gpt_config(kwargs: Mapping[str, Any], overrides: Mapping[str, Any]) -> GPTConfig:
    """A ``GPTConfig`` from a family's kwargs and the caller's overrides (applied last), with checks.

    Args:
        kwargs: fields from the HF config (``common_megatron_kwargs`` plus the family's hooks).
        overrides: any ``GPTConfig`` / ``TransformerConfig`` field (parallel sizes such as
            ``tensor_model_parallel_size``, ``pipeline_model_parallel_size``, ``virtual_pipeline_model_parallel_size``,
            ``expert_model_parallel_size``, ``expert_tensor_parallel_size``; ``params_dtype``; ...).

    Raises:
        ValueError: an opt-in layout of megatron-core 0.17+ this package does not convert
            (``versions.check_opt_in_layouts``), unknown override names, or heads / query groups that the
            tensor-parallel size cannot split.
    """
    check_opt_in_layouts({**kwargs, **overrides}, "model config")
    cls = config_class({**kwargs, **overrides})
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ValueError(f"unknown TransformerConfig override(s) {unknown}")
    kw: Dict[str, Any] = {**_RUNTIME_DEFAULTS, **kwargs}
    dtype = overrides.get("params_dtype", kw.get("params_dtype")) or torch.float32
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
    groups = kw["num_query_groups"]
    if groups >= tp and groups % tp:
        raise ValueError(
            f"num_query_groups ({groups}, HF num_key_value_heads) must be a multiple of tensor_model_parallel_size "
            f"({tp}) (each TP rank holds whole query groups), or a divisor of it"
        )
    if groups < tp and tp % groups:
        raise ValueError(
            f"num_query_groups ({groups}, HF num_key_value_heads) is smaller than tensor_model_parallel_size ({tp}) "
            f"and does not divide it: megatron-core splits each query group over tp / num_query_groups ranks"
        )
    return cls(**kw)


def common_hf_fields(config: GPTConfig) -> Dict[str, Any]:
    """The HF ``config.json`` fields every decoder family writes the same way from its Megatron config."""
    if config.vocab_size is None:
        raise ValueError("common_hf_fields: the config carries no (unpadded) vocab_size")
    fields: Dict[str, Any] = dict(
        hidden_size=config.hidden_size,
        num_hidden_layers=config.num_layers,
        num_attention_heads=config.num_attention_heads,
        num_key_value_heads=config.num_query_groups or config.num_attention_heads,
        head_dim=config.kv_channels,
        intermediate_size=config.ffn_hidden_size,
        vocab_size=config.vocab_size,
        max_position_embeddings=config.seq_length,
        initializer_range=config.init_method_std,
        attention_dropout=config.attention_dropout,
        tie_word_embeddings=config.share_embeddings_and_output_weights,
        dtype=dtype_name(config.params_dtype),
    )
    fields.update(rope_hf_fields(config))
    return fields


# ----------------------------------------------------------------------------------------------------------------------
# A GPTConfig as plain data (stored in a Megatron checkpoint), and back
# ----------------------------------------------------------------------------------------------------------------------

#: the parallel layout: stored apart (the layout a checkpoint was written at), never taken over when rebuilding
PARALLEL_FIELDS = (
    "tensor_model_parallel_size",
    "pipeline_model_parallel_size",
    "virtual_pipeline_model_parallel_size",
    "expert_model_parallel_size",
    "expert_tensor_parallel_size",
    "context_parallel_size",
    "pipeline_dtype",
)
#: derived again by ``TransformerConfig.__post_init__`` (initialisers from ``init_method_std``, the autocast dtype
#: from ``params_dtype``, the microbatch group from the pipeline size)
_DERIVED_FIELDS = ("init_method", "output_layer_init_method", "embedding_init_method", "embedding_init_method_std",
                   "autocast_dtype", "microbatch_group_size_per_vp_stage")
#: modules whose functions and enums a stored config may name
_IMPORTABLE_ROOTS = ("torch", "megatron", "megatron_bridge_ext")


def _field_default(f: "dataclasses.Field") -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return f.default_factory()  # type: ignore[misc]
    return dataclasses.MISSING


def _encode(name: str, value: Any) -> Any:
    import enum

    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, torch.dtype):
        return {"__dtype__": str(value).replace("torch.", "")}
    if isinstance(value, enum.Enum):
        cls = type(value)
        return {"__enum__": f"{cls.__module__}:{cls.__qualname__}", "name": value.name}
    if isinstance(value, tuple):  # e.g. window_size: megatron compares and unpacks it as a tuple
        return {"__tuple__": [_encode(name, v) for v in value]}
    if isinstance(value, list):
        return [_encode(name, v) for v in value]
    if isinstance(value, dict):
        return {str(k): _encode(name, v) for k, v in value.items()}
    if callable(value) and hasattr(value, "__module__") and hasattr(value, "__qualname__"):
        return {"__callable__": f"{value.__module__}:{value.__qualname__}"}
    raise ValueError(f"config field {name!r}: cannot store a value of type {type(value).__name__} ({value!r})")


def _import(ref: str, what: str) -> Any:
    import importlib

    module, _, qualname = ref.partition(":")
    if module.split(".")[0] not in _IMPORTABLE_ROOTS:
        raise ValueError(f"stored config names {what} {ref!r} outside {_IMPORTABLE_ROOTS}; refusing to import it")
    obj: Any = importlib.import_module(module)
    for part in qualname.split("."):
        obj = getattr(obj, part)
    return obj


def _decode(name: str, value: Any) -> Any:
    if isinstance(value, list):
        return [_decode(name, v) for v in value]
    if not isinstance(value, dict):
        return value
    if "__tuple__" in value:
        return tuple(_decode(name, v) for v in value["__tuple__"])
    if "__dtype__" in value:
        dt = getattr(torch, value["__dtype__"], None)
        if not isinstance(dt, torch.dtype):
            raise ValueError(f"config field {name!r}: unknown dtype {value['__dtype__']!r}")
        return dt
    if "__enum__" in value:
        return _import(value["__enum__"], "enum")[value["name"]]
    if "__callable__" in value:
        return _import(value["__callable__"], "function")
    return {k: _decode(name, v) for k, v in value.items()}


def config_to_dict(config: GPTConfig) -> Dict[str, Any]:
    """The model-defining fields of a ``GPTConfig`` as plain data (JSON- and ``torch.load(weights_only=True)``-safe):
    every field that differs from its default, except the parallel layout (:data:`PARALLEL_FIELDS`), the runtime
    switches this package sets itself, runtime features whose fields differ between megatron-core versions
    (``versions.RUNTIME_ONLY_CONFIG_FIELDS``) and the initialisers derived from ``init_method_std``. dtypes, enums
    and functions (the activation) are stored by name, tuples as ``{"__tuple__": [...]}``.

    Raises:
        ValueError: a field holds a value that cannot be stored (named).
    """
    skip = set(PARALLEL_FIELDS) | set(_DERIVED_FIELDS) | set(_RUNTIME_DEFAULTS) | RUNTIME_ONLY_CONFIG_FIELDS
    out: Dict[str, Any] = {}
    for f in dataclasses.fields(config):
        if f.name in skip or not f.init:
            continue
        value = getattr(config, f.name)
        default = _field_default(f)
        try:
            if default is not dataclasses.MISSING and value == default:
                continue
        except (TypeError, RuntimeError):  # values without a plain equality
            pass
        if default is dataclasses.MISSING or value is not default:
            out[f.name] = _encode(f.name, value)
    if isinstance(config, MLAGPTConfig):  # its own default; config_from_dict picks the class by it
        out["multi_latent_attention"] = True
    return out


def config_from_dict(fields: Mapping[str, Any], overrides: Optional[Mapping[str, Any]] = None) -> GPTConfig:
    """The ``GPTConfig`` of :func:`config_to_dict`'s output, with ``overrides`` (the parallel layout of this run,
    ``params_dtype``, ...) applied last through :func:`build_gpt_config` (same checks).

    The runtime-feature fields that differ between megatron-core versions (``versions.RUNTIME_ONLY_CONFIG_FIELDS``)
    are dropped, so a config stored under one supported version is read under the other.

    Raises:
        ValueError: an opt-in layout this package does not convert (``versions.check_opt_in_layouts``), unknown
            field names (a model feature of another megatron-core version), or a layout that cannot split the model.
    """
    fields = drop_runtime_only_fields(fields)
    check_opt_in_layouts(fields, "stored model config")
    cls = config_class(fields)  # MLA / YaRN configs carry their class's fields
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(fields) - known)
    if unknown:
        raise ValueError(f"stored model config has field(s) {unknown} that this megatron-core's {cls.__name__} "
                         "lacks")
    kwargs = {k: _decode(k, v) for k, v in fields.items()}
    return build_gpt_config(kwargs, dict(overrides or {}))
