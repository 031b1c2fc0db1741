"""Gemma 4 text (``Gemma4ForCausalLM``, ``model_type`` ``gemma4_text``), against Gemma 3 text (transformers 5.24's
``modeling_gemma4.py`` / ``configuration_gemma4.py``; what megatron-core 0.16.1 and 0.19.2's ``GPTModel`` can hold).

What Gemma 4 keeps from Gemma 3 and converts the same way: GeGLU MLP (``hidden_activation``), sandwich norms
(``post_attention_layernorm`` / ``pre_feedforward_layernorm`` / ``post_feedforward_layernorm``), per-head q/k norms,
embeddings scaled by sqrt(hidden_size), the sliding / full layer pattern (``layer_types``, ``sliding_window``),
per-layer-type RoPE (``rope_parameters[layer_type]``), ``final_logit_softcapping``, tied embeddings.

What is new, and what this bridge does with it:

========================================  ============================================================================
Gemma 4 (HF)                              here
========================================  ============================================================================
RMSNorm ``x * w`` (not ``x * (1+w)``)     converts: ``layernorm_zero_centered_gamma=False`` (local norms)
``v_norm`` (RMSNorm, no weight)           converts: ``value_rms_norm`` (``ValueNormSelfAttention``)
``layer_scalar`` (one number / layer)     converts: ``layer_output_scalar`` (``ScaledOutputTransformerLayer``),
                                          mapped to ``decoder.layers.N.layer_scalar``
attention ``scaling = 1.0``               converts: ``softmax_scale=1.0`` (no ``query_pre_attn_scalar``)
full layers' ``rope_type``                converts: ``rotary_proportion`` (frequencies ``theta ** (-2i / head_dim)`` on
``"proportional"``                        the first ``partial_rotary_factor`` of the pairs, 0 on the rest; HF's
                                          ``factor`` as ``seq_len_interpolation_factor``), ``proportional_rope``
``attn_logit_softcapping``                gone from Gemma 4 (nothing to convert)
``use_double_wide_mlp``                   accepted: it doubles the MLP of kv-shared layers only, which are refused
``per_layer_config``: another             converts: ``full_attention_kv_channels`` / ``full_attention_num_query_groups``
``head_dim`` (``global_head_dim``) /      (the full-attention layers' attention is built from
``num_key_value_heads``                   ``dataclasses.replace(config, kv_channels=, num_query_groups=)``:
(``num_global_key_value_heads``) on       ``LayerTypeRopeSelfAttention``; the model RoPE spans their head size,
the full-attention layers                 sliding layers get their own); their q/k/v are mapping-table entries per
                                          layer index with their (H, G, d) (``hf_layout``). Refused: overrides of
                                          other attributes, or layers of one type with different geometries
``num_kv_shared_layers`` > 0              refused: later layers reuse earlier layers' keys / values (and have no k/v
(``kv_sharing_modes``)                    projections); a megatron layer computes its own
``hidden_size_per_layer_input`` > 0       refused: per-layer input embeddings (``embed_tokens_per_layer``,
(PLE)                                     ``per_layer_model_projection``, a gated residual in every layer) are a second
                                          input stream that megatron's decoder layers do not take
``attention_k_eq_v``                      converts: ``full_attention_k_eq_v``; the full layers have no ``v_proj``:
(full layers: keys' projection as         import packs ``k_proj`` as key and value rows of megatron's fused
values, no ``v_proj``)                    ``linear_qkv`` (``KeyAsValueQKVMapping``); export checks the value rows
                                          equal the key rows bit for bit, refuses by name otherwise, writes no
                                          ``v_proj`` (see below)
``enable_moe_block``                      refused: a dense MLP and routed experts side by side, each with its own
                                          pre / post norms, and a router with its own norm, scale and
                                          ``per_expert_scale``; megatron's MoE layer has one pre-norm and adds shared
                                          experts unnormalised
``use_bidirectional_attention``           ``"all"`` refused: ``GPTModel`` is causal; ``"vision"`` accepted (only image
                                          tokens attend both ways, and the text model sees none; export writes None)
``attention_bias``                        refused (as Gemma 2 / 3: q/k/v/o biases without MLP biases)
========================================  ============================================================================

transformers' own defaults (its docs cite google/gemma-4-e2b-it) are refused for their per-layer input embeddings
(256); without them (``hidden_size_per_layer_input=0``, no kv sharing, no MoE block: the dense released shape) they
convert: sliding layers of head_dim 256, full layers of head_dim 512 (and ``num_global_key_value_heads`` with k=v),
weights bit-exact both ways (the ``gemma4_released`` checkpoint of ``tests/distributed/test_gemma4.py``).

k=v and training: HF computes ``value = v_norm(k_proj(x))`` and ``key = rope(k_norm(k_proj(x)))``; with
``linear_qkv``'s value rows equal to its key rows megatron's stock attention computes the same (the value norm and
the key norm / RoPE act on their own copies of the same projection). The rows are a copy, not a tie: megatron's fused
QKV weight cannot hold one parameter twice, and a module that reused the keys as values would change
``linear_qkv``'s shape, the TE key set and every checkpoint of the layer. So a model trained in Megatron lets its value
rows drift from its key rows (as if the two projections were untied) and has no k=v HF equivalent; the export says so
by name instead of writing a different model. Fine-tuning that should stay k=v must tie the gradients of those rows.
"""

