"""Parameter mappings: pure tensor transforms between one Megatron parameter (or a layer's experts) and HF tensors.

No mapping imports ``torch.distributed`` or megatron-core (``tests/test_package_layout.py`` checks it): the engine
resolves everything rank- and model-specific into the :class:`ConversionContext`.
"""

from megatron_bridge_ext.mappings.attention import (
    ConcatenatedQKVMapping, HeadShardedNormMapping, KeyAsValueQKVMapping, KVMapping, QKVMapping,
)
from megatron_bridge_ext.mappings.base import (
    COLUMN,
    EXPERTS,
    LAYOUTS,
    REPLICATED,
    ROW,
    ConversionContext,
    HFParam,
    HFShapes,
    HFWeights,
    MegatronParamMapping,
    Shape,
    shapes_of,
)
from megatron_bridge_ext.mappings.gated_delta_net import (
    GDNConv1dMapping, GDNInProjMapping, GDNSplitInProjMapping, ZeroCenteredNormMapping,
)
from megatron_bridge_ext.mappings.experts import ExpertFC1Mapping, ExpertFC2Mapping, ExpertMapping, ExpertUpMapping
from megatron_bridge_ext.mappings.linear import (
    AutoMapping,
    ColumnParallelMapping,
    CopiesMapping,
    ReplicatedMapping,
    RowParallelMapping,
    with_copies,
)
from megatron_bridge_ext.mappings.mamba import MambaSplitMapping
from megatron_bridge_ext.mappings.mlp import FusedGatedMLPMapping, GatedMLPMapping

__all__ = [
    "COLUMN", "ROW", "REPLICATED", "EXPERTS", "LAYOUTS",
    "ConversionContext", "MegatronParamMapping", "HFParam", "HFWeights", "HFShapes", "Shape", "shapes_of",
    "ReplicatedMapping", "ColumnParallelMapping", "RowParallelMapping", "AutoMapping", "CopiesMapping",
    "with_copies", "QKVMapping", "KVMapping", "ConcatenatedQKVMapping", "HeadShardedNormMapping",
    "KeyAsValueQKVMapping",
    "GatedMLPMapping", "FusedGatedMLPMapping", "MambaSplitMapping",
    "ExpertMapping", "ExpertFC1Mapping", "ExpertFC2Mapping", "ExpertUpMapping",
    "GDNInProjMapping", "GDNSplitInProjMapping", "GDNConv1dMapping", "ZeroCenteredNormMapping",
]
