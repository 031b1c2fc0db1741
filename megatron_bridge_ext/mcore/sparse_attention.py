"""DeepSeek sparse attention (megatron-core >= 0.19 ``experimental_attention_variant="dsa"``) on the local spec.

megatron-core builds DSA only from Transformer Engine modules (``get_dsa_module_spec_for_backend`` asserts
``transformer_impl == "transformer_engine"``); the modules themselves (``AbsorbedMLASelfAttention``,
``DSAttention``, ``DSAIndexer``) have plain-PyTorch paths (``dsa_kernel_backend="none"``), which run on CPU.
:func:`dsa_attention_spec` is the same spec with local modules:

==========================================  ========================================================================
submodule                                   module (TP layout of its weight)
==========================================  ========================================================================
``linear_q_down_proj`` / ``kv_down_proj``   ``ColumnParallelLinear`` (column; gathered in the forward, as megatron's
                                            local MLA spec)
``linear_q_up_proj`` / ``kv_up_proj``       ``ColumnParallelLinear`` (column, by heads)
``q_layernorm`` / ``kv_layernorm``          standalone ``LocalRMSNorm`` (DSA reads the normalised q latent);
                                            ``LatentRMSNorm`` when ``latent_layernorm_epsilon`` differs
``linear_proj``                             ``RowParallelLinear`` (row)
``core_attention``                          ``DSAttention`` (no parameters of its own)
``core_attention.indexer.linear_wq_b``,     megatron's ``Linear`` with ``parallel_mode="duplicated"``: replicated on
``linear_wk``, ``linear_weights_proj``      every TP rank (megatron's choice: the indexer is not split)
``core_attention.indexer.k_norm``           :class:`IndexerLayerNorm`, a LayerNorm with a bias (replicated)
==========================================  ========================================================================

AbsorbedMLA needs ``sequence_parallel`` when TP > 1 (the config translation sets it), which megatron's torch norms
(``WrappedTorchNorm``) refuse: every norm of a DSA model is a ``LocalRMSNorm`` (``model_builder.gpt_layer_spec``)
or :class:`IndexerLayerNorm`; neither has parameters that sequence parallelism would treat otherwise.
"""

from __future__ import annotations

from typing import Any

import torch
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.spec_utils import ModuleSpec

__all__ = ["IndexerLayerNorm", "dsa_attention_spec", "local_norm_mtp_block_spec"]


class IndexerLayerNorm(torch.nn.Module):
    """LayerNorm with weight and bias in the input's dtype (``torch.nn.LayerNorm``'s arithmetic, HF's indexer
    ``k_norm``), built like megatron's norms (``config``, ``hidden_size``, ``eps``); sequence parallelism allowed.
    """

    def __init__(self, config: Any, hidden_size: int, eps: float = 1e-5, **kwargs: Any) -> None:
        super().__init__()
        self.eps = eps
        self.weight = torch.nn.Parameter(torch.ones(hidden_size, dtype=config.params_dtype))
        self.bias = torch.nn.Parameter(torch.zeros(hidden_size, dtype=config.params_dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.layer_norm(x, self.weight.shape, self.weight.to(x.dtype), self.bias.to(x.dtype),
                                              self.eps)


def dsa_attention_spec(config: Any) -> ModuleSpec:
    """The local-module spec of megatron-core's DSA attention (``AbsorbedMLASelfAttention`` around ``DSAttention``
    and its ``DSAIndexer``) for ``config``.

    Raises:
        ValueError: a config without multi-latent attention, without a q LoRA, or with ``qk_l2_norm`` (megatron's
            DSA needs the normalised q latent).
    """
    from megatron.core.post_training.modelopt.layers import Linear
    from megatron.core.transformer.experimental_attention_variant.absorbed_mla import (
        AbsorbedMLASelfAttention, AbsorbedMLASelfAttentionSubmodules,
    )
    from megatron.core.transformer.experimental_attention_variant.dsa import (
        DSAIndexer, DSAIndexerSubmodules, DSAttention, DSAttentionSubmodules,
    )
    from megatron_bridge_ext.mcore.modules import LatentRMSNorm, LocalRMSNorm

    if not getattr(config, "multi_latent_attention", False) or config.q_lora_rank is None or config.qk_l2_norm:
        raise ValueError(f"dsa_attention_spec: DSA needs multi_latent_attention=True with a q_lora_rank and no "
                         f"qk_l2_norm (got multi_latent_attention={getattr(config, 'multi_latent_attention', None)},"
                         f" q_lora_rank={config.q_lora_rank}, qk_l2_norm={config.qk_l2_norm})")
    latent_eps = getattr(config, "latent_layernorm_epsilon", None)
    latent_norm = LatentRMSNorm if latent_eps is not None and latent_eps != config.layernorm_epsilon else \
        LocalRMSNorm
    indexer = ModuleSpec(module=DSAIndexer, submodules=DSAIndexerSubmodules(
        linear_wq_b=Linear, linear_wk=Linear, k_norm=IndexerLayerNorm, linear_weights_proj=Linear))
    return ModuleSpec(
        module=AbsorbedMLASelfAttention,
        params={"attn_mask_type": AttnMaskType.causal},
        submodules=AbsorbedMLASelfAttentionSubmodules(
            linear_q_proj=ColumnParallelLinear,
            linear_q_down_proj=ColumnParallelLinear,
            linear_q_up_proj=ColumnParallelLinear,
            linear_kv_down_proj=ColumnParallelLinear,
            linear_kv_up_proj=ColumnParallelLinear,
            core_attention=ModuleSpec(module=DSAttention, submodules=DSAttentionSubmodules(indexer=indexer)),
            linear_proj=RowParallelLinear,
            q_layernorm=latent_norm,
            kv_layernorm=latent_norm,
        ),
    )


def local_norm_mtp_block_spec(mtp_spec: Any) -> Any:
    """``mtp_spec`` (megatron's local MTP block spec, or None) with ``LocalRMSNorm`` for each MTP layer's ``enorm``,
    ``hnorm`` and ``layer_norm`` (megatron's torch norms refuse the sequence parallelism DSA runs with)."""
    import dataclasses

    from megatron_bridge_ext.mcore.modules import LocalRMSNorm

    if mtp_spec is None:
        return None
    block = getattr(mtp_spec, "submodules", mtp_spec)  # a ModuleSpec or its MultiTokenPredictionBlockSubmodules
    layers = [dataclasses.replace(spec, submodules=dataclasses.replace(
        spec.submodules, enorm=LocalRMSNorm, hnorm=LocalRMSNorm, layer_norm=LocalRMSNorm))
        for spec in block.layer_specs]
    block = dataclasses.replace(block, layer_specs=layers)
    return block if block is mtp_spec or not hasattr(mtp_spec, "submodules") else \
        dataclasses.replace(mtp_spec, submodules=block)
