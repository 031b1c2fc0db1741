"""Multi-token prediction (DeepSeek-V3, GLM-4.5): the MTP layers a checkpoint or a model holds, their config
fields and mapping tables (the family's decoder-layer table re-addressed to each MTP layer, plus the copies of the
embedding and the output head), and the layout hooks of the families with routed experts and MTP layers.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Sequence

from megatron_bridge_ext.mappings import AutoMapping, CopiesMapping, MegatronParamMapping
from megatron_bridge_ext.mcore.versions import mtp_layer_module
from megatron_bridge_ext.models.hf_config import config_get
from megatron_bridge_ext.models.moe import family_expert_layout
from megatron_bridge_ext.models.tables import H, L

__all__ = ["MTPLayers", "detect_mtp_layers", "mtp_layers_of_model", "mtp_kwargs", "layer_mappings_at",
           "mtp_mappings", "RoutedExpertsWithMTP"]

@dataclass(frozen=True)
class MTPLayers:
    """Multi-token-prediction layers: MTP layer ``i`` (megatron ``mtp.layers.{i}``) is HF decoder layer
    ``first + i`` (``first`` = ``num_hidden_layers``), for ``i < count``.

    Attributes:
        first: HF index of the first MTP layer (the main model's layer count).
        count: number of MTP layers (megatron ``mtp_num_layers``, HF ``num_nextn_predict_layers``).
        tied: the model ties its output layer to the embedding (the MTP layers' head copies copy the embedding).
    """

    first: int
    count: int
    tied: bool = False

    def describe(self) -> str:
        return f"{self.count} multi-token-prediction layer(s) (HF model.layers.{self.first}" + (
            f"-{self.first + self.count - 1})" if self.count > 1 else ")")


_HF_LAYER = re.compile(r"^model\.layers\.(\d+)\.")


def detect_mtp_layers(hf_state: Mapping[str, Any], hf_config: Any, family: str,
                      field: str = "num_nextn_predict_layers") -> Optional[MTPLayers]:
    """The multi-token-prediction layers a checkpoint holds: HF decoder layers from ``num_hidden_layers`` on (read
    from the keys; transformers' configs say ``num_nextn_predict_layers = 1`` also for checkpoints without them, and
    transformers builds none). None when the checkpoint has none.

    Raises:
        ValueError: layers beyond ``num_hidden_layers`` that are not ``num_hidden_layers .. + k - 1`` with ``k`` the
            config's ``field``, naming a tensor, the layers found and the config's value.
    """
    layers = int(config_get(hf_config, "num_hidden_layers"))
    found: Dict[int, str] = {}
    for key in hf_state.keys():
        m = _HF_LAYER.match(key)
        if m is not None and int(m.group(1)) >= layers:
            found.setdefault(int(m.group(1)), key)
    if not found:
        return None
    declared = int(config_get(hf_config, field, 0) or 0)
    want = list(range(layers, layers + declared))
    if sorted(found) != want:
        example = found[max(found)]
        says = (f"{field}={declared}: multi-token-prediction layers are layers {layers}..{layers + declared - 1}"
                if declared else f"{field}=0 (no multi-token-prediction layers)")
        raise ValueError(f"{family}: the checkpoint holds tensors of HF layers {sorted(found)} beyond "
                         f"num_hidden_layers={layers} (e.g. {example}), but config.json says {says}")
    return MTPLayers(first=layers, count=declared, tied=bool(config_get(hf_config, "tie_word_embeddings", False)))


def mtp_layers_of_model(config: Any) -> Optional[MTPLayers]:
    """The multi-token-prediction layers of a Megatron model (its ``mtp_num_layers``); None without."""
    count = int(getattr(config, "mtp_num_layers", None) or 0)
    if not count:
        return None
    return MTPLayers(first=int(config.num_layers), count=count,
                     tied=bool(getattr(config, "share_embeddings_and_output_weights", False)))


def mtp_kwargs(mtp: Optional[MTPLayers], hf_config: Any, family: str) -> Dict[str, Any]:
    """``GPTConfig`` fields of a checkpoint's MTP layers (none without). megatron-core builds each MTP layer with
    the last decoder layer's spec; HF (DeepSeek-V3, GLM-4.5) makes layer ``n`` an MoE layer when
    ``n >= first_k_dense_replace``.

    Raises:
        ValueError: MTP layers of another kind (dense / MoE) than the last decoder layer.
    """
    if mtp is None:
        return {}
    k = int(config_get(hf_config, "first_k_dense_replace", 0) or 0)
    last_moe, mtp_moe = mtp.first - 1 >= k, mtp.first >= k
    if last_moe != mtp_moe:
        raise ValueError(f"{family}: first_k_dense_replace={k} makes the last of the {mtp.first} decoder layers dense "
                         "and the multi-token-prediction layers MoE layers; megatron-core builds them like the last "
                         "decoder layer")
    return {"mtp_num_layers": mtp.count}


def layer_mappings_at(mappings: Sequence[MegatronParamMapping], megatron_layer: str, hf_layer: str
                      ) -> List[MegatronParamMapping]:
    """The decoder-layer mappings (Megatron ``decoder.layers.*.X``, HF ``model.layers.*.Y``) re-addressed to one
    other layer: Megatron ``<megatron_layer>.X``, HF ``<hf_layer>.Y``, the layer wildcard gone on both sides
    (other wildcards, e.g. the expert index, stay). The registry has no index arithmetic; this spells out the few
    multi-token-prediction layers (megatron ``mtp.layers.{i}.transformer_layer`` = HF ``model.layers.{N + i}``;
    ``mtp_model_layer`` under megatron-core 0.19, see ``mcore.versions.mtp_layer_module``).
    Mappings that are not per decoder layer are left out.

    Raises:
        ValueError: a per-layer mapping with an HF name outside ``model.layers.*``.
    """
    out: List[MegatronParamMapping] = []
    meg_prefix, hf_prefix = f"{L}.", f"{H}."
    for m in mappings:
        if not m.megatron_param.startswith(meg_prefix):
            continue
        roles = m.hf_param if isinstance(m.hf_param, dict) else {None: m.hf_param}
        bad = [v for v in roles.values() if not v.startswith(hf_prefix)]
        if bad:
            raise ValueError(f"layer_mappings_at: {m!r} maps a decoder-layer parameter to {bad}, outside {hf_prefix}")
        moved = {r: f"{hf_layer}.{v[len(hf_prefix):]}" for r, v in roles.items()}
        out.append(m.with_names(f"{megatron_layer}.{m.megatron_param[len(meg_prefix):]}",
                                moved[None] if None in moved else moved))
    return out


def mtp_mappings(mtp: Optional[MTPLayers], layer: Sequence[MegatronParamMapping]) -> List[MegatronParamMapping]:
    """Mappings of multi-token-prediction layers (none without), to be registered before the main model's (the first
    match wins). MTP layer ``i`` (megatron-core ``MultiTokenPredictionLayer``, HF decoder layer ``n = first + i``):

    - ``enorm`` / ``hnorm`` (the norms of the shifted tokens' embedding and of the main model's hidden states),
      ``eh_proj`` (``[D, 2D]``, column-parallel, applied to ``[enorm(embedding); hnorm(hidden)]`` in both),
      ``final_layernorm`` = HF ``shared_head.norm``;
    - ``transformer_layer.*`` (0.19: ``mtp_model_layer.*``, ``mcore.versions.mtp_layer_module``) = the decoder
      layer's tensors of HF layer ``n`` (the family's per-layer ``layer`` table re-addressed, see
      :func:`layer_mappings_at`);
    - HF ``model.layers.n.embed_tokens`` and ``shared_head.head`` are copies of the embedding and the output head,
      which megatron-core shares with the main model: :class:`~megatron_bridge_ext.mappings.CopiesMapping` on the
      embedding and the output layer (on the embedding with tied embeddings) checks them on import and writes them
      on export.
    """
    if mtp is None:
        return []
    out: List[MegatronParamMapping] = []
    embed_copies = [f"model.layers.{mtp.first + i}.embed_tokens.weight" for i in range(mtp.count)]
    head_copies = [f"model.layers.{mtp.first + i}.shared_head.head.weight" for i in range(mtp.count)]
    if mtp.tied:
        out.append(CopiesMapping("embedding.word_embeddings.weight", "model.embed_tokens.weight",
                                 embed_copies + head_copies))
    else:
        out.append(CopiesMapping("embedding.word_embeddings.weight", "model.embed_tokens.weight", embed_copies))
        out.append(CopiesMapping("output_layer.weight", "lm_head.weight", head_copies))
    for i in range(mtp.count):
        meg, hf = f"mtp.layers.{i}", f"model.layers.{mtp.first + i}"
        out += [
            AutoMapping(f"{meg}.enorm.weight", f"{hf}.enorm.weight"),
            AutoMapping(f"{meg}.hnorm.weight", f"{hf}.hnorm.weight"),
            AutoMapping(f"{meg}.eh_proj.weight", f"{hf}.eh_proj.weight"),
            AutoMapping(f"{meg}.final_layernorm.weight", f"{hf}.shared_head.norm.weight"),
            *layer_mappings_at(layer, f"{meg}.{mtp_layer_module()}", hf),
        ]
    return out


class RoutedExpertsWithMTP:
    """Layout hooks of the families with ``n_routed_experts`` and multi-token-prediction layers (DeepSeek-V3,
    GLM-4.5): the expert layout and the MTP layers from the checkpoint, or from the model being exported. Listed
    before the bridge base class."""

    def detect_hf_layout(self, hf_state, hf_config):
        experts = family_expert_layout(self, hf_state, hf_config, experts_field="n_routed_experts")
        return dataclasses.replace(experts, mtp=detect_mtp_layers(hf_state, hf_config, type(self).__name__))

    def hf_layout_for_model(self, config):
        if config is None:
            return self.hf_layout
        return dataclasses.replace(self.hf_layout, mtp=mtp_layers_of_model(config))