from __future__ import annotations

import math
from typing import Any, Dict, Hashable, Mapping, Optional, Tuple

from megatron_bridge_ext.engine import MegatronModelBridge
from megatron_bridge_ext.mappings import KeyAsValueQKVMapping, QKVMapping
from megatron_bridge_ext.mcore.config import full_attention_layers, layer_attention_dims
from megatron_bridge_ext.models.gemma2 import GELU_ACTIVATIONS
from megatron_bridge_ext.models.hf_config import (
    FULL,
    RMSNORM_GLU_NO_BIAS,
    SLIDING,
    activation_hf_fields,
    config_get,
    dtype_kwargs,
    gated_activation_kwargs,
    model_size_hf_fields,
    model_size_kwargs,
    per_layer_type_rope,
    refuse_megatron_settings,
    rms_norm_hf_fields,
    rms_norm_kwargs,
    rope_hf_fields,
    rope_settings,
    window_hf_fields,
    window_settings,
)
from megatron_bridge_ext.models.tables import (
    GPT_MODEL,
    attention_mappings,
    embedding_mappings,
    gated_mlp_mappings,
    layer_scalar_mappings,
    post_norm_mappings,
    qk_norm_mappings,
)
from megatron_bridge_ext.registry import MegatronMappingRegistry

__all__ = ["Gemma4Bridge"]

#: HF fields whose truthy values build what GPTModel cannot hold (see the module docstring), with the reason
REFUSED = {
    "num_kv_shared_layers": "layers that reuse earlier layers' keys and values (kv sharing) cannot be expressed: each "
                            "megatron layer computes its own",
    "hidden_size_per_layer_input": "per-layer input embeddings (embed_tokens_per_layer, per_layer_model_projection "
                                   "and a gated per-layer residual) cannot be expressed: megatron's decoder layers "
                                   "take one hidden-state stream",
    "enable_moe_block": "a dense MLP and routed experts side by side, each with its own norms, and a router with its "
                        "own norm, scale and per_expert_scale cannot be expressed by megatron's MoE layer",
    "attention_bias": "q/k/v and o_proj biases without MLP biases cannot be expressed (megatron's add_bias_linear "
                      "covers both)",
}
#: HF rope parameters of a proportional RoPE that this bridge reads
PROPORTIONAL_KEYS = {"rope_type", "rope_theta", "partial_rotary_factor", "factor"}


def _as_hf_config(hf_config: Any) -> Any:
    """An HF config object: a dict form goes through ``Gemma4TextConfig``, which derives the per-layer overrides
    (``global_head_dim``, ``num_global_key_value_heads``) that decide whether the model converts."""
    if not isinstance(hf_config, Mapping):
        return hf_config
    import transformers

    return transformers.Gemma4TextConfig(**{k: v for k, v in hf_config.items() if k != "model_type"})


