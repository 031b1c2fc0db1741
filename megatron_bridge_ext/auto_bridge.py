"""AutoBridge: the public entry point from an HF checkpoint directory to Megatron models and back."""

from __future__ import annotations

import os
from typing import Any, Dict, Iterator, List, Optional, Sequence, Union

import torch
import torch.distributed as dist

from megatron_bridge_ext.engine import DEFAULT_BUCKET_BYTES, HFWeightTuple, MegatronModelBridge
from megatron_bridge_ext.io import SafeTensorsWriter
from megatron_bridge_ext.io.hf_checkpoint import HFCheckpoint, copy_side_files
from megatron_bridge_ext.mcore.topology import current_parallel_sizes

__all__ = ["AutoBridge", "HFCheckpoint"]


def _ensure_models_registered() -> None:
    import megatron_bridge_ext.models  # noqa: F401  (registers every model bridge)


class AutoBridge:
    """Convert between an HF checkpoint and Megatron-Core models for any registered architecture.

    Example::

        bridge = AutoBridge.from_hf_pretrained("/ckpt/llama")
        chunks = bridge.to_megatron_model()              # under the current megatron parallel_state
        ...
        bridge.save_hf_pretrained(chunks, "/out/llama")  # every rank calls it; rank 0 writes
    """

    def __init__(self, hf_pretrained: HFCheckpoint, model_bridge: MegatronModelBridge) -> None:
        self.hf_pretrained = hf_pretrained
        self.model_bridge = model_bridge

    @classmethod
    def from_hf_pretrained(cls, path: Union[str, os.PathLike]) -> "AutoBridge":
        """Open a local HF checkpoint and pick the bridge of its architecture (``config.architectures[0]``).

        Raises:
            ValueError: the architecture is not supported (the message lists the supported ones).
        """
        _ensure_models_registered()
        from megatron_bridge_ext.dispatch import get_model_bridge

        ckpt = HFCheckpoint.open(path)
        archs = list(getattr(ckpt.config, "architectures", None) or [])
        if not archs:
            raise ValueError(f"{path}: config.json has no 'architectures' entry; cannot choose a bridge")
        return cls(ckpt, get_model_bridge(archs[0]))

    @classmethod
    def list_supported_models(cls) -> List[str]:
        """Names of the HF architectures with a registered bridge."""
        _ensure_models_registered()
        from megatron_bridge_ext.dispatch import supported_architectures

        return supported_architectures()

    @property
    def hf_config(self) -> Any:
        return self.hf_pretrained.config

    def transformer_config(self, **overrides: Any):
        """Megatron TransformerConfig for this checkpoint; parallel sizes default to the current parallel_state."""
        for key, value in current_parallel_sizes().items():
            overrides.setdefault(key, value)
        return self.model_bridge.transformer_config(self.hf_config, **overrides)

    def to_megatron_model(
        self,
        load_weights: bool = True,
        allowed_mismatched_params: Optional[Sequence[str]] = None,
        **overrides: Any,
    ) -> List[torch.nn.Module]:
        """This rank's GPTModel chunk(s) under the current megatron parallel_state (one per virtual stage).

        Args:
            load_weights: fill them from the checkpoint.
            allowed_mismatched_params: globs of Megatron names whose shape mismatch is tolerated (with a warning).
            **overrides: TransformerConfig fields (e.g. ``params_dtype=torch.float32``).
        """
        from megatron_bridge_ext.mcore.model_builder import build_model_chunks

        config = self.transformer_config(**overrides)
        chunks = build_model_chunks(config, self.hf_config.vocab_size, _max_seq_len(self.hf_config))
        if load_weights:
            self.load_hf_weights(chunks, allowed_mismatched_params=allowed_mismatched_params)
        return chunks

    def load_hf_weights(
        self,
        model: Union[torch.nn.Module, Sequence[torch.nn.Module]],
        allowed_mismatched_params: Optional[Sequence[str]] = None,
        show_progress: Optional[bool] = None,
    ) -> List[torch.nn.Module]:
        """Load the checkpoint into existing Megatron chunk(s); each rank reads only what it keeps."""
        return self.model_bridge.load_weights_hf_to_megatron(
            self.hf_pretrained, model, allowed_mismatched_params=allowed_mismatched_params, show_progress=show_progress
        )

    def export_hf_weights(
        self,
        model: Union[torch.nn.Module, Sequence[torch.nn.Module]],
        *,
        bucket_bytes: int = DEFAULT_BUCKET_BYTES,
        dst: Union[int, str] = 0,
        show_progress: Optional[bool] = None,
        copy: bool = True,
    ) -> Iterator[HFWeightTuple]:
        """Generator of ``(hf_name, tensor)``; every rank must iterate it, tensors arrive on ``dst`` (or ``"all"``).

        With ``copy=False`` tensors that need no conversion are views valid until the next item (see
        :meth:`MegatronModelBridge.stream_weights_megatron_to_hf`).
        """
        return self.model_bridge.stream_weights_megatron_to_hf(
            model, self.hf_pretrained, bucket_bytes=bucket_bytes, dst=dst, show_progress=show_progress, copy=copy
        )

    def save_hf_pretrained(
        self,
        model: Union[torch.nn.Module, Sequence[torch.nn.Module]],
        out_dir: Union[str, os.PathLike],
        *,
        max_shard_bytes: int = 2 * 1024**3,
        bucket_bytes: int = DEFAULT_BUCKET_BYTES,
        strict: bool = True,
        show_progress: Optional[bool] = None,
        fsync: bool = True,
    ) -> Optional[Dict[str, Any]]:
        """Write the model as an HF checkpoint (config.json and other small files, sharded safetensors).

        Every rank must call it; global rank 0 writes. Each tensor goes to its place in its shard's file as it arrives;
        a shard is (fsynced, unless ``fsync=False``, and) renamed when complete; the index is written last, and only
        when every expected tensor arrived (strict).

        Returns:
            On rank 0, a summary dict (``tensors``, ``bytes``, ``files``); None elsewhere.
        """
        out_dir = os.fspath(out_dir)
        rank0 = not dist.is_initialized() or dist.get_rank() == 0
        tasks = self.model_bridge.build_conversion_tasks(None, model)  # collective: every rank builds them
        stream = self.model_bridge.stream_weights_megatron_to_hf(
            model, self.hf_pretrained, bucket_bytes=bucket_bytes, dst=0, show_progress=show_progress,
            conversion_tasks=tasks, copy=False,  # the writer puts each tensor in its file at once
        )
        if not rank0:
            for _ in stream:
                pass
            return None
        src = self.hf_pretrained.state
        # Plan shards in the order tensors will arrive, so each shard is written as soon as possible.
        order = [name for task in tasks for name in task.mapping.hf_names]
        tied_name = self.model_bridge.tied_output_hf_name
        if tied_name in src and tied_name not in order:
            order.append(tied_name)
        order += [k for k in src.keys() if k not in set(order)]
        expected = {k: (src.shape(k), src.dtype(k)) for k in order if k in src}
        with SafeTensorsWriter(out_dir, expected, max_shard_bytes=max_shard_bytes, strict=strict,
                               fsync=fsync) as writer:
            for name, tensor in stream:
                writer.add(name, tensor)
            summary = writer.close()
        copy_side_files(self.hf_pretrained.path, out_dir)
        return summary


def _max_seq_len(hf_config: Any) -> int:
    return int(getattr(hf_config, "max_position_embeddings", 0) or 4096)
