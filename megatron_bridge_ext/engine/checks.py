"""Checks of an HF checkpoint against itself and against the bridge, made before any weight is converted, and the
context that every conversion error carries.

- :func:`check_raw_config`: the fields a family needs are present in ``config.json`` as written, as positive
  integers, before transformers fills in defaults that do not describe the weights.
- :func:`check_config_against_tensors`: the config agrees with the tensors' shapes (headers only, nothing is read):
  layer count, vocabulary rows, heads x head_dim, experts per layer; both sides are named.
- :func:`unused_hf_tensors`: every HF tensor is consumed by a conversion task, or named.
- :func:`check_rotary_inv_freq`: a stored ``rotary_emb.inv_freq`` (dropped as a known non-weight) holds what the
  config's rope settings give; one that differs is named with its largest deviation.
- :func:`check_dtype_class`: an integer tensor where a floating weight belongs (and the reverse) is named, never cast.
- :func:`conversion_error`: an exception raised inside a mapping or an op, re-raised with the HF name(s), the
  Megatron name and the file.
"""

from __future__ import annotations

import fnmatch
from types import SimpleNamespace
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import torch

from megatron_bridge_ext.mappings import COLUMN, ConversionContext, MegatronParamMapping
from megatron_bridge_ext.naming import VOCAB_TENSORS, decoder_layer, layer_param
from megatron_bridge_ext.registry import MegatronMappingRegistry

__all__ = [
    "KNOWN_NON_WEIGHTS",
    "check_raw_config",
    "check_config_against_tensors",
    "short_names",
    "unused_hf_tensors",
    "ROTARY_INV_FREQ",
    "reference_inv_freqs",
    "check_rotary_inv_freq",
    "check_dtype_class",
    "dtype_class",
    "conversion_error",
]

#: HF tensors that are not weights (buffers some transformers versions saved); the default of
#: ``allowed_unused_hf_params``. ``rotary_emb.inv_freq`` is recomputed from ``rope_theta`` / ``rope_parameters`` by
#: both transformers and megatron-core.
ROTARY_INV_FREQ = "*.rotary_emb.inv_freq"
KNOWN_NON_WEIGHTS: Tuple[str, ...] = (ROTARY_INV_FREQ,)
#: a stored inverse frequency may differ from the recomputed one by this many units in the last place of its dtype
#: (transformers versions computed it with slightly different float formulas); an edited rope is far beyond it
INV_FREQ_ULPS = 4


def _is_positive_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x > 0


def check_raw_config(raw: Mapping[str, Any], required: Sequence[str], family: str, where: str) -> None:
    """The fields ``required`` are in the raw ``config.json`` as positive integers.

    Raises:
        ValueError: naming the file, the family, every missing field, and every field whose value is not a positive
            integer (with the value).
    """
    missing = [f for f in required if raw.get(f) is None]
    if missing:
        raise ValueError(
            f"{where}: {family} needs {missing} in config.json, which lacks {'it' if len(missing) == 1 else 'them'} "
            "(transformers would fill in defaults that need not describe these weights)"
        )
    bad = {f: raw[f] for f in required if not _is_positive_int(raw[f])}
    if bad:
        raise ValueError(f"{where}: {family} needs positive integers for {sorted(bad)}, config.json has {bad}")


def _ranges(ids: Iterable[int]) -> str:
    ids = sorted(set(ids))
    if not ids:
        return "none"
    out, start, prev = [], ids[0], ids[0]
    for i in ids[1:] + [None]:  # type: ignore[list-item]
        if i is not None and i == prev + 1:
            prev = i
            continue
        out.append(f"{start}" if start == prev else f"{start}-{prev}")
        if i is not None:
            start = prev = i
    return ", ".join(out)