@MegatronModelBridge.register_bridge(source="Gemma4ForCausalLM", target=GPT_MODEL)
class Gemma4Bridge(MegatronModelBridge):
    """HF Gemma4ForCausalLM (text) <-> Megatron-Core GPTModel (with the local-spec modules of ``mcore/modules.py``)."""

    hf_model_type = "gemma4_text"

    def _refuse_unsupported(self, hf_config: Any) -> None:
        family = type(self).__name__
        for field, why in REFUSED.items():
            value = config_get(hf_config, field)
            if value:
                raise ValueError(f"{family}: {field}={value!r} is not supported: {why}")
        bidirectional = config_get(hf_config, "use_bidirectional_attention")
        if bidirectional not in (None, "vision"):  # "vision": image tokens only, which the text model never sees
            raise ValueError(f"{family}: use_bidirectional_attention={bidirectional!r} is not supported: GPTModel is "
                             "causal")
        _attention_geometry(hf_config, family)  # refuses per-layer overrides it cannot express

    def _rope_kwargs(self, hf_config: Any) -> Dict[str, Any]:
        """The model's RoPE from ``rope_parameters["full_attention"]``, the sliding layers' base as
        ``local_rotary_base`` where the two differ."""
        family = type(self).__name__
        per_type = per_layer_type_rope(hf_config)
        if per_type is None or FULL not in per_type:
            raise ValueError(f"{family}: rope_parameters={config_get(hf_config, 'rope_parameters')!r} must be keyed "
                             f"by layer type, with a {FULL!r} entry")
        full = per_type[FULL]
        if full.get("rope_type", "default") == "proportional":
            extra = sorted(set(full) - PROPORTIONAL_KEYS)
            if extra:
                raise ValueError(f"{family}: rope_parameters[{FULL!r}] = {full} has keys {extra} that proportional "
                                 "RoPE does not read")
            kw: Dict[str, Any] = {"rotary_base": float(full["rope_theta"]),
                                  "rotary_proportion": float(full.get("partial_rotary_factor") or 1.0)}
            factor = float(full.get("factor", 1.0))
            if factor != 1.0:
                kw["seq_len_interpolation_factor"] = factor
        else:
            kw = rope_settings({"rope_parameters": full})
            if "rotary_percent" in kw:
                raise ValueError(f"{family}: rope_parameters[{FULL!r}] = {full}: partial_rotary_factor is read by "
                                 "proportional RoPE only")
        if SLIDING in per_type:
            local = rope_settings({"rope_parameters": per_type[SLIDING]})
            if set(local) != {"rotary_base"}:
                raise ValueError(f"{family}: rope_parameters[{SLIDING!r}] = {per_type[SLIDING]} is not supported: "
                                 "sliding layers take a rope base only (rope_type 'default')")
            if set(kw) != {"rotary_base"} or local["rotary_base"] != kw["rotary_base"]:
                kw["local_rotary_base"] = local["rotary_base"]
        return kw

    def hf_config_to_megatron_kwargs(self, hf_config: Any) -> Dict[str, Any]:
        hf_config = _as_hf_config(hf_config)
        self._refuse_unsupported(hf_config)
        family = type(self).__name__
        (sliding_d, sliding_g), (full_d, full_g), _ = _attention_geometry(hf_config, family)
        # the sizes from a flat view: a config with per-layer overrides refuses reading head_dim globally
        flat = {k: v for k, v in hf_config.to_dict().items() if k != "per_layer_config"}
        flat.update(head_dim=sliding_d, num_key_value_heads=sliding_g)
        kw = {**model_size_kwargs(flat), **self._rope_kwargs(hf_config), **dtype_kwargs(hf_config)}
        if full_d != sliding_d:
            kw["full_attention_kv_channels"] = full_d
        if full_g != sliding_g:
            kw["full_attention_num_query_groups"] = full_g
        if config_get(hf_config, "attention_k_eq_v"):
            kw["full_attention_k_eq_v"] = True
        cap = config_get(hf_config, "final_logit_softcapping")
        if cap is not None:
            if isinstance(cap, bool) or not isinstance(cap, (int, float)) or not math.isfinite(cap) or cap <= 0:
                raise ValueError(f"{family}: final_logit_softcapping={cap!r} is not a positive number (None: no "
                                 "capping)")
            kw["final_logit_softcapping"] = float(cap)
        kw.update(
            **rms_norm_kwargs(hf_config),
            layernorm_zero_centered_gamma=False,
            post_self_attn_layernorm=True,
            post_mlp_layernorm=True,
            qk_layernorm=True,
            value_rms_norm=True,
            layer_output_scalar=True,
            **gated_activation_kwargs(hf_config, family, field="hidden_activation", default="gelu_pytorch_tanh",
                                      allowed=GELU_ACTIVATIONS),
            add_bias_linear=False,
            add_qkv_bias=False,
            softmax_scale=1.0,
            embedding_scale=kw["hidden_size"] ** 0.5,
            **window_settings(hf_config, family),
        )
        return kw

    def _check_megatron(self, config: Any) -> None:
        refuse_megatron_settings(config, type(self).__name__, self.hf_architecture, (
            *RMSNORM_GLU_NO_BIAS, ("layernorm_zero_centered_gamma", False), ("post_self_attn_layernorm", True),
            ("post_mlp_layernorm", True), ("qk_layernorm", True), ("value_rms_norm", True),
            ("layer_output_scalar", True), ("softmax_scale", 1.0), ("embedding_scale", config.hidden_size ** 0.5),
            ("attn_logit_softcapping", None), ("rotary_percent", 1.0)), show_expected=True)

    def _rope_hf_fields(self, config: Any) -> Dict[str, Any]:
        if config.rotary_proportion is None:
            full = rope_hf_fields(config)["rope_parameters"]
        else:
            if config.rope_scaling or config.position_embedding_type != "rope":
                raise ValueError(f"{type(self).__name__}: rotary_proportion={config.rotary_proportion} with "
                                 f"rope_scaling={config.rope_scaling} / position_embedding_type="
                                 f"{config.position_embedding_type!r} has no HF equivalent")
            full = {"rope_type": "proportional", "partial_rotary_factor": float(config.rotary_proportion),
                    "rope_theta": float(config.rotary_base)}
            if config.seq_len_interpolation_factor is not None:
                full["factor"] = float(config.seq_len_interpolation_factor)
        if config.local_rotary_base is None:
            sliding = dict(full)
        else:
            sliding = {"rope_type": "default", "rope_theta": float(config.local_rotary_base)}
        return {"rope_parameters": {FULL: full, SLIDING: sliding}}

    def megatron_to_hf_config(self, config: Any) -> Dict[str, Any]:
        self._check_megatron(config)
        family = type(self).__name__
        window = window_hf_fields(config, family)
        if window["layer_types"][-1] != FULL:  # HF Gemma 4 turns a last sliding layer into a full one
            raise ValueError(f"{family}: the last layer slides (window_attn_skip_freq="
                             f"{config.window_attn_skip_freq}); Gemma 4's last layer is a full-attention layer")
        if window["sliding_window"] is None:  # HF Gemma builds a sliding-window mask even when no layer uses it
            window = {**window, "sliding_window": config.seq_length}
        return {
            **super().megatron_to_hf_config(config), **model_size_hf_fields(config), **self._rope_hf_fields(config),
            **rms_norm_hf_fields(config), **activation_hf_fields(config, "hidden_activation"), **window,
            "attention_bias": False,
            "final_logit_softcapping": config.final_logit_softcapping,
            # always written: without it HF gives the full-attention layers head_dim 512
            "per_layer_config": _per_layer_config_hf(config, window["layer_types"]),
            "hidden_size_per_layer_input": 0,
            "num_kv_shared_layers": 0,
            "attention_k_eq_v": bool(config.full_attention_k_eq_v),
            "enable_moe_block": False,
            "use_double_wide_mlp": False,
            "use_bidirectional_attention": None,
        }

    # ---- the full-attention layers' q/k/v: a mapping table entry per layer index (``hf_layout``) -----------------

    def detect_hf_layout(self, hf_state: Any, hf_config: Any) -> Optional[Hashable]:
        """The full-attention layers' own q/k/v geometry and k=v, from the HF config (:func:`_layout`)."""
        hf_config = _as_hf_config(hf_config)
        family = type(self).__name__
        (sd, sg), (fd, fg), k_eq_v = _attention_geometry(hf_config, family)
        types = list(config_get(hf_config, "layer_types"))
        full = tuple(i for i, t in enumerate(types) if t == FULL)
        heads = int(config_get(hf_config, "num_attention_heads"))
        return _layout(full, (heads, fg, fd), (heads, sg, sd), bool(k_eq_v))

    def hf_layout_for_model(self, config: Any) -> Optional[Hashable]:
        """The same from the Megatron config (``full_attention_*`` fields, the full layers from its window
        pattern), so an export without a source writes what the model holds."""
        full = tuple(full_attention_layers(config))
        base = layer_attention_dims(config)
        dims = layer_attention_dims(config, full[0]) if full else base
        return _layout(full, dims, base, bool(getattr(config, "full_attention_k_eq_v", False)))

    def mapping_registry(self) -> MegatronMappingRegistry:
        per_layer = []
        if self.hf_layout is not None:  # exact names first: they win over the wildcard entries below
            _, full, dims, k_eq_v = self.hf_layout
            for i in full:
                meg, a = f"decoder.layers.{i}.self_attention.linear_qkv.weight", f"model.layers.{i}.self_attn"
                if k_eq_v:
                    per_layer.append(KeyAsValueQKVMapping(meg, q=f"{a}.q_proj.weight", k=f"{a}.k_proj.weight",
                                                          dims=dims))
                else:
                    per_layer.append(QKVMapping(meg, q=f"{a}.q_proj.weight", k=f"{a}.k_proj.weight",
                                                v=f"{a}.v_proj.weight", dims=dims))
        return MegatronMappingRegistry(*per_layer, *embedding_mappings(), *attention_mappings(), *qk_norm_mappings(),
                                       *gated_mlp_mappings(pre_norm="pre_feedforward_layernorm"),
                                       *post_norm_mappings(), *layer_scalar_mappings())


