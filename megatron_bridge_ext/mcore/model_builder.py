"""Build megatron-core GPTModel chunks for this rank and set up / tear down megatron's parallel state.

Uses the local (non-Transformer-Engine) layer spec, which runs on CPU and GPU alike, adjusted by
:func:`gpt_layer_spec` for the features whose modules megatron-core's local spec lacks (see :mod:`.modules`). In a
process without CUDA, :func:`build_gpt_model` first applies what megatron-core needs there
(``cpu_compat.prepare_cpu_process``).
"""

from __future__ import annotations

import dataclasses
from typing import Callable, List, Optional, Union

import torch
from megatron.core import parallel_state
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec, get_gpt_mtp_block_spec
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import (
    LayerNormImpl,
    TransformerBlockSubmodules,
    get_num_layers_to_build,
)
from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

from megatron_bridge_ext.mcore.config import GPTConfig, padded_vocab_size
from megatron_bridge_ext.mcore.cpu_compat import cuda_moves_disabled, prepare_cpu_process, seed_model_parallel_rng
from megatron_bridge_ext.mcore.linear_attention import gdn_block_spec, is_gated_delta_net
from megatron_bridge_ext.mcore.modules import (
    FP32WeightRouter,
    LatentRMSNorm,
    LayerTypeDotProductAttention,
    LayerTypeRopeSelfAttention,
    LocalRMSNorm,
    MLADotProductAttention,
    PostNormRowParallelLinear,
    ScaledOutputTransformerLayer,
    RopeLayerQKNormSelfAttention,
    SoftCapDotProductAttention,
    ValueNormSelfAttention,
    proportional_rope,
    WholeKeyRMSNorm,
    WholeQueryRMSNorm,
    scale_embeddings,
    set_llama3_rope_parameters,
    softcap_output_logits,
)
from megatron_bridge_ext.mcore.topology import one_process_world
from megatron_bridge_ext.mcore.versions import replace_submodules, spec_submodules

__all__ = ["build_gpt_model", "build_model_chunks", "build_meta_model", "gpt_layer_spec", "moe_layer_pattern",
           "init_parallel", "destroy_parallel"]


def init_parallel(tp: int, pp: int, vpp: Optional[int] = None, ep: int = 1, etp: Optional[int] = None,
                  seed: int = 1234) -> None:
    """Initialise megatron's model-parallel groups over the whole default process group and seed its rng tracker.

    Destroys any previous megatron parallel state first, so several layouts can be set up in one process.

    Args:
        tp, pp, vpp, ep, etp: tensor, pipeline, virtual-pipeline, expert and expert-tensor parallel sizes.
        seed: rng seed (CPU processes use megatron's inference rng tracker).

    Raises:
        ValueError: when torch.distributed is not initialised or the world size is not a multiple of tp * pp.
    """
    if not torch.distributed.is_initialized():
        raise ValueError("init_parallel: torch.distributed is not initialised (init_process_group first)")
    world = torch.distributed.get_world_size()
    if tp < 1 or pp < 1 or world % (tp * pp):
        raise ValueError(f"init_parallel: world size {world} is not a multiple of tp={tp} * pp={pp}")
    if vpp is not None and vpp > 1 and pp < 2:
        raise ValueError(f"init_parallel: virtual pipeline size {vpp} needs pp > 1, got pp={pp}")
    destroy_parallel()
    global _GROUPS_BEFORE
    _GROUPS_BEFORE = set(_process_groups())
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        virtual_pipeline_model_parallel_size=vpp if vpp and vpp > 1 else None,
        expert_model_parallel_size=ep,
        expert_tensor_parallel_size=etp,
    )
    seed_model_parallel_rng(seed)


#: the process groups that existed before :func:`init_parallel` made megatron's (None: no megatron state of ours)
_GROUPS_BEFORE: Optional[set] = None


def _process_groups() -> List[torch.distributed.ProcessGroup]:
    """This process's process groups, in creation order (torch.distributed's registry)."""
    from torch.distributed import distributed_c10d as c10d

    return list(c10d._world.pg_names)


