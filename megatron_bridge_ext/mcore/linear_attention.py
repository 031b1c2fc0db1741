"""Gated delta-net (linear attention) layers of megatron-core 0.19 in the local (non-Transformer-Engine) layer spec.

megatron-core 0.19 builds Qwen3-Next / Qwen3.5 as a ``GPTModel`` with ``experimental_attention_variant=
"gated_delta_net"``: the layers that ``linear_attention_freq`` marks (1) have a ``GatedDeltaNet`` where the others
have ``SelfAttention``; layer indices are HF's. megatron's own block spec for it
(``get_transformer_block_with_experimental_attention_variant_spec``) asserts Transformer Engine; this module builds
the same layers with local modules (:func:`gdn_block_spec`), which ``model_builder.gpt_layer_spec`` calls for such a
config:

- a linear-attention layer: the local layer of the config (its ``input_layernorm`` a separate norm where TE fuses it
  into ``in_proj``: its checkpoint key is TE's ``in_proj.layer_norm_weight``, as the local spec saves a softmax layer's
  under ``linear_qkv.layer_norm_weight``) with :class:`LocalGatedDeltaNet` as ``self_attention``:
  ``in_proj`` a ``ColumnParallelLinear``, ``out_norm`` a :class:`~.modules.LocalRMSNorm` (zero-centred with
  ``layernorm_zero_centered_gamma``, as TE's norm of megatron's spec is), ``out_proj`` a ``RowParallelLinear``;
- a full-attention layer: the config's local layer (``attention_output_gate``, q/k norms, zero-centred norms ...).

Parameters of ``GatedDeltaNet`` on TP rank t (megatron-core 0.19.2 ``ssm/gated_delta_net``): ``in_proj.weight``
``[q_t; k_t; v_t; z_t; beta_t; alpha_t]`` (rank t's key heads' q and k rows, their value heads' v / z rows and one
beta / alpha row per value head; ``ColumnParallelLinear`` splits the whole fused tensor in tp blocks, so each rank's
block holds its own six sections), ``conv1d.weight`` ``[q_t; k_t; v_t]`` channels (``[C/tp, 1, K]``), ``A_log`` /
``dt_bias`` (rank t's value heads), ``out_norm.weight`` ``[value_head_dim]`` (replicated), ``out_proj.weight``
(row-parallel).

CPU: megatron's ``GatedDeltaNet`` refuses to be built without the ``fla`` package (flash-linear-attention, CUDA /
Triton kernels) and calls its kernels in the forward unless ``config.deterministic_mode``. Where ``fla`` is not
installed :class:`LocalGatedDeltaNet` builds anyway (the parameters are the same) and its forward takes megatron's
own torch paths (``F.conv1d`` and ``torch_chunk_gated_delta_rule``, its deterministic mode, set on the module's own
copy of the config) with a torch L2 norm of q and k (``fla``'s ``l2norm``: ``x * rsqrt(sum(x^2) + 1e-6)``), put in
megatron's module in place of the missing import. Where ``fla`` is installed nothing is changed.

Under megatron-core < 0.19 the families are refused by name (their bridges' ``min_megatron_core``,
``versions.MEGATRON_CORE_0_19``): 0.16.1 has an earlier ``GatedDeltaNet`` module (the same parameters) that this
package neither builds nor tests.
"""

from __future__ import annotations

import copy
from typing import Any, Callable, List, Optional

import torch

from megatron_bridge_ext.mcore.versions import MEGATRON_CORE_0_19, require_megatron_core_for

__all__ = ["is_gated_delta_net", "linear_attention_pattern",
           "gdn_block_spec", "torch_l2norm"]


def is_gated_delta_net(config: Any) -> bool:
    """Whether a TransformerConfig builds gated delta-net layers (False under megatron-core versions without them)."""
    return getattr(config, "experimental_attention_variant", None) == "gated_delta_net"


def linear_attention_pattern(config: Any) -> List[int]:
    """Per layer 1 (gated delta-net) or 0 (full attention), from ``linear_attention_freq`` as megatron-core reads
    it (an int N: every N-th layer is full attention, the others linear; a list: per layer).

    Raises:
        ValueError: a list whose length is not ``num_layers``, or another type.
    """
    freq = config.linear_attention_freq
    if isinstance(freq, int) and not isinstance(freq, bool) and freq > 0:
        return [0 if (i + 1) % freq == 0 else 1 for i in range(config.num_layers)]
    if isinstance(freq, (list, tuple)):
        if len(freq) != config.num_layers:
            raise ValueError(f"linear_attention_freq has {len(freq)} entries for {config.num_layers} layers")
        return [int(bool(x)) for x in freq]
    raise ValueError(f"linear_attention_freq must be a positive int or a list of 0/1 per layer, got {freq!r}")


