"""megatron-core GPTModel chunks built from the Transformer Engine (TE) layer spec for a ``GPTConfig`` of this package:
what a training job (Megatron-LM with ``--transformer-impl transformer_engine``, Megatron Bridge's default) builds for
the same model. Test and check support only; runs with real TE (on a GPU) or with ``tests/te_standin.py`` (CPU).

The layer specs are megatron-core's own (``get_gpt_decoder_block_spec(config, use_transformer_engine=True)``, and
``get_gpt_mtp_block_spec(..., use_transformer_engine=True)`` for multi-token prediction); only what megatron-core's TE
spec cannot express is swapped in, as Megatron Bridge does it (gated delta-net models, megatron-core 0.19: megatron's
own ``get_transformer_block_with_experimental_attention_variant_spec``, see ``_gdn_block_spec``):

- a norm after attention / the MLP (Gemma 2 / 3, OLMo 2 / Olmo 3: ``post_self_attn_layernorm`` /
  ``post_mlp_layernorm``): ``linear_proj`` / ``linear_fc2`` are a ``TERowParallelLinear`` with a ``TENorm`` child
  ``post_layernorm`` (Megatron Bridge's ``TERowParallelLinearLayerNorm``);
- no norm before attention / the MLP (OLMo 2 / Olmo 3: ``pre_layernorms=False``): ``linear_qkv`` / ``linear_fc1``
  are TE's plain ``TEColumnParallelLinear`` (no fused input norm, so no ``layer_norm_weight``);
- query / key norms over the whole projection (OLMo 2 / Olmo 3 / OLMoE: ``qk_layernorm_whole_projection``): TE's
  attention with this package's ``WholeQueryRMSNorm`` / ``WholeKeyRMSNorm`` (``mcore/modules.py``) as
  ``q_layernorm`` / ``k_layernorm`` in place of TE's per-head ``TENorm`` (no TE class normalises a whole
  projection; they save their TP-sharded weight and no ``_extra_state``);
- a learned scalar on each layer's output (Gemma 4: ``layer_output_scalar``): the layer is this package's
  ``ScaledOutputTransformerLayer`` (a ``TransformerLayer`` with a ``layer_scalar`` parameter, any submodules);
- full-attention layers of their own head size / kv heads (Gemma 4: ``full_attention_kv_channels`` /
  ``full_attention_num_query_groups``): the self-attention is this package's ``LayerTypeRopeSelfAttention`` (built
  from the layer's own config, TE submodules);
- hybrid models (NemotronH, megatron-core 0.19 ``HybridModel``): megatron-core's own TE hybrid spec
  (``hybrid_layer_specs.hybrid_stack_spec``, Megatron-LM's default for hybrid models; :func:`te_hybrid_stack_spec`),
  with ``mamba_ssm``'s gated norm as this package's torch ``GatedRMSNorm`` where ``mamba_ssm`` is missing (the same
  parameter and checkpoint entry);
- the rest of this package's modules change no parameter (soft-capped, per-layer-type RoPE or value-normalising
  attention, proportional RoPE, fp32 router weights, embedding scale, output soft-cap, Llama 4's chunked /
  temperature-tuned attention and its q/k L2 norm on RoPE layers only) and are left out: the keys are what is compared
  here. ``qk_l2_norm`` is passed on as Megatron-LM's GPT builder passes ``--qk-l2-norm`` (megatron-core's
  parameter-free ``L2Norm`` on every layer).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import List, Optional

__all__ = ["te_block_spec", "te_hybrid_stack_spec", "build_te_chunks"]


@functools.lru_cache(maxsize=None)
def _post_norm_linear():
    from megatron.core.extensions.transformer_engine import TENorm, TERowParallelLinear

    class TEPostNormRowParallelLinear(TERowParallelLinear):
        """Row-parallel TE linear followed by a norm of its output (``post_layernorm``)."""

        def __init__(self, input_size: int, output_size: int, *, config, **kwargs):
            super().__init__(input_size, output_size, config=config, **kwargs)
            self.post_layernorm = TENorm(config, output_size, eps=config.layernorm_epsilon)

        def forward(self, x):
            out, bias = super().forward(x)
            return self.post_layernorm(out), bias

    return TEPostNormRowParallelLinear


def _submodules(spec):
    """A spec's submodules: a ModuleSpec's field, or (megatron-core >= 0.18) a partial's ``submodules`` keyword."""
    if isinstance(spec, functools.partial):
        return spec.keywords["submodules"]
    return spec.submodules


