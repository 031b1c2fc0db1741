"""The shared pieces of the gated delta-net families (Qwen3-Next, Qwen3.5 dense and MoE): their HF config fields <->
megatron-core 0.19's ``experimental_attention_variant="gated_delta_net"`` fields, and their mapping tables.

The model (megatron-core >= 0.19, ``mcore.linear_attention``): a ``GPTModel`` whose layers HF's ``layer_types``
marks ``linear_attention`` have a ``GatedDeltaNet`` as ``self_attention`` (megatron ``linear_attention_freq``, a list
of 1 / 0 per layer), the others a gated softmax attention (megatron ``attention_output_gate``: HF ``q_proj`` holds
per head ``[query; gate]``) with per-head q / k RMSNorms; every RMSNorm but the delta-net's gated output norm is
zero-centred (HF ``x * (1 + w)``, megatron ``layernorm_zero_centered_gamma``, the weight as stored); partial RoPE
(``partial_rotary_factor``, megatron ``rotary_percent``).

Under megatron-core 0.16.1 every family refuses by name (:class:`GatedDeltaNetFamily`: the families'
``min_megatron_core``, checked by ``MegatronModelBridge.require_megatron_core``).
"""

from __future__ import annotations

from typing import Any, Dict, List

from megatron_bridge_ext.mappings import (
    AutoMapping,
    ColumnParallelMapping,
    MegatronParamMapping,
    QKVMapping,
    RowParallelMapping,
)
from megatron_bridge_ext.mappings.gated_delta_net import (
    GDNConv1dMapping,
    GDNInProjMapping,
    GDNSplitInProjMapping,
    ZeroCenteredNormMapping,
)
from megatron_bridge_ext.mcore.linear_attention import linear_attention_pattern
from megatron_bridge_ext.mcore.versions import MEGATRON_CORE_0_19
from megatron_bridge_ext.models.hf_config import config_get
from megatron_bridge_ext.models.tables import H, L

__all__ = ["GatedDeltaNetFamily", "LINEAR", "FULL", "gdn_megatron_kwargs", "gdn_hf_fields", "gated_attention_mappings",
           "gdn_mappings", "check_gdn_config"]

LINEAR, FULL = "linear_attention", "full_attention"
_LINEAR_FIELDS = ("linear_conv_kernel_dim", "linear_key_head_dim", "linear_value_head_dim", "linear_num_key_heads",
                  "linear_num_value_heads")


class GatedDeltaNetFamily:
    """The megatron-core the gated delta-net families need (listed before their bridge class; the families call
    ``self.require_megatron_core()`` before :func:`gdn_megatron_kwargs`)."""

    min_megatron_core = MEGATRON_CORE_0_19
    min_megatron_core_feature = ("gated delta-net (linear attention) layers (megatron-core's ssm/gated_delta_net, "
                                 "GPTModel with experimental_attention_variant='gated_delta_net')")


def _layer_types(hf_config: Any, family: str) -> List[str]:
    layers = int(config_get(hf_config, "num_hidden_layers"))
    types = config_get(hf_config, "layer_types")
    if types is None:  # transformers derives them from full_attention_interval (default 4)
        interval = int(config_get(hf_config, "full_attention_interval", 4) or 4)
        types = [FULL if (i + 1) % interval == 0 else LINEAR for i in range(layers)]
    types = list(types)
    bad = sorted({t for t in types if t not in (LINEAR, FULL)})
    if len(types) != layers or bad:
        raise ValueError(f"{family}: layer_types={types!r}: expected {layers} entries of {LINEAR!r} / {FULL!r}")
    return types


def gdn_megatron_kwargs(hf_config: Any, family: str) -> Dict[str, Any]:
    """The gated delta-net, gated attention and zero-centred norm fields of a family's ``GPTConfig`` (the family
    checks its megatron-core first: :class:`GatedDeltaNetFamily`).

    Raises:
        ValueError: ``layer_types`` other than linear / full attention per layer, ``attention_bias``, an activation
            other than silu, missing linear fields.
    """
    if config_get(hf_config, "attention_bias", False):
        raise ValueError(f"{family}: attention_bias=True is not supported (the gated delta-net layers have no "
                         "biases and megatron's add_bias_linear covers both)")
    if config_get(hf_config, "hidden_act", "silu") not in ("silu", "swish"):
        raise ValueError(f"{family}: hidden_act={config_get(hf_config, 'hidden_act')!r}: the gated delta-net's "
                         "convolution and output gate use silu (megatron takes them from activation_func)")
    missing = [f for f in _LINEAR_FIELDS if config_get(hf_config, f) is None]
    if missing:
        raise ValueError(f"{family}: config.json lacks {missing}")
    types = _layer_types(hf_config, family)
    return {
        "experimental_attention_variant": "gated_delta_net",
        "linear_attention_freq": [1 if t == LINEAR else 0 for t in types],
        **{f: int(config_get(hf_config, f)) for f in _LINEAR_FIELDS},
        "qk_layernorm": True,
        "attention_output_gate": True,
        "layernorm_zero_centered_gamma": True,
    }


