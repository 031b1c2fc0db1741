"""The conversion engine: entry points (:mod:`.bridge`), tasks with the global order and metadata (:mod:`.tasks`),
the export transport (:mod:`.transport`) and the reusable weight-sync plan (:mod:`.sync`)."""

from megatron_bridge_ext.engine.bridge import (
    DEFAULT_BUCKET_BYTES,
    HFWeightTuple,
    MegatronModelBridge,
    MegatronWeightTuple,
)
from megatron_bridge_ext.engine.tasks import GlobalOrder, ParamMeta, WeightConversionTask
from megatron_bridge_ext.engine.transport import BucketPlan, Transport
from megatron_bridge_ext.engine.sync import WeightSyncPlan

__all__ = [
    "MegatronModelBridge",
    "WeightConversionTask",
    "MegatronWeightTuple",
    "HFWeightTuple",
    "DEFAULT_BUCKET_BYTES",
    "GlobalOrder",
    "ParamMeta",
    "BucketPlan",
    "Transport",
    "WeightSyncPlan",
]
