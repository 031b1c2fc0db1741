"""Checkpoint I/O: the safetensors format, the lazy HF checkpoint source and the streaming HF writer; Megatron-LM's
distributed checkpoints on disk (:mod:`.megatron_checkpoint`, imported on use: it writes through megatron-core), read
through the restricted ``torch_dist`` reader (:mod:`.dcp_reader`, torch only) and checked against their checksum
manifests (:mod:`.checksums`).

Nothing here imports the mappings or the engine (``tests/test_package_layout.py`` checks it).
"""

from megatron_bridge_ext.io.hf_source import SafeTensorsSource
from megatron_bridge_ext.io.hf_writer import SafeTensorsWriter, save_hf_tensors
from megatron_bridge_ext.io.safetensors import (
    CONFIG_NAME,
    SAFE_WEIGHTS_INDEX_NAME,
    SAFE_WEIGHTS_NAME,
    SAFETENSORS_DTYPES,
)

__all__ = [
    "SafeTensorsSource",
    "SafeTensorsWriter",
    "save_hf_tensors",
    "SAFETENSORS_DTYPES",
    "SAFE_WEIGHTS_NAME",
    "SAFE_WEIGHTS_INDEX_NAME",
    "CONFIG_NAME",
]
