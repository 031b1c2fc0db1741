"""The Megatron side of the config translation: ``GPTConfig`` (and its YaRN / MLA variants), building one from a
family's fields with this package's runtime defaults and checks, vocabulary padding, and a ``GPTConfig`` as plain
data (stored in a Megatron checkpoint) and back. Reading and writing HF ``config.json`` fields is
:mod:`megatron_bridge_ext.models.hf_config`'s (the families compose their translation from its pieces).

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
    "HybridGPTConfig",
    "YARN_FIELDS",
    "config_class",
    "padded_vocab_size",
    "default_vocab_divisor",
    "build_gpt_config",
    "quick_gelu",
    "PARALLEL_FIELDS",
    "config_to_dict",
    "config_from_dict",
    "full_attention_layers",
    "layer_attention_dims",
]


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
    pre_layernorms: bool = True
    """Norms before attention and before the MLP (``input_layernorm`` / ``pre_mlp_layernorm``); False: none, the
    post-norm placement of OLMo 2 / Olmo 3 (norms on the sublayer outputs only, ``post_*_layernorm``)."""
    qk_layernorm_whole_projection: bool = False
    """With ``qk_layernorm``: the q / k norms are RMSNorms over the whole projection (all heads together, one weight
    of ``heads * head_dim``; OLMo 2 / Olmo 3 / OLMoE), not one per head."""
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
    rotary_proportion: Optional[float] = None
    """Proportional RoPE on the model's rotary embedding (Gemma 4's ``rope_type="proportional"``): of the
    ``kv_channels / 2`` channel pairs, the first ``int(p * kv_channels // 2)`` turn at ``rotary_base **
    (-2i / kv_channels)`` and the others not at all; None: megatron's RoPE (``rotary_percent``)."""
    value_rms_norm: bool = False
    """RMS-normalise the values per head, without a weight, before the core attention (Gemma 4's ``v_norm``)."""
    layer_output_scalar: bool = False
    """Each decoder layer multiplies its output by a learned scalar, ``layer_scalar`` (Gemma 4)."""
    attention_chunk_size: Optional[int] = None
    """RoPE layers (those ``no_rope_freq`` does not mark) attend causally within chunks of this many positions
    (``j <= i`` and ``j // chunk == i // chunk``; Llama 4's ``attention_chunk_size``); None: plain causal."""
    attn_temperature_floor_scale: Optional[float] = None
    """NoPE layers (``no_rope_freq``) scale the query at position ``p`` by ``1 + attn_temperature_scale *
    log1p(floor((p + 1) / floor_scale))`` (Llama 4's ``attn_temperature_tuning`` / ``floor_scale``); None: no
    scaling."""
    attn_temperature_scale: float = 0.1
    """The strength of that scaling (Llama 4's ``attn_scale``)."""
    rope_scaling_low_freq_factor: Optional[float] = None
    """With ``rope_scaling``: llama3 ``low_freq_factor`` (None: megatron-core's fixed 1); the three
    ``rope_scaling_*`` fields below replace megatron's fixed llama3 parameters after the model is built
    (``modules.set_llama3_rope_parameters``; Llama 4 Scout: 1 / 1 / 8192)."""
    rope_scaling_high_freq_factor: Optional[float] = None
    """With ``rope_scaling``: llama3 ``high_freq_factor`` (None: megatron-core's fixed 4)."""
    rope_scaling_original_max_position_embeddings: Optional[int] = None
    """With ``rope_scaling``: llama3 ``original_max_position_embeddings`` (None: megatron-core's fixed 8192)."""
    qk_norm_nope_layers: bool = True
    """With ``qk_l2_norm``: whether NoPE layers (``no_rope_freq``) normalise queries and keys too (megatron-core's
    spec: every layer); False: only the RoPE layers (Llama 4)."""
    full_attention_kv_channels: Optional[int] = None
    """Head size of the full-attention layers (those ``window_size`` / ``window_attn_skip_freq`` leave unwindowed)
    when it differs from ``kv_channels`` (Gemma 4's ``global_head_dim``); the model's rotary embedding then spans
    it and the sliding layers get their own. None: every layer has ``kv_channels``. Set (or
    ``full_attention_num_query_groups``), :func:`build_gpt_config` sets megatron's ``hetereogenous_dist_checkpoint``
    (one checkpoint key per layer: layer-stacked keys need one shape for all layers)."""
    full_attention_num_query_groups: Optional[int] = None
    """Query groups (kv heads) of the full-attention layers when they differ from ``num_query_groups`` (Gemma 4's
    ``num_global_key_value_heads``); None: ``num_query_groups``."""
    full_attention_k_eq_v: bool = False
    """The full-attention layers' HF checkpoint has no value projection: its keys' projection serves as values
    (Gemma 4's ``attention_k_eq_v``). The Megatron model keeps megatron's fused ``linear_qkv`` with value rows
    equal to the key rows (filled on import, checked on export); the model itself computes as any other."""


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


#: the ``yarn_*`` fields of :class:`YarnGPTConfig`
YARN_FIELDS = tuple(f.name for f in dataclasses.fields(YarnGPTConfig) if f.name.startswith("yarn_"))


@dataclass
class MLAGPTConfig(GPTConfig, MLATransformerConfig):
    """``GPTConfig`` of a multi-latent-attention model (megatron's ``MLATransformerConfig`` fields: q / kv LoRA
    ranks, nope / rope / v head dims, its own rope settings)."""

    latent_layernorm_epsilon: Optional[float] = None
    """Epsilon of the q / kv latent norms when it differs from ``layernorm_epsilon`` (HF DeepSeek-V3 fixes 1e-6
    there whatever ``rms_norm_eps`` is); None: ``layernorm_epsilon``."""


@dataclass
class HybridGPTConfig(GPTConfig):
    """``GPTConfig`` of a hybrid model (megatron-core >= 0.19 ``HybridModel``: Mamba-2 / attention / MLP layers,
    NemotronH), built by ``mcore.hybrid_builder`` instead of a ``GPTModel``. The Mamba sizes are
    ``TransformerConfig``'s own ``mamba_*`` fields."""

    hybrid_layer_pattern: Optional[str] = None
    """One symbol per decoder layer (megatron's ``hybrid_layer_allocation.Symbols``: ``M`` Mamba, ``*`` attention,
    ``-`` MLP), without pipeline separators (placed when the model is built)."""
    mamba_conv_kernel: int = 4
    """Width of the Mamba layers' causal depthwise convolution (``MambaMixer``'s ``d_conv``)."""
    mamba_chunk_size: int = 128
    """Chunk size of the Mamba layers' scan (``MambaMixer``'s ``chunk_size``)."""


def config_class(kwargs: Mapping[str, Any]) -> type:
    """The ``GPTConfig`` class for a model's fields: :class:`HybridGPTConfig` with a ``hybrid_layer_pattern``,
    :class:`MLAGPTConfig` with ``multi_latent_attention``, :class:`YarnGPTConfig` with
    ``position_embedding_type="yarn"``, else :class:`GPTConfig`."""
    if kwargs.get("hybrid_layer_pattern"):
        return HybridGPTConfig
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


#: TransformerConfig fields with which megatron-core splits the layers unevenly over the pipeline stages
_UNEVEN_PIPELINE_FIELDS = ("num_layers_in_first_pipeline_stage", "num_layers_in_last_pipeline_stage",
                           "pipeline_model_parallel_layout", "account_for_embedding_in_pipeline_split",
                           "account_for_loss_in_pipeline_split")


def build_gpt_config(kwargs: Mapping[str, Any], overrides: Mapping[str, Any]) -> GPTConfig:
    """A ``GPTConfig`` from a family's kwargs and the caller's overrides (applied last), with checks.

    Args:
        kwargs: fields from the HF config (a family's ``hf_config_to_megatron_kwargs``).
        overrides: any ``GPTConfig`` / ``TransformerConfig`` field (parallel sizes such as
            ``tensor_model_parallel_size``, ``pipeline_model_parallel_size``, ``virtual_pipeline_model_parallel_size``,
            ``expert_model_parallel_size``, ``expert_tensor_parallel_size``; ``params_dtype``; ...).

    Raises:
        ValueError: an opt-in layout of megatron-core 0.17+ this package does not convert
            (``versions.check_opt_in_layouts``), unknown override names, heads / query groups that the
            tensor-parallel size cannot split, or layers that the (virtual) pipeline stages cannot share evenly.
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
    if kw.get("experimental_attention_variant") == "dsa" and "sequence_parallel" not in overrides:
        kw["sequence_parallel"] = tp > 1  # megatron-core's DSA attention (AbsorbedMLA) asserts it at TP > 1
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
    for field in ("linear_num_key_heads", "linear_num_value_heads"):
        heads = kw.get(field)  # gated delta-net (megatron-core >= 0.19): each TP rank holds whole key / value heads
        if heads and kw.get("experimental_attention_variant") == "gated_delta_net" and heads % tp:
            raise ValueError(f"{field} ({heads}, HF {field}) must be a multiple of tensor_model_parallel_size "
                             f"({tp}): megatron-core's gated delta-net gives each TP rank whole heads")
    pp = int(kw.get("pipeline_model_parallel_size", 1) or 1)
    vpp = int(kw.get("virtual_pipeline_model_parallel_size") or 1)
    uneven = any(kw.get(f) for f in _UNEVEN_PIPELINE_FIELDS)  # megatron-core places the layers itself then
    if not uneven and kw["num_layers"] % (pp * vpp):
        raise ValueError(
            f"num_layers ({kw['num_layers']}, HF num_hidden_layers) is not divisible by pipeline_model_parallel_size "
            f"({pp}) x virtual_pipeline_model_parallel_size ({vpp}): megatron-core gives every (virtual) pipeline "
            "stage the same number of layers"
        )
    if kw.get("full_attention_kv_channels") is not None or kw.get("full_attention_num_query_groups") is not None:
        # layers of two geometries cannot share megatron's layer-stacked checkpoint keys ("decoder.layers.<name>"
        # with the layer as a prepended axis): one key per layer ("decoder.layers.<i>.<name>")
        kw["hetereogenous_dist_checkpoint"] = True
    full_groups = kw.get("full_attention_num_query_groups")
    if full_groups is not None and (
            (full_groups >= tp and full_groups % tp) or (full_groups < tp and tp % full_groups)):
        raise ValueError(
            f"full_attention_num_query_groups ({full_groups}, HF num_global_key_value_heads) must be a multiple or a "
            f"divisor of tensor_model_parallel_size ({tp}) (megatron-core splits the query groups over the TP ranks)"
        )
    return cls(**kw)


def full_attention_layers(config: Any) -> list:
    """0-based indices of the decoder layers without a sliding window (megatron's ``is_layer_window_attention``)."""
    from megatron.core.transformer.utils import is_layer_window_attention

    return [i for i in range(config.num_layers)
            if not is_layer_window_attention(config.window_size, config.window_attn_skip_freq, i + 1)]


def layer_attention_dims(config: Any, layer: Optional[int] = None):
    """(H, G, d) of decoder layer ``layer`` (0-based; None: the model's ``num_query_groups`` / ``kv_channels``):
    a full-attention layer takes ``full_attention_num_query_groups`` / ``full_attention_kv_channels`` where set."""
    heads = config.num_attention_heads
    groups = config.num_query_groups or heads
    head_dim = config.kv_channels or config.hidden_size // heads
    full_d = getattr(config, "full_attention_kv_channels", None)
    full_g = getattr(config, "full_attention_num_query_groups", None)
    if layer is not None and (full_d is not None or full_g is not None) and layer in full_attention_layers(config):
        groups = full_g if full_g is not None else groups
        head_dim = full_d if full_d is not None else head_dim
    return heads, groups, head_dim


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
#: functions of this package that configs stored earlier name at their former place -> their place now
_MOVED = {"megatron_bridge_ext.models.common:_gelu_tanh": "megatron_bridge_ext.models.hf_config:_gelu_tanh"}


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

    ref = _MOVED.get(ref, ref)
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
