"""Gated delta-net (linear attention; Qwen3-Next, Qwen3.5): HF projections <-> megatron-core's fused ``in_proj``,
the causal convolution's channels, and the gated output norm stored as ``1 + w``.

Geometry (``ctx.config``, megatron's names): ``linear_num_key_heads`` Hk of ``linear_key_head_dim`` dk,
``linear_num_value_heads`` Hv of ``linear_value_head_dim`` dv, r = Hv / Hk value heads per key head.

Megatron (megatron-core 0.19 ``GatedDeltaNet``): TP rank t holds key heads ``[t Hk/tp, (t+1) Hk/tp)`` and their
value heads; its block of ``in_proj`` is ``[q_t; k_t; v_t; z_t; beta_t; alpha_t]`` (q / k: dk rows per key head, v /
z: dv rows per value head, beta / alpha: one row per value head), the whole parameter being the tp blocks in rank
order (``ColumnParallelLinear``); ``conv1d.weight`` (``[C, 1, K]``, C = 2 Hk dk + Hv dv) likewise ``[q_t; k_t;
v_t]`` per rank. Value head j belongs to key head j // r (megatron repeats q / k ``repeat_interleave(r)``).

HF:
- Qwen3-Next ``in_proj_qkvz`` ``[Hk (2 dk + 2 r dv), D]``: per key head ``[q (dk); k (dk); v (r dv); z (r dv)]``;
  ``in_proj_ba`` ``[Hk 2r, D]``: per key head ``[b (r); a (r)]`` (:class:`GDNInProjMapping`);
- Qwen3.5 ``in_proj_qkv`` ``[2 Hk dk + Hv dv, D]`` = ``[q; k; v]`` (all heads each), ``in_proj_z`` ``[Hv dv, D]``,
  ``in_proj_b`` / ``in_proj_a`` ``[Hv, D]`` (:class:`GDNSplitInProjMapping`);
- ``conv1d.weight`` ``[C, 1, K]`` with channels ``[q; k; v]`` (all heads each) (:class:`GDNConv1dMapping`).

All are pure row permutations: export gives back the HF tensors bit for bit.
"""

from __future__ import annotations

from typing import Dict, List, Sequence, Tuple

import torch

from megatron_bridge_ext.mappings.base import COLUMN, REPLICATED, MegatronParamMapping, single, write

__all__ = ["gdn_dims", "GDNInProjMapping", "GDNSplitInProjMapping", "GDNConv1dMapping", "ZeroCenteredNormMapping"]

#: the sections of megatron's in_proj block, in order
IN_PROJ_SECTIONS = ("q", "k", "v", "z", "b", "a")


def gdn_dims(ctx, name: str) -> Tuple[int, int, int, int]:
    """(Hk, Hv, dk, dv) of ``ctx.config``, checked against the TP size.

    Raises:
        ValueError: missing fields, Hv not a multiple of Hk, or heads the TP size does not divide (named).
    """
    cfg = ctx.config
    fields = ("linear_num_key_heads", "linear_num_value_heads", "linear_key_head_dim", "linear_value_head_dim")
    values = [getattr(cfg, f, None) if cfg is not None else None for f in fields]
    if any(v is None for v in values):
        raise ValueError(f"{name}: gated delta-net mappings need ctx.config with {', '.join(fields)}; got "
                         f"{dict(zip(fields, values))}")
    hk, hv, dk, dv = (int(v) for v in values)
    if hk < 1 or hv % hk:
        raise ValueError(f"{name}: linear_num_value_heads = {hv} is not a multiple of linear_num_key_heads = {hk}")
    for field, n in (("linear_num_key_heads", hk), ("linear_num_value_heads", hv)):
        if n % ctx.tp_size:
            raise ValueError(f"{name}: {field} = {n} is not divisible by tensor_model_parallel_size = {ctx.tp_size}")
    return hk, hv, dk, dv


