"""AutoBridge: the public entry point from an HF checkpoint directory to Megatron models and back."""

from __future__ import annotations

import json
import os
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Union

import torch
import torch.distributed as dist

from megatron_bridge_ext.engine import DEFAULT_BUCKET_BYTES, HFWeightTuple, MegatronModelBridge
from megatron_bridge_ext.engine.checks import conversion_error
from megatron_bridge_ext.engine.quantize import FP8Export, export_quantization, with_quantization_config
from megatron_bridge_ext.io import CONFIG_NAME, SafeTensorsWriter
from megatron_bridge_ext.io.staging import StagedCheckpoint
from megatron_bridge_ext.io.hf_source import refuse_pickle_only
from megatron_bridge_ext.io.hf_checkpoint import (
    CARRIED_TENSORS, HFCheckpoint, architectures_of, copy_side_files, read_hf_config,
)
from megatron_bridge_ext.io.hf_source import SafeTensorsSource
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

    def __init__(self, hf_pretrained: Optional[HFCheckpoint], model_bridge: MegatronModelBridge) -> None:
        self.hf_pretrained = hf_pretrained
        self.model_bridge = model_bridge

    @classmethod
    def from_architecture(cls, architecture: str) -> "AutoBridge":
        """A bridge without an HF checkpoint (e.g. to export a trained Megatron model): ``config.json`` and the HF
        tensor shapes come from the Megatron side, dtypes from the parameters.

        Raises:
            ValueError: the architecture is not supported (the message lists the supported ones).
        """
        _ensure_models_registered()
        from megatron_bridge_ext.dispatch import get_model_bridge

        return cls(None, get_model_bridge(architecture))

    def _require_hf(self, what: str) -> HFCheckpoint:
        if self.hf_pretrained is None:
            raise ValueError(f"AutoBridge.{what} needs an HF checkpoint (from_hf_pretrained); this bridge was made "
                             f"for {self.model_bridge.hf_architecture} without one")
        return self.hf_pretrained

    @classmethod
    def from_hf_pretrained(cls, path: Union[str, os.PathLike]) -> "AutoBridge":
        """Open a local HF checkpoint and pick the bridge of its architecture (``config.architectures[0]``).

        Checked before any weight is read, in this order: ``config.json`` as written (its architecture is supported,
        before transformers is asked; the fields the family needs are present, before transformers fills in
        defaults), the safetensors headers (see :class:`~megatron_bridge_ext.io.SafeTensorsSource`; pickle-only
        checkpoints are refused), then the config against the tensors' shapes (layers, vocabulary rows, heads x
        head_dim, experts).

        Raises:
            FileNotFoundError: no directory, config.json or weights.
            ValueError: the architecture is not supported (the message lists the supported ones), a missing or bad
                config field, a damaged checkpoint, or a config that disagrees with the tensors (both sides named).
        """
        _ensure_models_registered()
        from megatron_bridge_ext.dispatch import get_model_bridge

        raw = read_hf_config(path)
        refuse_pickle_only(os.fspath(path))
        where = os.path.join(os.fspath(path), CONFIG_NAME)
        archs = architectures_of(raw, where)
        try:
            bridge = get_model_bridge(archs[0])
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from None
        bridge.check_hf_config(raw, where)
        ckpt = HFCheckpoint.open(path, raw_config=raw)
        ckpt.config = bridge.language_model_config(ckpt.config)
        bridge.check_hf_checkpoint(ckpt)
        return cls(ckpt, bridge)

    @classmethod
    def list_supported_models(cls) -> List[str]:
        """Names of the HF architectures with a registered bridge."""
        _ensure_models_registered()
        from megatron_bridge_ext.dispatch import supported_architectures

        return supported_architectures()

    @property
    def hf_config(self) -> Any:
        """The HF config of the checkpoint (None for a bridge made without one)."""
        return None if self.hf_pretrained is None else self.hf_pretrained.config

    def transformer_config(self, **overrides: Any):
        """Megatron TransformerConfig for this checkpoint; parallel sizes default to the current parallel_state."""
        for key, value in current_parallel_sizes().items():
            overrides.setdefault(key, value)
        return self.model_bridge.transformer_config(self._require_hf("transformer_config").config, **overrides)

    def to_megatron_model(
        self,
        load_weights: bool = True,
        allowed_mismatched_params: Optional[Sequence[str]] = None,
        allowed_unused_hf_params: Optional[Sequence[str]] = None,
        **overrides: Any,
    ) -> List[torch.nn.Module]:
        """This rank's GPTModel chunk(s) under the current megatron parallel_state (one per virtual stage).

        Args:
            load_weights: fill them from the checkpoint.
            allowed_mismatched_params: globs of Megatron names whose shape mismatch is tolerated (with a warning).
            allowed_unused_hf_params: globs of HF tensors the model may leave unused (see :meth:`load_hf_weights`).
            **overrides: TransformerConfig fields (e.g. ``params_dtype=torch.float32``).
        """
        from megatron_bridge_ext.mcore.model_builder import build_model_chunks

        config = self.transformer_config(**overrides)
        chunks = build_model_chunks(config, self.hf_config.vocab_size, _max_seq_len(self.hf_config))
        if load_weights:
            self.load_hf_weights(chunks, allowed_mismatched_params=allowed_mismatched_params,
                                 allowed_unused_hf_params=allowed_unused_hf_params)
        return chunks

    def load_hf_weights(
        self,
        model: Union[torch.nn.Module, Sequence[torch.nn.Module]],
        allowed_mismatched_params: Optional[Sequence[str]] = None,
        show_progress: Optional[bool] = None,
        allowed_unused_hf_params: Optional[Sequence[str]] = None,
    ) -> List[torch.nn.Module]:
        """Load the checkpoint into existing Megatron chunk(s); each rank reads only what it keeps.

        Every HF tensor must be consumed by a mapping of the model: an unused one fails the import, named, unless a
        pattern of ``allowed_unused_hf_params`` covers it (default: the bridge's ``known_non_weights``, e.g.
        ``*.rotary_emb.inv_freq``; pass ``[]`` to allow none).
        """
        return self.model_bridge.load_weights_hf_to_megatron(
            self._require_hf("load_hf_weights"), model, allowed_mismatched_params=allowed_mismatched_params,
            show_progress=show_progress, allowed_unused_hf_params=allowed_unused_hf_params,
        )

    def save_megatron_checkpoint(
        self,
        out_dir: Union[str, os.PathLike],
        *,
        spec: str = "te",
        dtype: Optional[torch.dtype] = None,
        layout: Optional[Dict[str, Any]] = None,
        buffer_bytes: Optional[int] = None,
        overwrite: bool = False,
        resume: bool = False,
        show_progress: bool = False,
        allowed_unused_hf_params: Optional[Sequence[str]] = None,
        **kwargs: Any,
    ) -> Dict[str, Any]:
        """Convert the HF checkpoint into a Megatron ``torch_dist`` checkpoint at ``out_dir`` as a stream: no model
        is built, memory is bounded by ``buffer_bytes`` plus the largest parameter (collective over the default
        process group: each rank converts a share). See :func:`megatron_bridge_ext.engine.stream.stream_hf_to_megatron`
        for the arguments and what it returns."""
        from megatron_bridge_ext.engine.stream import DEFAULT_BUFFER_BYTES, stream_hf_to_megatron

        hf = self._require_hf("save_megatron_checkpoint")
        return stream_hf_to_megatron(
            self, hf.path, os.fspath(out_dir), max_seq_len=_max_seq_len(self.hf_config), spec=spec, dtype=dtype,
            layout=layout, buffer_bytes=DEFAULT_BUFFER_BYTES if buffer_bytes is None else int(buffer_bytes),
            overwrite=overwrite, resume=resume, show=show_progress,
            allowed_unused_hf_params=allowed_unused_hf_params, **kwargs)

    def export_hf_weights(
        self,
        model: Union[torch.nn.Module, Sequence[torch.nn.Module]],
        *,
        bucket_bytes: int = DEFAULT_BUCKET_BYTES,
        dst: Union[int, str] = 0,
        show_progress: Optional[bool] = None,
        copy: bool = True,
        quantization: Optional[str] = None,
        quantization_rule: Optional[str] = None,
        quantization_block_size: Optional[Sequence[int]] = None,
    ) -> Iterator[HFWeightTuple]:
        """Generator of ``(hf_name, tensor)``; every rank must iterate it, tensors arrive on ``dst`` (or ``"all"``).

        With ``copy=False`` tensors that need no conversion are views valid until the next item (see
        :meth:`MegatronModelBridge.stream_weights_megatron_to_hf`). ``quantization="fp8"``: the linear weights
        arrive in FP8, each followed by its ``weight_scale_inv`` (see :meth:`save_hf_pretrained`).

        Raises:
            ValueError: bad quantization settings (named), before anything is exchanged.
        """
        quant = export_quantization(quantization, quantization_rule, quantization_block_size,
                                    where="AutoBridge.export_hf_weights")
        return self.model_bridge.stream_weights_megatron_to_hf(
            model, self.hf_pretrained, bucket_bytes=bucket_bytes, dst=dst, show_progress=show_progress, copy=copy,
            quantization=quant,
        )  # without an HF source (from_architecture) tensors keep the parameters' dtypes

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
        side_files: Optional[str] = None,
        config_extra: Optional[Dict[str, Any]] = None,
        materialize: Any = None,
        quantization: Optional[str] = None,
        quantization_rule: Optional[str] = None,
        quantization_block_size: Optional[Sequence[int]] = None,
        before_commit: Optional[Callable[[], Any]] = None,
    ) -> Optional[Dict[str, Any]]:
        """Write the model as an HF checkpoint (config.json and other small files, sharded safetensors).

        Every rank must call it; global rank 0 writes. The checkpoint is written into a staging directory beside
        ``out_dir`` (side files first, then the weights, the index last) and swapped in whole when complete
        (:class:`~megatron_bridge_ext.io.staging.StagedCheckpoint`): after a failure at any point ``out_dir`` holds
        the old checkpoint unchanged (or nothing, if there was none), never a mix. Files of an old ``out_dir`` that
        are not weights are kept; its weights of any format are replaced (named in the summary's ``replaced``).
        Saving into the source checkpoint's directory (or an ancestor of it) is refused. Each tensor goes to its
        place in its shard's file as it arrives; a shard is (fsynced, unless ``fsync=False``, and) renamed when
        complete; the index is written only when every expected tensor arrived (strict).

        With an HF source checkpoint its dtypes and key set are reproduced and its side files (config.json, tokenizer,
        ...) copied. Without one (:meth:`from_architecture`) the tensors keep the parameters' dtypes and
        ``config.json`` is generated from the Megatron config (the bridge's ``megatron_to_hf_config``), with
        ``config_extra`` (e.g. ``bos_token_id`` / ``eos_token_id``) added, and the files of ``side_files`` (a
        directory of tokenizer and other side files, e.g. those ``import`` kept) are copied first.

        ``materialize``: a one-process model on the meta device whose parameters are read bucket by bucket (the
        streamed export of a Megatron checkpoint, :class:`megatron_bridge_ext.mcore.stream.CheckpointParams`).

        ``quantization="fp8"`` writes DeepSeek-V3's FP8 layout (:mod:`megatron_bridge_ext.engine.quantize`): every 2-D
        linear ``*.weight`` in ``float8_e4m3fn`` with its ``*.weight_scale_inv`` (float32, one per
        ``quantization_block_size`` block, default ``(128, 128)``, partial at the edges); embeddings, output layer,
        norms, routers, biases, 1-D and 3-D tensors as the plain export writes them; ``config.json`` with
        DeepSeek-V3's ``quantization_config`` (+ ``modules_to_not_convert``). ``quantization_rule``:
        ``"transformers"`` (default: transformers' own FP8 quantizer, so transformers quantizing the plain export
        gives the same bytes) or ``"deepseek"``. Without a quantization, a ``quantization_config`` in the source's
        ``config.json`` is not written (the weights are not quantized).

        ``before_commit``: called on rank 0 once every file is written (and fsynced), before the swap; an exception
        from it aborts the save like any other failure (the streamed export's check of its source's checksums, run
        beside the conversion).

        Returns:
            On rank 0, a summary dict (``files``, ``total_size``, ``index``, ``missing``, ``replaced``, ``carried``,
            ``cleaned``, ``not_exported``: source tensors no mapping produces, such as allowed non-weights,
            ``carried_tensors``: the source's tensors of the bridge's ``carried_hf_params``, written unchanged); None
            elsewhere.

        Raises:
            ValueError: ``out_dir`` is (or contains) the source checkpoint; missing tensors (strict); bad quantization
                settings (named; checked before anything is written or exchanged).
            OSError: no space left, naming the path and the bytes needed.
        """
        quant = export_quantization(quantization, quantization_rule, quantization_block_size,
                                    where="AutoBridge.save_hf_pretrained")
        out_dir = os.fspath(out_dir)
        if self.hf_pretrained is None and self.model_bridge.hf_source_needed and _carried_file(side_files) is None:
            # every rank refuses alike, before anything is exchanged
            raise ValueError(f"AutoBridge.save_hf_pretrained: {type(self.model_bridge).__name__} exports only with "
                             "its source checkpoint (from_hf_pretrained) or the side files an import kept beside a "
                             f"Megatron checkpoint (side_files=iter_.../hf, holding {CARRIED_TENSORS}): "
                             f"{self.model_bridge.hf_source_needed}")
        rank0 = not dist.is_initialized() or dist.get_rank() == 0
        with self.model_bridge.watch("save_hf_pretrained") as watch:
            staged = None
            if rank0:
                # checks (source directory, mount point, a save in progress, leftovers) before any collective
                protect = [self.hf_pretrained.path] if self.hf_pretrained is not None else []
                staged = StagedCheckpoint(out_dir, protect=protect)
            try:
                watch.barrier("save_hf_pretrained: start")  # rank 0's refusal reaches every rank here
                summary = self._save(model, staged, watch, max_shard_bytes, bucket_bytes, strict, show_progress,
                                     fsync, side_files, config_extra, materialize, quant, before_commit)
                watch.barrier("save_hf_pretrained: committed")  # every rank returns only once rank 0 swapped it in
            except BaseException:
                if staged is not None:
                    staged.abort()  # a no-op once committed
                raise
        return summary

    def _save(self, model, staged: Optional[StagedCheckpoint], watch, max_shard_bytes: int, bucket_bytes: int,
              strict: bool, show_progress: Optional[bool], fsync: bool, side_files: Optional[str] = None,
              config_extra: Optional[Dict[str, Any]] = None, materialize: Any = None,
              quant: Optional[FP8Export] = None,
              before_commit: Optional[Callable[[], Any]] = None) -> Optional[Dict[str, Any]]:
        watch.set_phase("save_hf_pretrained: conversion tasks")
        src = self.hf_pretrained.state if self.hf_pretrained is not None else None
        # collective: every rank builds them, once, with the source's copies (a stored tied output layer)
        tasks = self.model_bridge.build_conversion_tasks(None, model,
                                                         stored_keys=None if src is None else src.keys())
        stream = self.model_bridge.stream_weights_megatron_to_hf(
            model, self.hf_pretrained, bucket_bytes=bucket_bytes, dst=0, show_progress=show_progress,
            conversion_tasks=tasks, copy=False,  # the writer puts each tensor in its file at once
            materialize=materialize, quantization=quant,
        )
        if staged is None:
            for _ in stream:
                pass
            return None
        not_exported: List[str] = []
        carried: List[str] = []
        carried_src: Optional[SafeTensorsSource] = None
        if self.hf_pretrained is None:
            expected = self.model_bridge.hf_tensor_specs(model, conversion_tasks=tasks)
            kept_file = _carried_file(side_files) if self.model_bridge.carried_hf_params else None
            if kept_file is not None:  # the carried tensors an import kept beside the Megatron checkpoint
                carried_src = SafeTensorsSource(kept_file)
                carried = list(carried_src.keys())
                expected.update({k: (carried_src.shape(k), carried_src.dtype(k)) for k in carried})
        else:
            # Plan shards in the order tensors will arrive, so each shard is written as soon as possible.
            order = [name for task in tasks for name in task.mapping.hf_names]
            produced = set(order)
            not_exported = [k for k in src.keys() if k not in produced]  # allowed non-weights: nothing maps them
            carried = self.model_bridge.carried_hf(not_exported)
            kept_apart = set(carried)
            not_exported = [k for k in not_exported if k not in kept_apart]
            expected = {k: (src.shape(k), src.dtype(k)) for k in order + carried if k in src}
        kept = [(k, shape) for k, (shape, _) in expected.items()]
        if quant is not None:
            expected = quant.expand_specs(expected)
        # The new checkpoint is written beside out_dir and swapped in whole when complete: a failure at any point
        # leaves out_dir as it was (see io/staging.py). Side files first, weights, the index last, then the swap.
        watch.set_phase("save_hf_pretrained: side files")
        if self.hf_pretrained is None:
            if side_files is not None:  # the source's tokenizer etc.; config.json is written from the model next
                copy_side_files(side_files, staged.path, fsync=fsync)
            if carried_src is not None and self.model_bridge.hf_source_needed:
                # the family's config.json only its source can write (a vision_config): the kept one, as it is
                _describe_weights(os.path.join(staged.path, CONFIG_NAME), quant, kept, fsync)
            else:
                self._write_config(model, staged.path, fsync=fsync, extra=config_extra, quant=quant, kept=kept)
        else:
            copy_side_files(self.hf_pretrained.path, staged.path, fsync=fsync)
            _describe_weights(os.path.join(staged.path, CONFIG_NAME), quant, kept, fsync)
        with SafeTensorsWriter(staged.path, expected, max_shard_bytes=max_shard_bytes, strict=strict,
                               fsync=fsync, atomic=False) as writer:
            for name, tensor in stream:
                try:
                    writer.add(name, tensor)
                except Exception as e:
                    if getattr(e, "bridge_context", False) or isinstance(e, OSError):
                        raise
                    raise conversion_error(e, f"writing HF tensor {name} to {staged.target}") from e
                tensor = None  # written: not held while the stream makes the next one
            held = src if carried_src is None else carried_src
            for name in carried:  # the source's carried tensors (a vision tower), unchanged, one at a time
                writer.add(name, held[name])
            summary = writer.close()
        if carried_src is not None:
            carried_src.close()
        if before_commit is not None:
            watch.set_phase("save_hf_pretrained: before the swap")
            before_commit()
        watch.set_phase("save_hf_pretrained: swap")
        summary.update(staged.commit())
        summary["not_exported"] = not_exported
        summary["carried_tensors"] = carried
        summary["files"] = [os.path.join(staged.target, os.path.basename(f)) for f in summary["files"]]
        if summary.get("index"):
            summary["index"] = os.path.join(staged.target, os.path.basename(summary["index"]))
        return summary

    def _write_config(self, model: Union[torch.nn.Module, Sequence[torch.nn.Module]], out_dir: str,
                      fsync: bool = True, extra: Optional[Dict[str, Any]] = None, quant: Optional[FP8Export] = None,
                      kept: Sequence[Any] = ()) -> None:
        from megatron_bridge_ext.mcore.names import as_chunks, model_config

        config = self.model_bridge.megatron_to_hf_config(model_config(as_chunks(model)))
        config.update(extra or {})
        _write_json(os.path.join(out_dir, CONFIG_NAME), with_quantization_config(config, quant, kept), fsync)


def _carried_file(side_files: Optional[str]) -> Optional[str]:
    """The carried tensors an import kept in a side-file directory (its :data:`CARRIED_TENSORS`), or None."""
    if side_files is None:
        return None
    path = os.path.join(os.fspath(side_files), CARRIED_TENSORS)
    return path if os.path.isfile(path) else None


def _write_json(path: str, data: Dict[str, Any], fsync: bool) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2, sort_keys=True)
        f.write("\n")
        f.flush()
        if fsync:
            os.fsync(f.fileno())
    os.replace(tmp, path)


def _describe_weights(path: str, quant: Optional[FP8Export], kept: Sequence[Any], fsync: bool) -> None:
    """The copied source ``config.json`` given the FP8 export's ``quantization_config`` (a plain export needs
    nothing: ``copy_side_files`` never carries a source's ``quantization_config`` over)."""
    if quant is None or not os.path.isfile(path):
        return
    with open(path, "r", encoding="utf-8") as f:
        config = json.load(f)
    _write_json(path, with_quantization_config(config, quant, kept), fsync)


def _max_seq_len(hf_config: Any) -> int:
    return int(getattr(hf_config, "max_position_embeddings", 0) or 4096)
