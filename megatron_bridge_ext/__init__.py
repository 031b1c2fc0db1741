"""megatron_bridge_ext: HuggingFace <-> Megatron-Core weight conversion on native ops.

Importing the package loads the compiled operator library (``torch.ops.bridge.*``) and re-exports the public API.
The conversion engine (which imports megatron-core and transformers) is loaded on first use.
"""

import importlib
from typing import Any

import torch  # noqa: F401  (loads libtorch before the extension)

from megatron_bridge_ext import _C  # noqa: F401  (registers torch.ops.bridge.*)
from megatron_bridge_ext import ops

__all__ = [
    "ops",
    "AutoBridge",
    "HFCheckpoint",
    "MegatronModelBridge",
    "MegatronMappingRegistry",
    "SafeTensorsSource",
    "SafeTensorsWriter",
    "register_bridge",
]
__version__ = "0.1.0"

_LAZY = {
    "AutoBridge": "megatron_bridge_ext.auto_bridge",
    "HFCheckpoint": "megatron_bridge_ext.io.hf_checkpoint",
    "MegatronModelBridge": "megatron_bridge_ext.engine",
    "MegatronMappingRegistry": "megatron_bridge_ext.registry",
    "SafeTensorsSource": "megatron_bridge_ext.io",
    "SafeTensorsWriter": "megatron_bridge_ext.io",
    "register_bridge": "megatron_bridge_ext.dispatch",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'megatron_bridge_ext' has no attribute {name!r}")
