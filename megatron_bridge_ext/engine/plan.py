"""The conversion plan of an HF checkpoint for a layout, without converting and without reading a tensor (the
``inspect`` subcommand).

Every HF key -> the Megatron parameter it feeds, the parameter's tensor-parallel layout, its pipeline stage and the
shape of its shard on each rank; the bytes each rank holds; keys that nothing maps on either side; and an estimate of
the peak memory of each rank during import and of the destination rank during export.

The Megatron side is a whole model built on the ``meta`` device (no memory, no data) at TP1 PP1: it gives the exact
set of parameter names and their owning modules (layouts). Shard shapes come from the mappings' shape contract
(``megatron_shape``, from the geometry module) for each rank; layers are placed on pipeline stages
and experts on expert-parallel ranks by megatron's even split, ranks numbered in megatron's order (tp fastest, pp
slowest): :mod:`megatron_bridge_ext.mcore.topology` (``stages_of``, ``layout_ranks``) works both out from the sizes.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Tuple

import torch

from megatron_bridge_ext.engine.bridge import DEFAULT_BUCKET_BYTES, MegatronModelBridge
from megatron_bridge_ext.mappings import EXPERTS, ConversionContext, shapes_of, with_copies
from megatron_bridge_ext.mcore.config import padded_vocab_size
from megatron_bridge_ext.mcore.layout import detect_layout
from megatron_bridge_ext.mcore.names import ModelView
from megatron_bridge_ext.mcore.topology import Topology, layout_ranks, stages_of

__all__ = ["conversion_plan"]


def _meta_model(model_bridge: MegatronModelBridge, hf_config: Any) -> List[torch.nn.Module]:
    """The whole model on the meta device (TP1 PP1, in a one-process world of its own when there is none)."""
    from megatron_bridge_ext.mcore.model_builder import build_meta_model

    return build_meta_model(lambda: model_bridge.transformer_config(hf_config, tensor_model_parallel_size=1),
                            "conversion_plan builds its meta model")


def conversion_plan(model_bridge: MegatronModelBridge, hf_pretrained: Any, *, tp: int = 1, pp: int = 1,
                    vpp: Optional[int] = None, ep: int = 1, etp: Optional[int] = None,
                    bucket_bytes: Optional[int] = None) -> Dict[str, Any]:
    """The conversion plan of an HF checkpoint for a layout (see the module docstring), as plain data.

    Args:
        model_bridge: the architecture's bridge.
        hf_pretrained: the HF checkpoint (``.config``, ``.state`` with shapes and dtypes; no tensor is read).
        tp, pp, vpp, ep, etp: the target layout.
        bucket_bytes: the export bucket budget (for the export peak-memory estimate).

    Raises:
        ValueError: a layout that cannot split the model (named).
    """
    bucket_bytes = bucket_bytes or DEFAULT_BUCKET_BYTES
    vpp_n = vpp if vpp and vpp > 1 else 1
    etp_n = etp or tp
    src = hf_pretrained.state
    hf_config = hf_pretrained.config
    # the target layout's config: checks heads / groups against tp, as import would
    target = model_bridge.transformer_config(
        hf_config, tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
        virtual_pipeline_model_parallel_size=vpp if vpp_n > 1 else None, expert_model_parallel_size=ep,
        expert_tensor_parallel_size=etp_n)
    num_layers = target.num_layers
    if num_layers % (pp * vpp_n):
        raise ValueError(f"num_layers = {num_layers} is not divisible by pp * vpp = {pp * vpp_n}")
    experts = target.num_moe_experts or 0
    if experts and experts % ep:
        raise ValueError(f"num_moe_experts = {experts} is not divisible by --ep {ep}")
    chunks = _meta_model(model_bridge, hf_config)
    registry = model_bridge.registry
    view = ModelView(chunks, Topology())
    copies = model_bridge._hf_copies(view, src.keys())  # a stored tied output layer: a copy of the embedding
    # the last stage keeps a copy of the embedding (a tied output layer, or for its MTP layers)
    embedding_copy = bool(target.share_embeddings_and_output_weights) or bool(target.mtp_num_layers)
    meta_state = {k: torch.empty(src.shape(k), dtype=src.dtype(k), device="meta") for k in src.keys()}
    hf_vocab = getattr(hf_config, "vocab_size", None)
    padded = padded_vocab_size(target.vocab_size, tp, target.make_vocab_size_divisible_by)

    params = view.params
    rows: List[Dict[str, Any]] = []
    unmapped_megatron: List[str] = []
    missing_hf: List[str] = []
    used_hf = set()
    dense: Dict[Tuple[int, int], int] = {}  # (pp rank, tp rank) -> bytes
    expert_bytes: Dict[Tuple[int, int, int], int] = {}  # (pp rank, ep rank, etp rank) -> bytes
    read_max: Dict[Tuple[int, int], int] = {}  # largest HF bytes one task reads, per (pp, tp)
    expert_read_max: Dict[Tuple[int, int, int], int] = {}  # the same for expert groups, per (pp, ep, etp)
    groups_done = set()
    for p in params:
        name = p.global_name
        mapping = registry.megatron_to_hf_lookup(name)
        if mapping is None:
            unmapped_megatron.append(name)
            continue
        group = mapping.megatron_param if mapping.grouped else None
        if group is not None:
            if group in groups_done:
                continue
            groups_done.add(group)
            mapping = mapping.for_experts(experts)  # type: ignore[attr-defined]
        elif name in copies:  # a stored tied output layer: a copy of the embedding
            mapping = with_copies(mapping, copies[name])
        needed = mapping.hf_names
        absent = [k for k in needed if k not in meta_state]
        if absent:
            missing_hf.extend(f"{k} (for {group or name})" for k in absent)
            continue
        used_hf.update(needed)
        hf = shapes_of(model_bridge.maybe_modify_loaded_hf_weight(mapping.hf_param, meta_state))
        hf_bytes = sum(src.nbytes(k) for k in needed)
        layout = mapping.layout or detect_layout(p.module, p.tensor, name)
        dtype = target.params_dtype
        places = stages_of(name, num_layers, pp, vpp_n, embedding_copy)
        shards: Dict[str, List[int]] = {}
        if group is not None:
            for e_rank in range(ep):
                for t_rank in range(etp_n):
                    ctx = ConversionContext(tp_size=etp_n, tp_rank=t_rank, ep_size=ep, ep_rank=e_rank, config=target,
                                            hf_vocab_size=hf_vocab, padded_vocab_size=padded, layout=EXPERTS)
                    one = mapping.megatron_shape(hf, ctx)  # the shape contract
                    shape = [experts // ep, *one]
                    shards[f"ep{e_rank}/etp{t_rank}"] = shape
                    nbytes = int(torch.Size(shape).numel()) * dtype.itemsize
                    for pp_rank, _ in places:
                        key = (pp_rank, e_rank, t_rank)
                        expert_bytes[key] = expert_bytes.get(key, 0) + nbytes
                        expert_read_max[key] = max(expert_read_max.get(key, 0), nbytes)  # rows of its experts
            layout = EXPERTS
        else:
            for t_rank in range(tp):
                ctx = ConversionContext(tp_size=tp, tp_rank=t_rank, config=target, hf_vocab_size=hf_vocab,
                                        padded_vocab_size=padded, layout=layout)
                shape = list(mapping.megatron_shape(hf, ctx))  # the shape contract
                shards[f"tp{t_rank}"] = shape
                nbytes = int(torch.Size(shape).numel()) * dtype.itemsize
                for pp_rank, _ in places:
                    dense[(pp_rank, t_rank)] = dense.get((pp_rank, t_rank), 0) + nbytes
                    read = min(hf_bytes, nbytes if layout != "replicated" else hf_bytes)
                    read_max[(pp_rank, t_rank)] = max(read_max.get((pp_rank, t_rank), 0), read)
        rows.append({"hf": needed, "megatron": group or name, "mapping": type(mapping).__name__, "layout": layout,
                     "stages": [f"pp{a}" + (f".chunk{b}" if vpp_n > 1 else "") for a, b in places],
                     "dtype": str(dtype).replace("torch.", ""), "shards": shards})
    unused_hf = [k for k in src.keys() if k not in used_hf]
    carried_hf = model_bridge.carried_hf(unused_hf)
    carried_set = set(carried_hf)
    unmapped_hf = [k for k in unused_hf if k not in carried_set]

    layout_d = {"tp": tp, "pp": pp, "vpp": vpp if vpp_n > 1 else None, "ep": ep, "etp": etp}
    places_of_ranks = layout_ranks(tp, pp, ep, etp_n)  # the smallest world megatron accepts for the layout
    world = len(places_of_ranks)
    ranks = []
    biggest_task = max((sum(src.nbytes(k) for k in r["hf"]) for r in rows), default=0)
    for rp in places_of_ranks:
        nbytes = dense.get((rp.pp, rp.tp), 0) + expert_bytes.get((rp.pp, rp.ep, rp.etp), 0)
        peak = nbytes + max(read_max.get((rp.pp, rp.tp), 0), expert_read_max.get((rp.pp, rp.ep, rp.etp), 0))
        ranks.append({"rank": rp.rank, "pp": rp.pp, "tp": rp.tp, "ep": rp.ep, "etp": rp.etp, "bytes": nbytes,
                      "import_peak_bytes": peak})
    bucket_bytes = min(bucket_bytes, src.total_size)  # a bucket never holds more than the whole model
    export_peak = (ranks[0]["bytes"] if ranks else 0) + 2 * bucket_bytes + biggest_task
    return {
        "hf_dir": getattr(hf_pretrained, "path", None), "architecture": hf_config.architectures[0], "layout": layout_d, "world": world,
        "hf_tensors": len(src), "hf_bytes": src.total_size, "dtype": str(target.params_dtype).replace("torch.", ""),
        "padded_vocab_size": padded, "rows": rows, "ranks": ranks,
        "unmapped_hf": unmapped_hf, "carried_hf": carried_hf, "unmapped_megatron": unmapped_megatron,
        "missing_hf": missing_hf,
        "export_peak_bytes_rank0": export_peak, "bucket_bytes": bucket_bytes,
    }