#: per-layer attributes of HF's ``per_layer_config`` that this bridge converts (on the full-attention layers)
PER_LAYER_ATTRIBUTES = {"head_dim", "num_key_value_heads"}


def _attention_geometry(hf_config: Any, family: str) -> Tuple[Tuple[int, int], Tuple[int, int], bool]:
    """``((head_dim, kv heads) of the sliding layers, the same of the full-attention layers, attention_k_eq_v)`` from
    HF's resolved ``per_layer_config`` (``global_head_dim`` / ``num_global_key_value_heads`` land there); a model
    without sliding layers gives its full layers' geometry twice.

    Raises:
        ValueError: per-layer overrides of other attributes, or layers of one type that differ among themselves.
    """
    attrs = set(getattr(hf_config, "per_layer_attributes", None) or ())
    other = sorted(attrs - PER_LAYER_ATTRIBUTES)
    if other:
        raise ValueError(f"{family}: per_layer_config overrides {other} per layer: only head_dim and "
                         "num_key_value_heads (of the full-attention layers) are supported")
    n = int(config_get(hf_config, "num_hidden_layers"))
    types = list(config_get(hf_config, "layer_types") or [FULL] * n)
    layers = hf_config.per_layer_config if attrs else [hf_config] * n
    by_type: Dict[str, set] = {}
    for i, t in enumerate(types):
        by_type.setdefault(t, set()).add((int(layers[i].head_dim), int(layers[i].num_key_value_heads)))
    for t, geo in by_type.items():
        if len(geo) != 1:
            raise ValueError(f"{family}: per_layer_config gives the {t} layers different (head_dim, "
                             f"num_key_value_heads) {sorted(geo)}: megatron builds one geometry per layer type")
    full = next(iter(by_type[FULL])) if FULL in by_type else next(iter(by_type[SLIDING]))
    sliding = next(iter(by_type[SLIDING])) if SLIDING in by_type else full
    return sliding, full, bool(config_get(hf_config, "attention_k_eq_v"))


