"""A local HF checkpoint directory: its config and its lazy tensors, and the side files (tokenizer, generation
config, ...) a converted checkpoint carries along."""

from __future__ import annotations

import errno
import json
import os
import shutil
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Union

from megatron_bridge_ext.io.hf_source import SafeTensorsSource, refuse_pickle_only
from megatron_bridge_ext.io.quantized import QuantizedSource, open_source, strip_quantization
from megatron_bridge_ext.io.safetensors import CONFIG_NAME, read_json_object
from megatron_bridge_ext.io import staging
from megatron_bridge_ext.io.staging import _TEMP_RE, interrupted_save_hint, is_weight_file, no_space_error

__all__ = ["HFCheckpoint", "read_hf_config", "architectures_of", "hf_config_of", "CONFIG_ALIASES", "side_files",
           "copy_side_files", "CARRIED_TENSORS", "carried_names", "write_carried"]

#: the side file of a Megatron checkpoint's ``hf/`` directory holding the source's carried tensors (a
#: vision-language checkpoint's vision tower: what the family does not convert), for an export without the source
CARRIED_TENSORS = "carried.safetensors"

#: ``model_type`` values of released checkpoints that transformers has no config class for, mapped to the model type
#: whose class reads them: the release's own architecture is that model's (Kimi-K2 is DeepSeek-V3 at 384 experts,
#: ``architectures: ["DeepseekV3ForCausalLM"]``, its ``auto_map`` pointing at code in the checkpoint). The config is
#: built from config.json by that class; the checkpoint's own code is never imported (``trust_remote_code`` stays off).
CONFIG_ALIASES = {"kimi_k2": "deepseek_v3"}

def read_hf_config(path: Union[str, os.PathLike]) -> Dict[str, Any]:
    """The raw ``config.json`` of a checkpoint directory, as written (before transformers fills in defaults).

    Raises:
        FileNotFoundError: naming the missing directory or config.json.
        ValueError: corrupt JSON, a field given twice, or not a JSON object (the file named).
    """
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"HF checkpoint directory {path!r} does not exist{interrupted_save_hint(path)}")
    cfg = os.path.join(path, CONFIG_NAME)
    if not os.path.isfile(cfg):
        raise FileNotFoundError(f"HF checkpoint {path!r} has no {CONFIG_NAME}")
    return read_json_object(cfg, CONFIG_NAME)


def architectures_of(raw_config: Mapping[str, Any], where: str) -> List[str]:
    """The ``architectures`` list of a raw config.

    Raises:
        ValueError: absent, empty or not a list of strings (``where`` names the file).
    """
    archs = raw_config.get("architectures")
    if not isinstance(archs, list) or not archs or not all(isinstance(a, str) and a for a in archs):
        raise ValueError(f"{where}: 'architectures' is {archs!r}; expected a non-empty list of class names (it "
                         "chooses the bridge)")
    return list(archs)


def hf_config_of(path: Union[str, os.PathLike], raw_config: Optional[Mapping[str, Any]] = None) -> Any:
    """The transformers config of a checkpoint directory, without running any code of the checkpoint.

    A ``model_type`` transformers knows is read by ``AutoConfig`` (``trust_remote_code=False``); one of
    :data:`CONFIG_ALIASES` is built from the raw config.json by the aliased model's config class (``auto_map`` and
    the model type dropped: the result is that model's config, which transformers' model classes accept).

    Raises:
        ValueError: an unknown ``model_type`` (named, with the file), from transformers.
    """
    path = os.fspath(path)
    raw = read_hf_config(path) if raw_config is None else raw_config
    alias = CONFIG_ALIASES.get(raw.get("model_type"))
    if alias is None:
        from transformers import AutoConfig

        return AutoConfig.from_pretrained(path, local_files_only=True, trust_remote_code=False)
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    fields = {k: v for k, v in raw.items() if k not in ("model_type", "auto_map", "transformers_version")}
    return CONFIG_MAPPING[alias](**fields)


