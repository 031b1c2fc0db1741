"""Local-spec modules for model features megatron-core 0.16.1 has no local (non-Transformer-Engine) module for.

The local layer spec of megatron-core 0.16.1 (``get_gpt_layer_local_spec``) builds every RMSNorm as
``WrappedTorchNorm``, which asserts ``not config.layernorm_zero_centered_gamma``; ``TransformerLayer`` has no norm
after attention or after the MLP; ``GPTModel`` has one rotary embedding for every layer, no embedding scale, and
neither its ``DotProductAttention`` nor its output layer has soft-capping (``cap * tanh(x / cap)``) of the attention
scores / the logits. Gemma 2 / Gemma 3 need all of them. Its local ``DotProductAttention`` has no ``k_channels`` /
``v_channels`` arguments, which multi-latent attention (DeepSeek-V3) passes (queries / keys of ``qk_head_dim +
qk_pos_emb_head_dim`` channels, values of ``v_head_dim``). Its ``q_layernorm`` / ``k_layernorm`` normalise each
head on its own (OLMo 2 / OLMoE normalise the whole projection), and every layer has its pre-norms (OLMo 2 has
none). ``model_builder.gpt_layer_spec`` puts these modules into the spec only when the config asks for the feature,
so the other families build exactly megatron-core's local spec.

=================================  ===============================================================================
module                             what it adds
=================================  ===============================================================================
``LocalRMSNorm``                   RMSNorm in fp32 that honours ``layernorm_zero_centered_gamma`` (``x * (1 + w)``,
                                   the weight stored as on disk, as Transformer Engine's ``zero_centered_gamma``)
``PostNormRowParallelLinear``      ``RowParallelLinear`` followed by a norm of its (TP-reduced) output; its weight is
                                   ``<linear>.post_layernorm.weight`` (Gemma's ``post_attention_layernorm`` /
                                   ``post_feedforward_layernorm``, the names Megatron Bridge uses)
``WholeQueryRMSNorm`` /            RMSNorm over a whole query / key projection (all heads together, as OLMo 2's
``WholeKeyRMSNorm``                ``q_norm`` / ``k_norm``), in place of the per-head ``q_layernorm`` /
                                   ``k_layernorm``: its weight is split by heads over TP like the q / k rows, the
                                   sum of squares is all-reduced over the TP group (:class:`WholeProjectionRMSNorm`)
``LayerTypeRopeSelfAttention``     ``SelfAttention`` whose sliding-window layers use their own rotary base
                                   (``config.local_rotary_base``, without YaRN's attention factor); full-attention
                                   layers use the model's RoPE and may have their own head size / kv heads
                                   (``full_attention_kv_channels`` / ``full_attention_num_query_groups``, Gemma 4)
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
``LayerTypeDotProductAttention``   ``DotProductAttention`` whose RoPE layers attend causally within chunks
                                   (``config.attention_chunk_size``) and whose NoPE layers (``no_rope_freq``) scale
                                   the query by position (``config.attn_temperature_floor_scale``); Llama 4;
                                   ``RopeLayerQKNormSelfAttention`` drops the q/k norm on NoPE layers
                                   (``config.qk_norm_nope_layers=False``); ``set_llama3_rope_parameters`` sets
                                   llama3 RoPE factors megatron-core fixes (``config.rope_scaling_*``)
=================================  ===============================================================================

Gemma 4 needs ``ValueNormSelfAttention``, ``ScaledOutputTransformerLayer`` and ``proportional_rope`` (with the
non-zero-centred norms, post norms and soft-capped logits above).
"""

from __future__ import annotations

import copy
import dataclasses
import math
from typing import Any, Optional

