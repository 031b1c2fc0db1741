"""HF ``config.json`` <-> Megatron ``GPTConfig`` fields: the pieces every family composes its config translation from
(sizes, RoPE and YaRN, sliding windows, dtypes, RMSNorm, gated activations, biases), each with its reverse.

A family's ``hf_config_to_megatron_kwargs`` is a union of these pieces (and of ``models.moe`` / ``models.mtp`` for
experts and multi-token prediction) plus what only it has; its ``megatron_to_hf_config`` the union of their reverses.
No piece writes a field that another family would have to remove.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Dict, Iterable, Mapping, Optional, Tuple

import torch
import torch.nn.functional as F

from megatron_bridge_ext.mcore.config import YARN_FIELDS, GPTConfig

__all__ = [
    "RMSNORM_GLU_NO_BIAS",
    "refuse_megatron_settings",
    "SLIDING",
    "FULL",
    "config_get",
    "LanguageModelConfig",
    "model_size_kwargs",
    "dtype_kwargs",
    "common_megatron_kwargs",
    "model_size_hf_fields",
    "common_hf_fields",
    "layer_type_rope_kwargs",
    "layer_type_rope_hf_fields",
    "rope_settings",
    "per_layer_type_rope",
    "rope_hf_fields",
    "yarn_settings",
    "yarn_hf_fields",
    "window_settings",
    "window_hf_fields",
    "uniform_window_hf_field",
    "qwen_window_hf_fields",
    "dtype_name",
    "ACTIVATIONS",
    "activation_func",
    "activation_name",
    "rms_norm_kwargs",
    "rms_norm_hf_fields",
    "gated_activation_kwargs",
    "activation_hf_fields",
    "linear_bias_kwargs",
    "check_linear_biases",
    "linear_bias_hf_fields",
    "refuse_biases",
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



def config_get(cfg: Any, name: str, default: Any = None) -> Any:
    """A field of an HF config object or of its dict form."""
    if isinstance(cfg, Mapping):
        return cfg.get(name, default)
    return getattr(cfg, name, default)


class LanguageModelConfig:
    """The language model's config of a vision-language HF config (object or dict with a ``text_config``): its
    fields are ``text_config``'s, except :attr:`OWN` (the checkpoint's architecture and model type, and the
    ``tie_word_embeddings`` transformers ties the checkpoint's ``lm_head`` by), which are the outer config's; a field
    ``text_config`` leaves unset (None) is the outer config's (e.g. ``dtype``).

    Raises:
        ValueError: an outer config without a ``text_config`` (naming ``family``).
    """

    OWN = ("architectures", "model_type", "tie_word_embeddings", "text_config", "vision_config")

    def __init__(self, outer: Any, family: str) -> None:
        text = config_get(outer, "text_config")
        if text is None:
            raise ValueError(f"{family}: the config has no text_config (a vision-language config holds the language "
                             "model's config there)")
        object.__setattr__(self, "outer", outer)
        object.__setattr__(self, "text", text)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        missing = object()
        text = missing if name in self.OWN else config_get(self.text, name, missing)
        if text is not missing and text is not None:
            return text
        outer = config_get(self.outer, name, missing)
        if outer is not missing and (outer is not None or text is missing):
            return outer
        if text is not missing:
            return text
        raise AttributeError(f"{name!r}: neither the config nor its text_config has it")


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
        params.update(yarn_hf_fields({f: getattr(config, f) for f in YARN_FIELDS}))
    elif config.rope_scaling:
        params.update(rope_type="llama3", factor=float(config.rope_scaling_factor), **_MCORE_LLAMA3_FIXED)
    elif config.seq_len_interpolation_factor is not None:
        params.update(rope_type="linear", factor=float(config.seq_len_interpolation_factor))
    if config.rotary_percent != 1.0:
        params["partial_rotary_factor"] = float(config.rotary_percent)
    return {"rope_parameters": params}


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


def model_size_kwargs(hf_config: Any) -> Dict[str, Any]:
    """The ``GPTConfig`` sizes every decoder family reads the same way from its HF config (object or dict): layers,
    widths, heads and query groups, head dim, vocabulary, sequence length, dropout, initialisation, embedding tying,
    RoPE positions (:func:`rope_settings` says which RoPE).

    Raises:
        ValueError: a required field (``hidden_size``, ``num_attention_heads``, ``num_hidden_layers``,
            ``vocab_size``) missing, named.
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
    return kw


