"""The mapping contract: how one Megatron parameter (or one layer's experts) relates to one or more HF tensors.

A mapping names its Megatron parameter and its HF tensor(s); names may hold wildcards (``*`` digits, ``**`` anything)
that the registry resolves. Mappings are pure tensor transforms: they never communicate, read files or look at
Megatron modules (the engine resolves everything rank- and module-specific into the :class:`ConversionContext`), and
the packing maths lives in :mod:`megatron_bridge_ext.ops`:

- ``hf_to_megatron(hf, ctx, out)`` produces this rank's Megatron tensor from (lazy, possibly memory-mapped) HF tensors,
  writing straight into ``out`` (the parameter) when given, and reading only the rows this rank keeps.
- ``megatron_to_hf(shards, ctx)`` turns the tensors of every shard holder (index = TP rank; one tensor for replicated
  parameters) back into HF tensors in one pass.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch

HFParam = Union[str, Dict[str, str]]
HFWeights = Union[torch.Tensor, Dict[str, torch.Tensor]]
Shape = Tuple[int, ...]
#: the shapes of a mapping's HF tensors, structured as its ``hf`` argument: one shape, or role -> shape (a list of
#: shapes for a role that lists one tensor per expert)
HFShapes = Union[Shape, Dict[str, Union[Shape, List[Shape]]]]

__all__ = ["COLUMN", "ROW", "REPLICATED", "EXPERTS", "LAYOUTS", "ConversionContext", "MegatronParamMapping",
           "HFParam", "HFWeights", "HFShapes", "Shape", "shapes_of"]

#: Tensor-parallel layouts of a Megatron parameter. ``experts`` is a layer's routed experts as one stacked tensor per
#: (EP, expert-TP) rank (see :mod:`megatron_bridge_ext.mappings.experts`).
COLUMN, ROW, REPLICATED, EXPERTS = "column", "row", "replicated", "experts"
LAYOUTS = (COLUMN, ROW, REPLICATED, EXPERTS)


@dataclass
class ConversionContext:
    """Where a conversion runs: this rank's position in the parallel layout and the model config.

    Attributes:
        tp_size, tp_rank: tensor-parallel size and rank of this parameter's group (expert-TP for routed experts).
        ep_size, ep_rank: expert-parallel size and rank (routed experts only).
        config: the Megatron TransformerConfig (heads, groups, kv_channels, ...), read by attribute.
        hf_vocab_size: HF vocabulary size, for trimming the padded vocabulary on export.
        padded_vocab_size: Megatron's padded vocabulary size, for zero-padding on import.
        layout: the parameter's resolved TP layout (``column``, ``row``, ``replicated``), used by Auto mappings.
        alloc: where ``megatron_to_hf`` puts the HF tensors it creates: ``alloc(shape, dtype, device)``; None for
            fresh tensors. The engine passes a reused scratch area when the consumer uses each tensor at once.
    """

    tp_size: int = 1
    tp_rank: int = 0
    ep_size: int = 1
    ep_rank: int = 0
    config: Any = None
    hf_vocab_size: Optional[int] = None
    padded_vocab_size: Optional[int] = None
    layout: Optional[str] = None
    alloc: Optional[Callable[[Tuple[int, ...], torch.dtype, torch.device], torch.Tensor]] = None

    def empty(self, shape: Sequence[int], like: torch.Tensor) -> torch.Tensor:
        """A new HF tensor of ``shape`` with ``like``'s dtype and device (from ``alloc`` when set)."""
        if self.alloc is None:
            return like.new_empty(tuple(shape))
        return self.alloc(tuple(shape), like.dtype, like.device)