def destroy_parallel() -> None:
    """Tear down megatron's parallel state (a no-op when none is set up), and destroy the process groups
    :func:`init_parallel` created for it: megatron-core only forgets its groups (it destroys only its extra gloo
    groups), and each live gloo group keeps its transport threads, so a process that sets up several layouts would
    otherwise accumulate them. Groups that existed before (the default group, the caller's own) are kept."""
    global _GROUPS_BEFORE
    parallel_state.destroy_model_parallel()
    before, _GROUPS_BEFORE = _GROUPS_BEFORE, None
    if before is None or not torch.distributed.is_initialized():
        return
    from torch.distributed import distributed_c10d as c10d

    default = c10d._get_default_group()
    for pg in reversed(_process_groups()):
        if pg not in before and pg is not default and c10d._world.pg_map.get(pg) is not None:
            torch.distributed.destroy_process_group(pg)


def build_gpt_model(
    config: GPTConfig,
    vocab_size: Optional[int] = None,
    max_seq_len: Optional[int] = None,
    *,
    vp_stage: Optional[int] = None,
    pre_process: Optional[bool] = None,
    post_process: Optional[bool] = None,
) -> GPTModel:
    """Build one GPTModel chunk of this rank under the current megatron parallel state.

    Args:
        config: a ``GPTConfig`` (a bridge's ``transformer_config``).
        vocab_size: unpadded vocabulary size (default ``config.vocab_size``); padded here to a multiple of
            ``divisor * tp`` (``config.padded_vocab_size``).
        max_seq_len: maximum sequence length (default ``config.seq_length``).
        vp_stage: virtual pipeline stage of this chunk (required when vpp > 1).
        pre_process, post_process: override the first/last-stage flags derived from the parallel state.

    Returns:
        The GPTModel in eval mode; ``model.unpadded_vocab_size`` records the unpadded vocabulary size.
    """
    prepare_cpu_process()  # a no-op where CUDA is available
    vocab_size = config.vocab_size if vocab_size is None else vocab_size
    if vocab_size is None:
        raise ValueError("build_gpt_model: no vocab_size given and config.vocab_size is None")
    max_seq_len = config.seq_length if max_seq_len is None else max_seq_len
    vpp = parallel_state.get_virtual_pipeline_model_parallel_world_size()
    if vpp is not None and vp_stage is None:
        raise ValueError(f"build_gpt_model: virtual pipeline size is {vpp}; pass vp_stage")
    cfg_vpp = config.virtual_pipeline_model_parallel_size
    if (cfg_vpp if cfg_vpp and cfg_vpp > 1 else None) != vpp:
        raise ValueError(
            f"build_gpt_model: config.virtual_pipeline_model_parallel_size="
            f"{config.virtual_pipeline_model_parallel_size} but the parallel state has vpp={vpp}"
        )
    tp = parallel_state.get_tensor_model_parallel_world_size()
    pp = parallel_state.get_pipeline_model_parallel_world_size()
    if config.tensor_model_parallel_size != tp or config.pipeline_model_parallel_size != pp:
        raise ValueError(
            f"build_gpt_model: config has tp={config.tensor_model_parallel_size}, "
            f"pp={config.pipeline_model_parallel_size}; the parallel state has tp={tp}, pp={pp}"
        )
    if pre_process is None:
        pre_process = parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage)
    if post_process is None:
        post_process = parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage)
    spec = gpt_layer_spec(config, vp_stage=vp_stage)
    # multi-token-prediction layers (config.mtp_num_layers) on the last pipeline stage, each built from the last
    # decoder layer's spec (megatron-core's choice); None on the other stages
    mtp_spec = get_gpt_mtp_block_spec(config, spec, use_transformer_engine=False, vp_stage=vp_stage) if (
        config.mtp_num_layers) else None
    if _is_dsa(config):
        from megatron_bridge_ext.mcore.sparse_attention import local_norm_mtp_block_spec

        mtp_spec = local_norm_mtp_block_spec(mtp_spec)
    with cuda_moves_disabled():  # a no-op where CUDA is available
        model = GPTModel(
            config=config,
            transformer_layer_spec=spec,
            vocab_size=padded_vocab_size(vocab_size, tp, config.make_vocab_size_divisible_by),
            max_sequence_length=max_seq_len,
            pre_process=pre_process,
            post_process=post_process,
            parallel_output=True,
            share_embeddings_and_output_weights=config.share_embeddings_and_output_weights,
            position_embedding_type=config.position_embedding_type,
            rotary_percent=config.rotary_percent,
            rotary_base=config.rotary_base,
            rope_scaling=config.rope_scaling,
            rope_scaling_factor=config.rope_scaling_factor,
            seq_len_interpolation_factor=config.seq_len_interpolation_factor,
            mtp_block_spec=mtp_spec,
            vp_stage=vp_stage,
        )
    if config.embedding_scale is not None:
        scale_embeddings(model, config.embedding_scale)
    if config.final_logit_softcapping is not None:
        softcap_output_logits(model, config.final_logit_softcapping)
    if config.rotary_proportion is not None or config.full_attention_kv_channels is not None:
        proportional_rope(model, config.rotary_proportion)
    if config.rope_scaling and any(v is not None for v in (
            config.rope_scaling_low_freq_factor, config.rope_scaling_high_freq_factor,
            config.rope_scaling_original_max_position_embeddings)):
        set_llama3_rope_parameters(model, config)
    model.unpadded_vocab_size = vocab_size
    return model.eval()


