"""Local-spec modules for model features megatron-core 0.16.1 has no local (non-Transformer-Engine) module for.

The local layer spec of megatron-core 0.16.1 (``get_gpt_layer_local_spec``) builds every RMSNorm as
``WrappedTorchNorm``, which asserts ``not config.layernorm_zero_centered_gamma``; ``TransformerLayer`` has no norm
after attention or after the MLP; ``GPTModel`` has one rotary embedding for every layer and no embedding scale.
Gemma 2 / Gemma 3 need all four. Its local ``DotProductAttention`` has no ``k_channels`` / ``v_channels``
arguments, which multi-latent attention (DeepSeek-V3) passes (queries / keys of ``qk_head_dim +
qk_pos_emb_head_dim`` channels, values of ``v_head_dim``). ``model_builder.gpt_layer_spec`` puts these modules into
the spec only when the config asks for the feature, so the other families build exactly megatron-core's local spec.

=================================  ===============================================================================
module                             what it adds
=================================  ===============================================================================
``LocalRMSNorm``                   RMSNorm in fp32 that honours ``layernorm_zero_centered_gamma`` (``x * (1 + w)``,
                                   the weight stored as on disk, as Transformer Engine's ``zero_centered_gamma``)
``PostNormRowParallelLinear``      ``RowParallelLinear`` followed by a norm of its (TP-reduced) output; its weight is
                                   ``<linear>.post_layernorm.weight`` (Gemma's ``post_attention_layernorm`` /
                                   ``post_feedforward_layernorm``, the names Megatron Bridge uses)
``LayerTypeRopeSelfAttention``     ``SelfAttention`` whose sliding-window layers use their own rotary base
                                   (``config.local_rotary_base``); full-attention layers use the model's RoPE
``ScaledLanguageModelEmbedding``   the embedding output multiplied by ``config.embedding_scale`` in its own dtype
``MLADotProductAttention``         ``DotProductAttention`` accepting ``k_channels`` / ``v_channels`` (the output
                                   width is ``v_channels`` per head); no parameters of its own
``LatentRMSNorm``                  :class:`LocalRMSNorm` with ``config.latent_layernorm_epsilon`` (MLA's q / kv
                                   latent norms, whose epsilon HF DeepSeek-V3 fixes at 1e-6)
``FP32WeightRouter``               ``TopKRouter`` whose weight (and bias) stay fp32 whatever ``params_dtype`` is
                                   (``config.moe_router_fp32_weight``; HF DeepSeek-V3 / GLM-4.5 keep theirs in fp32)
=================================  ===============================================================================
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from megatron.core.models.common.embeddings.language_model_embedding import LanguageModelEmbedding
from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding
from megatron.core.tensor_parallel.layers import RowParallelLinear
from megatron.core.transformer.attention import SelfAttention
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.moe.router import TopKRouter
from megatron.core.transformer.utils import is_layer_window_attention

__all__ = [
    "LocalRMSNorm",
    "PostNormRowParallelLinear",
    "LayerTypeRopeSelfAttention",
    "ScaledLanguageModelEmbedding",
    "scale_embeddings",
    "MLADotProductAttention",
    "LatentRMSNorm",
    "FP32WeightRouter",
]


class LocalRMSNorm(torch.nn.Module):
    """RMSNorm computed in fp32 and cast back to the input dtype.

    With ``config.layernorm_zero_centered_gamma`` the output is ``norm(x) * (1 + w)`` and the weight starts at zero;
    otherwise ``norm(x) * w`` with the weight starting at one.

    Args:
        config: the TransformerConfig (``layernorm_zero_centered_gamma``, ``params_dtype``).
        hidden_size: size of the normalised (last) dimension.
        eps: epsilon added to the mean square.
    """

    def __init__(self, config: Any, hidden_size: int, eps: float = 1e-5, **kwargs: Any) -> None:
        super().__init__()
        if getattr(config, "normalization", "RMSNorm") != "RMSNorm":
            raise ValueError(f"LocalRMSNorm: config.normalization is {config.normalization!r}, expected 'RMSNorm'")
        self.zero_centered_gamma = bool(config.layernorm_zero_centered_gamma)
        self.eps = eps
        init = torch.zeros if self.zero_centered_gamma else torch.ones
        self.weight = torch.nn.Parameter(init(hidden_size, dtype=config.params_dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        out = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        gamma = self.weight.float()
        if self.zero_centered_gamma:
            gamma = gamma + 1.0
        return (out * gamma).type_as(x)

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.eps}, zero_centered_gamma={self.zero_centered_gamma}"


class PostNormRowParallelLinear(RowParallelLinear):
    """A ``RowParallelLinear`` whose reduced output goes through ``post_layernorm`` (a :class:`LocalRMSNorm`).

    A bias (``skip_bias_add``) is added before the norm; the module then returns ``(output, None)``.
    """

    def __init__(self, input_size: int, output_size: int, *, config: Any, **kwargs: Any) -> None:
        super().__init__(input_size, output_size, config=config, **kwargs)
        self.post_layernorm = LocalRMSNorm(config, output_size, eps=config.layernorm_epsilon)

    def forward(self, input_: torch.Tensor):
        output, bias = super().forward(input_)
        if bias is not None:
            output = output + bias
        return self.post_layernorm(output), None


class LayerTypeRopeSelfAttention(SelfAttention):
    """``SelfAttention`` with a separate rotary base on sliding-window layers (``config.local_rotary_base``).

    Layers for which megatron's ``is_layer_window_attention`` holds get their own ``RotaryEmbedding`` (same
    ``kv_channels`` and ``rotary_percent``, no scaling) and use it in place of the model's, for the same positions;
    the other layers use the rotary embedding ``GPTModel`` passes in.
    """

    def __init__(self, config: Any, submodules: Any, layer_number: int, *args: Any, **kwargs: Any) -> None:
        super().__init__(config, submodules, layer_number, *args, **kwargs)
        self.local_rotary_pos_emb: Optional[RotaryEmbedding] = None
        base = getattr(config, "local_rotary_base", None)
        if base is not None and is_layer_window_attention(config.window_size, config.window_attn_skip_freq,
                                                          layer_number):
            self.local_rotary_pos_emb = RotaryEmbedding(
                kv_channels=config.kv_channels,
                rotary_percent=getattr(config, "rotary_percent", 1.0),
                rotary_interleaved=config.rotary_interleaved,
                rotary_base=base,
                use_cpu_initialization=config.use_cpu_initialization,
            )

    def forward(self, hidden_states: torch.Tensor, attention_mask: Optional[torch.Tensor], *args: Any,
                rotary_pos_emb: Any = None, **kwargs: Any):
        if self.local_rotary_pos_emb is not None and rotary_pos_emb is not None:
            first = rotary_pos_emb[0] if isinstance(rotary_pos_emb, tuple) else rotary_pos_emb
            local = self.local_rotary_pos_emb(first.size(0))
            rotary_pos_emb = local.to(device=first.device)
        return super().forward(hidden_states, attention_mask, *args, rotary_pos_emb=rotary_pos_emb, **kwargs)


class ScaledLanguageModelEmbedding(LanguageModelEmbedding):
    """``LanguageModelEmbedding`` whose output is multiplied by ``embedding_scale`` (a number held in the output's
    dtype, as HF Gemma does)."""

    embedding_scale: float = 1.0

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        out = super().forward(*args, **kwargs)
        return out * torch.tensor(self.embedding_scale, dtype=out.dtype, device=out.device)


def scale_embeddings(model: torch.nn.Module, scale: float) -> None:
    """Make ``model.embedding`` (a ``LanguageModelEmbedding``) a :class:`ScaledLanguageModelEmbedding` with
    ``scale``; parameters and names are unchanged. A no-op on chunks without an embedding (later pipeline stages).

    Raises:
        ValueError: the model's embedding is of another class.
    """
    emb = getattr(model, "embedding", None)
    if emb is None:
        return
    if type(emb) not in (LanguageModelEmbedding, ScaledLanguageModelEmbedding):
        raise ValueError(f"scale_embeddings: embedding_scale needs a LanguageModelEmbedding, the model has "
                         f"{type(emb).__name__}")
    emb.__class__ = ScaledLanguageModelEmbedding
    emb.embedding_scale = float(scale)


class MLADotProductAttention(DotProductAttention):
    """``DotProductAttention`` for multi-latent attention: keys of ``k_channels`` and values of ``v_channels`` per
    head (``MultiLatentAttention`` passes both, with its own ``softmax_scale``). The maths is the parent's, which
    takes its widths from the query / value tensors; only the output width changes (``v_channels`` per head).
    Requires ``num_query_groups == num_attention_heads`` (MLA expands keys and values to every head)."""

    def __init__(self, config: Any, layer_number: int, attn_mask_type: Any, attention_type: str,
                 attention_dropout: Optional[float] = None, softmax_scale: Optional[float] = None,
                 k_channels: Optional[int] = None, v_channels: Optional[int] = None,
                 cp_comm_type: Optional[str] = None, pg_collection: Any = None) -> None:
        if k_channels is not None and softmax_scale is None:
            softmax_scale = k_channels ** -0.5
        super().__init__(config, layer_number, attn_mask_type, attention_type, attention_dropout=attention_dropout,
                         softmax_scale=softmax_scale, cp_comm_type=cp_comm_type, pg_collection=pg_collection)
        if self.num_query_groups_per_partition != self.num_attention_heads_per_partition:
            raise ValueError(f"MLADotProductAttention: num_query_groups ({config.num_query_groups}) must equal "
                             f"num_attention_heads ({config.num_attention_heads})")
        if v_channels is not None:
            self.hidden_size_per_partition = v_channels * self.num_attention_heads_per_partition


class LatentRMSNorm(LocalRMSNorm):
    """:class:`LocalRMSNorm` whose epsilon is ``config.latent_layernorm_epsilon`` (the ``eps`` megatron passes, its
    ``layernorm_epsilon``, is ignored)."""

    def __init__(self, config: Any, hidden_size: int, eps: float = 1e-5, **kwargs: Any) -> None:
        super().__init__(config, hidden_size, eps=config.latent_layernorm_epsilon, **kwargs)


class FP32WeightRouter(TopKRouter):
    """``TopKRouter`` whose weight (and bias) stay fp32 whatever ``config.params_dtype`` is.

    megatron-core 0.16.1's ``Router.reset_parameters`` casts the (fp32-created) weight to ``params_dtype``, so a bf16
    model would round the fp32 router weights HF DeepSeek-V3 / GLM-4.5 checkpoints carry (and a round trip would not
    be bit-exact); ``moe_router_dtype`` sets only the dtype the logits are computed in. The gating input is cast to
    the weight's dtype, so both operands of the router GEMM have one dtype (Transformer Engine's GEMM, when present,
    takes one); with ``moe_router_dtype="fp32"`` (these families) the logits are what the parent computes.
    Megatron's ``Float16Module`` (a training wrapper) still casts every parameter to bf16 / fp16.
    """

    def reset_parameters(self) -> None:
        if self.config.perform_initialization:
            self.config.init_method(self.weight)
            if self.bias is not None:
                self.config.init_method(self.bias)
        setattr(self.weight, "sequence_parallel", self.config.sequence_parallel)
        if self.bias is not None:
            setattr(self.bias, "sequence_parallel", self.config.sequence_parallel)

    def gating(self, input: torch.Tensor) -> torch.Tensor:
        return super().gating(input.to(self.weight.dtype))