class MegatronParamMapping:
    """Base class of all mappings.

    Args:
        megatron_param: Megatron parameter name (pattern), e.g. ``decoder.layers.*.mlp.linear_fc2.weight``.
        hf_param: one HF name (pattern) or a dict of role -> HF name (e.g. ``{"q": ..., "k": ..., "v": ...}``).
    """

    #: TP layout of the Megatron parameter; None means "the engine resolves it from the model" (Auto).
    layout: Optional[str] = REPLICATED
    #: Whether :meth:`hf_to_megatron` takes block-quantized HF weights as stored (``ops.QuantizedWeight``) and
    #: dequantizes them with the fused op of its layout (only the rows the rank keeps); others get them dequantized.
    reads_quantized: bool = False
    #: Mappings of routed experts convert a whole layer's experts at once (one op call per rank); see
    #: :class:`megatron_bridge_ext.mappings.experts.ExpertMapping`.
    grouped: bool = False

    def __init__(self, megatron_param: str, hf_param: HFParam) -> None:
        self.megatron_param = megatron_param
        self.hf_param: HFParam = dict(hf_param) if isinstance(hf_param, Mapping) else hf_param

    def with_names(self, megatron_param: str, hf_param: HFParam) -> "MegatronParamMapping":
        """A copy of this mapping with other (e.g. wildcard-resolved) names."""
        clone = copy.copy(self)
        clone.megatron_param = megatron_param
        clone.hf_param = dict(hf_param) if isinstance(hf_param, Mapping) else hf_param
        return clone

    @property
    def hf_names(self) -> List[str]:
        """Every HF tensor name this mapping reads or writes, in the order export yields them."""
        return list(self.hf_param.values()) if isinstance(self.hf_param, dict) else [self.hf_param]

    def resolved_layout(self, ctx: ConversionContext) -> str:
        """The TP layout used on this rank."""
        return self.layout or ctx.layout or REPLICATED

    def hf_to_megatron(
        self, hf: HFWeights, ctx: ConversionContext, out: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        """This rank's Megatron tensor from the HF tensor(s); written into ``out`` when given."""
        raise NotImplementedError(f"{type(self).__name__} does not implement hf_to_megatron")

    def megatron_to_hf(self, shards: Sequence[torch.Tensor], ctx: ConversionContext) -> Dict[str, torch.Tensor]:
        """HF tensors from the tensors of every shard holder (one tensor for a replicated parameter)."""
        raise NotImplementedError(f"{type(self).__name__} does not implement megatron_to_hf")

    def hf_to_megatron_rows(self, hf: HFWeights, ctx: ConversionContext) -> Optional[List[torch.Tensor]]:
        """This rank's Megatron tensor as tensors whose rows, one after the other, are its rows (views of the HF
        tensors, nothing copied), where the mapping can give it so; None otherwise (the default). A caller that
        needs only some rows (the streamed import writing the stored pieces of a gated ``linear_fc1``) then reads
        them without the concatenation :meth:`hf_to_megatron` makes."""
        return None

    # ---- the shape contract: what the conversions make, from shapes alone (geometry, no data, no op call) --------

    def megatron_shape(self, hf: HFShapes, ctx: ConversionContext) -> Shape:
        """The shape of this rank's Megatron tensor that :meth:`hf_to_megatron` makes from HF tensors of shapes
        ``hf`` (structured as its ``hf`` argument; :func:`shapes_of`); for a layer's experts, one local expert's.

        Every mapping of this package computes it from :mod:`megatron_bridge_ext.geometry`. The default, for
        mappings defined elsewhere, runs :meth:`hf_to_megatron` on meta tensors.

        Raises:
            ValueError: shapes the layout cannot split (named), as :meth:`hf_to_megatron` would.
        """
        def meta(x):
            if isinstance(x, dict):
                return {k: meta(v) for k, v in x.items()}
            if isinstance(x, list):
                return [meta(v) for v in x]
            return torch.empty(x, device="meta")

        return tuple(self.hf_to_megatron(meta(hf), ctx).shape)

    def hf_shapes(self, shard: Shape, num_shards: int, ctx: ConversionContext) -> Dict[str, Shape]:
        """HF name -> shape of what :meth:`megatron_to_hf` makes from ``num_shards`` shards of shape ``shard`` (one
        for a replicated parameter), in the order it yields them.

        Every mapping of this package computes it from :mod:`megatron_bridge_ext.geometry`. The default, for
        mappings defined elsewhere, runs :meth:`megatron_to_hf` on meta tensors.
        """
        shards = [torch.empty(shard, device="meta")] * num_shards
        return {name: tuple(t.shape) for name, t in self.megatron_to_hf(shards, ctx).items()}

    def __repr__(self) -> str:
        return f"{type(self).__name__}(megatron_param={self.megatron_param!r}, hf_param={self.hf_param!r})"


def single(hf: HFWeights, mapping: MegatronParamMapping) -> torch.Tensor:
    """The one HF tensor of a single-tensor mapping."""
    if isinstance(hf, dict):
        raise ValueError(f"{mapping!r} expects one HF tensor, got {sorted(hf)}")
    return hf


def write(result: torch.Tensor, out: Optional[torch.Tensor]) -> torch.Tensor:
    """``result`` into ``out`` (when given)."""
    if out is None:
        return result
    out.copy_(result)
    return out


def attention_dims(ctx: ConversionContext):
    """(H, G, d) of the model config in the context."""
    cfg = ctx.config
    if cfg is None:
        raise ValueError("attention mappings need ctx.config (num_attention_heads, num_query_groups, kv_channels)")
    heads = cfg.num_attention_heads
    groups = cfg.num_query_groups or heads
    head_dim = cfg.kv_channels or cfg.hidden_size // heads
    return heads, groups, head_dim


def shapes_of(hf: Any) -> HFShapes:
    """The shapes of HF tensors as a mapping takes them (a tensor, a quantized weight as stored: the shape of the
    parameter it stands for, a list per expert, a dict by role)."""
    if isinstance(hf, dict):
        return {role: shapes_of(v) for role, v in hf.items()}
    if isinstance(hf, (list, tuple)):
        return [tuple(v.shape) for v in hf]
    return tuple(hf.shape)
