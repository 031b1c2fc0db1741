"""The import loop (HF -> Megatron), mixed into :class:`~megatron_bridge_ext.engine.bridge.MegatronModelBridge`.

Every rank walks its own tasks in the global order (:mod:`.tasks`), reads from the lazy, memory-mapped HF source
only the rows it keeps, and packs them straight into the parameters with the fused ops (a layer's routed experts with
one call). No collective is needed except the tied-embedding broadcast to the last pipeline stage.

The loop uses what the bridge provides: its tasks and contexts (``_tasks``, ``_context``), its mapping table and the
family's read hook (``maybe_modify_loaded_hf_weight``).
"""

from __future__ import annotations

import dataclasses
import fnmatch
import warnings
from collections.abc import Mapping
from typing import Any, Iterator, List, NamedTuple, Optional, Sequence, Tuple, Union

import torch

from megatron_bridge_ext import ops
from megatron_bridge_ext.engine.checks import (
    ROTARY_INV_FREQ,
    check_dtype_class,
    check_rotary_inv_freq,
    conversion_error,
    short_names,
    unused_hf_tensors,
)
from megatron_bridge_ext.engine.progress import progress
from megatron_bridge_ext.engine.tasks import ConversionTasks, WeightConversionTask
from megatron_bridge_ext.io.protocols import TensorSource, as_source, is_quantized_source
from megatron_bridge_ext.mappings import ConversionContext, shapes_of
from megatron_bridge_ext.mcore.embeddings import broadcast_tied_embeddings
from megatron_bridge_ext.mcore.names import ModelView, as_chunks

__all__ = ["ImportLoop", "MegatronWeightTuple", "RowPieces"]

Model = Union[torch.nn.Module, Sequence[torch.nn.Module]]


class RowPieces:
    """A converted Megatron tensor given as tensors whose rows, one after the other, are its rows (views of the HF
    tensors: :meth:`~megatron_bridge_ext.mappings.base.MegatronParamMapping.hf_to_megatron_rows`), for a consumer
    that writes it in row ranges; :meth:`rows` is a view where the range lies in one piece, :meth:`tensor` the whole
    (a concatenation)."""

    def __init__(self, pieces: Sequence[torch.Tensor]) -> None:
        self.pieces = list(pieces)
        first = self.pieces[0]
        self.shape = torch.Size((sum(p.shape[0] for p in self.pieces), *first.shape[1:]))
        self.dtype = first.dtype
        self._whole: Optional[torch.Tensor] = None

    def to(self, dtype: torch.dtype) -> "RowPieces":
        return self if dtype == self.dtype else RowPieces([p.to(dtype) for p in self.pieces])

    def rows(self, start: int, n: int) -> torch.Tensor:
        """Rows ``[start, start + n)``: a view of a piece when they lie in one, else their concatenation."""
        parts, at = [], 0
        for p in self.pieces:
            lo, hi = max(start, at), min(start + n, at + p.shape[0])
            if lo < hi:
                parts.append(p.narrow(0, lo - at, hi - lo))
            at += p.shape[0]
        if sum(t.shape[0] for t in parts) != n:
            raise ValueError(f"rows [{start}, {start + n}) are outside a tensor of {self.shape[0]} rows")
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def tensor(self) -> torch.Tensor:
        if self._whole is None:
            self._whole = torch.cat(self.pieces)
        return self._whole


class MegatronWeightTuple(NamedTuple):
    """A converted Megatron tensor of this rank."""

    param_name: str
    weight: torch.Tensor
    vp_stage: int


