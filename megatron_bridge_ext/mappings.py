"""Parameter mappings: how one Megatron parameter relates to one or more HF tensors.

A mapping names its Megatron parameter and its HF tensor(s); names may hold wildcards (``*`` digits, ``**`` anything)
that the registry resolves. Packing maths lives in :mod:`megatron_bridge_ext.ops`; mappings decide what to read and
where it goes.
"""

from __future__ import annotations

import copy
from typing import Dict, Mapping, Union

HFParam = Union[str, Dict[str, str]]

__all__ = ["MegatronParamMapping"]


class MegatronParamMapping:
    """Base class of all mappings.

    Args:
        megatron_param: Megatron parameter name (pattern), e.g. ``decoder.layers.*.mlp.linear_fc2.weight``.
        hf_param: one HF name (pattern) or a dict of role -> HF name (e.g. ``{"q": ..., "k": ..., "v": ...}``).
    """

    def __init__(self, megatron_param: str, hf_param: HFParam) -> None:
        self.megatron_param = megatron_param
        self.hf_param: HFParam = dict(hf_param) if isinstance(hf_param, Mapping) else hf_param

    def with_names(self, megatron_param: str, hf_param: HFParam) -> "MegatronParamMapping":
        """A copy of this mapping with other (e.g. wildcard-resolved) names."""
        clone = copy.copy(self)
        clone.megatron_param = megatron_param
        clone.hf_param = dict(hf_param) if isinstance(hf_param, Mapping) else hf_param
        return clone

    def __repr__(self) -> str:
        return f"{type(self).__name__}(megatron_param={self.megatron_param!r}, hf_param={self.hf_param!r})"
