"""GLM-5 (``GlmMoeDsaForCausalLM``): DeepSeek-V3.2's sparse attention (``models.deepseek_v32``) with GLM's choices.

- Indexer RoPE: interleaved pairs (HF ``apply_rotary_pos_emb_interleave``; megatron
  ``dsa_indexer_rope_interleaved=True``); scoring, ``k_norm`` (LayerNorm, epsilon 1e-6) and tensors as DeepSeek-V3.2.
- Cross-layer top-k sharing: HF ``indexer_types`` (per layer ``"full"``: the layer runs its indexer, ``"shared"``: it
  reuses the top-k of the last full layer and has no indexer tensors). megatron-core expresses periodic patterns
  (``dsa_indexer_topk_freq`` / ``dsa_indexer_skip_topk_offset``: layer ``n`` (1-based) computes when
  ``max(n - max(offset, 1), 0) % freq == 0``), which are what transformers derives from ``index_topk_freq`` /
  ``index_skip_topk_offset``; another pattern is refused naming ``indexer_types``. Megatron builds no indexer in a
  shared layer either, so the indexer mappings meet only the full layers' tensors.
- Pipeline stages: a shared layer needs its source layer earlier on the same (virtual) stage (megatron-core keeps
  the top-k per forward of one stage); a layout whose stage starts with a shared layer, or an uneven split, is
  refused by name.
- Multi-token-prediction layers convert with every indexer full; with sharing they are refused (HF's
  ``indexer_types`` has no entry for them, and megatron would number them past the decoder layers).

Latent norms: epsilon 1e-6 while ``rms_norm_eps`` is 1e-5 by default (``LatentRMSNorm`` latent norms). Everything
else (MLA, MoE with the sigmoid router, ``mlp_layer_types`` / ``first_k_dense_replace``) as DeepSeek-V3.2.
"""

from __future__ import annotations

from typing import Any, Dict, List, Tuple

from megatron_bridge_ext.engine import MegatronModelBridge
from megatron_bridge_ext.models.deepseek_v32 import DeepseekV32Bridge
from megatron_bridge_ext.models.hf_config import config_get
from megatron_bridge_ext.models.tables import GPT_MODEL

__all__ = ["GlmMoeDsaBridge", "indexer_types_of", "topk_sharing_of"]


def indexer_types_of(layers: int, freq: int, offset: int) -> List[str]:
    """Per layer ``"full"`` / ``"shared"`` of megatron-core's top-k sharing (``dsa_indexer_topk_freq`` ``freq``,
    ``dsa_indexer_skip_topk_offset`` ``offset``; megatron's ``is_dsa_skip_topk_layer`` on 1-based layers)."""
    start = max(int(offset), 1)
    return ["full" if max(n - start, 0) % int(freq) == 0 else "shared" for n in range(1, layers + 1)]


def topk_sharing_of(types: List[str], family: str) -> Tuple[int, int]:
    """``(dsa_indexer_topk_freq, dsa_indexer_skip_topk_offset)`` giving HF ``indexer_types`` (the smallest ones).

    Raises:
        ValueError: entries other than ``"full"`` / ``"shared"``, or a pattern no frequency / offset gives.
    """
    bad = sorted({t for t in types if t not in ("full", "shared")}, key=str)
    if bad:
        raise ValueError(f"{family}: indexer_types entries {bad} are neither 'full' nor 'shared' ({types})")
    layers = len(types)
    if all(t == "full" for t in types):
        return 1, 0
    for freq in range(2, layers + 1):
        for offset in range(1, layers + 1):
            if indexer_types_of(layers, freq, offset) == types:
                return freq, offset
    raise ValueError(f"{family}: indexer_types={types} is not a periodic top-k sharing pattern (megatron-core's "
                     "dsa_indexer_topk_freq / dsa_indexer_skip_topk_offset)")


@MegatronModelBridge.register_bridge(source="GlmMoeDsaForCausalLM", target=GPT_MODEL)
class GlmMoeDsaBridge(DeepseekV32Bridge):
    """HF GlmMoeDsaForCausalLM <-> Megatron-Core GPTModel with DSA (interleaved indexer RoPE, top-k sharing)."""

    hf_model_type = "glm_moe_dsa"
    hf_model_name = "GLM-5"
    indexer_rope_interleaved = True

    def hf_config_to_megatron_kwargs(self, hf_config: Any) -> Dict[str, Any]:
        family = type(self).__name__
        kw = super().hf_config_to_megatron_kwargs(hf_config)
        layers = int(config_get(hf_config, "num_hidden_layers"))
        types = config_get(hf_config, "indexer_types")
        types = ["full"] * layers if types is None else list(types)
        if len(types) != layers:
            raise ValueError(f"{family}: indexer_types has {len(types)} entries for num_hidden_layers={layers}")
        freq, offset = topk_sharing_of(types, family)
        if freq > 1 and kw.get("mtp_num_layers"):
            raise ValueError(f"{family}: multi-token-prediction layers with cross-layer top-k sharing "
                             f"(indexer_types={types}) are not converted")
        kw.update(dsa_indexer_topk_freq=freq, dsa_indexer_skip_topk_offset=offset)
        return kw

    def transformer_config(self, hf_config: Any, **overrides: Any):
        config = super().transformer_config(hf_config, **overrides)
        freq = config.dsa_indexer_topk_freq
        if freq > 1:
            uneven = {f: getattr(config, f, None) for f in ("num_layers_in_first_pipeline_stage",
                                                             "num_layers_in_last_pipeline_stage",
                                                             "pipeline_model_parallel_layout")
                      if getattr(config, f, None)}
            if uneven:
                raise ValueError(f"{type(self).__name__}: cross-layer top-k sharing (dsa_indexer_topk_freq={freq}) "
                                 f"with an uneven pipeline split {uneven} is not supported")
            types = indexer_types_of(config.num_layers, freq, config.dsa_indexer_skip_topk_offset)
            stages = config.pipeline_model_parallel_size * (config.virtual_pipeline_model_parallel_size or 1)
            per = config.num_layers // stages
            starts = [s * per for s in range(stages) if types[s * per] == "shared"]
            if starts:
                raise ValueError(f"{type(self).__name__}: pipeline_model_parallel_size="
                                 f"{config.pipeline_model_parallel_size} x virtual_pipeline_model_parallel_size="
                                 f"{config.virtual_pipeline_model_parallel_size} starts (virtual) stages at the shared "
                                 f"layers {starts} (indexer_types={types}); megatron-core shares the top-k only "
                                 "within a stage")
        return config

    def megatron_to_hf_config(self, config: Any) -> Dict[str, Any]:
        hf = super().megatron_to_hf_config(config)
        freq = config.dsa_indexer_topk_freq or 1
        if freq > 1 and config.mtp_num_layers:
            raise ValueError(f"{type(self).__name__}: multi-token-prediction layers with cross-layer top-k sharing "
                             f"(dsa_indexer_topk_freq={freq}) are not converted")
        hf["indexer_types"] = indexer_types_of(config.num_layers, freq, config.dsa_indexer_skip_topk_offset or 0)
        return hf