def dtype_kwargs(hf_config: Any) -> Dict[str, Any]:
    """``params_dtype`` from HF ``dtype`` (``torch_dtype`` in older config.json files); none when unset.

    Raises:
        ValueError: a dtype name this package does not know.
    """
    dtype = _hf_dtype(hf_config)
    return {} if dtype is None else {"params_dtype": dtype}


def common_megatron_kwargs(hf_config: Any, rope_layer_type: Optional[str] = None, *, yarn: bool = False
                           ) -> Dict[str, Any]:
    """The ``GPTConfig`` fields every decoder family with plain RoPE reads the same way from its HF config:
    :func:`model_size_kwargs`, :func:`rope_settings` and :func:`dtype_kwargs`.

    Families compose the rest from the pieces of this module and of ``models.moe`` / ``models.mtp``: normalization,
    activation and gating, biases, q/k norms, experts, windows. ``rope_layer_type`` selects the model's RoPE among
    per-layer-type rope parameters, ``yarn`` accepts YaRN (see :func:`rope_settings`).
    """
    return {**model_size_kwargs(hf_config), **rope_settings(hf_config, rope_layer_type, yarn=yarn),
            **dtype_kwargs(hf_config)}


def model_size_hf_fields(config: GPTConfig, *, head_dim: bool = True) -> Dict[str, Any]:
    """The HF ``config.json`` sizes every decoder family writes the same way from its Megatron config (the reverse
    of :func:`model_size_kwargs` and :func:`dtype_kwargs`).

    Args:
        config: the Megatron config.
        head_dim: write ``head_dim`` (``kv_channels``); False for families whose HF config derives it (Phi-3,
            DeepSeek-V3).

    Raises:
        ValueError: a config without its unpadded ``vocab_size``.
    """
    if config.vocab_size is None:
        raise ValueError("common_hf_fields: the config carries no (unpadded) vocab_size")
    fields: Dict[str, Any] = dict(
        hidden_size=config.hidden_size,
        num_hidden_layers=config.num_layers,
        num_attention_heads=config.num_attention_heads,
        num_key_value_heads=config.num_query_groups or config.num_attention_heads,
    )
    if head_dim:
        fields["head_dim"] = config.kv_channels
    fields.update(
        intermediate_size=config.ffn_hidden_size,
        vocab_size=config.vocab_size,
        max_position_embeddings=config.seq_length,
        initializer_range=config.init_method_std,
        attention_dropout=config.attention_dropout,
        tie_word_embeddings=config.share_embeddings_and_output_weights,
        dtype=dtype_name(config.params_dtype),
    )
    return fields


def common_hf_fields(config: GPTConfig) -> Dict[str, Any]:
    """The HF ``config.json`` fields every decoder family with plain RoPE writes the same way from its Megatron
    config: :func:`model_size_hf_fields` and :func:`rope_hf_fields`."""
    return {**model_size_hf_fields(config), **rope_hf_fields(config)}


def layer_type_rope_kwargs(hf_config: Any, family: str, *, yarn: bool = False) -> Dict[str, Any]:
    """:func:`common_megatron_kwargs` of a family with per-layer-type RoPE (Gemma 3, Olmo 3): full-attention layers
    use ``rope_parameters["full_attention"]`` (the model's RoPE: default, linear scaling, and with ``yarn`` YaRN),
    sliding layers ``rope_parameters["sliding_attention"]``, a base only (``local_rotary_base`` when it differs or
    the full layers' RoPE is scaled, built by ``mcore.modules.LayerTypeRopeSelfAttention``, which also keeps YaRN's
    attention factor off the sliding layers). One set of rope parameters: the plain fields.

    Raises:
        ValueError: sliding-layer RoPE other than the default type, or full-layer RoPE that
            :func:`rope_settings` refuses (YaRN without ``yarn``), named.
    """
    per_type = per_layer_type_rope(hf_config)
    if per_type is None:
        return common_megatron_kwargs(hf_config, yarn=yarn)
    kw = common_megatron_kwargs(hf_config, rope_layer_type=FULL, yarn=yarn)
    if SLIDING in per_type:
        kind = per_type[SLIDING].get("rope_type", per_type[SLIDING].get("type", "default"))
        local = rope_settings({"rope_parameters": per_type[SLIDING]}) if kind == "default" else {}
        extra = sorted(set(local) - {"rotary_base"})
        if kind != "default" or extra:
            raise ValueError(f"{family}: rope_parameters[{SLIDING!r}] = {per_type[SLIDING]} is not supported: "
                             "sliding layers take a rope base only (rope_type 'default')")
        global_scaled = "rope_scaling" in kw or "seq_len_interpolation_factor" in kw or \
            kw.get("position_embedding_type") == "yarn"
        if global_scaled or local["rotary_base"] != kw["rotary_base"]:
            kw["local_rotary_base"] = local["rotary_base"]
    return kw


