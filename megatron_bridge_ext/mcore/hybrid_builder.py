"""Build megatron-core (>= 0.19) ``HybridModel`` chunks: Mamba-2 ('M'), attention ('*'), MLP ('-') and MoE ('E')
layers in the order of ``config.hybrid_layer_pattern`` (NemotronH), the second kind of model the engine builds beside
``GPTModel`` (:func:`~megatron_bridge_ext.mcore.model_builder.build_model_chunks` asks :func:`is_hybrid_config`).

megatron-core ships only Transformer-Engine hybrid specs (``hybrid_layer_specs.hybrid_stack_spec``, every pre-norm
fused into the first linear: ``mixer.in_proj.layer_norm_weight``, ``mlp.linear_fc1.layer_norm_weight``,
``self_attention.linear_qkv.layer_norm_weight``). :func:`hybrid_stack_spec` is its local counterpart, which runs on
CPU and GPU alike: the norms are modules of their own (``norm`` of a Mamba layer, ``pre_mlp_layernorm`` of an MLP
layer and of an MoE layer, ``input_layernorm`` of an attention layer; megatron's ``WrappedTorchNorm``; an MoE layer is
megatron's ``MoETransformerLayer`` with the local GPT spec's MoE module, as its TE hybrid spec builds it with TE
modules), the linears megatron's ``ColumnParallelLinear`` / ``RowParallelLinear``, the attention megatron's
``DotProductAttention``. Checkpoints are written and read with either spec's keys: ``mcore.te_keys`` renames the
standalone norms to the TE spec's fused ones (an MoE layer's stays standalone) and adds its ``_extra_state`` objects
(``spec="te"``, the default).

Building a hybrid model needs three things a CPU process (or a GPU one without ``mamba_ssm``) lacks, supplied by
:func:`hybrid_construction` while the model is built and restored after:

- ``mamba_mixer.HAVE_MAMBA_SSM``: the constructor raises ``ImportError`` without ``mamba_ssm`` although it builds no
  kernel; set True for the construction.
- ``mamba_mixer.ExtendedRMSNorm``: the gated group RMSNorm, a subclass of ``mamba_ssm``'s Triton ``RMSNormGated``
  (a ``MagicMock`` without ``mamba_ssm``: no parameter at all). Replaced by :class:`GatedRMSNorm`, the same weight
  (``[d_inner / tp]``, TP-sharded on dim 0 in checkpoints) and the same maths in torch.
- ``hybrid_block.TENorm``: the stack's final norm is hard-coded as Transformer Engine's; replaced by megatron's
  ``WrappedTorchNorm`` (the local spec's norm, key ``decoder.final_norm.weight`` either way).

The Mamba forward itself (``mamba_split_conv1d_scan_combined`` / ``mamba_chunk_scan_combined``) is Triton / CUDA
only (megatron has no torch fallback for the scan): a model built here runs its Mamba layers only where ``mamba_ssm``
is installed, or with a scan put in ``mamba_mixer.mamba_chunk_scan_combined`` and ``use_mamba_mem_eff_path=False``
(``tests/distributed/test_nemotron_h.py`` uses transformers' torch ``mamba2_chunk_scan``).
"""

from __future__ import annotations

import contextlib
from typing import Iterator, List, Optional

import torch

from megatron_bridge_ext.mcore.versions import MEGATRON_CORE_0_19, require_megatron_core_for

__all__ = ["is_hybrid_config", "GatedRMSNorm", "hybrid_construction", "hybrid_stack_spec", "pipeline_pattern",
           "build_hybrid_model", "build_hybrid_chunks"]


def is_hybrid_config(config: object) -> bool:
    """Whether a config describes a hybrid model (it carries a ``hybrid_layer_pattern``)."""
    return bool(getattr(config, "hybrid_layer_pattern", None))