class ImportLoop:
    """HF -> Megatron: :meth:`load_weights_hf_to_megatron` (into the parameters) and
    :meth:`stream_weights_hf_to_megatron` (yielded, the model untouched)."""

    def _read_hf(self, task: WeightConversionTask, state: Any, ctx: ConversionContext
                 ) -> Tuple[Any, ConversionContext]:
        """The HF tensor(s) of a task and the context to convert them in.

        From a source that dequantizes on read (an FP8 / MXFP4 release): a mapping with a fused path for quantized
        weights (``reads_quantized``) gets them as stored (:class:`~megatron_bridge_ext.ops.QuantizedWeight`) and its
        op dequantizes only the rows the rank keeps; other mappings get them dequantized. A layer's experts are read
        only for the global experts ``ctx`` selects (this rank's, or this run's), with a context of one
        expert-parallel rank that takes them all: the same parameters, without dequantizing the other ranks'
        experts. Reads of other sources are views of the files, which cost nothing until used.
        """
        mapping = task.mapping
        if not _dequantizes(state, mapping.hf_names):
            return self.maybe_modify_loaded_hf_weight(mapping.hf_param, state), ctx
        as_stored = bool(getattr(mapping, "reads_quantized", False))
        num = getattr(mapping, "num_experts", None)
        if not task.is_group or not num or ctx.ep_size <= 1 or num % ctx.ep_size:
            return self.maybe_modify_loaded_hf_weight(mapping.hf_param, _QuantizedReads(state, as_stored)), ctx
        per = num // ctx.ep_size
        lo, hi = ctx.ep_rank * per, (ctx.ep_rank + 1) * per
        names = {role: name if isinstance(name, str) else name[lo:hi] for role, name in mapping.hf_param.items()}
        fused = [name for name in names.values() if isinstance(name, str)]
        hf = self.maybe_modify_loaded_hf_weight(names, _QuantizedReads(state, as_stored, fused, lo, hi))
        return hf, dataclasses.replace(ctx, ep_size=1, ep_rank=0)

    def _convert_one(self, task: WeightConversionTask, hf_state, ctx: ConversionContext, allowed: Sequence[str]):
        """Converts one owned task straight into its parameter(s); None when an allowed mismatch skipped it.

        Raises:
            ValueError: a shape mismatch or a dtype class that cannot be right (both sides named).
            The error of a mapping or an op, with the HF name(s), the Megatron name and the file in front.
        """
        names = task.mapping.hf_names
        where = f"HF {short_names(names)} in {_files_of(hf_state, names)} -> Megatron {task.global_param_name}"
        try:
            hf, ctx = self._read_hf(task, hf_state, ctx)
            targets = task.local_tensors
            got = task.mapping.megatron_shape(shapes_of(hf), ctx)  # the shape contract: no op call
        except Exception as e:
            raise conversion_error(e, where) from e
        want = tuple(targets[0].shape)
        if got != want:
            if any(fnmatch.fnmatch(task.mapping.megatron_param, p) or fnmatch.fnmatch(task.param_name, p)
                   for p in allowed):
                warnings.warn(f"shape mismatch for {task.global_param_name} allowed by allowed_mismatched_params: "
                              f"Megatron {want}, converted {got}; parameter left unchanged")
                return None
            raise ValueError(
                f"shape mismatch for Megatron parameter {task.global_param_name}: expected {want}, converted "
                f"HF tensor(s) {task.mapping.hf_param} give {got} ({type(task.mapping).__name__}, "
                f"tp={ctx.tp_size}{f', ep={ctx.ep_size}' if task.is_group else ''}; "
                f"file(s) {_files_of(hf_state, names)})"
            )
        check_dtype_class(names, [t.dtype for t in _all_tensors(hf)], targets[0].dtype, task.global_param_name,
                          lambda n: _files_of(hf_state, [n]))
        try:
            return self._pack(task, hf, ctx, targets)
        except Exception as e:
            raise conversion_error(e, where) from e

    def _pack(self, task: WeightConversionTask, hf: Any, ctx: ConversionContext, targets) -> Any:
        first = _first_tensor(hf)
        datas = [t.data for t in targets]
        if task.is_group:
            if all(d.dtype == first.dtype and d.device == first.device for d in datas):
                return task.mapping.hf_to_megatron(hf, ctx, out=datas)  # one op call for the layer's local experts
            for d, s in zip(datas, task.mapping.hf_to_megatron(hf, ctx).unbind(0)):
                d.copy_(s)
            return datas
        data = datas[0]
        if type(data).__name__ == "DTensor":
            full = task.mapping.hf_to_megatron(hf, ctx)
            local = data.to_local()
            ops.copy_into_dtensor(full.to(device=local.device, dtype=local.dtype), data)
            return data
        if first.dtype == data.dtype and first.device == data.device and data.is_contiguous():
            return task.mapping.hf_to_megatron(hf, ctx, out=data)
        # another dtype or device (e.g. CPU checkpoint -> GPU parameter): pack this rank's shard where the HF
        # tensors live (reading only its rows), then one copy into the parameter
        data.copy_(task.mapping.hf_to_megatron(hf, ctx))
        return data

    def _check_unused(self, state: Any, tasks: Sequence[WeightConversionTask], chunks,
                      allowed: Optional[Sequence[str]], hf_config: Any = None) -> None:
        """Every HF tensor is consumed by a task, or allowed by a pattern; else the import fails naming them. With the
        default patterns, a stored ``rotary_emb.inv_freq`` must hold what the config's rope settings give."""
        consumed = {n for t in tasks for n in t.mapping.hf_names}
        patterns = self.known_non_weights if allowed is None else tuple(allowed)
        if allowed is None and hf_config is not None and ROTARY_INV_FREQ in patterns:
            stored = [k for k in state.keys() if k not in consumed and fnmatch.fnmatchcase(k, ROTARY_INV_FREQ)]
            check_rotary_inv_freq(state, stored, hf_config, lambda n: _files_of(state, [n]))
        unused = unused_hf_tensors(state.keys(), consumed, patterns)
        if unused:
            shown = [f"{n} ({_files_of(state, [n])})" for n in unused[:20]]
            raise ValueError(
                f"{type(self).__name__}: {len(unused)} HF tensor(s) of {state.path} "
                f"are used by no mapping of this model: {shown}{' ...' if len(unused) > 20 else ''}. Importing would "
                f"silently drop them; pass allowed_unused_hf_params=[patterns] to allow them (allowed now: "
                f"{list(patterns)})"
            )

    def load_weights_hf_to_megatron(
        self,
        hf_pretrained: Any,
        megatron_model: Model,
        allowed_mismatched_params: Optional[Sequence[str]] = None,
        show_progress: Optional[bool] = None,
        allowed_unused_hf_params: Optional[Sequence[str]] = None,
    ) -> List[torch.nn.Module]:
        """Load HF weights into this rank's Megatron chunk(s), each rank reading only what it keeps.

        Args:
            hf_pretrained: an object with ``.state`` (lazy HF tensors: ``keys()``, ``[name]``) and ``.config``.
            megatron_model: model chunk or list of virtual-pipeline chunks.
            allowed_mismatched_params: fnmatch globs of Megatron names whose shape mismatch is skipped with a warning.
            show_progress: rich progress bar on rank 0 (default: ``self.show_progress``).
            allowed_unused_hf_params: fnmatch globs of HF tensors the model may leave unused (default:
                :attr:`known_non_weights`, e.g. ``*.rotary_emb.inv_freq``); any other unused tensor fails the import.

        Returns:
            The list of chunks.

        Raises:
            ValueError: missing or unused HF tensors, unmapped parameters, shape mismatches (both shapes named),
                dtype classes that cannot be right.
        """
        chunks = as_chunks(megatron_model)
        state = as_source(hf_pretrained.state)
        with self.watch("import") as watch:
            watch.barrier("import: start")  # every rank is here before the collective name exchange
            watch.set_phase("import: conversion tasks")
            self.use_hf_layout_of(state, hf_pretrained.config)
            tasks = self._tasks(state.keys(), chunks, state.keys())
            self._check_unused(state, tasks, chunks, allowed_unused_hf_params, hf_pretrained.config)
            allowed = list(allowed_mismatched_params or [])
            owned = [t for t in tasks if t.owned]
            show = self.show_progress if show_progress is None else show_progress
            with torch.no_grad():
                for task in progress(owned, "Loading HF weights", show):
                    watch.set_phase(f"import: {task.global_param_name}")
                    watch.check()  # a peer's failure stops this rank within a slice
                    ctx = self._context(task, tasks.view, hf_pretrained.config)
                    self._convert_one(task, state, ctx, allowed)
                    state.release(task.mapping.hf_names)
                watch.barrier("import: converted")  # every rank converted before the tied-embedding broadcast
                watch.set_phase("import: tied embeddings")
                broadcast_tied_embeddings(chunks)
        return chunks

    def stream_weights_hf_to_megatron(
        self,
        hf_pretrained: Any,
        megatron_model: Model,
        conversion_tasks: Optional[List[WeightConversionTask]] = None,
        allowed_unused_hf_params: Optional[Sequence[str]] = None,
        select: Optional[Any] = None,
        max_group_bytes: Optional[int] = None,
        row_pieces: bool = False,
    ) -> Iterator[MegatronWeightTuple]:
        """Generator variant: yields this rank's converted tensors (fresh tensors; the model is not modified).

        ``select(task)`` (optional) picks the owned tasks to convert (the unused-tensor check still covers them all);
        the HF tensors of each converted task are released from memory once it is done (where the source can).
        ``max_group_bytes`` (optional): a layer's local experts are converted in runs of at most that many bytes
        (whole experts, a divisor of the local count) instead of in one op call, so that memory holds one run.
        ``row_pieces``: a parameter whose mapping gives it as row pieces (``hf_to_megatron_rows``) comes as a
        :class:`RowPieces` of views of the HF tensors instead of a converted tensor."""
        chunks = as_chunks(megatron_model)
        state = as_source(hf_pretrained.state)
        changed = self.use_hf_layout_of(state, hf_pretrained.config)
        tasks = conversion_tasks if conversion_tasks is not None and not changed else self._tasks(
            state.keys(), chunks, state.keys())
        self._check_unused(state, tasks, chunks, allowed_unused_hf_params, hf_pretrained.config)
        view = tasks.view if isinstance(tasks, ConversionTasks) else ModelView(chunks)
        with torch.no_grad():
            for task in tasks:
                if not task.owned or (select is not None and not select(task)):
                    continue
                ctx = self._context(task, view, hf_pretrained.config)
                names = task.mapping.hf_names
                mine = [n for n in task.members if n in view.by_global] if task.is_group else []
                runs = _expert_runs(task, ctx, max_group_bytes) if task.is_group else 1
                for run in range(runs):
                    run_ctx = ctx
                    if runs > 1:  # whole experts in runs: the mapping's expert-parallel split picks each run
                        run_ctx = dataclasses.replace(ctx, ep_size=ctx.ep_size * runs,
                                                      ep_rank=ctx.ep_rank * runs + run)
                    try:
                        hf, run_ctx = self._read_hf(task, state, run_ctx)
                        check_dtype_class(names, [t.dtype for t in _all_tensors(hf)], task.local_tensors[0].dtype,
                                          task.global_param_name, lambda n: _files_of(state, [n]))
                        pieces = None
                        if row_pieces and not task.is_group:
                            pieces = task.mapping.hf_to_megatron_rows(hf, run_ctx)
                        converted = RowPieces(pieces) if pieces else task.mapping.hf_to_megatron(hf, run_ctx)
                    except Exception as e:
                        if getattr(e, "bridge_context", False):
                            raise
                        raise conversion_error(e, f"HF {short_names(names)} in {_files_of(state, names)} -> Megatron "
                                                  f"{task.global_param_name}") from e
                    if not task.is_group:
                        yield MegatronWeightTuple(task.param_name, converted, task.vp_stage)
                    else:
                        per = len(mine) // runs
                        for name, tensor in zip(mine[run * per:(run + 1) * per], converted.unbind(0)):
                            yield MegatronWeightTuple(view.local_name(name), tensor, task.vp_stage)
                    del converted, hf
                    state.release(names)