import torch
import torch.distributed.nn.functional as dist_fn
from megatron.core import parallel_state
from megatron.core.fusions import fused_softmax
from megatron.core.fusions.fused_softmax import FusedScaleMaskSoftmax, SoftmaxOne
from megatron.core.models.common.embeddings.language_model_embedding import LanguageModelEmbedding
from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding
from megatron.core.tensor_parallel.layers import (
    ColumnParallelLinear,
    RowParallelLinear,
    set_tensor_model_parallel_attributes,
)
from megatron.core.transformer.attention import SelfAttention
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.moe.router import TopKRouter
from megatron.core.transformer.transformer_layer import TransformerLayer
from megatron.core.transformer.utils import is_layer_window_attention, make_sharded_tensors_for_checkpoint

__all__ = [
    "LocalRMSNorm",
    "PostNormRowParallelLinear",
    "WholeProjectionRMSNorm",
    "WholeQueryRMSNorm",
    "WholeKeyRMSNorm",
    "LayerTypeRopeSelfAttention",
    "ScaledLanguageModelEmbedding",
    "scale_embeddings",
    "MLADotProductAttention",
    "LatentRMSNorm",
    "soft_cap",
    "TorchScaleMaskSoftmax",
    "SoftCapScaleMaskSoftmax",
    "SoftCapDotProductAttention",
    "SoftCapOutputLayer",
    "softcap_output_logits",
    "FP32WeightRouter",
    "ValueNormSelfAttention",
    "ScaledOutputTransformerLayer",
    "proportional_rotary_inv_freq",
    "proportional_rope",
    "LayerTypeDotProductAttention", "RopeLayerQKNormSelfAttention", "set_llama3_rope_parameters",
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


class WholeProjectionRMSNorm(torch.nn.Module):
    """RMSNorm over all heads of a query or key projection together (HF OLMo 2 / Olmo 3 / OLMoE ``q_norm`` /
    ``k_norm``, applied to ``q_proj`` / ``k_proj`` outputs before the head split), built where megatron's
    ``SelfAttention`` builds its per-head ``q_layernorm`` / ``k_layernorm``.

    ``SelfAttention`` (megatron-core 0.16.1 and 0.19.2 alike) calls the norm on the split heads, ``[sq, b, heads, d]``
    (this TP rank's heads), before RoPE, with ``hidden_size = d``. Each TP rank holds ``heads / tp`` consecutive heads
    (HF order), so the norm's weight (``heads * d``) is split along dim 0 over TP like the q / k rows
    (``tensor_model_parallel`` attributes: column layout; its sharded state dict says so, so ``torch_dist``
    checkpoints save and load it at any layout). The mean square over the whole projection is the sum of squares
    over the local heads, all-reduced over the TP group (an autograd-aware all-reduce: gradients flow to every
    rank's inputs), divided by ``heads * d``; then as :class:`LocalRMSNorm`: fp32, ``x * rsqrt(ms + eps) * w``
    (``1 + w`` with ``layernorm_zero_centered_gamma``), cast back to the input dtype.

    Subclasses say whose heads: :class:`WholeQueryRMSNorm` (``num_attention_heads``), :class:`WholeKeyRMSNorm`
    (``num_query_groups``). Any grouped-query model (e.g. MiniMax-M2) can use them.

    Raises:
        ValueError: a head count that the TP size does not divide (with fewer key heads than TP ranks megatron
            replicates key heads, so a rank's heads are no slice of the projection), named.
    """

    heads_field = "num_attention_heads"

    def __init__(self, config: Any, hidden_size: int, eps: float = 1e-5, **kwargs: Any) -> None:
        super().__init__()
        name = type(self).__name__
        if getattr(config, "normalization", "RMSNorm") != "RMSNorm":
            raise ValueError(f"{name}: config.normalization is {config.normalization!r}, expected 'RMSNorm'")
        heads = getattr(config, self.heads_field) or config.num_attention_heads
        tp = parallel_state.get_tensor_model_parallel_world_size() if parallel_state.model_parallel_is_initialized() \
            else 1
        if heads % tp:
            raise ValueError(f"{name}: {self.heads_field}={heads} is not a multiple of "
                             f"tensor_model_parallel_size={tp}: a norm over the whole projection needs whole heads "
                             "on each TP rank (megatron-core replicates key heads when there are fewer than TP ranks)")
        self.tp_group = parallel_state.get_tensor_model_parallel_group() if tp > 1 else None
        self.head_dim = hidden_size
        self.local_heads = heads // tp
        self.total = heads * hidden_size
        self.eps = eps
        self.zero_centered_gamma = bool(config.layernorm_zero_centered_gamma)
        init = torch.zeros if self.zero_centered_gamma else torch.ones
        self.weight = torch.nn.Parameter(init(self.local_heads * hidden_size, dtype=config.params_dtype))
        set_tensor_model_parallel_attributes(self.weight, is_parallel=True, dim=0, stride=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.size(-2) != self.local_heads or x.size(-1) != self.head_dim:
            raise ValueError(f"{type(self).__name__}: expected [..., {self.local_heads}, {self.head_dim}] (this rank's "
                             f"heads, head_dim), got shape {tuple(x.shape)}")
        xf = x.float()
        squares = xf.pow(2).sum(dim=(-2, -1), keepdim=True)
        if self.tp_group is not None:
            squares = dist_fn.all_reduce(squares, group=self.tp_group)
        out = xf * torch.rsqrt(squares / self.total + self.eps)
        gamma = self.weight.float().view(self.local_heads, self.head_dim)
        if self.zero_centered_gamma:
            gamma = gamma + 1.0
        return (out * gamma).type_as(x)

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata: Optional[dict] = None):
        """The weight as a TP-sharded tensor (axis 0), as ``ColumnParallelLinear``'s."""
        return make_sharded_tensors_for_checkpoint(self.state_dict(prefix="", keep_vars=True), prefix, {"weight": 0},
                                                   sharded_offsets)

    def extra_repr(self) -> str:
        return (f"{tuple(self.weight.shape)} of {self.total}, eps={self.eps}, "
                f"zero_centered_gamma={self.zero_centered_gamma}")


class WholeQueryRMSNorm(WholeProjectionRMSNorm):
    """:class:`WholeProjectionRMSNorm` over the query heads (``num_attention_heads * head_dim``)."""

    heads_field = "num_attention_heads"


class WholeKeyRMSNorm(WholeProjectionRMSNorm):
    """:class:`WholeProjectionRMSNorm` over the key heads (``num_query_groups * head_dim``)."""

    heads_field = "num_query_groups"


def _without_yarn(config: Any) -> Any:
    """A shallow copy of ``config`` as an instance of its first base class without YaRN fields (``GPTConfig`` for a
    ``YarnGPTConfig``): megatron decides whether to apply YaRN's attention factor by ``hasattr(config,
    "yarn_rotary_scaling_factor")``."""
    plain = copy.copy(config)
    plain.__class__ = next(c for c in type(config).__mro__ if not hasattr(c, "yarn_rotary_scaling_factor"))
    for name in [n for n in vars(plain) if n.startswith("yarn_")]:
        delattr(plain, name)
    return plain


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
    With YaRN on the model's RoPE (Olmo 3's full layers) the sliding layers also rotate without YaRN's attention
    factor (HF applies it with the scaled RoPE only): megatron-core 0.16.1 reads that factor from ``self.config`` in
    each forward (a ``YarnGPTConfig`` has one), 0.19.2 from ``self._yarn_concentration_factor`` cached at
    construction; these layers get a copy of the config without the ``yarn_*`` fields and a cached factor of 1.
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
            if hasattr(config, "yarn_rotary_scaling_factor"):
                self.config = _without_yarn(config)
                self._yarn_concentration_factor = 1.0

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