def check_config_against_tensors(kwargs: Mapping[str, Any], registry: MegatronMappingRegistry, state: Any,
                                 where: str) -> None:
    """The Megatron config of a checkpoint (``kwargs`` from its config) agrees with its tensors' shapes.

    Checked from the headers (no data read): the decoder layers the tensors hold are exactly ``0 .. num_layers-1``;
    the embedding (and an untied output layer) has ``vocab_size`` rows of ``hidden_size``; each layer's q/k/v rows are
    heads x head_dim and query groups x head_dim; each MoE layer holds ``num_moe_experts`` experts.

    Raises:
        ValueError: naming the config field and its value, and the tensor, its file and its shape.
    """
    keys = list(state.keys())

    def file_of(name: str) -> str:
        try:
            return state.file_of(name)
        except Exception:  # a source without files
            return "the checkpoint"

    layers: Dict[int, str] = {}
    experts: Dict[int, Dict[int, str]] = {}
    for name in keys:
        mapping = registry.hf_to_megatron_lookup(name)
        if mapping is None:
            continue
        layer = decoder_layer(mapping.megatron_param)
        if layer is None:
            continue
        layers.setdefault(layer, name)
        expert = getattr(mapping, "expert", None)
        per_expert = expert is not None and name not in (
            mapping.hf_param.values() if isinstance(mapping.hf_param, dict) else (mapping.hf_param,))
        if per_expert:
            experts.setdefault(layer, {}).setdefault(expert, name)

    n = kwargs.get("num_layers")
    if n is not None and layers and set(layers) != set(range(n)):
        beyond = sorted(i for i in layers if i >= n)
        example = layers[beyond[0]] if beyond else None
        raise ValueError(
            f"{where}: config.json says num_hidden_layers = {n}, but the tensors hold decoder layers "
            f"{_ranges(layers)}" + (f" (e.g. {example} in {file_of(example)})" if example else
                                    f" (layers {_ranges(set(range(n)) - set(layers))} are missing)")
        )

    vocab, hidden = kwargs.get("vocab_size"), kwargs.get("hidden_size")
    for megatron_name in VOCAB_TENSORS:
        mapping = registry.megatron_to_hf_lookup(megatron_name)
        if mapping is None:
            continue
        for name in mapping.hf_names:  # the tensor and any copies of it (e.g. MTP layers' embedding / head)
            if name not in state:
                continue
            shape = tuple(state.shape(name))
            if len(shape) != 2 or (vocab is not None and shape[0] != vocab) or (
                    hidden is not None and shape[1] != hidden):
                raise ValueError(
                    f"{where}: config.json says vocab_size = {vocab} and hidden_size = {hidden}, but {name} in "
                    f"{file_of(name)} has shape {list(shape)} (expected [{vocab}, {hidden}])"
                )

    heads, groups = kwargs.get("num_attention_heads"), kwargs.get("num_query_groups")
    d = kwargs.get("kv_channels")
    if heads and groups and d:
        for layer in sorted(layers):
            mapping = registry.megatron_to_hf_lookup(layer_param(layer, "self_attention.linear_qkv.weight"))
            if mapping is None:
                mapping = registry.megatron_to_hf_lookup(layer_param(layer, "self_attention.linear_kv.weight"))
            _check_attention_rows(mapping, heads, groups, d, hidden, state, where, file_of)

    want_experts = kwargs.get("num_moe_experts")
    if want_experts:
        for layer, found in sorted(experts.items()):
            if set(found) != set(range(want_experts)):
                example = found[max(found)]
                raise ValueError(
                    f"{where}: config.json says {want_experts} experts per layer (num_moe_experts), but layer "
                    f"{layer}'s tensors hold experts {_ranges(found)} (e.g. {example} in {file_of(example)})"
                )