def check_gdn_config(config: Any, family: str) -> None:
    """A Megatron config the family can write as HF.

    Raises:
        ValueError: no gated delta-net, no output gate / q-k norms / zero-centred norms, biases (named).
    """
    if getattr(config, "experimental_attention_variant", None) != "gated_delta_net":
        raise ValueError(f"{family}: experimental_attention_variant="
                         f"{getattr(config, 'experimental_attention_variant', None)!r}; the family needs "
                         "'gated_delta_net'")
    for field in ("attention_output_gate", "qk_layernorm", "layernorm_zero_centered_gamma"):
        if not getattr(config, field):
            raise ValueError(f"{family}: {field}={getattr(config, field)!r}; the family's HF model always has it")
    if config.add_bias_linear or config.add_qkv_bias:
        raise ValueError(f"{family}: add_bias_linear={config.add_bias_linear}, add_qkv_bias={config.add_qkv_bias}: "
                         "the family has no linear biases")


def gdn_hf_fields(config: Any) -> Dict[str, Any]:
    """HF ``layer_types`` and ``linear_*`` fields of a Megatron config."""
    pattern = linear_attention_pattern(config)
    return {"layer_types": [LINEAR if p else FULL for p in pattern], "attention_bias": False,
            **{f: int(getattr(config, f)) for f in _LINEAR_FIELDS}}


def gated_attention_mappings() -> List[MegatronParamMapping]:
    """The full-attention layers: input norm (also the linear layers': megatron's local spec keeps it apart from
    ``in_proj``), q (per head ``[query; gate]``) / k / v into ``linear_qkv`` with the output gate, q / k norms,
    ``o_proj``."""
    a = f"{H}.self_attn"
    return [
        AutoMapping(f"{L}.input_layernorm.weight", f"{H}.input_layernorm.weight"),
        QKVMapping(f"{L}.self_attention.linear_qkv.weight", q=f"{a}.q_proj.weight", k=f"{a}.k_proj.weight",
                   v=f"{a}.v_proj.weight", output_gate=True),
        AutoMapping(f"{L}.self_attention.linear_proj.weight", f"{a}.o_proj.weight"),
        AutoMapping(f"{L}.self_attention.q_layernorm.weight", f"{a}.q_norm.weight"),
        AutoMapping(f"{L}.self_attention.k_layernorm.weight", f"{a}.k_norm.weight"),
    ]


def gdn_mappings(split_in_proj: bool) -> List[MegatronParamMapping]:
    """The gated delta-net layers (HF ``linear_attn``): ``in_proj`` from Qwen3-Next's ``in_proj_qkvz`` /
    ``in_proj_ba`` or (``split_in_proj``) Qwen3.5's ``in_proj_qkv`` / ``in_proj_z`` / ``in_proj_b`` /
    ``in_proj_a``; ``conv1d``; ``A_log`` / ``dt_bias`` (split by value heads); the gated norm (``1 + w`` in
    megatron); ``out_proj``."""
    a = f"{H}.linear_attn"
    s = f"{L}.self_attention"
    in_proj = GDNSplitInProjMapping(f"{s}.in_proj.weight", qkv=f"{a}.in_proj_qkv.weight", z=f"{a}.in_proj_z.weight",
                                    b=f"{a}.in_proj_b.weight", a=f"{a}.in_proj_a.weight") if split_in_proj else \
        GDNInProjMapping(f"{s}.in_proj.weight", qkvz=f"{a}.in_proj_qkvz.weight", ba=f"{a}.in_proj_ba.weight")
    return [
        in_proj,
        GDNConv1dMapping(f"{s}.conv1d.weight", f"{a}.conv1d.weight"),
        ColumnParallelMapping(f"{s}.A_log", f"{a}.A_log"),
        ColumnParallelMapping(f"{s}.dt_bias", f"{a}.dt_bias"),
        ZeroCenteredNormMapping(f"{s}.out_norm.weight", f"{a}.norm.weight"),
        RowParallelMapping(f"{s}.out_proj.weight", f"{a}.out_proj.weight"),
    ]
