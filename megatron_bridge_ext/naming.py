"""Megatron parameter names: the one home of the rules that read or build them (pure string rules, no dependency).

A megatron-core ``GPTModel`` names its tensors by module path:

- decoder layers ``decoder.layers.{i}.``, multi-token-prediction layers ``mtp.layers.{i}.`` (numbered apart from the
  decoder layers); a chunk numbers its layers locally, its global names carry the global index;
- routed experts under ``.mlp.experts.``: sequential ``local_experts.{e}.linear_fc1.weight`` or grouped-GEMM
  ``linear_fc1.weight{e}`` (shared experts are dense: ``.mlp.shared_experts.``);
- the vocabulary tensors ``embedding.word_embeddings.weight`` and ``output_layer.weight`` (padded rows);
- Transformer Engine's fused norms: a norm fused into the linear after it is that linear's ``layer_norm_weight`` /
  ``layer_norm_bias`` (``input_layernorm.weight`` <-> ``self_attention.linear_qkv.layer_norm_weight``);
- wrapper prefixes (``module.`` of DDP / Float16Module, ``._checkpoint_wrapped_module.``) and the ``_extra_state``
  objects of TE modules, which are not tensors to convert.

The compiled name ops (``csrc/cpu/names.cpp``: ``torch.ops.bridge.param_sort_key``, ``local_to_global_name`` and the
sort of ``gather_param_names``) implement :func:`sort_key` and :func:`local_to_global` by hand, for speed on ~10^5
names; the functions here are their statement in Python, and the name tests (``test_names.py``) check that both
agree.
"""

from __future__ import annotations

import re
from typing import NamedTuple, Optional, Tuple

__all__ = [
    "DECODER_LAYERS", "MTP_LAYERS", "WORD_EMBEDDINGS", "OUTPUT_LAYER", "VOCAB_TENSORS", "EXTRA_STATE",
    "INPUT_NORM", "PRE_MLP_NORM", "Q_LATENT_NORM", "KV_LATENT_NORM", "LAYER_NORM_ALIASES",
    "unwrap_name", "is_extra_state", "decoder_layer", "layer_param", "layer_number", "mtp_layer", "is_mtp",
    "is_embedding", "is_output_layer", "is_vocab", "is_routed_expert", "is_fused_norm_param", "layer_norm_alias",
    "fused_norm_key", "plain_norm_key", "LayerKey", "split_layer_key", "sort_key", "local_to_global",
]

DECODER_LAYERS = "decoder.layers."
MTP_LAYERS = "mtp.layers."
#: the embedding (shared with a tied output layer) and the output layer: both hold (padded) vocabulary rows
WORD_EMBEDDINGS = "embedding.word_embeddings.weight"
OUTPUT_LAYER = "output_layer.weight"
VOCAB_TENSORS: Tuple[str, str] = (WORD_EMBEDDINGS, OUTPUT_LAYER)
EXTRA_STATE = "_extra_state"

#: Transformer Engine fused norms, as (standalone norm prefix, fused prefix) in a layer: the norm before attention is
#: ``linear_qkv``'s, the norm before the MLP ``linear_fc1``'s; in a multi-latent-attention layer the q / kv latent
#: norms are the up projections'.
INPUT_NORM = ("input_layernorm.", "self_attention.linear_qkv.layer_norm_")
PRE_MLP_NORM = ("pre_mlp_layernorm.", "mlp.linear_fc1.layer_norm_")
Q_LATENT_NORM = ("self_attention.q_layernorm.", "self_attention.linear_q_up_proj.layer_norm_")
KV_LATENT_NORM = ("self_attention.kv_layernorm.", "self_attention.linear_kv_up_proj.layer_norm_")

#: TE fused layer-norm names <-> the non-fused (local spec) names, as name suffixes (weights and biases of the input
#: and pre-MLP norms): a mapping registered for one spelling answers the other.
LAYER_NORM_ALIASES: Tuple[Tuple[str, str], ...] = tuple(
    (fused + leaf, plain + leaf) for plain, fused in (INPUT_NORM, PRE_MLP_NORM) for leaf in ("weight", "bias"))