def moe_layer_pattern(config: GPTConfig) -> List[int]:
    """Per layer 1 (routed experts) or 0 (dense MLP), from ``moe_layer_freq`` as megatron's
    ``get_gpt_decoder_layer_specs`` reads it; all 0 without experts.

    Raises:
        ValueError: a list whose length is not ``num_layers``, or another type.
    """
    if not config.num_moe_experts:
        return [0] * config.num_layers
    freq = config.moe_layer_freq
    if isinstance(freq, int):
        return [1 if i % freq == 0 else 0 for i in range(config.num_layers)]
    if isinstance(freq, (list, tuple)):
        if len(freq) != config.num_layers:
            raise ValueError(f"moe_layer_freq has {len(freq)} entries for {config.num_layers} layers")
        return [int(bool(x)) for x in freq]
    raise ValueError(f"moe_layer_freq must be an int or a list, got {freq!r}")


def gpt_layer_spec(config: GPTConfig, vp_stage: Optional[int] = None
                   ) -> Union[ModuleSpec, TransformerBlockSubmodules]:
    """megatron-core's local GPT layer spec for ``config``, with the modules of :mod:`.modules` where the config
    asks for what the local spec cannot build:

    - ``layernorm_zero_centered_gamma``: every norm (input, pre-MLP, q/k, final) is a :class:`LocalRMSNorm`;
    - ``post_self_attn_layernorm`` / ``post_mlp_layernorm``: ``linear_proj`` / ``linear_fc2`` are
      :class:`PostNormRowParallelLinear`;
    - ``pre_layernorms=False``: no ``input_layernorm`` / ``pre_mlp_layernorm`` (``IdentityOp``; dense layers only);
    - ``qk_layernorm_whole_projection``: the q / k norms are :class:`WholeQueryRMSNorm` / :class:`WholeKeyRMSNorm`
      (one norm over all heads, TP-sharded weight);
    - ``local_rotary_base`` / ``full_attention_kv_channels`` / ``full_attention_num_query_groups``: the attention
      is :class:`LayerTypeRopeSelfAttention` (full-attention layers of their own geometry);
    - ``attn_logit_softcapping``: the core attention is :class:`SoftCapDotProductAttention` (the output layer's
      ``final_logit_softcapping`` is set on the built model by :func:`build_gpt_model`);
    - ``experimental_attention_variant="dsa"``: megatron's DSA attention on local modules
      (:func:`.sparse_attention.dsa_attention_spec`);
    - ``multi_latent_attention``: megatron's MLA layer with :class:`MLADotProductAttention` as its core attention
      (and :class:`LatentRMSNorm` latent norms when ``latent_layernorm_epsilon`` differs from
      ``layernorm_epsilon``);
    - ``moe_router_fp32_weight``: the MoE layers' router is a :class:`FP32WeightRouter`.
    - ``value_rms_norm``: the attention is :class:`ValueNormSelfAttention`; ``layer_output_scalar``: the layer is
      a :class:`ScaledOutputTransformerLayer` (``rotary_proportion`` is set on the built model by
      :func:`build_gpt_model`);
    - ``qk_l2_norm``: megatron's parameter-free L2 q/k norm (its local spec's), on RoPE layers only with
      ``qk_norm_nope_layers=False`` (:class:`RopeLayerQKNormSelfAttention`);
    - ``attention_chunk_size`` / ``attn_temperature_floor_scale``: the core attention is
      :class:`LayerTypeDotProductAttention` (chunked causal mask on RoPE layers, query temperature on NoPE layers).
    - ``experimental_attention_variant="gated_delta_net"`` (megatron-core >= 0.19): the block spec of
      :func:`~.linear_attention.gdn_block_spec` (megatron's ``GatedDeltaNet`` on the layers ``linear_attention_freq``
      marks, these layer specs elsewhere).

    Dense and MoE layers mixed (``moe_layer_freq`` with zeros, e.g. DeepSeek-V3's ``first_k_dense_replace``) or
    zero-centred norms give a ``TransformerBlockSubmodules`` with this stage's layer specs (as megatron's
    ``get_gpt_decoder_block_spec`` slices them); otherwise one layer spec.

    Raises:
        ValueError: a combination these modules do not cover (zero-centred LayerNorm, post-MLP norm with experts,
            attention soft-capping with multi-latent attention or flash decoding, whole-projection q/k norms without
            ``qk_layernorm`` or with multi-latent attention, no pre-norms with experts).
    """
    pattern = moe_layer_pattern(config)
    if is_gated_delta_net(config):  # linear-attention layers (megatron-core >= 0.19): mcore.linear_attention
        return gdn_block_spec(config, vp_stage, _layer_spec, pattern)
    # zero-centred norms, or DSA (sequence parallel, which megatron's torch norms refuse): LocalRMSNorm everywhere
    zero_centered = bool(config.layernorm_zero_centered_gamma) or _is_dsa(config)
    moe_spec = _layer_spec(config, config.num_moe_experts) if any(pattern) else None
    dense_spec = _layer_spec(config, None) if not all(pattern) else None
    if not zero_centered and (moe_spec is None or dense_spec is None):
        return moe_spec if moe_spec is not None else dense_spec
    specs = [moe_spec if p else dense_spec for p in pattern]
    offset = get_transformer_layer_offset(config, vp_stage=vp_stage)
    count = get_num_layers_to_build(config, vp_stage=vp_stage)
    return TransformerBlockSubmodules(layer_specs=specs[offset:offset + count],
                                      layer_norm=LocalRMSNorm if zero_centered else LayerNormImpl)


