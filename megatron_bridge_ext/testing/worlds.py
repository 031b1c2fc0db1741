"""One spawned world that runs a list of layouts: the end-to-end loop the family tests share.

Per :class:`Layout`, on every rank: megatron's parallel state at its sizes, the HF checkpoint imported into Megatron
chunks by :class:`~megatron_bridge_ext.auto_bridge.AutoBridge`, the Megatron logits (optionally with the MTP depths'),
the layout's own checks (callables that return more results), the export with the source and, where the layout names
an architecture, without it (``AutoBridge.from_architecture``); then the parallel state is destroyed and the ranks
meet at a barrier. The test compares the results with its references (transformers' logits, the source checkpoint):
this module computes, the tests assert.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch

__all__ = ["Layout", "LayoutRun", "run_layouts", "spawn_layouts"]


@dataclasses.dataclass(frozen=True)
class Layout:
    """One conversion in a world.

    Attributes:
        name: the results' key and the export's directory under the world's output root.
        ckpt: the key of the HF checkpoint (in the world's checkpoint dict) imported.
        tp, pp, vpp, ep, etp: the parallel sizes (:func:`~megatron_bridge_ext.mcore.model_builder.init_parallel`).
        dtype: ``params_dtype`` of the import; None reads it from the checkpoint's config.json.
        logits: ``"plain"`` (:func:`~megatron_bridge_ext.mcore.forward.megatron_logits`), ``"mtp"`` (main and MTP
            logits: ``megatron_logits_with_mtp``) or None (no forward).
        no_source: an architecture to export the chunks as without the source checkpoint too (into
            ``{name}_nosource``), or None.
        max_shard_bytes: the export's shard size (None: the writer's default).
        before_import: callables ``hook(rank, layout)`` run after the parallel state is set up, right before the
            import (e.g. to reset a call counter).
        checks: callables ``check(run: LayoutRun) -> dict`` merged into the layout's results, after the forward and
            before the export; the results of a rank are pickled back to the test.
        after_export: the same, after the export(s) (e.g. a checkpoint written and read at another layout).
        model_kwargs: further keyword arguments of ``to_megatron_model`` (config overrides such as
            ``use_mamba_mem_eff_path=False``), or None.
    """

    name: str
    ckpt: str
    tp: int = 1
    pp: int = 1
    vpp: Optional[int] = None
    ep: int = 1
    etp: Optional[int] = None
    dtype: Optional[torch.dtype] = torch.float32
    logits: Optional[str] = "plain"
    no_source: Optional[str] = None
    max_shard_bytes: Optional[int] = None
    before_import: Sequence[Callable[[int, "Layout"], None]] = ()
    checks: Sequence[Callable[["LayoutRun"], Dict[str, Any]]] = ()
    after_export: Sequence[Callable[["LayoutRun"], Dict[str, Any]]] = ()
    model_kwargs: Optional[Dict[str, Any]] = None


@dataclasses.dataclass
class LayoutRun:
    """What a layout's check sees: the rank, the layout, its bridge and chunks, the world's inputs."""

    rank: int
    layout: Layout
    bridge: Any
    chunks: List[torch.nn.Module]
    ckpts: Dict[str, Any]
    tokens: torch.Tensor
    out_root: str

    def save(self, bridge: Any, chunks: Sequence[torch.nn.Module], name: str) -> str:
        """Export ``chunks`` with ``bridge`` as the layouts are exported (the layout's shard size, 64 KiB buckets)
        into ``name`` under the output root; returns the directory."""
        path = os.path.join(self.out_root, name)
        kw = {} if self.layout.max_shard_bytes is None else {"max_shard_bytes": self.layout.max_shard_bytes}
        bridge.save_hf_pretrained(chunks, path, bucket_bytes=64 * 1024, show_progress=False, **kw)
        return path


def run_layouts(rank: int, world: int, ckpts: Dict[str, Any], layouts: Sequence[Layout], tokens: torch.Tensor,
                out_root: str, tail: Optional[Callable[..., Dict[str, Any]]] = None) -> Dict[str, Any]:
    """The worker of :func:`spawn_layouts` (``fn(rank, world, ...)`` of :func:`megatron_bridge_ext.launch.spawn_local`).

    Returns:
        layout name -> ``{"logits": ..., "mtp_logits": ...}`` (rank 0 only) merged with the layout's checks' results,
        then ``tail(rank, ckpts, tokens, out_root)``'s results (run last, with no parallel state: refusals that may
        leave the world without further collectives).
    """
    from megatron_bridge_ext.mcore.cpu_compat import apply_cpu_patches

    apply_cpu_patches()
    import torch.distributed as dist

    from megatron_bridge_ext.auto_bridge import AutoBridge
    from megatron_bridge_ext.mcore.forward import megatron_logits, megatron_logits_with_mtp
    from megatron_bridge_ext.mcore.model_builder import destroy_parallel, init_parallel

    results: Dict[str, Any] = {}
    for layout in layouts:
        init_parallel(tp=layout.tp, pp=layout.pp, vpp=layout.vpp, ep=layout.ep, etp=layout.etp)
        bridge = AutoBridge.from_hf_pretrained(ckpts[layout.ckpt])
        for hook in layout.before_import:
            hook(rank, layout)
        chunks = bridge.to_megatron_model(**({} if layout.dtype is None else {"params_dtype": layout.dtype}),
                                          **(layout.model_kwargs or {}))
        r: Dict[str, Any] = {}
        if layout.logits == "plain":
            logits = megatron_logits(chunks, tokens)
            if rank == 0:
                r["logits"] = logits
        elif layout.logits == "mtp":
            logits, mtp_logits = megatron_logits_with_mtp(chunks, tokens)
            if rank == 0:
                r["logits"], r["mtp_logits"] = logits, mtp_logits
        elif layout.logits is not None:
            raise ValueError(f"Layout {layout.name}: logits={layout.logits!r}, expected 'plain', 'mtp' or None")
        run = LayoutRun(rank, layout, bridge, chunks, ckpts, tokens, out_root)
        for check in layout.checks:
            r.update(check(run))
        run.save(bridge, chunks, layout.name)
        if layout.no_source is not None:
            AutoBridge.from_architecture(layout.no_source).save_hf_pretrained(
                chunks, os.path.join(out_root, f"{layout.name}_nosource"), bucket_bytes=64 * 1024,
                show_progress=False)
        for check in layout.after_export:
            r.update(check(run))
        results[layout.name] = r
        destroy_parallel()
        dist.barrier()
    if tail is not None:
        results.update(tail(rank, ckpts, tokens, out_root))
    return results


def spawn_layouts(ckpts: Dict[str, Any], layouts: Sequence[Layout], tokens: torch.Tensor, out_root: str, *,
                  world_size: int = 4, timeout: float = 900.0,
                  tail: Optional[Callable[..., Dict[str, Any]]] = None) -> List[Dict[str, Any]]:
    """Run ``layouts`` in ONE spawned local world (gloo, CPU) of ``world_size`` ranks; returns each rank's results
    (:func:`run_layouts`). Checks and ``tail`` must be module-level functions (they travel by name)."""
    from megatron_bridge_ext.launch import spawn_local

    names = [layout.name for layout in layouts]
    if len(set(names)) != len(names):
        raise ValueError(f"spawn_layouts: layout names repeat: {sorted(n for n in set(names) if names.count(n) > 1)}")
    return spawn_local(run_layouts, world_size, (ckpts, list(layouts), tokens, out_root, tail), timeout=timeout)