def layer_type_rope_hf_fields(config: GPTConfig) -> Dict[str, Any]:
    """HF per-layer-type ``rope_parameters`` (the reverse of :func:`layer_type_rope_kwargs`)."""
    full = rope_hf_fields(config)["rope_parameters"]
    if config.local_rotary_base is None:
        sliding = dict(full)
    else:
        sliding = {"rope_type": "default", "rope_theta": float(config.local_rotary_base)}
    return {"rope_parameters": {FULL: full, SLIDING: sliding}}


def qwen_window_hf_fields(config: GPTConfig, family: str) -> Dict[str, Any]:
    """Qwen2 / Qwen3 window fields: ``sliding_window``, ``layer_types``, ``use_sliding_window`` and
    ``max_window_layers`` (the first sliding layer; HF slides the layers from there on unless ``layer_types`` says
    otherwise)."""
    window = window_hf_fields(config, family)
    sliding = [i for i, t in enumerate(window["layer_types"]) if t == SLIDING]
    return {**window, "use_sliding_window": bool(sliding),
            "max_window_layers": sliding[0] if sliding else config.num_layers}


# ----------------------------------------------------------------------------------------------------------------------
# Norms, activations, biases
# ----------------------------------------------------------------------------------------------------------------------


def _gelu_tanh(x):
    return F.gelu(x, approximate="tanh")


#: HF ``hidden_act`` -> the activation megatron applies (to the gate, with a gated MLP)
ACTIVATIONS: Dict[str, Callable[..., Any]] = {
    "silu": F.silu,
    "swish": F.silu,
    "gelu": F.gelu,
    "gelu_pytorch_tanh": _gelu_tanh,
}


def activation_func(hidden_act: str, family: str, allowed=("silu", "swish"), field: str = "hidden_act"
                    ) -> Callable[..., Any]:
    """The megatron activation for an HF ``hidden_act`` (config field ``field``) that the family supports.

    Raises:
        ValueError: naming the field, the activation and the supported ones.
    """
    if hidden_act not in allowed or hidden_act not in ACTIVATIONS:
        raise ValueError(f"{family}: {field}={hidden_act!r} is not supported (supported: {', '.join(allowed)})")
    return ACTIVATIONS[hidden_act]


def activation_name(func: Callable[..., Any]) -> str:
    """The HF ``hidden_act`` of a megatron activation function."""
    for name, f in ACTIVATIONS.items():
        if f is func:
            return name
    raise ValueError(f"no HF hidden_act for activation function {func!r}")


def rms_norm_kwargs(hf_config: Any, default_eps: float = 1e-6) -> Dict[str, Any]:
    """RMSNorm with HF ``rms_norm_eps`` (``default_eps`` when unset)."""
    return dict(normalization="RMSNorm", layernorm_epsilon=float(config_get(hf_config, "rms_norm_eps", default_eps)))


def rms_norm_hf_fields(config: GPTConfig) -> Dict[str, Any]:
    """HF ``rms_norm_eps`` (the reverse of :func:`rms_norm_kwargs`)."""
    return {"rms_norm_eps": config.layernorm_epsilon}