def _is_dsa(config: GPTConfig) -> bool:
    return getattr(config, "experimental_attention_variant", None) == "dsa"  # megatron-core >= 0.19


def _layer_spec(config: GPTConfig, num_experts: Optional[int]) -> ModuleSpec:
    """One layer's local spec (dense MLP or routed experts) with the modules the config asks for."""
    mla = bool(getattr(config, "multi_latent_attention", False))
    l2_norm = {"qk_l2_norm": True} if config.qk_l2_norm else {}  # megatron's own L2Norm (no parameters)
    spec = get_gpt_layer_local_spec(
        num_experts=num_experts,
        moe_grouped_gemm=config.moe_grouped_gemm,
        qk_layernorm=config.qk_layernorm,
        multi_latent_attention=mla,
        normalization=config.normalization,
        **l2_norm,
    )
    zero_centered = bool(config.layernorm_zero_centered_gamma)
    fp32_router = bool(num_experts and config.moe_router_fp32_weight)
    softcap = config.attn_logit_softcapping is not None
    value_norm = bool(config.value_rms_norm)
    whole_qk = bool(config.qk_layernorm_whole_projection)
    no_pre_norms = not config.pre_layernorms
    layer_type_attn = config.attention_chunk_size is not None or config.attn_temperature_floor_scale is not None
    rope_layer_qk_norm = not config.qk_norm_nope_layers
    per_layer_attention = config.full_attention_kv_channels is not None or \
        config.full_attention_num_query_groups is not None
    if not (per_layer_attention or zero_centered or config.post_self_attn_layernorm or config.post_mlp_layernorm
            or config.local_rotary_base is not None or mla or softcap or fp32_router or value_norm
            or config.layer_output_scalar or whole_qk or no_pre_norms or layer_type_attn or rope_layer_qk_norm):
        return spec
    latent_eps = getattr(config, "latent_layernorm_epsilon", None)
    if (zero_centered or config.post_self_attn_layernorm or config.post_mlp_layernorm) and \
            config.normalization != "RMSNorm":
        raise ValueError(f"gpt_layer_spec: layernorm_zero_centered_gamma / post norms need normalization='RMSNorm', "
                         f"got {config.normalization!r}")
    layer = spec_submodules(spec)
    attn = layer.self_attention
    attn_subs = {}
    if mla:
        attn_subs["core_attention"] = MLADotProductAttention
        if latent_eps is not None and latent_eps != config.layernorm_epsilon and config.qk_layernorm:
            if zero_centered:
                raise ValueError("gpt_layer_spec: latent_layernorm_epsilon with zero-centred norms is not supported")
            attn_subs.update(q_layernorm=LatentRMSNorm, kv_layernorm=LatentRMSNorm)
    if softcap:
        if mla:
            raise ValueError("gpt_layer_spec: attn_logit_softcapping with multi-latent attention is not supported")
        if config.flash_decode:  # megatron's flash-decode path computes attention without the core attention
            raise ValueError("gpt_layer_spec: attn_logit_softcapping with flash_decode=True is not supported "
                             "(megatron-core's decode step calls flash_attn_with_kvcache without a soft-cap)")
        attn_subs["core_attention"] = SoftCapDotProductAttention
    if layer_type_attn:
        if mla or softcap:
            raise ValueError(f"gpt_layer_spec: attention_chunk_size={config.attention_chunk_size} / "
                             f"attn_temperature_floor_scale={config.attn_temperature_floor_scale} with "
                             f"multi_latent_attention={mla} or attn_logit_softcapping="
                             f"{config.attn_logit_softcapping} is not supported")
        attn_subs["core_attention"] = LayerTypeDotProductAttention
    if zero_centered:
        for name in ("q_layernorm", "k_layernorm", "kv_layernorm"):
            if getattr(spec_submodules(attn), name, IdentityOp) is not IdentityOp:
                attn_subs[name] = LocalRMSNorm
    if whole_qk:
        if not config.qk_layernorm or mla:
            raise ValueError(f"gpt_layer_spec: qk_layernorm_whole_projection=True needs qk_layernorm=True and no "
                             f"multi-latent attention (got qk_layernorm={config.qk_layernorm}, "
                             f"multi_latent_attention={mla})")
        if config.normalization != "RMSNorm":
            raise ValueError(f"gpt_layer_spec: qk_layernorm_whole_projection needs normalization='RMSNorm', got "
                             f"{config.normalization!r}")
        attn_subs.update(q_layernorm=WholeQueryRMSNorm, k_layernorm=WholeKeyRMSNorm)
    if config.post_self_attn_layernorm:
        attn_subs["linear_proj"] = PostNormRowParallelLinear
    attn = replace_submodules(attn, **attn_subs)
    if _is_dsa(config):
        from megatron_bridge_ext.mcore.sparse_attention import dsa_attention_spec

        attn = dsa_attention_spec(config)
    if (config.local_rotary_base is not None or value_norm or per_layer_attention) and mla:
        raise ValueError("gpt_layer_spec: local_rotary_base / value_rms_norm with multi-latent attention is not "
                         "supported")
    if value_norm:
        attn = dataclasses.replace(attn, module=ValueNormSelfAttention)
    elif config.local_rotary_base is not None or per_layer_attention:
        attn = dataclasses.replace(attn, module=LayerTypeRopeSelfAttention)
    if rope_layer_qk_norm:
        if mla or config.local_rotary_base is not None:
            raise ValueError("gpt_layer_spec: qk_norm_nope_layers=False with multi-latent attention or "
                             f"local_rotary_base={config.local_rotary_base} is not supported")
        attn = dataclasses.replace(attn, module=RopeLayerQKNormSelfAttention)
    mlp = layer.mlp
    if config.post_mlp_layernorm:
        if num_experts:
            raise ValueError("gpt_layer_spec: post_mlp_layernorm with routed experts is not supported")
        mlp = replace_submodules(mlp, linear_fc2=PostNormRowParallelLinear)
    if fp32_router:
        mlp = replace_submodules(mlp, router=FP32WeightRouter)
    layer_subs = dict(self_attention=attn, mlp=mlp)
    if zero_centered or _is_dsa(config):
        layer_subs.update(input_layernorm=LocalRMSNorm, pre_mlp_layernorm=LocalRMSNorm)
    if no_pre_norms:
        if num_experts:  # megatron's MoE layer normalises its input in pre_mlp_layernorm; HF post-norm MoE: none
            raise ValueError("gpt_layer_spec: pre_layernorms=False with routed experts is not supported")
        layer_subs.update(input_layernorm=IdentityOp, pre_mlp_layernorm=IdentityOp)
    spec = replace_submodules(spec, **layer_subs)
    if config.layer_output_scalar:
        spec = dataclasses.replace(spec, module=ScaledOutputTransformerLayer)
    return spec