def torch_l2norm(x: torch.Tensor, dim: int = -1, eps: float = 1e-6, output_dtype: Optional[torch.dtype] = None
                 ) -> torch.Tensor:
    """``fla.modules.l2norm.l2norm`` in plain torch: ``x * rsqrt(sum(x^2) + eps)`` over ``dim`` (in fp32, cast back
    to ``output_dtype`` or the input's dtype)."""
    xf = x.float()
    out = xf * torch.rsqrt(xf.pow(2).sum(dim=dim, keepdim=True) + eps)
    return out.to(output_dtype or x.dtype)


def _gdn_class() -> type:
    """:class:`LocalGatedDeltaNet`, defined on first use (megatron-core >= 0.19's ``ssm.gated_delta_net`` package)."""
    global _GDN_CLASS
    if _GDN_CLASS is not None:
        return _GDN_CLASS
    from megatron.core.ssm.gated_delta_net import GatedDeltaNet
    from megatron.core.ssm.gated_delta_net import common as gdn_common

    class LocalGatedDeltaNet(GatedDeltaNet):
        """megatron-core's ``GatedDeltaNet``; without ``fla``: built all the same, forward on megatron's torch paths
        (see the module docstring)."""

        def __init__(self, config: Any, *args: Any, **kwargs: Any) -> None:
            have_fla = gdn_common.HAVE_FLA
            if not have_fla:
                if gdn_common.l2norm is None:
                    gdn_common.l2norm = torch_l2norm  # the name megatron's module imports from fla
                config = copy.copy(config)  # this module's own copy: the torch conv1d and delta rule
                config.deterministic_mode = True
                gdn_common.HAVE_FLA = True  # only for megatron's import check in __init__
            try:
                super().__init__(config, *args, **kwargs)
            finally:
                gdn_common.HAVE_FLA = have_fla

    _GDN_CLASS = LocalGatedDeltaNet
    return _GDN_CLASS


_GDN_CLASS: Optional[type] = None


def _gdn_attention_spec(config: Any) -> Any:
    from megatron.core.ssm.gated_delta_net import GatedDeltaNetSubmodules
    from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
    from megatron.core.transformer.spec_utils import ModuleSpec

    from megatron_bridge_ext.mcore.modules import LocalRMSNorm

    if config.normalization != "RMSNorm":
        raise ValueError(f"gated delta-net layers need normalization='RMSNorm' (their gated output norm), got "
                         f"{config.normalization!r}")
    return ModuleSpec(module=_gdn_class(), submodules=GatedDeltaNetSubmodules(
        in_proj=ColumnParallelLinear, out_norm=LocalRMSNorm, out_proj=RowParallelLinear))


def gdn_block_spec(config: Any, vp_stage: Optional[int], layer_spec: Callable[[Any, Optional[int]], Any],
                   moe_pattern: List[int]) -> Any:
    """This stage's layer specs of a gated delta-net model: ``layer_spec(config, num_experts)`` (the config's local
    layer, dense or MoE by ``moe_pattern``) with a :class:`LocalGatedDeltaNet` as ``self_attention`` where
    :func:`linear_attention_pattern` says 1.

    Raises:
        ValueError: a config without gated delta-net layers, or one of megatron-core < 0.19.
    """
    from megatron.core.transformer.transformer_block import TransformerBlockSubmodules, get_num_layers_to_build
    from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

    from megatron_bridge_ext.mcore.modules import LocalRMSNorm
    from megatron_bridge_ext.mcore.versions import replace_submodules, spec_submodules

    if not is_gated_delta_net(config):
        raise ValueError("gdn_block_spec: the config has no experimental_attention_variant='gated_delta_net'")
    require_megatron_core_for(MEGATRON_CORE_0_19, "gated delta-net model", "megatron-core's ssm/gated_delta_net")
    linear = linear_attention_pattern(config)
    gdn = _gdn_attention_spec(config)
    cache = {}
    specs = []
    for is_linear, is_moe in zip(linear, moe_pattern):
        key = (is_linear, is_moe)
        if key not in cache:
            spec = layer_spec(config, config.num_moe_experts if is_moe else None)
            if is_linear:  # TE fuses the input norm into in_proj: the checkpoint key is in_proj's
                keys = dict(spec_submodules(spec).sharded_state_dict_keys_map or {})
                keys["input_layernorm."] = "self_attention.in_proj.layer_norm_"
                spec = replace_submodules(spec, self_attention=gdn, sharded_state_dict_keys_map=keys)
            cache[key] = spec
        specs.append(cache[key])
    offset = get_transformer_layer_offset(config, vp_stage=vp_stage)
    count = get_num_layers_to_build(config, vp_stage=vp_stage)
    return TransformerBlockSubmodules(layer_specs=specs[offset:offset + count], layer_norm=LocalRMSNorm)