def gated_activation_kwargs(hf_config: Any, family: str, *, field: str = "hidden_act", default: str = "silu",
                            allowed: Tuple[str, ...] = ("silu", "swish")) -> Dict[str, Any]:
    """A gated MLP with the activation of HF ``field`` (SwiGLU by default).

    Raises:
        ValueError: an activation outside ``allowed`` (see :func:`activation_func`).
    """
    return dict(gated_linear_unit=True,
                activation_func=activation_func(config_get(hf_config, field, default), family, allowed=allowed,
                                                field=field))


def activation_hf_fields(config: GPTConfig, field: str = "hidden_act") -> Dict[str, Any]:
    """HF ``field`` of the config's activation (the reverse of :func:`gated_activation_kwargs`)."""
    return {field: activation_name(config.activation_func)}


def check_linear_biases(hf_config: Any, family: str) -> bool:
    """HF ``attention_bias`` (q/k/v and o_proj) equals ``mlp_bias``, as megatron's ``add_bias_linear`` needs; returns
    it.

    Raises:
        ValueError: the two differ.
    """
    attn_bias = bool(config_get(hf_config, "attention_bias", False))
    mlp_bias = bool(config_get(hf_config, "mlp_bias", False))
    if attn_bias != mlp_bias:
        raise ValueError(
            f"{family}: attention_bias={attn_bias} with mlp_bias={mlp_bias} cannot be expressed (megatron's "
            "add_bias_linear covers q/k/v, o_proj and the MLP together)"
        )
    return attn_bias


def linear_bias_kwargs(hf_config: Any, family: str) -> Dict[str, Any]:
    """Biases on every linear layer (q/k/v, o_proj, the MLP) or on none, from HF ``attention_bias`` / ``mlp_bias``.

    Raises:
        ValueError: the two differ (:func:`check_linear_biases`).
    """
    bias = check_linear_biases(hf_config, family)
    return dict(add_bias_linear=bias, add_qkv_bias=bias)


def linear_bias_hf_fields(config: GPTConfig) -> Dict[str, Any]:
    """HF ``attention_bias`` and ``mlp_bias`` (the reverse of :func:`linear_bias_kwargs`)."""
    return dict(attention_bias=bool(config.add_bias_linear), mlp_bias=bool(config.add_bias_linear))


def refuse_biases(config: GPTConfig, family: str, model: str) -> None:
    """For families without biases: the Megatron config has none.

    Raises:
        ValueError: ``add_bias_linear`` or ``add_qkv_bias`` set, naming both and the model.
    """
    if config.add_bias_linear or config.add_qkv_bias:
        raise ValueError(f"{family}: add_bias_linear={config.add_bias_linear}, add_qkv_bias={config.add_qkv_bias}"
                         f": {model} has no biases")


#: the Megatron settings of a model with RMSNorm, a gated MLP and no linear biases, for
#: :func:`refuse_megatron_settings`
RMSNORM_GLU_NO_BIAS = (("normalization", "RMSNorm"), ("gated_linear_unit", True), ("add_bias_linear", False),
                       ("add_qkv_bias", False))


def refuse_megatron_settings(config: GPTConfig, family: str, model: str, expected: Iterable[Tuple[str, Any]] = (),
                             *, also: Optional[Mapping[str, Tuple[Any, Any]]] = None,
                             wrong: Optional[Mapping[str, Any]] = None, show_expected: bool = False) -> None:
    """For the export's config: the Megatron settings an HF model has no equivalent of.

    Args:
        expected: ``(field, wanted value)`` pairs read from ``config``.
        also: ``field -> (got, wanted)`` pairs the caller computed (a normalised value).
        wrong: ``field -> got`` already judged unsupported by the caller (a condition other than equality).
        show_expected: name each wrong field as ``(got, expected)`` instead of its value alone.

    Raises:
        ValueError: naming every wrong field and its value, the family and the HF model.
    """
    checks = {f: (getattr(config, f), want) for f, want in expected}
    checks.update(also or {})
    found = {f: ((got, want) if show_expected else got) for f, (got, want) in checks.items() if got != want}
    found.update(wrong or {})
    if found:
        detail = " (field: (got, expected))" if show_expected else ""
        raise ValueError(f"{family}: these Megatron settings have no {model} equivalent{detail}: {found}")