class TorchScaleMaskSoftmax(FusedScaleMaskSoftmax):
    """``FusedScaleMaskSoftmax`` that always takes the PyTorch path (the fused kernels scale and mask inside), with
    two hooks for its subclasses: :meth:`scores` (the fully scaled scores, before the mask) and :meth:`mask_for`
    (the mask applied). The body is megatron-core 0.16.1's ``forward_torch_softmax``; the mask builders are looked
    up in ``fused_softmax`` when called, as there (``cpu_compat`` replaces them on CPU processes). In fp16 / bf16 with
    ``attention_softmax_in_fp32`` the scores, hooks and softmax are in fp32."""

    def scores(self, input: torch.Tensor) -> torch.Tensor:
        """The scaled scores before the mask (identity here)."""
        return input

    def mask_for(self, input: torch.Tensor, mask: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        """The mask for scores ``input`` [b, np, sq, sk]: megatron's sliding-window or causal mask (as its torch
        path builds them) when none is given, else ``mask``."""
        sq, sk = input.size(2), input.size(3)
        if self.window_size is not None:
            return fused_softmax.get_sliding_window_causal_mask(sq, sk, self.window_size)
        if self.attn_mask_type == AttnMaskType.causal and mask is None and sq > 1:
            if sq != sk:
                raise ValueError(f"{type(self).__name__}: a causal mask needs sq == sk, got {sq} and {sk}")
            return fused_softmax.get_default_causal_mask(sq)
        return mask

    def forward(self, input: torch.Tensor, mask: Optional[torch.Tensor],
                softmax_offset: Optional[torch.Tensor] = None) -> torch.Tensor:
        if input.dim() != 4:
            raise ValueError(f"{type(self).__name__}: scores must be [b, np, sq, sk], got shape {tuple(input.shape)}")
        return self.forward_torch_softmax(input, mask, softmax_offset)

    def forward_torch_softmax(self, input: torch.Tensor, mask: Optional[torch.Tensor],
                              softmax_offset: Optional[torch.Tensor] = None) -> torch.Tensor:
        if self.input_in_float16 and self.softmax_in_fp32:
            input = input.float()
        if self.scale is not None:
            input = input * self.scale
        input = self.scores(input)
        mask = self.mask_for(input, mask)
        masked = self.mask_func(input, mask) if mask is not None else input
        softmax = torch.nn.Softmax(dim=-1) if softmax_offset is None else \
            SoftmaxOne(-1, softmax_offset.to(input.device))
        probs = softmax(masked)
        if self.input_in_float16 and self.softmax_in_fp32:
            probs = probs.half() if self.input_in_fp16 else probs.bfloat16()
        return probs


class SoftCapScaleMaskSoftmax(TorchScaleMaskSoftmax):
    """Soft-caps the scores once they are fully scaled, before the mask and the softmax (where HF Gemma's eager
    attention caps them).

    The scores arrive multiplied by ``DotProductAttention.softmax_scale``; with ``apply_query_key_layer_scaling``
    that scale is divided by the layer number and this module's ``scale`` (the layer number) multiplies it back
    first, so the cap always sees ``q.k * softmax_scale``. In fp16 / bf16 with ``attention_softmax_in_fp32`` the cap
    is taken in fp32.
    """

    def __init__(self, *args: Any, softcap: float, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.softcap = _check_cap(softcap, "attn_logit_softcapping", type(self).__name__)

    def scores(self, input: torch.Tensor) -> torch.Tensor:
        return soft_cap(input, self.softcap)

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


# ----------------------------------------------------------------------------------------------------------------------
# Llama 4: per-layer-type attention (RoPE layers: chunked causal mask, q/k L2 norm; NoPE layers: query temperature)
# ----------------------------------------------------------------------------------------------------------------------


def is_nope_layer(config: Any, layer_number: int) -> bool:
    """Whether megatron skips RoPE on layer ``layer_number`` (1-based, global): ``config.no_rope_freq`` marks it
    (megatron-core's ``__post_init__`` turns an int into the per-layer list)."""
    freq = getattr(config, "no_rope_freq", None)
    if not freq:
        return False
    if isinstance(freq, int):
        return layer_number % freq == 0
    return bool(freq[layer_number - 1])


def chunked_causal_mask(sq: int, sk: int, chunk: int, device: Any = None) -> torch.Tensor:
    """``[1, 1, sq, sk]`` bool mask, True where masked: query ``i`` (the last ``sq`` of ``sk`` positions) sees key
    ``j`` iff ``j <= i`` and both lie in the same chunk of ``chunk`` positions (``j // chunk == i // chunk``), as
    transformers' ``create_chunked_causal_mask``."""
    q = torch.arange(sk - sq, sk, device=device).unsqueeze(1)
    k = torch.arange(sk, device=device).unsqueeze(0)
    return ((k > q) | (torch.div(k, chunk, rounding_mode="floor") != torch.div(q, chunk, rounding_mode="floor"))
            ).view(1, 1, sq, sk)


class ChunkedCausalScaleMaskSoftmax(TorchScaleMaskSoftmax):
    """Its causal mask is :func:`chunked_causal_mask` (combined with a given mask). In fp16 / bf16 with
    ``attention_softmax_in_fp32`` the softmax is taken in fp32."""

    def __init__(self, *args: Any, chunk_size: int, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if self.window_size is not None:
            raise ValueError(f"{type(self).__name__}: attention_chunk_size={chunk_size} with a sliding window "
                             f"{self.window_size} is not supported")
        self.chunk_size = int(chunk_size)

    def mask_for(self, input: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
        chunked = chunked_causal_mask(input.size(2), input.size(3), self.chunk_size, input.device)
        return chunked if mask is None else (mask.bool() | chunked)

    def extra_repr(self) -> str:
        return f"chunk_size={self.chunk_size}, scale={self.scale}"


def _positive(value: Any, field: str, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{where}: config.{field}={value!r} must be a positive number")
    return value


class LayerTypeDotProductAttention(DotProductAttention):
    """``DotProductAttention`` that acts by layer type (``no_rope_freq``), as HF Llama 4's attention:

    - RoPE layers with ``config.attention_chunk_size``: the causal mask is chunked (:func:`chunked_causal_mask`,
      :class:`ChunkedCausalScaleMaskSoftmax`);
    - NoPE layers with ``config.attn_temperature_floor_scale``: the query at position ``p`` is multiplied by
      ``1 + attn_temperature_scale * log1p(floor((p + 1) / floor_scale))`` (computed in fp32, cast back to the
      query's dtype) before the scores; positions are the last ``sq`` of the ``sk`` key positions.

    No parameters of its own; other layers behave as the parent.
    """

    def __init__(self, config: Any, layer_number: int, attn_mask_type: Any, attention_type: str,
                 **kwargs: Any) -> None:
        super().__init__(config, layer_number, attn_mask_type, attention_type, **kwargs)
        where = type(self).__name__
        self.nope_layer = is_nope_layer(config, layer_number)
        self.chunk_size: Optional[int] = None
        chunk = getattr(config, "attention_chunk_size", None)
        if chunk is not None and not self.nope_layer:
            if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
                raise ValueError(f"{where}: config.attention_chunk_size={chunk!r} must be a positive integer")
            self.chunk_size = chunk
            parent = self.scale_mask_softmax
            self.scale_mask_softmax = ChunkedCausalScaleMaskSoftmax(
                input_in_fp16=parent.input_in_fp16,
                input_in_bf16=parent.input_in_bf16,
                attn_mask_type=parent.attn_mask_type,
                scaled_masked_softmax_fusion=parent.scaled_masked_softmax_fusion,
                mask_func=parent.mask_func,
                softmax_in_fp32=parent.softmax_in_fp32,
                scale=parent.scale,
                window_size=parent.window_size,
                chunk_size=chunk,
            )
        self.temperature_floor_scale: Optional[float] = None
        floor = getattr(config, "attn_temperature_floor_scale", None)
        if floor is not None and self.nope_layer:
            self.temperature_floor_scale = float(_positive(floor, "attn_temperature_floor_scale", where))
            self.temperature_scale = float(config.attn_temperature_scale)

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                attention_mask: Optional[torch.Tensor], *args: Any, **kwargs: Any):
        if self.temperature_floor_scale is not None:  # query [sq, b, np, hn], key [sk, b, ng, hn]
            sq, sk = query.size(0), key.size(0)
            positions = torch.arange(sk - sq, sk, device=query.device, dtype=torch.float32)
            scales = torch.log1p(torch.floor((positions + 1.0) / self.temperature_floor_scale)) * \
                self.temperature_scale + 1.0
            query = (query * scales.view(sq, 1, 1, 1)).to(query.dtype)
        return super().forward(query, key, value, attention_mask, *args, **kwargs)

    def extra_repr(self) -> str:
        return (f"nope_layer={self.nope_layer}, chunk_size={self.chunk_size}, "
                f"temperature_floor_scale={self.temperature_floor_scale}")


class RopeLayerQKNormSelfAttention(SelfAttention):
    """``SelfAttention`` without q/k norms on NoPE layers (``no_rope_freq``) when ``config.qk_norm_nope_layers`` is
    False: HF Llama 4 L2-normalises queries and keys on RoPE layers only (megatron's ``qk_l2_norm`` spec puts the
    norm on every layer). The L2 norm has no parameters, so no parameter goes missing; a norm with a weight is
    refused."""

    def __init__(self, config: Any, submodules: Any, layer_number: int, *args: Any, **kwargs: Any) -> None:
        super().__init__(config, submodules, layer_number, *args, **kwargs)
        if not getattr(config, "qk_norm_nope_layers", True) and is_nope_layer(config, layer_number):
            for name in ("q_layernorm", "k_layernorm"):
                norm = getattr(self, name, None)
                if norm is not None and any(True for _ in norm.parameters()):
                    raise ValueError(f"{type(self).__name__}: qk_norm_nope_layers=False with a {name} that has "
                                     f"parameters ({type(norm).__name__}); only parameter-free norms (qk_l2_norm) "
                                     "can be left out")
                setattr(self, name, None)


def set_llama3_rope_parameters(model: torch.nn.Module, config: Any) -> None:
    """Recompute ``model.rotary_pos_emb``'s frequencies with llama3 scaling whose ``low_freq_factor`` /
    ``high_freq_factor`` / ``original_max_position_embeddings`` are ``config.rope_scaling_*`` (where set; megatron-core
    builds its ``RotaryEmbedding`` with the fixed 1 / 4 / 8192): megatron's own ``_apply_scaling`` (transformers'
    llama3 formula) on the unscaled frequencies of ``rotary_base``, ``kv_channels`` and ``rotary_percent``. Call it
    on a freshly built model, before its first forward (megatron caches the embedding's output per instance and
    sequence length). A no-op without ``rope_scaling`` or on a chunk without a rotary embedding.

    Raises:
        ValueError: the model's rotary embedding is of another class.
    """
    rope = getattr(model, "rotary_pos_emb", None)
    if rope is None or not config.rope_scaling:
        return
    if type(rope) is not RotaryEmbedding:
        raise ValueError(f"set_llama3_rope_parameters: llama3 factors need a RotaryEmbedding, the model has "
                         f"{type(rope).__name__}")
    low = config.rope_scaling_low_freq_factor
    high = config.rope_scaling_high_freq_factor
    original = config.rope_scaling_original_max_position_embeddings
    dim = config.kv_channels
    if config.rotary_percent < 1.0:
        dim = int(dim * config.rotary_percent)
    device = rope.inv_freq.device
    inv_freq = 1.0 / (config.rotary_base ** (torch.arange(0, dim, 2, dtype=torch.float32, device=device) / dim))
    rope.inv_freq = rope._apply_scaling(
        inv_freq, factor=config.rope_scaling_factor,
        low_freq_factor=1.0 if low is None else float(low),
        high_freq_factor=4.0 if high is None else float(high),
        original_max_position_embeddings=8192 if original is None else int(original))

