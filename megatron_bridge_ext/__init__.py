"""megatron_bridge_ext: HuggingFace <-> Megatron-Core weight conversion on native ops.

Importing the package loads the compiled operator library (``torch.ops.bridge.*``) and re-exports the public API.
"""

import torch  # noqa: F401  (loads libtorch before the extension)

from megatron_bridge_ext import _C  # noqa: F401  (registers torch.ops.bridge.*)
from megatron_bridge_ext import ops

__all__ = ["ops"]
__version__ = "0.1.0"
