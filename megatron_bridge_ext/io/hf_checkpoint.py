"""A local HF checkpoint directory: its config and its lazy tensors, and the side files (tokenizer, generation
config, ...) a converted checkpoint carries along."""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from typing import Any, List, Union

from megatron_bridge_ext.io.hf_source import SafeTensorsSource
from megatron_bridge_ext.io.safetensors import CONFIG_NAME

__all__ = ["HFCheckpoint", "side_files", "copy_side_files"]

# Files of an HF checkpoint directory that are weights (written by the exporter) rather than side files to copy.
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
_WEIGHT_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")


@dataclass
class HFCheckpoint:
    """A local HF checkpoint: its ``config`` (transformers PretrainedConfig) and lazy ``state`` (safetensors)."""

    path: str
    config: Any
    state: SafeTensorsSource

    @property
    def model_name_or_path(self) -> str:
        return self.path

    @classmethod
    def open(cls, path: Union[str, os.PathLike]) -> "HFCheckpoint":
        """Open a checkpoint directory (config.json + safetensors); nothing is read until a tensor is used.

        Raises:
            FileNotFoundError: naming the missing directory or config.json.
        """
        path = os.fspath(path)
        if not os.path.isdir(path):
            raise FileNotFoundError(f"HF checkpoint directory {path!r} does not exist")
        if not os.path.isfile(os.path.join(path, CONFIG_NAME)):
            raise FileNotFoundError(f"HF checkpoint {path!r} has no {CONFIG_NAME}")
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(path, local_files_only=True, trust_remote_code=False)
        return cls(path=path, config=config, state=SafeTensorsSource(path))


def side_files(src_dir: str) -> List[str]:
    """Names of the files of a checkpoint directory that are not weights (config, tokenizer, ...), sorted."""
    return [name for name in sorted(os.listdir(src_dir))
            if os.path.isfile(os.path.join(src_dir, name)) and not name.endswith(_WEIGHT_SUFFIXES)
            and name not in _WEIGHT_INDEXES]


def copy_side_files(src_dir: str, out_dir: str) -> List[str]:
    """Copies every side file of ``src_dir`` into ``out_dir``; returns their names."""
    names = side_files(src_dir)
    for name in names:
        shutil.copyfile(os.path.join(src_dir, name), os.path.join(out_dir, name))
    return names