@dataclass
class HFCheckpoint:
    """A local HF checkpoint: its ``config`` (transformers PretrainedConfig), lazy ``state`` (safetensors; a
    block-quantized release is read through :class:`~megatron_bridge_ext.io.quantized.QuantizedSource`, as its
    dequantized weights) and the ``raw_config`` (``config.json`` as written)."""

    path: str
    config: Any
    state: Union[SafeTensorsSource, QuantizedSource]
    raw_config: Optional[Dict[str, Any]] = None

    @property
    def model_name_or_path(self) -> str:
        return self.path

    @property
    def config_path(self) -> str:
        return os.path.join(self.path, CONFIG_NAME)

    @classmethod
    def open(cls, path: Union[str, os.PathLike], raw_config: Optional[Dict[str, Any]] = None) -> "HFCheckpoint":
        """Open a checkpoint directory (config.json + safetensors); nothing is read until a tensor is used.

        The safetensors headers are validated before transformers reads the config; a directory with only pickle
        weights is refused (never unpickled). An FP8 block-scaled or MXFP4 checkpoint (``quantization_config``) is
        read as its dequantized weights (:mod:`megatron_bridge_ext.io.quantized`), its scales checked first.

        Raises:
            FileNotFoundError: naming the missing directory, config.json or weights.
            ValueError: a corrupt config.json or safetensors file, pickle-only weights.
        """
        path = os.fspath(path)
        raw = read_hf_config(path) if raw_config is None else raw_config
        refuse_pickle_only(path)
        plain = SafeTensorsSource(path)
        try:
            state = open_source(plain, raw, os.path.join(path, CONFIG_NAME))
        except BaseException:
            plain.close()
            raise
        try:
            config = hf_config_of(path, raw)
        except BaseException:
            state.close()
            raise
        return cls(path=path, config=config, state=state, raw_config=raw)


def side_files(src_dir: str) -> List[str]:
    """Names of the files of a checkpoint directory that are not weights (config, tokenizer, ...), sorted; weights
    and indexes of any format and temporary files of killed saves are left out."""
    return [name for name in sorted(os.listdir(src_dir))
            if os.path.isfile(os.path.join(src_dir, name)) and not is_weight_file(name) and not _TEMP_RE.match(name)]


def copy_side_files(src_dir: str, out_dir: str, fsync: bool = True) -> List[str]:
    """Copies every side file of ``src_dir`` into ``out_dir`` (each flushed to disk unless ``fsync=False``); returns
    their names.

    The ``quantization_config`` of a block-quantized source's ``config.json`` is not carried over: this package
    writes the weights dequantized (an FP8 export writes its own).

    Raises:
        OSError: "no space left" naming the file and the bytes needed.
    """
    names = side_files(src_dir)
    for i, name in enumerate(names):
        dst = os.path.join(out_dir, name)
        try:
            raw = read_json_object(os.path.join(src_dir, name), name) if name == CONFIG_NAME else None
            if raw is not None and "quantization_config" in raw:
                with open(dst, "w") as f:
                    json.dump(strip_quantization(raw), f, indent=2, sort_keys=True)
                    f.write("\n")
            else:
                shutil.copyfile(os.path.join(src_dir, name), dst)
            if fsync:
                with open(dst, "rb+") as f:
                    os.fsync(f.fileno())
        except OSError as e:
            if e.errno in (errno.ENOSPC, errno.EDQUOT):
                needed = sum(os.path.getsize(os.path.join(src_dir, n)) for n in names[i:])
                raise no_space_error(e, dst, needed, f"side file {name}") from None
            raise
    staging._crash_point("after_side_files")
    return names


def carried_names(names: Any, patterns: Any) -> List[str]:
    """The names matching one of the fnmatch ``patterns``, in their order."""
    import fnmatch

    return [n for n in names if any(fnmatch.fnmatchcase(n, p) for p in patterns)]


def write_carried(src_dir: str, out_dir: str, patterns: Any) -> List[str]:
    """Write the tensors of the checkpoint ``src_dir`` matching ``patterns`` unchanged into
    ``out_dir/``:data:`CARRIED_TENSORS` (nothing when none match); returns their names."""
    from safetensors.torch import save_file

    with SafeTensorsSource(src_dir) as src:
        names = carried_names(src.keys(), patterns)
        if names:
            save_file({n: src[n].contiguous() for n in names}, os.path.join(out_dir, CARRIED_TENSORS),
                      metadata={"format": "pt"})
    return names