_DECODER_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.")
_ANY_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")
_MTP_LAYER = re.compile(r"^mtp\.layers\.(\d+)\.")
# a checkpoint key of a layer: decoder layers stacked (``decoder.layers.``) or one key per layer (``decoder.layers.3.``,
# megatron-core's non-homogeneous layers), and multi-token-prediction layers (``mtp.layers.0.transformer_layer.``)
_LAYER_KEY = re.compile(r"^(?P<prefix>decoder\.layers\.(?:(?P<layer>\d+)\.)?|mtp\.layers\.(?P<mtp>\d+)\."
                        r"transformer_layer\.)(?P<rest>.*)$")


def unwrap_name(name: str) -> str:
    """Strips ``module.`` prefixes (DDP / Float16Module wrappers) and ``._checkpoint_wrapped_module.``."""
    if not isinstance(name, str):
        raise ValueError(f"parameter name must be a string, got {type(name).__name__}")
    name = name.replace("._checkpoint_wrapped_module.", ".")
    while name.startswith("module."):
        name = name[len("module."):]
    return name


def is_extra_state(name: str) -> bool:
    """Whether a state-dict key is a TE module's ``_extra_state`` object (or lies under one): not a weight."""
    return EXTRA_STATE in name


def decoder_layer(name: str) -> Optional[int]:
    """The index of the decoder layer a name lies in (``decoder.layers.{i}.``), None outside the decoder layers."""
    m = _DECODER_LAYER.match(name)
    return None if m is None else int(m.group(1))


def layer_param(layer: int, rest: str) -> str:
    """The name of ``rest`` in decoder layer ``layer``: ``decoder.layers.{layer}.{rest}``."""
    return f"{DECODER_LAYERS}{layer}.{rest}"


def layer_number(name: str) -> Optional[int]:
    """The index of the first ``layers.{i}.`` of a name (decoder or multi-token-prediction layer), None if none."""
    m = _ANY_LAYER.search(name)
    return None if m is None else int(m.group(1))


def mtp_layer(name: str) -> Optional[int]:
    """The index of the multi-token-prediction layer a name lies in (``mtp.layers.{i}.``), None outside them."""
    m = _MTP_LAYER.match(name)
    return None if m is None else int(m.group(1))


def is_mtp(name: str) -> bool:
    """Whether a name lies in the multi-token-prediction block (``mtp.``)."""
    return name.startswith("mtp.")


def is_embedding(name: str) -> bool:
    """Whether a name lies in the embedding (``embedding.``: word and position embeddings)."""
    return name.startswith("embedding.")


def is_output_layer(name: str) -> bool:
    """Whether a name is (part of) the output layer."""
    return "output_layer" in name


def is_vocab(name: str) -> bool:
    """Whether a Megatron parameter holds vocabulary rows (padded on import, trimmed on export)."""
    return name.endswith("word_embeddings.weight") or name.endswith(OUTPUT_LAYER)


def is_routed_expert(name: str) -> bool:
    """Routed-expert tensors (sharded over EP and expert-TP); shared experts are dense."""
    return ".mlp.experts." in name


def is_fused_norm_param(name: str) -> bool:
    """Whether a parameter is a TE fused module's norm (``layer_norm_weight`` / ``layer_norm_bias``)."""
    return name.rsplit(".", 1)[-1].startswith("layer_norm")


def layer_norm_alias(name: str) -> Optional[str]:
    """The other spelling of a layer-norm parameter name (fused <-> non-fused, :data:`LAYER_NORM_ALIASES`), or None."""
    for fused, plain in LAYER_NORM_ALIASES:
        for a, b in ((fused, plain), (plain, fused)):
            if name == a:
                return b
            if name.endswith("." + a):
                return name[: len(name) - len(a)] + b
    return None


def fused_norm_key(rest: str, norm: Tuple[str, str]) -> str:
    """``rest`` (a name inside a layer) with the standalone norm ``norm`` (e.g. :data:`PRE_MLP_NORM`) spelled fused."""
    plain, fused = norm
    return fused + rest[len(plain):] if rest.startswith(plain) else rest


