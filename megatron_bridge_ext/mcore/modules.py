"""Local-spec modules for model features megatron-core 0.16.1 has no local (non-Transformer-Engine) module for.

The local layer spec of megatron-core 0.16.1 (``get_gpt_layer_local_spec``) builds every RMSNorm as
``WrappedTorchNorm``, which asserts ``not config.layernorm_zero_centered_gamma``; ``TransformerLayer`` has no norm
after attention or after the MLP; ``GPTModel`` has one rotary embedding for every layer, no embedding scale, and
neither its ``DotProductAttention`` nor its output layer has soft-capping (``cap * tanh(x / cap)``) of the attention
scores / the logits. Gemma 2 / Gemma 3 need all of them. Its local ``DotProductAttention`` has no ``k_channels`` /
``v_channels`` arguments, which multi-latent attention (DeepSeek-V3) passes (queries / keys of ``qk_head_dim +
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
                                   (``config.local_rotary_base``); full-attention layers use the model's RoPE and
                                   may have their own head size / kv heads (``full_attention_kv_channels`` /
                                   ``full_attention_num_query_groups``, Gemma 4)
``ScaledLanguageModelEmbedding``   the embedding output multiplied by ``config.embedding_scale`` in its own dtype
``MLADotProductAttention``         ``DotProductAttention`` accepting ``k_channels`` / ``v_channels`` (the output
                                   width is ``v_channels`` per head); no parameters of its own
``LatentRMSNorm``                  :class:`LocalRMSNorm` with ``config.latent_layernorm_epsilon`` (MLA's q / kv
                                   latent norms, whose epsilon HF DeepSeek-V3 fixes at 1e-6)
``SoftCapDotProductAttention``     ``DotProductAttention`` whose scaled scores are soft-capped before the mask and
                                   the softmax (``config.attn_logit_softcapping``); no parameters of its own
``SoftCapOutputLayer``             ``GPTModel``'s output layer (a ``ColumnParallelLinear``, same parameters) whose
                                   logits are soft-capped (``config.final_logit_softcapping``), set by
                                   :func:`softcap_output_logits`
``FP32WeightRouter``               ``TopKRouter`` whose weight (and bias) stay fp32 whatever ``params_dtype`` is
                                   (``config.moe_router_fp32_weight``; HF DeepSeek-V3 / GLM-4.5 keep theirs in fp32)
``ValueNormSelfAttention``         :class:`LayerTypeRopeSelfAttention` whose values are RMS-normalised per head
                                   without a weight (``config.value_rms_norm``, Gemma 4's ``v_norm``); no
                                   parameters of its own
``ScaledOutputTransformerLayer``   ``TransformerLayer`` whose output is multiplied by its learned ``layer_scalar``
                                   (one number; ``config.layer_output_scalar``, Gemma 4)
``proportional_rope``              (a function) gives ``GPTModel``'s rotary embedding Gemma 4's proportional
                                   frequencies (``config.rotary_proportion``), set by ``build_gpt_model``
=================================  ===============================================================================

Gemma 4 needs the last three (with the non-zero-centred norms, post norms and soft-capped logits above).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Optional

import torch
from megatron.core.fusions import fused_softmax
from megatron.core.fusions.fused_softmax import FusedScaleMaskSoftmax, SoftmaxOne
from megatron.core.models.common.embeddings.language_model_embedding import LanguageModelEmbedding
from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding
from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.attention import SelfAttention
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.moe.router import TopKRouter
from megatron.core.transformer.transformer_layer import TransformerLayer
from megatron.core.transformer.utils import is_layer_window_attention

__all__ = [
    "LocalRMSNorm",
    "PostNormRowParallelLinear",
    "LayerTypeRopeSelfAttention",
    "ScaledLanguageModelEmbedding",
    "scale_embeddings",
    "MLADotProductAttention",
    "LatentRMSNorm",
    "soft_cap",
    "SoftCapScaleMaskSoftmax",
    "SoftCapDotProductAttention",
    "SoftCapOutputLayer",
    "softcap_output_logits",
    "FP32WeightRouter",
    "ValueNormSelfAttention",
    "ScaledOutputTransformerLayer",
    "proportional_rotary_inv_freq",
    "proportional_rope",
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
    """``SelfAttention`` with a separate rotary base on sliding-window layers (``config.local_rotary_base``), and
    full-attention layers of their own head size / kv heads (``config.full_attention_kv_channels`` /
    ``full_attention_num_query_groups``, Gemma 4's ``global_head_dim`` / ``num_global_key_value_heads``).

    A full-attention layer (megatron's ``is_layer_window_attention`` false) with such overrides is built from
    ``dataclasses.replace(config, kv_channels=..., num_query_groups=...)``: its ``linear_qkv``, q / k norms, core
    attention and ``linear_proj`` (input width) all take the layer's geometry from that config, as megatron builds
    them, and its checkpoint shapes follow; it uses the model's rotary embedding, which then spans
    ``full_attention_kv_channels`` (:func:`proportional_rope`). Sliding-window layers get their own
    ``RotaryEmbedding`` (``kv_channels``, ``rotary_percent``, no scaling; base ``local_rotary_base``, or the model's
    ``rotary_base`` when only the head sizes differ) and use it in place of the model's, for the same positions;
    the other layers use the rotary embedding ``GPTModel`` passes in.
    """

    def __init__(self, config: Any, submodules: Any, layer_number: int, *args: Any, **kwargs: Any) -> None:
        sliding = is_layer_window_attention(config.window_size, config.window_attn_skip_freq, layer_number)
        full_d = getattr(config, "full_attention_kv_channels", None)
        full_g = getattr(config, "full_attention_num_query_groups", None)
        if not sliding and (full_d is not None or full_g is not None):
            config = dataclasses.replace(config, kv_channels=full_d if full_d is not None else config.kv_channels,
                                         num_query_groups=full_g if full_g is not None else config.num_query_groups)
        super().__init__(config, submodules, layer_number, *args, **kwargs)
        self.local_rotary_pos_emb: Optional[RotaryEmbedding] = None
        base = getattr(config, "local_rotary_base", None)
        if base is None and full_d is not None:
            base = config.rotary_base
        if base is not None and sliding:
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


def soft_cap(x: torch.Tensor, cap: float) -> torch.Tensor:
    """``cap * tanh(x / cap)``, in the order HF Gemma computes it (divide, tanh, multiply), in ``x``'s dtype."""
    return torch.tanh(x / cap) * cap


def _check_cap(value: Any, field: str, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{where}: config.{field}={value!r} must be a positive finite number")
    return float(value)


class SoftCapScaleMaskSoftmax(FusedScaleMaskSoftmax):
    """``FusedScaleMaskSoftmax`` that soft-caps the scores once they are fully scaled, before the mask and the
    softmax (where HF Gemma's eager attention caps them).

    The scores arrive multiplied by ``DotProductAttention.softmax_scale``; with ``apply_query_key_layer_scaling``
    that scale is divided by the layer number and this module's ``scale`` (the layer number) multiplies it back
    first, so the cap always sees ``q.k * softmax_scale``. Always the PyTorch path: the fused softmax kernels scale
    and mask inside and have no cap. In fp16 / bf16 with ``attention_softmax_in_fp32`` the cap is taken in fp32.
    """

    def __init__(self, *args: Any, softcap: float, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.softcap = _check_cap(softcap, "attn_logit_softcapping", type(self).__name__)

    def forward(self, input: torch.Tensor, mask: Optional[torch.Tensor],
                softmax_offset: Optional[torch.Tensor] = None) -> torch.Tensor:
        if input.dim() != 4:
            raise ValueError(f"{type(self).__name__}: scores must be [b, np, sq, sk], got shape {tuple(input.shape)}")
        return self.forward_torch_softmax(input, mask, softmax_offset)

    def forward_torch_softmax(self, input: torch.Tensor, mask: Optional[torch.Tensor],
                              softmax_offset: Optional[torch.Tensor] = None) -> torch.Tensor:
        # megatron-core 0.16.1's forward_torch_softmax with the cap between the scaling and the mask; the mask
        # builders are looked up in fused_softmax when called, as there (cpu_compat replaces them on CPU processes)
        if self.input_in_float16 and self.softmax_in_fp32:
            input = input.float()
        if self.scale is not None:
            input = input * self.scale
        input = soft_cap(input, self.softcap)
        sq, sk = input.size(2), input.size(3)
        if self.window_size is not None:
            mask = fused_softmax.get_sliding_window_causal_mask(sq, sk, self.window_size)
        elif self.attn_mask_type == AttnMaskType.causal and mask is None and sq > 1:
            if sq != sk:
                raise ValueError(f"{type(self).__name__}: a causal mask needs sq == sk, got {sq} and {sk}")
            mask = fused_softmax.get_default_causal_mask(sq)
        masked = self.mask_func(input, mask) if mask is not None else input
        softmax = torch.nn.Softmax(dim=-1) if softmax_offset is None else \
            SoftmaxOne(-1, softmax_offset.to(input.device))
        probs = softmax(masked)
        if self.input_in_float16 and self.softmax_in_fp32:
            probs = probs.half() if self.input_in_fp16 else probs.bfloat16()
        return probs

    def extra_repr(self) -> str:
        return f"softcap={self.softcap}, scale={self.scale}, window_size={self.window_size}"


class SoftCapDotProductAttention(DotProductAttention):
    """``DotProductAttention`` with soft-capping of the attention scores: ``scores = cap * tanh(scores / cap)`` with
    ``cap = config.attn_logit_softcapping``, after the query scaling (``softmax_scale``, Gemma's
    ``query_pre_attn_scalar ** -0.5``) and before the causal / sliding-window mask and the softmax, as HF Gemma 2's
    eager attention. Same arguments and no parameters of its own; only its ``scale_mask_softmax`` differs
    (:class:`SoftCapScaleMaskSoftmax`, built with the parent's settings)."""

    def __init__(self, config: Any, layer_number: int, attn_mask_type: Any, attention_type: str,
                 **kwargs: Any) -> None:
        super().__init__(config, layer_number, attn_mask_type, attention_type, **kwargs)
        cap = _check_cap(getattr(config, "attn_logit_softcapping", None), "attn_logit_softcapping",
                         type(self).__name__)
        parent = self.scale_mask_softmax
        self.scale_mask_softmax = SoftCapScaleMaskSoftmax(
            input_in_fp16=parent.input_in_fp16,
            input_in_bf16=parent.input_in_bf16,
            attn_mask_type=parent.attn_mask_type,
            scaled_masked_softmax_fusion=parent.scaled_masked_softmax_fusion,
            mask_func=parent.mask_func,
            softmax_in_fp32=parent.softmax_in_fp32,
            scale=parent.scale,
            window_size=parent.window_size,
            softcap=cap,
        )


class SoftCapOutputLayer(ColumnParallelLinear):
    """``GPTModel``'s output layer with its logits soft-capped: ``logit_softcap * tanh(logits / logit_softcap)``
    (HF Gemma's ``final_logit_softcapping``). Elementwise, so each tensor-parallel rank caps its vocabulary shard
    (gathered or not); parameters and names are the ``ColumnParallelLinear``'s."""

    logit_softcap: float = 1.0

    def forward(self, *args: Any, **kwargs: Any):
        output, bias = super().forward(*args, **kwargs)
        if bias is not None:  # GPTModel builds its output layer without a bias; capping must come after one
            raise ValueError(f"{type(self).__name__}: the output layer returned a separate bias (skip_bias_add); "
                             "logit soft-capping needs the biased logits")
        return soft_cap(output, self.logit_softcap), None


def softcap_output_logits(model: torch.nn.Module, cap: float) -> None:
    """Make ``model.output_layer`` (a ``ColumnParallelLinear``) a :class:`SoftCapOutputLayer` capping at ``cap``;
    parameters and names are unchanged. A no-op on chunks without an output layer (all but the last pipeline stage).

    Raises:
        ValueError: ``cap`` is not a positive finite number, or the output layer is of another class.
    """
    cap = _check_cap(cap, "final_logit_softcapping", "softcap_output_logits")
    layer = getattr(model, "output_layer", None)
    if layer is None:
        return
    if type(layer) not in (ColumnParallelLinear, SoftCapOutputLayer):
        raise ValueError(f"softcap_output_logits: final_logit_softcapping needs a ColumnParallelLinear output layer, "
                         f"the model has {type(layer).__name__}")
    layer.__class__ = SoftCapOutputLayer
    layer.logit_softcap = cap


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


def _unit_rms_norm(x: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm without a weight over the last dimension, in fp32 and cast back, as HF Gemma 4's ``v_norm``
    (``x * (mean(x^2) + eps) ** -0.5``)."""
    xf = x.float()
    return (xf * torch.pow(xf.pow(2).mean(-1, keepdim=True) + eps, -0.5)).type_as(x)


class ValueNormSelfAttention(LayerTypeRopeSelfAttention):
    """:class:`LayerTypeRopeSelfAttention` (plain ``SelfAttention`` without ``config.local_rotary_base``) whose
    values are RMS-normalised per head, without a weight, with ``config.layernorm_epsilon``, before the core
    attention (HF Gemma 4's ``v_norm``). No parameters of its own.

    Raises:
        ValueError: at the forward, when the fused q/k/v path (``split_qkv=False``) hands over unsplit tensors.
    """

    def get_query_key_value_tensors(self, *args: Any, **kwargs: Any):
        out = super().get_query_key_value_tensors(*args, **kwargs)
        if not isinstance(out, tuple) or len(out) < 3:
            raise ValueError(f"{type(self).__name__}: value_rms_norm needs split query / key / value tensors, got "
                             f"{type(out).__name__} (fused_single_qkv_rope is not supported)")
        query, key, value, *rest = out
        return (query, key, _unit_rms_norm(value, self.config.layernorm_epsilon), *rest)


class ScaledOutputTransformerLayer(TransformerLayer):
    """``TransformerLayer`` whose output hidden states are multiplied by ``layer_scalar`` (a parameter of one
    element, starting at 1; HF Gemma 4's ``layer_scalar`` buffer), after both residual adds."""

    def __init__(self, config: Any, submodules: Any, *args: Any, **kwargs: Any) -> None:
        super().__init__(config, submodules, *args, **kwargs)
        self.layer_scalar = torch.nn.Parameter(torch.ones(1, dtype=config.params_dtype))

    def forward(self, *args: Any, **kwargs: Any):
        output, context = super().forward(*args, **kwargs)
        return output * self.layer_scalar.to(output.dtype), context


def proportional_rotary_inv_freq(head_dim: int, base: float, proportion: float,
                                 device: Optional[torch.device] = None) -> torch.Tensor:
    """HF's proportional RoPE frequencies (``rope_type="proportional"``): ``head_dim / 2`` of them, the first
    ``int(proportion * head_dim // 2)`` equal to ``base ** (-2i / head_dim)``, the others 0 (not rotated); fp32, on
    ``device`` (default: torch's current default device).

    Raises:
        ValueError: ``proportion`` outside [0, 1] or an odd ``head_dim``.
    """
    if not 0.0 <= proportion <= 1.0 or head_dim % 2:
        raise ValueError(f"proportional_rotary_inv_freq: proportion={proportion!r} must lie in [0, 1] and "
                         f"head_dim={head_dim} be even")
    angles = int(proportion * head_dim // 2)
    rotated = 1.0 / (base ** (torch.arange(0, 2 * angles, 2, dtype=torch.int64, device=device).float() / head_dim))
    return torch.cat((rotated, torch.zeros(head_dim // 2 - angles, dtype=torch.float32, device=device)))


def proportional_rope(model: torch.nn.Module, proportion: Optional[float]) -> None:
    """Give ``model.rotary_pos_emb`` (megatron's ``RotaryEmbedding`` over all ``kv_channels``) the frequencies of
    :func:`proportional_rotary_inv_freq` over the full-attention layers' head size (``full_attention_kv_channels``
    where set, else ``kv_channels``): megatron rotates channel ``j`` with ``j + head_dim / 2`` at frequency ``j``, as
    HF does, and a zero frequency leaves that pair as it is. ``proportion`` None: every pair turns (1.0; megatron's
    own frequencies, ``base ** (-2i / head_dim)``, for a head size other than ``kv_channels``). Call before the first
    forward (megatron caches the rotary embedding per length). A no-op on a model without a rotary embedding.

    Raises:
        ValueError: the rotary embedding is of another class or covers part of the channels (``rotary_percent``), or
            llama3 scaling (``rope_scaling``) with another head size.
    """
    rope = getattr(model, "rotary_pos_emb", None)
    if rope is None:
        return
    config = model.config
    head_dim = config.kv_channels
    if type(rope) is not RotaryEmbedding or rope.inv_freq.numel() != head_dim // 2 or rope.rotary_interleaved:
        raise ValueError(f"proportional_rope: needs a non-interleaved RotaryEmbedding over all {head_dim} channels, "
                         f"the model has {type(rope).__name__} with {rope.inv_freq.numel()} frequencies")
    full_d = getattr(config, "full_attention_kv_channels", None)
    if full_d is not None:
        if getattr(config, "rope_scaling", False):
            raise ValueError("proportional_rope: rope_scaling (llama3) with full_attention_kv_channels is not "
                             "supported")
        head_dim = full_d
    # on the device megatron chose (CPU with use_cpu_initialization, also while a meta model is built)
    rope.inv_freq = proportional_rotary_inv_freq(head_dim, config.rotary_base,
                                                 1.0 if proportion is None else proportion,
                                                 device=rope.inv_freq.device)