def build_model_chunks(config: GPTConfig, vocab_size: Optional[int] = None,
                       max_seq_len: Optional[int] = None) -> List[GPTModel]:
    """Build this rank's GPTModel chunk(s): one per virtual pipeline stage (vp_stage 0..vpp-1), else one.

    Virtual stage ``s`` of the whole model lives on pp rank ``s % pp`` as chunk ``s // pp``. A hybrid config (one
    with a ``hybrid_layer_pattern``) gives megatron-core's HybridModel chunks instead (:mod:`.hybrid_builder`).
    """
    from megatron_bridge_ext.mcore.hybrid_builder import build_hybrid_chunks, is_hybrid_config

    if is_hybrid_config(config):
        return build_hybrid_chunks(config, vocab_size, max_seq_len)
    vpp = parallel_state.get_virtual_pipeline_model_parallel_world_size()
    if vpp is None:
        return [build_gpt_model(config, vocab_size, max_seq_len)]
    return [build_gpt_model(config, vocab_size, max_seq_len, vp_stage=v) for v in range(vpp)]


def build_meta_model(make_config: Callable[[], GPTConfig], what: str) -> List[GPTModel]:
    """The whole model on the ``meta`` device (no memory, no data) at TP1 PP1: the parallel state is set up over a
    one-process world, of its own when torch.distributed has none
    (:func:`~megatron_bridge_ext.mcore.topology.one_process_world`), then ``make_config()`` is called (a config reads
    its parallel sizes from that state) and the model built from it.

    Raises:
        RuntimeError: the process is a rank of a larger world (``what`` says what needs a one-process one).
    """
    one_process_world(what)
    init_parallel(tp=1, pp=1)
    config = make_config()
    with torch.device("meta"):
        return build_model_chunks(config)