def _expert_runs(task: WeightConversionTask, ctx: ConversionContext, max_bytes: Optional[int]) -> int:
    """In how many runs to convert a layer's local experts so that each run holds at most ``max_bytes`` (the
    smallest divisor of the local expert count that does; 1 without a limit)."""
    local = len(task.local_tensors)
    if not max_bytes or local <= 1:
        return 1
    total = sum(t.numel() * t.element_size() for t in task.local_tensors)
    for runs in range(1, local + 1):
        if local % runs == 0 and total / runs <= max_bytes:
            return runs
    return local


def _dequantizes(state: TensorSource, names: Sequence[str]) -> bool:
    """Whether reading any of ``names`` makes a new tensor (a block-quantized source dequantizing it) rather than a
    view of the file: then only the experts a rank (or run) converts are read."""
    return is_quantized_source(state) and any(state.is_quantized(n) for n in names)


class _QuantizedReads(Mapping):
    """``state`` (a block-quantized source) as a mapping reads it: its quantized weights as stored
    (:class:`~megatron_bridge_ext.ops.QuantizedWeight`, for a mapping with a fused op: ``as_stored``) or dequantized,
    and each fused (all-experts) tensor in ``fused`` cut to global experts ``[lo, hi)``, so that only those are
    dequantized."""

    def __init__(self, state: Any, as_stored: bool, fused: Sequence[str] = (), lo: int = 0, hi: int = 0) -> None:
        self.state, self.as_stored, self.fused, self.lo, self.hi = state, as_stored, set(fused), lo, hi

    def __getitem__(self, key: str) -> Any:
        stored = self.as_stored and self.state.is_quantized(key)
        if key in self.fused:
            if stored:
                return self.state.quantized(key).experts(self.lo, self.hi)
            return self.state.experts(key, self.lo, self.hi)
        return self.state.quantized(key) if stored else self.state[key]

    def __iter__(self):
        return iter(self.state)

    def __len__(self) -> int:
        return len(self.state)


def _first_tensor(hf: Any) -> torch.Tensor:
    value = next(iter(hf.values())) if isinstance(hf, dict) else hf
    if isinstance(value, (list, tuple)):
        value = value[0]
    return value


def _all_tensors(hf: Any) -> List[torch.Tensor]:
    values = list(hf.values()) if isinstance(hf, dict) else [hf]
    out: List[torch.Tensor] = []
    for v in values:
        out.extend(v if isinstance(v, (list, tuple)) else [v])
    return out


def _files_of(state: TensorSource, names: Sequence[str]) -> str:
    """The file(s) holding HF tensors ``names`` (their base names when they share a directory)."""
    files = []
    for n in names:
        try:
            f = state.file_of(n)
        except Exception:
            continue
        if f not in files:
            files.append(f)
    return ", ".join(files) if files else "the HF checkpoint"