class GatedRMSNorm(torch.nn.Module):
    """torch stand-in of ``mamba_ssm``'s ``RMSNormGated`` as megatron's ``MambaMixer`` builds it
    (``norm_before_gate=False``): ``weight * rms_norm_per_group(x * silu(z))`` in fp32, cast back to ``x``'s dtype;
    groups of ``group_size`` channels. Its checkpoint entry is TP-sharded on dim 0 (megatron's ``ExtendedRMSNorm``).
    """

    def __init__(self, hidden_size: int, eps: float = 1e-5, group_size: Optional[int] = None,
                 norm_before_gate: bool = False, device=None, dtype=None) -> None:
        super().__init__()
        if norm_before_gate:
            raise ValueError("GatedRMSNorm: norm_before_gate=True is not supported (megatron's MambaMixer asserts "
                             "it False)")
        self.eps = eps
        self.group_size = group_size or hidden_size
        self.weight = torch.nn.Parameter(torch.ones(hidden_size, device=device, dtype=dtype))

    def forward(self, x: torch.Tensor, z: Optional[torch.Tensor] = None) -> torch.Tensor:
        dtype = x.dtype
        h = x.float()
        if z is not None:
            h = h * torch.nn.functional.silu(z.float())
        g = h.view(*h.shape[:-1], h.shape[-1] // self.group_size, self.group_size)
        g = g * torch.rsqrt(g.pow(2).mean(-1, keepdim=True) + self.eps)
        return (g.view(h.shape) * self.weight.float()).to(dtype)

    def sharded_state_dict(self, prefix: str = "", sharded_offsets=(), metadata=None):
        """The weight TP-sharded on dim 0 (as megatron's ``ExtendedRMSNorm``)."""
        from megatron.core import parallel_state
        from megatron.core.transformer.utils import make_sharded_tensors_for_checkpoint

        tp_group = getattr(self, "tp_group", None) or parallel_state.get_tensor_model_parallel_group()
        return make_sharded_tensors_for_checkpoint(self.state_dict(prefix="", keep_vars=True), prefix, {"weight": 0},
                                                   sharded_offsets, tp_group=tp_group,
                                                   dp_cp_group=metadata["dp_cp_group"])


@contextlib.contextmanager
def hybrid_construction(local_final_norm: bool = True) -> Iterator[None]:
    """While a hybrid model is constructed: the ``mamba_ssm`` stand-ins (where ``mamba_ssm`` is missing) and, with
    ``local_final_norm``, the local final norm (see the module docstring; False keeps megatron's ``TENorm``, for a
    Transformer Engine model); everything is restored on exit."""
    import megatron.core.models.hybrid.hybrid_block as hybrid_block
    import megatron.core.ssm.mamba_mixer as mamba_mixer
    from megatron.core.transformer.torch_norm import WrappedTorchNorm

    saved = (mamba_mixer.HAVE_MAMBA_SSM, mamba_mixer.ExtendedRMSNorm, hybrid_block.TENorm)
    if not mamba_mixer.HAVE_MAMBA_SSM:
        mamba_mixer.HAVE_MAMBA_SSM = True
        mamba_mixer.ExtendedRMSNorm = GatedRMSNorm
    if local_final_norm:
        hybrid_block.TENorm = WrappedTorchNorm
    try:
        yield
    finally:
        mamba_mixer.HAVE_MAMBA_SSM, mamba_mixer.ExtendedRMSNorm, hybrid_block.TENorm = saved


def hybrid_stack_spec(config):
    """The local (non-Transformer-Engine) ``HybridStack`` spec for ``config``: Mamba layers (``norm`` + mixer with
    ``in_proj`` / ``out_proj`` and ``d_conv`` = ``config.mamba_conv_kernel``, ``chunk_size`` =
    ``config.mamba_chunk_size``), attention layers (``input_layernorm`` + causal self-attention without RoPE unless
    the config has one), MLP layers (``pre_mlp_layernorm`` + ``linear_fc1`` / ``linear_fc2``) and, with 'E' in the
    pattern, MoE layers (:func:`_moe_layer_spec`)."""
    from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
    from megatron.core.models.hybrid.hybrid_block import HybridStack, HybridStackSubmodules
    from megatron.core.ssm.mamba_layer import MambaLayer, MambaLayerSubmodules
    from megatron.core.ssm.mamba_mixer import MambaMixer, MambaMixerSubmodules
    from megatron.core.ssm.mlp_layer import MLPLayer
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
    from megatron.core.transformer.attention import SelfAttention, SelfAttentionSubmodules
    from megatron.core.transformer.dot_product_attention import DotProductAttention
    from megatron.core.transformer.enums import AttnMaskType
    from megatron.core.transformer.mlp import MLP, MLPSubmodules
    from megatron.core.transformer.spec_utils import ModuleSpec
    from megatron.core.transformer.torch_norm import WrappedTorchNorm
    from megatron.core.transformer.transformer_layer import TransformerLayer, TransformerLayerSubmodules

    mamba = ModuleSpec(
        module=MambaLayer,
        submodules=MambaLayerSubmodules(
            norm=WrappedTorchNorm,
            mixer=ModuleSpec(module=MambaMixer,
                             params={"d_conv": config.mamba_conv_kernel, "chunk_size": config.mamba_chunk_size},
                             submodules=MambaMixerSubmodules(in_proj=ColumnParallelLinear,
                                                             out_proj=RowParallelLinear)),
            mamba_bda=get_bias_dropout_add))
    attention = ModuleSpec(
        module=TransformerLayer,
        submodules=TransformerLayerSubmodules(
            input_layernorm=WrappedTorchNorm,
            self_attention=ModuleSpec(module=SelfAttention, params={"attn_mask_type": AttnMaskType.causal},
                                      submodules=SelfAttentionSubmodules(linear_qkv=ColumnParallelLinear,
                                                                         core_attention=DotProductAttention,
                                                                         linear_proj=RowParallelLinear)),
            self_attn_bda=get_bias_dropout_add))
    mlp = ModuleSpec(
        module=MLPLayer,
        submodules=TransformerLayerSubmodules(
            pre_mlp_layernorm=WrappedTorchNorm,
            mlp=ModuleSpec(module=MLP, submodules=MLPSubmodules(linear_fc1=ColumnParallelLinear,
                                                                linear_fc2=RowParallelLinear)),
            mlp_bda=get_bias_dropout_add))
    layers = dict(mamba_layer=mamba, attention_layer=attention, mlp_layer=mlp)
    if "E" in (config.hybrid_layer_pattern or ""):
        layers["moe_layer"] = _moe_layer_spec(config)
    return ModuleSpec(module=HybridStack, submodules=HybridStackSubmodules(**layers))


def _moe_layer_spec(config):
    """The local spec of an 'E' layer: megatron's ``MoETransformerLayer`` (what its TE hybrid spec builds) with a
    standalone ``pre_mlp_layernorm`` and the local GPT spec's MoE module (router, sequential or grouped experts,
    shared experts; the router a :class:`~.modules.FP32WeightRouter` with ``config.moe_router_fp32_weight``)."""
    from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.spec_utils import ModuleSpec
    from megatron.core.transformer.torch_norm import WrappedTorchNorm
    from megatron.core.transformer.transformer_layer import MoETransformerLayer, TransformerLayerSubmodules

    from megatron_bridge_ext.mcore.modules import FP32WeightRouter
    from megatron_bridge_ext.mcore.versions import replace_submodules, spec_submodules

    if not config.num_moe_experts:
        raise ValueError(f"hybrid_layer_pattern={config.hybrid_layer_pattern!r} has 'E' layers but "
                         f"num_moe_experts={config.num_moe_experts}")
    moe = spec_submodules(get_gpt_layer_local_spec(num_experts=config.num_moe_experts,
                                                   moe_grouped_gemm=config.moe_grouped_gemm)).mlp
    if config.moe_router_fp32_weight:
        moe = replace_submodules(moe, router=FP32WeightRouter)
    return ModuleSpec(module=MoETransformerLayer,
                      submodules=TransformerLayerSubmodules(pre_mlp_layernorm=WrappedTorchNorm, mlp=moe,
                                                            mlp_bda=get_bias_dropout_add))


def pipeline_pattern(pattern: str, pp: int, vpp: Optional[int]) -> str:
    """``pattern`` cut into ``pp * vpp`` equal segments joined by ``|`` (megatron's explicit pipeline stages: segment
    ``s`` is virtual stage ``s // pp`` of pipeline rank ``s % pp``, the order megatron gives GPTModel layers).

    Raises:
        ValueError: a pattern whose length the segments cannot share evenly, or one that already has ``|``.
    """
    from megatron.core.models.hybrid.hybrid_layer_allocation import Symbols

    if Symbols.PIPE in pattern or Symbols.MTP_SEPARATOR in pattern:
        raise ValueError(f"hybrid_layer_pattern={pattern!r}: pipeline ('|') or MTP ('/') separators are placed by "
                         "this package, not read from the config")
    segments = pp * (vpp or 1)
    if len(pattern) % segments:
        raise ValueError(f"hybrid_layer_pattern={pattern!r} has {len(pattern)} layers, not divisible by "
                         f"pipeline_model_parallel_size ({pp}) x virtual_pipeline_model_parallel_size ({vpp or 1})")
    n = len(pattern) // segments
    return Symbols.PIPE.join(pattern[i * n:(i + 1) * n] for i in range(segments))


def build_hybrid_model(config, vocab_size: Optional[int] = None, max_seq_len: Optional[int] = None, *,
                       vp_stage: Optional[int] = None):
    """Build one ``HybridModel`` chunk of this rank under the current megatron parallel state (the counterpart of
    ``model_builder.build_gpt_model``; same checks of the config against the parallel state).

    Returns:
        The model in eval mode; ``model.unpadded_vocab_size`` records the unpadded vocabulary size.

    Raises:
        ValueError: megatron-core < 0.19, or a config that does not match the parallel state.
    """
    require_megatron_core_for(MEGATRON_CORE_0_19, "HybridModel", "megatron.core.models.hybrid")
    from megatron.core import parallel_state
    from megatron.core.models.hybrid.hybrid_model import HybridModel

    from megatron_bridge_ext.mcore.config import padded_vocab_size
    from megatron_bridge_ext.mcore.cpu_compat import cuda_moves_disabled, prepare_cpu_process

    prepare_cpu_process()
    vocab_size = config.vocab_size if vocab_size is None else vocab_size
    if vocab_size is None:
        raise ValueError("build_hybrid_model: no vocab_size given and config.vocab_size is None")
    max_seq_len = config.seq_length if max_seq_len is None else max_seq_len
    tp = parallel_state.get_tensor_model_parallel_world_size()
    pp = parallel_state.get_pipeline_model_parallel_world_size()
    vpp = parallel_state.get_virtual_pipeline_model_parallel_world_size()
    cfg_vpp = config.virtual_pipeline_model_parallel_size
    if config.tensor_model_parallel_size != tp or config.pipeline_model_parallel_size != pp or (
            (cfg_vpp if cfg_vpp and cfg_vpp > 1 else None) != vpp):
        raise ValueError(f"build_hybrid_model: config has tp={config.tensor_model_parallel_size}, "
                         f"pp={config.pipeline_model_parallel_size}, vpp={cfg_vpp}; the parallel state has tp={tp}, "
                         f"pp={pp}, vpp={vpp}")
    if vpp is not None and vp_stage is None:
        raise ValueError(f"build_hybrid_model: virtual pipeline size is {vpp}; pass vp_stage")
    with cuda_moves_disabled(), hybrid_construction():
        model = HybridModel(
            config=config,
            hybrid_stack_spec=hybrid_stack_spec(config),
            vocab_size=padded_vocab_size(vocab_size, tp, config.make_vocab_size_divisible_by),
            max_sequence_length=max_seq_len,
            hybrid_layer_pattern=pipeline_pattern(config.hybrid_layer_pattern, pp, vpp),
            pre_process=parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage),
            post_process=parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage),
            parallel_output=True,
            share_embeddings_and_output_weights=config.share_embeddings_and_output_weights,
            position_embedding_type=config.position_embedding_type,
            rotary_percent=config.rotary_percent,
            rotary_base=config.rotary_base,
            seq_len_interpolation_factor=config.seq_len_interpolation_factor,
            vp_stage=vp_stage,
        )
    model.unpadded_vocab_size = vocab_size
    return model.eval()


def build_hybrid_chunks(config, vocab_size: Optional[int] = None, max_seq_len: Optional[int] = None) -> List:
    """This rank's ``HybridModel`` chunk(s): one per virtual pipeline stage, else one."""
    from megatron.core import parallel_state

    vpp = parallel_state.get_virtual_pipeline_model_parallel_world_size()
    if vpp is None:
        return [build_hybrid_model(config, vocab_size, max_seq_len)]
    return [build_hybrid_model(config, vocab_size, max_seq_len, vp_stage=v) for v in range(vpp)]