def _with_submodules(spec, **changes):
    subs = dataclasses.replace(_submodules(spec), **changes)
    if isinstance(spec, functools.partial):
        return functools.partial(spec.func, *spec.args, **{**spec.keywords, "submodules": subs})
    return dataclasses.replace(spec, submodules=subs)


def _swaps(config) -> bool:
    return bool(getattr(config, "post_self_attn_layernorm", False) or getattr(config, "post_mlp_layernorm", False)
                or not getattr(config, "pre_layernorms", True)
                or getattr(config, "qk_layernorm_whole_projection", False))


def _layer_with_package_modules(layer_spec, config):
    """The layer spec with what megatron-core's TE spec cannot express swapped in (see the module docstring)."""
    from megatron.core.extensions.transformer_engine import TEColumnParallelLinear
    from megatron.core.transformer.moe.moe_layer import MoELayer

    layer = _submodules(layer_spec)
    attn, mlp = {}, {}
    if config.post_self_attn_layernorm:
        attn["linear_proj"] = _post_norm_linear()
    if getattr(config, "qk_layernorm_whole_projection", False):
        from megatron_bridge_ext.mcore.modules import WholeKeyRMSNorm, WholeQueryRMSNorm

        attn.update(q_layernorm=WholeQueryRMSNorm, k_layernorm=WholeKeyRMSNorm)
    mlp_module = layer.mlp.func if isinstance(layer.mlp, functools.partial) else layer.mlp.module
    moe = isinstance(mlp_module, type) and issubclass(mlp_module, MoELayer)
    if not getattr(config, "pre_layernorms", True):
        if moe:  # as the local spec (model_builder.gpt_layer_spec): MoE layers normalise in pre_mlp_layernorm
            raise ValueError("te_models: pre_layernorms=False with routed experts is not supported")
        attn["linear_qkv"] = TEColumnParallelLinear
        mlp["linear_fc1"] = TEColumnParallelLinear
    if config.post_mlp_layernorm:
        mlp["linear_fc2"] = _post_norm_linear()
    changes = {}
    if attn:
        changes["self_attention"] = _with_submodules(layer.self_attention, **attn)
    if mlp:
        changes["mlp"] = _with_submodules(layer.mlp, **mlp)
    return _with_submodules(layer_spec, **changes) if changes else layer_spec


def _per_layer_attention(spec):
    """The self-attention spec with this package's ``LayerTypeRopeSelfAttention`` as its module (full-attention
    layers of their own head size / kv heads; TE submodules unchanged)."""
    from megatron_bridge_ext.mcore.modules import LayerTypeRopeSelfAttention

    if isinstance(spec, functools.partial):
        return functools.partial(LayerTypeRopeSelfAttention, *spec.args, **spec.keywords)
    return dataclasses.replace(spec, module=LayerTypeRopeSelfAttention)


def _gdn_block_spec(config, vp_stage: Optional[int]):
    """megatron-core 0.19's TE block spec of a gated delta-net model
    (``get_transformer_block_with_experimental_attention_variant_spec``: ``GatedDeltaNet`` with a TE
    ``in_proj`` that holds the input norm, a TE ``out_norm`` and ``out_proj``), its ``GatedDeltaNet`` built as this
    package's ``LocalGatedDeltaNet`` (the same module and parameters; it builds without the ``fla`` kernels)."""
    from megatron.core.models.gpt.experimental_attention_variant_module_specs import (
        get_transformer_block_with_experimental_attention_variant_spec,
    )
    from megatron.core.ssm.gated_delta_net import GatedDeltaNet

    from megatron_bridge_ext.mcore.linear_attention import _gdn_class

    block = get_transformer_block_with_experimental_attention_variant_spec(config, vp_stage=vp_stage)
    specs = []
    for spec in block.layer_specs:
        attn = _submodules(spec).self_attention
        if getattr(attn, "module", None) is GatedDeltaNet:
            spec = _with_submodules(spec, self_attention=dataclasses.replace(attn, module=_gdn_class()))
        specs.append(spec)
    return dataclasses.replace(block, layer_specs=specs)


