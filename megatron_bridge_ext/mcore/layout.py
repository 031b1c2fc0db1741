"""The tensor-parallel layout of a Megatron parameter, from its TP attributes or its owning module's class
(local-spec and Transformer Engine modules)."""

from __future__ import annotations

from typing import Dict, Optional, Union

import torch

from megatron_bridge_ext.mappings.base import COLUMN, REPLICATED, ROW
from megatron_bridge_ext.naming import is_fused_norm_param

__all__ = ["detect_layout", "register_module_layout"]

# Module classes whose ``weight`` is column- or row-parallel (row-parallel biases are replicated).
_LAYOUT_BY_CLASS: Dict[str, str] = {
    "ColumnParallelLinear": COLUMN,
    "VocabParallelEmbedding": COLUMN,
    "TEColumnParallelLinear": COLUMN,
    "TELayerNormColumnParallelLinear": COLUMN,
    "TEColumnParallelGroupedLinear": COLUMN,
    "RowParallelLinear": ROW,
    "TERowParallelLinear": ROW,
    "TERowParallelGroupedLinear": ROW,
}


def register_module_layout(module_class: Union[type, str], layout: str) -> None:
    """Declare the TP layout (``column``, ``row`` or ``replicated``) of a module class's weights for AutoMapping."""
    if layout not in (COLUMN, ROW, REPLICATED):
        raise ValueError(f"register_module_layout: layout must be column, row or replicated, got {layout!r}")
    _LAYOUT_BY_CLASS[module_class if isinstance(module_class, str) else module_class.__name__] = layout


def detect_layout(module: Optional[torch.nn.Module], param: Optional[torch.Tensor], param_name: str) -> str:
    """TP layout of a parameter: its ``tensor_model_parallel``/``partition_dim`` attributes, else its module's class.

    Row-parallel biases and ``layer_norm_*`` parameters of fused TE modules are replicated.
    """
    leaf = param_name.rsplit(".", 1)[-1]
    if param is not None and getattr(param, "tensor_model_parallel", False):
        return COLUMN if getattr(param, "partition_dim", 0) == 0 else ROW
    if param is not None and hasattr(param, "tensor_model_parallel"):
        return REPLICATED
    if is_fused_norm_param(param_name):
        return REPLICATED
    if module is not None:
        for cls in type(module).__mro__:
            layout = _LAYOUT_BY_CLASS.get(cls.__name__)
            if layout is not None:
                if layout == ROW and not leaf.startswith("weight"):
                    return REPLICATED
                return layout
    return REPLICATED