def _check_attention_rows(mapping: Optional[MegatronParamMapping], heads: int, groups: int, d: int,
                          hidden: Optional[int], state: Any, where: str, file_of) -> None:
    """The stored q/k/v (or fused qkv, or k/v) tensors have the rows the config's heads, groups and head_dim give:
    the mapping's shape contract taken both ways (the Megatron shape of the stored tensors, then the HF shapes that
    shape gives, whose rows come from the config) must give back the stored shapes."""
    if mapping is None:
        return
    names = mapping.hf_param if isinstance(mapping.hf_param, dict) else {None: mapping.hf_param}
    if not all(isinstance(n, str) and n in state for n in names.values()):
        return  # a missing tensor is named by the task check
    stored = {role: tuple(state.shape(name)) for role, name in names.items()}
    if getattr(mapping, "dims", None) is not None:  # a layer of its own geometry (e.g. Gemma 4's full layers)
        heads, groups, d = mapping.dims
    config = SimpleNamespace(num_attention_heads=heads, num_query_groups=groups, kv_channels=d, hidden_size=hidden)
    ctx = ConversionContext(config=config, layout=COLUMN)  # linear_qkv / linear_kv are column-parallel
    try:
        want = mapping.hf_shapes(mapping.megatron_shape(stored[None] if None in stored else stored, ctx), 1, ctx)
    except ValueError as e:
        raise ValueError(f"{where}: {e} (num_attention_heads, num_key_value_heads, head_dim)") from None
    gate = bool(getattr(mapping, "output_gate", False))
    for role, name in names.items():
        shape, rows = stored[role], want[name][0]
        if not shape or shape[0] != rows or (hidden is not None and len(shape) == 2 and shape[1] != hidden):
            what = {"q": f"num_attention_heads {heads}{' x 2 (output gate)' if gate else ''} x head_dim {d}",
                    "k": f"num_key_value_heads {groups} x head_dim {d}",
                    "v": f"num_key_value_heads {groups} x head_dim {d}",
                    None: f"(num_attention_heads {heads} + 2 x num_key_value_heads {groups}) x head_dim {d}"}.get(
                        role, f"num_attention_heads {heads}, num_key_value_heads {groups}, head_dim {d}")
            raise ValueError(
                f"{where}: config.json gives {what} = {rows} rows of hidden_size {hidden}, but {name} in "
                f"{file_of(name)} has shape {list(shape)}"
            )


def unused_hf_tensors(keys: Iterable[str], consumed: Iterable[str], allowed: Sequence[str]) -> List[str]:
    """HF tensor names that no task consumes and no ``allowed`` fnmatch pattern covers, in checkpoint order."""
    used = set(consumed)
    return [k for k in keys if k not in used and not any(fnmatch.fnmatchcase(k, p) for p in allowed)]


def reference_inv_freqs(hf_config: Any) -> List[Tuple[str, torch.Tensor]]:
    """The rotary inverse frequencies the config's rope settings give, as transformers computes them: every
    ``*inv_freq`` buffer (one per layer type, e.g. Gemma 3's full and sliding layers) of the family's
    ``*RotaryEmbedding`` modules built from the config, in fp32. Empty when transformers has none for the family."""
    import importlib

    module_name = type(hf_config).__module__.replace(".configuration_", ".modeling_")
    try:
        module = importlib.import_module(module_name)
    except ImportError:
        return []
    out = []
    for cls_name, cls in sorted(vars(module).items()):
        if not (cls_name.endswith("RotaryEmbedding") and isinstance(cls, type) and issubclass(cls, torch.nn.Module)):
            continue
        try:
            rotary = cls(hf_config)
        except Exception:  # noqa: BLE001  (a rotary class for another config of the module, e.g. vision)
            continue
        for name, buf in rotary.named_buffers():
            if name.endswith("inv_freq") and "original" not in name:
                out.append((f"{cls_name}.{name}", buf.detach().to(torch.float32)))
    return out


def _ulp(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).eps if dtype.is_floating_point else 0.0