def te_block_spec(config, vp_stage: Optional[int] = None):
    """This stage's TE block spec for ``config`` (megatron-core's, plus the swaps of :mod:`te_models`)."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec

    if getattr(config, "experimental_attention_variant", None) == "dsa":  # megatron-core >= 0.19: its own TE spec
        from megatron.core.models.gpt.experimental_attention_variant_module_specs import (
            get_transformer_block_with_experimental_attention_variant_spec,
        )

        return get_transformer_block_with_experimental_attention_variant_spec(config, vp_stage=vp_stage)
    if getattr(config, "experimental_attention_variant", None) == "gated_delta_net":
        return _gdn_block_spec(config, vp_stage)
    block = get_gpt_decoder_block_spec(config, use_transformer_engine=True, normalization=config.normalization,
                                       qk_l2_norm=bool(getattr(config, "qk_l2_norm", False)), vp_stage=vp_stage)
    if _swaps(config):
        block = dataclasses.replace(block, layer_specs=[_layer_with_package_modules(s, config)
                                                        for s in block.layer_specs])
    if getattr(config, "full_attention_kv_channels", None) is not None or \
            getattr(config, "full_attention_num_query_groups", None) is not None:
        block = dataclasses.replace(block, layer_specs=[_with_submodules(s, self_attention=_per_layer_attention(
            _submodules(s).self_attention)) for s in block.layer_specs])
    if getattr(config, "layer_output_scalar", False):
        from megatron_bridge_ext.mcore.modules import ScaledOutputTransformerLayer

        block = dataclasses.replace(block, layer_specs=[dataclasses.replace(s, module=ScaledOutputTransformerLayer)
                                                        for s in block.layer_specs])
    return block


def te_hybrid_stack_spec(config):
    """megatron-core's own TE hybrid spec (``hybrid_layer_specs.hybrid_stack_spec``, what Megatron-LM's
    ``HybridModelBuilder`` builds by default: each pre-norm fused into ``mixer.in_proj`` / ``self_attention.linear_qkv``
    / ``mlp.linear_fc1``, ``TENorm`` final norm), with the Mamba mixer given the config's convolution width and scan
    chunk (``d_conv`` / ``chunk_size``, as ``mcore.hybrid_builder.hybrid_stack_spec`` passes them)."""
    from megatron.core.models.hybrid.hybrid_layer_specs import hybrid_stack_spec

    subs = hybrid_stack_spec.submodules
    mamba = subs.mamba_layer
    mixer = dataclasses.replace(mamba.submodules.mixer, params={"d_conv": config.mamba_conv_kernel,
                                                                 "chunk_size": config.mamba_chunk_size})
    mamba = dataclasses.replace(mamba, submodules=dataclasses.replace(mamba.submodules, mixer=mixer))
    return dataclasses.replace(hybrid_stack_spec, submodules=dataclasses.replace(subs, mamba_layer=mamba))


def _build_te_hybrid_chunks(config, vocab_size: int) -> List:
    """This rank's TE-spec ``HybridModel`` chunk(s) (megatron-core >= 0.19), built as
    ``mcore.hybrid_builder.build_hybrid_model`` builds the local ones (the same pipeline segments) but from
    :func:`te_hybrid_stack_spec`; ``mamba_ssm``'s gated norm is this package's torch stand-in where it is missing
    (the same parameter), the final norm stays megatron's ``TENorm``."""
    from megatron.core import parallel_state
    from megatron.core.models.hybrid.hybrid_model import HybridModel

    from megatron_bridge_ext.mcore.config import padded_vocab_size
    from megatron_bridge_ext.mcore.cpu_compat import cuda_moves_disabled
    from megatron_bridge_ext.mcore.hybrid_builder import hybrid_construction, pipeline_pattern

    tp = parallel_state.get_tensor_model_parallel_world_size()
    pp = parallel_state.get_pipeline_model_parallel_world_size()
    vpp = parallel_state.get_virtual_pipeline_model_parallel_world_size()
    chunks = []
    for vp_stage in (range(vpp) if vpp else [None]):
        with cuda_moves_disabled(), hybrid_construction(local_final_norm=False):
            model = HybridModel(
                config=config, hybrid_stack_spec=te_hybrid_stack_spec(config),
                vocab_size=padded_vocab_size(vocab_size, tp, config.make_vocab_size_divisible_by),
                max_sequence_length=config.seq_length,
                hybrid_layer_pattern=pipeline_pattern(config.hybrid_layer_pattern, pp, vpp),
                pre_process=parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage),
                post_process=parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage),
                parallel_output=True, share_embeddings_and_output_weights=config.share_embeddings_and_output_weights,
                position_embedding_type=config.position_embedding_type, rotary_percent=config.rotary_percent,
                rotary_base=config.rotary_base, seq_len_interpolation_factor=config.seq_len_interpolation_factor,
                vp_stage=vp_stage,
            )
        model.unpadded_vocab_size = vocab_size
        chunks.append(model.eval())
    return chunks