def _layout(full: Tuple[int, ...], dims: Tuple[int, int, int], base: Tuple[int, int, int],
            k_eq_v: bool) -> Optional[Hashable]:
    """``("per_layer_attention", full-layer indices, their (H, G, d), k=v)`` where the full-attention layers need
    their own q/k/v entries (another geometry or k=v), else None (the wildcard entries serve every layer)."""
    if not full or (tuple(dims) == tuple(base) and not k_eq_v):
        return None
    return ("per_layer_attention", tuple(full), tuple(int(x) for x in dims), bool(k_eq_v))


def _per_layer_config_hf(config: Any, layer_types: Any) -> Dict[str, Dict[str, int]]:
    """HF's ``per_layer_config`` of a Megatron config: the full-attention layers' ``head_dim`` /
    ``num_key_value_heads`` where they differ from the model's (empty: one geometry)."""
    over: Dict[str, int] = {}
    if config.full_attention_kv_channels is not None and config.full_attention_kv_channels != config.kv_channels:
        over["head_dim"] = int(config.full_attention_kv_channels)
    groups = config.num_query_groups or config.num_attention_heads
    if config.full_attention_num_query_groups is not None and config.full_attention_num_query_groups != groups:
        over["num_key_value_heads"] = int(config.full_attention_num_query_groups)
    if not over:
        return {}
    return {str(i): dict(over) for i, t in enumerate(layer_types) if t == FULL}