def _section_rows(ctx, name: str) -> Dict[str, int]:
    """Rows of each in_proj section over all heads."""
    hk, hv, dk, dv = gdn_dims(ctx, name)
    return {"q": hk * dk, "k": hk * dk, "v": hv * dv, "z": hv * dv, "b": hv, "a": hv}


def _check_rows(name: str, hf_name: str, shape: Sequence[int], rows: int, what: str) -> None:
    if len(shape) == 0 or shape[0] != rows:
        raise ValueError(f"{name}: HF tensor {hf_name} has shape {list(shape)}, expected {rows} rows ({what})")


def _rank_block(sections: Dict[str, torch.Tensor], order: Sequence[str], ctx, out=None) -> torch.Tensor:
    """TP rank ``ctx.tp_rank``'s block: the rank's part of each section (whole-head sections), in ``order``."""
    parts = []
    for s in order:
        t = sections[s]
        n = t.shape[0] // ctx.tp_size
        parts.append(t.narrow(0, ctx.tp_rank * n, n))
    rows = sum(p.shape[0] for p in parts)
    if out is None:
        out = parts[0].new_empty((rows, *parts[0].shape[1:]))
    return torch.cat(parts, dim=0, out=out)


def _gather_sections(shards: Sequence[torch.Tensor], order: Sequence[str], rows: Dict[str, int], name: str
                     ) -> Dict[str, torch.Tensor]:
    """Each section over all heads from the TP shards (inverse of :func:`_rank_block`)."""
    tp = len(shards)
    local = [rows[s] // tp for s in order]
    if any(s.shape[0] != sum(local) for s in shards):
        raise ValueError(f"{name}: shards of {[s.shape[0] for s in shards]} rows, expected {sum(local)} each "
                         f"({dict(zip(order, local))} per rank)")
    pieces: Dict[str, List[torch.Tensor]] = {s: [] for s in order}
    for shard in shards:
        for s, part in zip(order, torch.split(shard, local, dim=0)):
            pieces[s].append(part)
    return {s: torch.cat(pieces[s], dim=0) for s in order}


class GDNInProjMapping(MegatronParamMapping):
    """Qwen3-Next ``in_proj_qkvz`` / ``in_proj_ba`` (grouped by key head) <-> megatron ``in_proj`` (see the module
    docstring)."""

    layout = COLUMN

    def __init__(self, megatron_param: str, qkvz: str, ba: str) -> None:
        super().__init__(megatron_param, {"qkvz": qkvz, "ba": ba})

    def _dims(self, ctx):
        hk, hv, dk, dv = gdn_dims(ctx, self.megatron_param)
        return hk, hv // hk, dk, dv

    def _sections(self, qkvz: torch.Tensor, ba: torch.Tensor, ctx) -> Dict[str, torch.Tensor]:
        hk, r, dk, dv = self._dims(ctx)
        per = 2 * dk + 2 * r * dv
        _check_rows(self.megatron_param, self.hf_param["qkvz"], qkvz.shape, hk * per,
                    f"linear_num_key_heads {hk} x (2 x {dk} + 2 x {r} x {dv})")
        _check_rows(self.megatron_param, self.hf_param["ba"], ba.shape, hk * 2 * r,
                    f"linear_num_key_heads {hk} x 2 x {r}")
        rest = tuple(qkvz.shape[1:])
        g = qkvz.reshape(hk, per, *rest)
        cuts = {"q": (0, dk), "k": (dk, dk), "v": (2 * dk, r * dv), "z": (2 * dk + r * dv, r * dv)}
        out = {s: g.narrow(1, a, n).reshape(hk * n, *rest) for s, (a, n) in cuts.items()}
        gba = ba.reshape(hk, 2 * r, *tuple(ba.shape[1:]))
        out["b"] = gba.narrow(1, 0, r).reshape(hk * r, *tuple(ba.shape[1:]))
        out["a"] = gba.narrow(1, r, r).reshape(hk * r, *tuple(ba.shape[1:]))
        return out

    def hf_to_megatron(self, hf, ctx, out=None):
        return _rank_block(self._sections(hf["qkvz"], hf["ba"], ctx), IN_PROJ_SECTIONS, ctx, out)

    def megatron_shape(self, hf, ctx):
        hk, r, dk, dv = self._dims(ctx)
        _check_rows(self.megatron_param, self.hf_param["qkvz"], hf["qkvz"], hk * (2 * dk + 2 * r * dv), "qkvz")
        _check_rows(self.megatron_param, self.hf_param["ba"], hf["ba"], hk * 2 * r, "ba")
        rows = sum(_section_rows(ctx, self.megatron_param).values())
        return (rows // ctx.tp_size, *hf["qkvz"][1:])

    def hf_shapes(self, shard, num_shards, ctx):
        hk, r, dk, dv = self._dims(ctx)
        rest = tuple(shard[1:])
        return {self.hf_param["qkvz"]: (hk * (2 * dk + 2 * r * dv), *rest), self.hf_param["ba"]: (hk * 2 * r, *rest)}

    def megatron_to_hf(self, shards, ctx):
        hk, r, dk, dv = self._dims(ctx)
        s = _gather_sections(shards, IN_PROJ_SECTIONS, _section_rows(ctx, self.megatron_param), self.megatron_param)
        rest = tuple(shards[0].shape[1:])
        qkvz = torch.cat([s["q"].reshape(hk, dk, *rest), s["k"].reshape(hk, dk, *rest),
                          s["v"].reshape(hk, r * dv, *rest), s["z"].reshape(hk, r * dv, *rest)], dim=1)
        ba = torch.cat([s["b"].reshape(hk, r, *rest), s["a"].reshape(hk, r, *rest)], dim=1)
        qkvz_out = ctx.empty((hk * (2 * dk + 2 * r * dv), *rest), shards[0])
        ba_out = ctx.empty((hk * 2 * r, *rest), shards[0])
        return {self.hf_param["qkvz"]: qkvz_out.copy_(qkvz.reshape(qkvz_out.shape)),
                self.hf_param["ba"]: ba_out.copy_(ba.reshape(ba_out.shape))}


class GDNSplitInProjMapping(MegatronParamMapping):
    """Qwen3.5 ``in_proj_qkv`` (``[q; k; v]``) / ``in_proj_z`` / ``in_proj_b`` / ``in_proj_a`` <-> megatron
    ``in_proj`` (see the module docstring)."""

    layout = COLUMN

    def __init__(self, megatron_param: str, qkv: str, z: str, b: str, a: str) -> None:
        super().__init__(megatron_param, {"qkv": qkv, "z": z, "b": b, "a": a})

    def _check(self, shapes, ctx) -> Dict[str, int]:
        rows = _section_rows(ctx, self.megatron_param)
        want = {"qkv": rows["q"] + rows["k"] + rows["v"], "z": rows["z"], "b": rows["b"], "a": rows["a"]}
        for role, n in want.items():
            _check_rows(self.megatron_param, self.hf_param[role], shapes[role], n, f"{role} rows")
        return rows

    def hf_to_megatron(self, hf, ctx, out=None):
        rows = self._check({k: tuple(v.shape) for k, v in hf.items()}, ctx)
        q, k, v = torch.split(hf["qkv"], [rows["q"], rows["k"], rows["v"]], dim=0)
        return _rank_block({"q": q, "k": k, "v": v, "z": hf["z"], "b": hf["b"], "a": hf["a"]}, IN_PROJ_SECTIONS,
                           ctx, out)

    def megatron_shape(self, hf, ctx):
        rows = self._check(hf, ctx)
        return (sum(rows.values()) // ctx.tp_size, *hf["qkv"][1:])

    def hf_shapes(self, shard, num_shards, ctx):
        rows = _section_rows(ctx, self.megatron_param)
        rest = tuple(shard[1:])
        return {self.hf_param["qkv"]: (rows["q"] + rows["k"] + rows["v"], *rest), self.hf_param["z"]: (rows["z"],
                *rest), self.hf_param["b"]: (rows["b"], *rest), self.hf_param["a"]: (rows["a"], *rest)}

    def megatron_to_hf(self, shards, ctx):
        rows = _section_rows(ctx, self.megatron_param)
        s = _gather_sections(shards, IN_PROJ_SECTIONS, rows, self.megatron_param)
        rest = tuple(shards[0].shape[1:])
        qkv = ctx.empty((rows["q"] + rows["k"] + rows["v"], *rest), shards[0])
        torch.cat([s["q"], s["k"], s["v"]], dim=0, out=qkv)
        out = {self.hf_param["qkv"]: qkv}
        for role in ("z", "b", "a"):
            out[self.hf_param[role]] = ctx.empty(tuple(s[role].shape), shards[0]).copy_(s[role])
        return out


class GDNConv1dMapping(MegatronParamMapping):
    """HF ``conv1d.weight`` (or bias) with channels ``[q; k; v]`` <-> megatron ``conv1d`` whose TP rank t holds
    ``[q_t; k_t; v_t]``."""

    layout = COLUMN

    def _rows(self, ctx) -> Dict[str, int]:
        rows = _section_rows(ctx, self.megatron_param)
        return {s: rows[s] for s in ("q", "k", "v")}

    def hf_to_megatron(self, hf, ctx, out=None):
        hf = single(hf, self)
        rows = self._rows(ctx)
        _check_rows(self.megatron_param, self.hf_param, hf.shape, sum(rows.values()), "conv channels q + k + v")
        q, k, v = torch.split(hf, list(rows.values()), dim=0)
        return _rank_block({"q": q, "k": k, "v": v}, ("q", "k", "v"), ctx, out)

    def megatron_shape(self, hf, ctx):
        hf = single(hf, self)
        rows = self._rows(ctx)
        _check_rows(self.megatron_param, self.hf_param, hf, sum(rows.values()), "conv channels q + k + v")
        return (sum(rows.values()) // ctx.tp_size, *hf[1:])

    def hf_shapes(self, shard, num_shards, ctx):
        return {self.hf_param: (sum(self._rows(ctx).values()), *shard[1:])}

    def megatron_to_hf(self, shards, ctx):
        rows = self._rows(ctx)
        s = _gather_sections(shards, ("q", "k", "v"), rows, self.megatron_param)
        full = ctx.empty((sum(rows.values()), *shards[0].shape[1:]), shards[0])
        return {self.hf_param: torch.cat([s["q"], s["k"], s["v"]], dim=0, out=full)}


class ZeroCenteredNormMapping(MegatronParamMapping):
    """A norm HF applies as ``x * w`` whose Megatron module applies ``x * (1 + w)`` (megatron's gated delta-net
    ``out_norm`` follows ``layernorm_zero_centered_gamma``, while Qwen3-Next's / Qwen3.5's gated norm weight is a
    plain one): Megatron holds ``w - 1``, HF ``w``; replicated.

    Both directions compute in fp32 and round to the tensor's dtype. ``w - 1`` and back are exact for every ``w``
    in [0.5, 2] (Sterbenz); outside it the stored ``w - 1`` is rounded to the parameter's dtype (in fp32, to 24
    bits), as any zero-centred copy of such a weight is.
    """

    layout = REPLICATED

    def hf_to_megatron(self, hf, ctx, out=None):
        hf = single(hf, self)
        shifted = hf.float() - 1.0
        if out is not None:
            return write(shifted, out)
        return shifted.to(hf.dtype)

    def megatron_to_hf(self, shards, ctx):
        m = shards[0]
        full = ctx.empty(tuple(m.shape), m)
        return {self.hf_param: full.copy_(m.float() + 1.0)}

    def megatron_shape(self, hf, ctx):
        return tuple(single(hf, self))

    def hf_shapes(self, shard, num_shards, ctx):
        return {self.hf_param: tuple(shard)}