def build_te_chunks(config, vocab_size: Optional[int] = None, device=None) -> List:
    """This rank's TE-spec GPTModel chunk(s) under the current parallel state (one per virtual stage), moved to
    ``device`` when given (built on the CPU: ``use_cpu_initialization``); a hybrid config (``hybrid_layer_pattern``)
    gives ``HybridModel`` chunks of megatron-core's TE hybrid spec (:func:`te_hybrid_stack_spec`)."""
    from megatron.core import parallel_state
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_mtp_block_spec

    from megatron_bridge_ext.mcore.config import padded_vocab_size
    from megatron_bridge_ext.mcore.cpu_compat import cuda_moves_disabled

    vocab_size = config.vocab_size if vocab_size is None else vocab_size
    if getattr(config, "hybrid_layer_pattern", None):
        chunks = _build_te_hybrid_chunks(config, vocab_size)
        return [c.to(device) for c in chunks] if device is not None else chunks
    tp = parallel_state.get_tensor_model_parallel_world_size()
    vpp = parallel_state.get_virtual_pipeline_model_parallel_world_size()
    chunks = []
    for vp_stage in (range(vpp) if vpp else [None]):
        block = te_block_spec(config, vp_stage)
        mtp = get_gpt_mtp_block_spec(config, block, use_transformer_engine=True, vp_stage=vp_stage) if (
            config.mtp_num_layers) else None
        with cuda_moves_disabled():
            model = GPTModel(
                config=config, transformer_layer_spec=block,
                vocab_size=padded_vocab_size(vocab_size, tp, config.make_vocab_size_divisible_by),
                max_sequence_length=config.seq_length,
                pre_process=parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage),
                post_process=parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage),
                parallel_output=True, share_embeddings_and_output_weights=config.share_embeddings_and_output_weights,
                position_embedding_type=config.position_embedding_type, rotary_percent=config.rotary_percent,
                rotary_base=config.rotary_base, rope_scaling=config.rope_scaling,
                rope_scaling_factor=config.rope_scaling_factor,
                seq_len_interpolation_factor=config.seq_len_interpolation_factor, mtp_block_spec=mtp,
                vp_stage=vp_stage,
            )
        model.unpadded_vocab_size = vocab_size
        chunks.append(model.eval())
    if device is not None:
        chunks = [c.to(device) for c in chunks]
    return chunks
