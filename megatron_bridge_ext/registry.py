"""The mapping registry: resolves a Megatron or HF parameter name to the mapping that converts it.

Patterns use two wildcards, anchored at both ends: ``*`` matches digits only (a layer or expert index) and ``**``
matches anything (dots included). Both sides of a mapping carry the same number of wildcards; the captures of the side
that matched are substituted, in order, into the other side (into every value of a dict ``hf_param``).

The first registered mapping that matches wins. Wildcard-free names are dict lookups; every resolved name is cached,
so a model with 10^5 parameters pays one scan per distinct name at most.

Expert mappings (``mapping.grouped``) resolve to their layer's group: the expert index (the last wildcard) stays ``*``
in the resolved names and is recorded as ``mapping.expert``; an HF side fused over experts carries one wildcard less.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

from megatron_bridge_ext.mappings import HFParam, MegatronParamMapping
from megatron_bridge_ext.naming import LAYER_NORM_ALIASES, layer_norm_alias

__all__ = ["MegatronMappingRegistry", "LAYER_NORM_ALIASES"]

_TOKEN = re.compile(r"\*\*|\*")


@dataclass(frozen=True)
class _Pattern:
    """One compiled name pattern."""

    text: str
    parts: Tuple[str, ...]  # literal pieces around the wildcards: len(parts) == n_wildcards + 1
    regex: Optional["re.Pattern[str]"]  # None for wildcard-free names

    @property
    def n_wildcards(self) -> int:
        return len(self.parts) - 1

    def fill(self, captures: Sequence[str]) -> str:
        out = [self.parts[0]]
        for cap, lit in zip(captures, self.parts[1:]):
            out.append(cap)
            out.append(lit)
        return "".join(out)


def _compile(text: str) -> _Pattern:
    parts = tuple(_TOKEN.split(text))
    if len(parts) == 1:
        return _Pattern(text, parts, None)
    regex_parts = []
    for i, tok in enumerate(_TOKEN.finditer(text)):
        regex_parts.append(re.escape(parts[i]))
        regex_parts.append(r"(\d+)" if tok.group() == "*" else r"(.*)")
    regex_parts.append(re.escape(parts[-1]))
    return _Pattern(text, parts, re.compile("".join(regex_parts)))


class _Compiled:
    """A registered mapping with its compiled patterns."""

    __slots__ = ("mapping", "order", "megatron", "hf", "grouped")

    def __init__(self, mapping: MegatronParamMapping, order: int) -> None:
        if not isinstance(mapping, MegatronParamMapping):
            raise ValueError(f"MegatronMappingRegistry takes MegatronParamMapping objects, got {mapping!r}")
        if not isinstance(mapping.megatron_param, str):
            raise ValueError(f"{mapping!r}: megatron_param must be a string")
        self.mapping = mapping
        self.order = order
        self.megatron = _compile(mapping.megatron_param)
        hf = mapping.hf_param
        if isinstance(hf, str):
            self.hf: Dict[Optional[str], _Pattern] = {None: _compile(hf)}
        elif isinstance(hf, dict) and hf and all(isinstance(v, str) for v in hf.values()):
            self.hf = {role: _compile(v) for role, v in hf.items()}
        else:
            raise ValueError(f"{mapping!r}: hf_param must be a string or a non-empty dict of role -> string")
        n = self.megatron.n_wildcards
        self.grouped = bool(getattr(mapping, "grouped", False))
        if self.grouped and n < 1:
            raise ValueError(f"{mapping!r}: an expert mapping's megatron_param {mapping.megatron_param!r} needs the "
                             "expert index as its last wildcard")
        fused_roles = set(getattr(mapping, "fused_roles", ()))
        for role, pat in self.hf.items():
            want = n - 1 if self.grouped and role in fused_roles else n  # a fused HF tensor has no expert index
            if pat.n_wildcards != want:
                where = "hf_param" if role is None else f"hf_param[{role!r}]"
                raise ValueError(
                    f"{mapping!r}: megatron_param {mapping.megatron_param!r} has {n} wildcard(s) but {where} "
                    f"{pat.text!r} has {pat.n_wildcards} (expected {want})"
                )

    def resolve(self, captures: Sequence[str], megatron_name: Optional[str] = None) -> MegatronParamMapping:
        if self.grouped:
            return self._resolve_group(captures)
        meg = megatron_name if megatron_name is not None else self.megatron.fill(captures)
        if None in self.hf:
            hf: HFParam = self.hf[None].fill(captures)
        else:
            hf = {role: pat.fill(captures) for role, pat in self.hf.items()}
        return self.mapping.with_names(meg, hf)

    def resolve_hf(self, pat: _Pattern, captures: Sequence[str]) -> MegatronParamMapping:
        """The mapping resolved from an HF name that ``pat`` (one of its HF patterns) matched with ``captures``. A
        fused expert tensor (its pattern one wildcard short of the Megatron name's: no expert index) resolves to its
        layer's group, the expert index left open and no ``expert`` set."""
        if self.grouped and pat.n_wildcards == self.megatron.n_wildcards - 1:
            open_expert = [*captures, "*"]
            hf = {role: p.fill(captures if p.n_wildcards == len(captures) else open_expert)
                  for role, p in self.hf.items()}
            return self.mapping.with_names(self.megatron.fill(open_expert), hf)
        return self.resolve(captures)

    def _resolve_group(self, captures: Sequence[str]) -> MegatronParamMapping:
        """An expert mapping resolved to its layer's group: the expert index (last capture) stays a wildcard."""
        *outer, expert = captures
        if not expert.isdigit():
            raise ValueError(f"{self.mapping!r}: expert index {expert!r} of a resolved name is not a number")
        open_expert = [*outer, "*"]
        hf = {role: pat.fill(outer if pat.n_wildcards == len(outer) else open_expert) for role, pat in self.hf.items()}
        resolved = self.mapping.with_names(self.megatron.fill(open_expert), hf)
        resolved.expert = int(expert)  # type: ignore[attr-defined]
        return resolved


class MegatronMappingRegistry:
    """An ordered set of parameter mappings with cached, wildcard-aware lookups in both directions.

    Args:
        *mappings: the mappings, in precedence order (the first match wins).

    Raises:
        ValueError: a mapping whose two sides carry different numbers of wildcards, or a malformed mapping.
    """

    def __init__(self, *mappings: MegatronParamMapping) -> None:
        self._compiled: List[_Compiled] = [_Compiled(m, i) for i, m in enumerate(mappings)]
        # Exact (wildcard-free) names -> first mapping spelling them; wildcard mappings scanned in order.
        self._meg_exact: Dict[str, _Compiled] = {}
        self._meg_wild: List[_Compiled] = []
        self._hf_exact: Dict[str, Tuple[_Compiled, _Pattern]] = {}
        self._hf_wild: List[Tuple[_Compiled, _Pattern]] = []
        for c in self._compiled:
            if c.megatron.regex is None:
                self._meg_exact.setdefault(c.megatron.text, c)
            else:
                self._meg_wild.append(c)
            for pat in c.hf.values():
                if pat.regex is None:
                    self._hf_exact.setdefault(pat.text, (c, pat))
                else:
                    self._hf_wild.append((c, pat))
        self._meg_cache: Dict[str, Optional[MegatronParamMapping]] = {}
        self._hf_cache: Dict[str, Optional[MegatronParamMapping]] = {}

    # ---- Megatron -> HF -----------------------------------------------------------------------------------------

    def _match_megatron(self, name: str) -> Optional[MegatronParamMapping]:
        exact = self._meg_exact.get(name)
        for c in self._meg_wild:
            if exact is not None and c.order > exact.order:
                break
            m = c.megatron.regex.fullmatch(name)  # type: ignore[union-attr]
            if m is not None:
                return c.resolve(m.groups())
        if exact is not None:
            return exact.resolve((), megatron_name=name)
        return None

    def megatron_to_hf_lookup(self, megatron_param_name: str) -> Optional[MegatronParamMapping]:
        """The mapping for a (global) Megatron parameter name, with wildcards resolved; None when nothing matches.

        A fused layer-norm name (``...self_attention.linear_qkv.layer_norm_weight``) is also answered by a mapping
        registered for its non-fused spelling (``...input_layernorm.weight``) and vice versa (likewise
        ``mlp.linear_fc1.layer_norm_*`` <-> ``pre_mlp_layernorm.*``; the pairs are
        :data:`megatron_bridge_ext.naming.LAYER_NORM_ALIASES`); an explicit mapping always wins.
        """
        try:
            return self._meg_cache[megatron_param_name]
        except KeyError:
            pass
        result = self._match_megatron(megatron_param_name)
        if result is None:
            alias = layer_norm_alias(megatron_param_name)
            if alias is not None:
                found = self._match_megatron(alias)
                if found is not None:
                    result = found.with_names(megatron_param_name, found.hf_param)
        self._meg_cache[megatron_param_name] = result
        return result

    # ---- HF -> Megatron -----------------------------------------------------------------------------------------

    def hf_to_megatron_lookup(self, hf_param_name: str) -> Optional[MegatronParamMapping]:
        """The mapping that reads an HF tensor name (any value of a dict ``hf_param``), resolved; None if none."""
        try:
            return self._hf_cache[hf_param_name]
        except KeyError:
            pass
        exact = self._hf_exact.get(hf_param_name)
        result: Optional[MegatronParamMapping] = None
        for c, pat in self._hf_wild:
            if exact is not None and c.order > exact[0].order:
                break
            m = pat.regex.fullmatch(hf_param_name)  # type: ignore[union-attr]
            if m is not None:
                result = c.resolve_hf(pat, m.groups())
                break
        if result is None and exact is not None:
            result = exact[0].resolve_hf(exact[1], ())
        self._hf_cache[hf_param_name] = result
        return result

    # ---- container API --------------------------------------------------------------------------------------------

    def __iter__(self) -> Iterator[MegatronParamMapping]:
        return (c.mapping for c in self._compiled)

    def __len__(self) -> int:
        return len(self._compiled)

    def megatron_patterns(self) -> List[str]:
        """The Megatron name patterns, in registration order."""
        return [c.megatron.text for c in self._compiled]

    def hf_patterns(self) -> List[HFParam]:
        """The HF name patterns (strings or role dicts), in registration order."""
        return [c.mapping.hf_param for c in self._compiled]

    def __repr__(self) -> str:
        lines = [f"MegatronMappingRegistry({len(self)} mappings)"]
        for c in self._compiled:
            lines.append(f"  {type(c.mapping).__name__}: {c.megatron.text} <-> {c.mapping.hf_param!r}")
        return "\n".join(lines)