def plain_norm_key(rest: str, norm: Tuple[str, str]) -> str:
    """``rest`` (a name inside a layer) with the fused norm ``norm`` spelled as a standalone norm."""
    plain, fused = norm
    return plain + rest[len(fused):] if rest.startswith(fused) else rest


class LayerKey(NamedTuple):
    """A checkpoint key of a layer, split: ``prefix`` + ``rest``; ``layer`` / ``mtp`` the index in the key (None for
    stacked decoder layers / outside the MTP layers)."""

    prefix: str
    layer: Optional[int]
    mtp: Optional[int]
    rest: str


def split_layer_key(key: str) -> Optional[LayerKey]:
    """A checkpoint key of a decoder layer (stacked ``decoder.layers.``, or one per layer ``decoder.layers.{i}.``) or
    of a multi-token-prediction layer (``mtp.layers.{i}.transformer_layer.``), split; None for any other key."""
    m = _LAYER_KEY.match(key)
    if m is None:
        return None
    layer, mtp = m.group("layer"), m.group("mtp")
    return LayerKey(m.group("prefix"), None if layer is None else int(layer), None if mtp is None else int(mtp),
                    m.group("rest"))


# ---- the rules the compiled name ops implement ----------------------------------------------------------------------

_SORT_LAYER = re.compile(r"layers\.(\d+)", re.ASCII)
_SORT_EXPERT = re.compile(r"(?:bias|weight)(\d+)", re.ASCII)
_SORT_LOCAL_EXPERT = re.compile(r"local_experts\.(\d+)", re.ASCII)
_GLOBAL_LAYER = re.compile(r"layers\.(\d+)\.", re.ASCII)
_GROUPED_EXPERT = re.compile(r"\.(?:weight|bias)(\d+)$", re.ASCII)
_SEQUENTIAL_EXPERT = re.compile(r"\.mlp\.experts\.local_experts\.(\d+)\.", re.ASCII)


def sort_key(name: str) -> Tuple[int, int]:
    """``(layer, expert)`` of a global name, -1 where absent: the layer is the first ``layers(\\d+)``, the expert the
    first ``(bias|weight)(\\d+)``, else the first ``local_experts.(\\d+)``. The global order sorts by (key, name).
    Compiled: ``torch.ops.bridge.param_sort_key`` (:func:`megatron_bridge_ext.ops.param_sort_key`)."""
    m = _SORT_LAYER.search(name)
    layer = int(m.group(1)) if m else -1
    m = _SORT_EXPERT.search(name) or _SORT_LOCAL_EXPERT.search(name)
    return layer, (int(m.group(1)) if m else -1)


def local_to_global(name: str, layer_offset: int = 0, expert_offset: int = 0) -> str:
    """A local name with its first layer index (``layers.{i}.``) moved by ``layer_offset`` and its routed-expert index
    (grouped ``.mlp.experts.linear_fc*.weight{e}`` / ``bias{e}``, sequential ``.mlp.experts.local_experts.{e}.``) by
    ``expert_offset``; adapter parameters (``.adapter.``) keep their expert index. Compiled:
    ``torch.ops.bridge.local_to_global_name`` (:func:`megatron_bridge_ext.ops.local_to_global_name`).

    Raises:
        ValueError: an index that the offset makes negative.
    """
    edits = []
    if layer_offset:
        m = _GLOBAL_LAYER.search(name)
        if m is not None:
            edits.append((m.start(1), m.end(1), layer_offset, "layer"))
    if expert_offset and ".adapter." not in name:
        if ".mlp.experts.linear_fc" in name:
            m = _GROUPED_EXPERT.search(name)
            if m is not None:
                edits.append((m.start(1), m.end(1), expert_offset, "expert"))
        m = _SEQUENTIAL_EXPERT.search(name)
        if m is not None:
            edits.append((m.start(1), m.end(1), expert_offset, "expert"))
    out, pos = [], 0
    for begin, end, offset, what in sorted(edits):
        local = int(name[begin:end])
        if local + offset < 0:
            raise ValueError(f"local_to_global_name: {what} index {local} + offset {offset} is negative for '{name}'")
        out += [name[pos:begin], str(local + offset)]
        pos = end
    return "".join(out) + name[pos:]