def check_rotary_inv_freq(state: Any, names: Sequence[str], hf_config: Any, file_of) -> None:
    """Each stored ``rotary_emb.inv_freq`` in ``names`` equals (within :data:`INV_FREQ_ULPS` units in the last place
    of its dtype, relative) one of the inverse frequencies the config gives (:func:`reference_inv_freqs`): dropping it
    then loses nothing. A checkpoint whose rotary frequencies were edited would convert into a different model.

    Raises:
        ValueError: naming the tensor, its file, the largest deviation (absolute and relative) from the closest
            recomputed frequencies of the same shape, and the rope settings; or the shape when none has it.
    """
    if not names:
        return
    refs = reference_inv_freqs(hf_config)
    rope = getattr(hf_config, "rope_parameters", None) or {"rope_theta": getattr(hf_config, "rope_theta", None)}
    for name in names:
        stored = state[name]
        if not refs:
            raise ValueError(
                f"HF tensor {name} in {file_of(name)}: transformers has no rotary embedding for "
                f"{type(hf_config).__name__} to check it against; pass allowed_unused_hf_params=[{name!r}] to drop it")
        if not stored.is_floating_point():
            raise ValueError(f"HF tensor {name} in {file_of(name)} is {stored.dtype}, not floating-point rotary "
                             "inverse frequencies")
        same = [(label, ref) for label, ref in refs if tuple(ref.shape) == tuple(stored.shape)]
        if not same:
            raise ValueError(
                f"HF tensor {name} in {file_of(name)} has shape {list(stored.shape)}; the config's rope settings "
                f"({rope}) give inverse frequencies of shape {sorted({tuple(r.shape) for _, r in refs})}: converting "
                "would build a model with other rotary frequencies than the checkpoint's")
        s64 = stored.detach().to(torch.float64)
        best = None
        for label, ref in same:
            r64 = ref.to(stored.dtype).to(torch.float64)
            dev = (s64 - r64).abs()
            rel = float((dev / r64.abs().clamp_min(torch.finfo(torch.float32).tiny)).max())
            if best is None or rel < best[0]:
                best = (rel, float(dev.max()), label)
        assert best is not None
        if best[0] > INV_FREQ_ULPS * _ulp(stored.dtype):
            raise ValueError(
                f"HF tensor {name} in {file_of(name)} differs from the rotary inverse frequencies the config's rope "
                f"settings ({rope}) give: largest deviation {best[1]:.6g} ({best[0]:.3g} relative, vs "
                f"{best[2]}); a checkpoint whose rotary frequencies were edited would convert into a different "
                f"model. Fix config.json, or pass allowed_unused_hf_params=[{name!r}] to drop it anyway")


def dtype_class(dtype: torch.dtype) -> str:
    """``floating``, ``complex``, ``bool`` or ``integer``."""
    if dtype.is_floating_point:
        return "floating"
    if dtype.is_complex:
        return "complex"
    if dtype == torch.bool:
        return "bool"
    return "integer"


def check_dtype_class(hf_names: Sequence[str], hf_dtypes: Sequence[torch.dtype], target: torch.dtype,
                      megatron_name: str, file_of) -> None:
    """Each HF tensor's dtype class (integer, floating, ...) is the target's: a cast between classes cannot be right.

    Raises:
        ValueError: naming the HF tensor, its dtype and file, the Megatron parameter and its dtype.
    """
    want = dtype_class(target)
    for name, dt in zip(hf_names, hf_dtypes):
        if dtype_class(dt) != want:
            raise ValueError(
                f"HF tensor {name} in {file_of(name)} is {str(dt).replace('torch.', '')} ({dtype_class(dt)}), but "
                f"Megatron parameter {megatron_name} is {str(target).replace('torch.', '')} ({want}): refusing to "
                "cast between dtype classes"
            )


_SAME_TYPE = (ValueError, TypeError, RuntimeError, IndexError, KeyError, NotImplementedError, AssertionError)


def short_names(names: Sequence[str], limit: int = 4) -> str:
    """HF names for a message: the first ``limit``, and how many there are when more."""
    names = list(names)
    return ", ".join(names[:limit]) + (f" ... ({len(names)} tensors)" if len(names) > limit else "")


def conversion_error(exc: BaseException, context: str) -> BaseException:
    """``exc`` as the same builtin type (else RuntimeError) with ``context`` in front of its message."""
    detail = exc.args[0] if isinstance(exc, KeyError) and exc.args else str(exc)
    message = f"{context}: {type(exc).__name__}: {detail}"
    cls = type(exc) if type(exc) in _SAME_TYPE else RuntimeError
    try:
        new = cls(message)
    except Exception:  # pragma: no cover - builtin types take one message
        new = RuntimeError(message)
    new.bridge_context = True  # type: ignore[attr-defined]
    return new
