"""Qwen3.5 as released: the vision-language checkpoints ``Qwen3_5ForConditionalGeneration`` (dense) and
``Qwen3_5MoeForConditionalGeneration`` (MoE), converted for training the language model.

The checkpoint (transformers' ``Qwen3_5Config`` / ``Qwen3_5MoeConfig``, ``model_type`` ``qwen3_5`` /
``qwen3_5_moe``) holds:

- ``text_config``: the language model's config (``Qwen3_5TextConfig`` / ``Qwen3_5MoeTextConfig``), which drives the
  Megatron config exactly as the text-only families' ``config.json`` does (``models.qwen3_5``,
  ``models.qwen3_5_moe``); the top-level ``tie_word_embeddings`` is the one transformers ties by;
- ``model.language_model.*`` (embedding, decoder layers, final norm) and ``lm_head.weight``: the language model,
  mapped into the same Megatron ``GPTModel`` as the text-only families (their tables, HF names re-addressed);
- ``model.visual.*`` (the vision tower) and ``mtp.*`` (the multi-token-prediction layer, which transformers itself
  skips on load): **carried**, not converted. An import leaves them out of the Megatron model (the bridge's
  :attr:`~Qwen3_5VLBridge.carried_hf_params`, also accepted as unused by the import); a Megatron checkpoint written
  by ``import`` keeps them unchanged in ``iter_.../hf/carried.safetensors`` beside the source's ``config.json``. An
  export writes them back unchanged, from the source checkpoint (``--hf-source``) or from those side files, with the
  source's ``config.json``: the complete vision-language checkpoint, its language model's tensors from Megatron.
  Without either it is refused by name (no ``vision_config``, no vision tower: it could not write the checkpoint
  transformers loads). The MTP layer is carried, not trained: after training the language model it is the
  release's, unchanged (megatron-core's own MTP layers are not built for these families).

Needs megatron-core >= 0.19 (refused by name below it, like the text families).
"""

from __future__ import annotations

from typing import Any, Dict, List, Mapping, Tuple

from megatron_bridge_ext.engine.checks import check_raw_config
from megatron_bridge_ext.mappings import MegatronParamMapping
from megatron_bridge_ext.models.hf_config import LanguageModelConfig
from megatron_bridge_ext.models.qwen3_5 import Qwen3_5Bridge
from megatron_bridge_ext.models.qwen3_5_moe import Qwen3_5MoeBridge
from megatron_bridge_ext.models.tables import GPT_MODEL
from megatron_bridge_ext.registry import MegatronMappingRegistry

__all__ = ["Qwen3_5VLBridge", "Qwen3_5MoeVLBridge", "LANGUAGE_MODEL_PREFIX", "language_model_mappings"]

#: where the language model's ``model.*`` tensors live in the vision-language checkpoint
LANGUAGE_MODEL_PREFIX = "model.language_model."
#: the HF tensors of the vision-language checkpoints that are carried (see the module docstring)
CARRIED = ("model.visual.*", "mtp.*")


def _relocated(name: str, where: str) -> str:
    if name.startswith("model."):
        return LANGUAGE_MODEL_PREFIX + name[len("model."):]
    if name == "lm_head.weight":
        return name
    raise ValueError(f"{where}: HF name {name!r} is neither model.* nor lm_head.weight; cannot place it in the "
                     "vision-language checkpoint")


def language_model_mappings(registry: MegatronMappingRegistry, where: str) -> List[MegatronParamMapping]:
    """The text-only family's mappings with their HF names moved under ``model.language_model.`` (``lm_head.weight``
    stays where it is).

    Raises:
        ValueError: a mapping with an HF name outside ``model.*`` / ``lm_head.weight``.
    """
    out: List[MegatronParamMapping] = []
    for m in registry:
        if isinstance(m.hf_param, dict):
            moved: Any = {role: _relocated(v, where) for role, v in m.hf_param.items()}
        else:
            moved = _relocated(m.hf_param, where)
        out.append(m.with_names(m.megatron_param, moved))
    return out


class _TextKeys(Mapping):
    """A checkpoint's language-model tensors under their text-only names (``model.language_model.X`` read as
    ``model.X``), for the text families' key-reading hooks (the expert layout)."""

    def __init__(self, state: Any) -> None:
        self._state = state
        self._names = {"model." + k[len(LANGUAGE_MODEL_PREFIX):]: k
                       for k in state.keys() if k.startswith(LANGUAGE_MODEL_PREFIX)}

    def __getitem__(self, key: str) -> Any:
        return self._state[self._names[key]]

    def __iter__(self):
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)

    def shape(self, key: str) -> Tuple[int, ...]:
        shape = getattr(self._state, "shape", None)
        return tuple(shape(self._names[key])) if callable(shape) else tuple(self._state[self._names[key]].shape)


class _VisionLanguage:
    """What the two vision-language families add to their text-only family (listed before it)."""

    carried_hf_params: Tuple[str, ...] = CARRIED
    hf_source_needed = ("the vision-language checkpoint's config.json (vision_config) and its carried tensors "
                        "(model.visual.*, mtp.*) come from the source checkpoint (--hf-source) or from the side files "
                        "import kept")
    required_text_fields: Tuple[str, ...] = ()

    def __init_subclass__(cls, **kwargs: Any) -> None:
        # from the text family (the base after this one): its required fields are text_config's, its known
        # non-weights stay allowed beside the carried tensors
        super().__init_subclass__(**kwargs)
        text = next(b for b in cls.__bases__ if b is not _VisionLanguage)
        cls.required_hf_fields = ()
        cls.required_text_fields = text.required_hf_fields
        cls.known_non_weights = text.known_non_weights + CARRIED

    def language_model_config(self, hf_config: Any) -> Any:
        if isinstance(hf_config, LanguageModelConfig):
            return hf_config
        return LanguageModelConfig(hf_config, type(self).__name__)

    def check_hf_config(self, raw_config: Mapping[str, Any], where: str) -> None:
        text = raw_config.get("text_config")
        if not isinstance(text, Mapping):
            raise ValueError(f"{where}: {type(self).__name__}: text_config is {text!r}; a vision-language Qwen3.5 "
                             "config.json holds the language model's config as a JSON object there")
        check_raw_config(text, self.required_text_fields, type(self).__name__, f"{where} (text_config)")

    def hf_config_to_megatron_kwargs(self, hf_config: Any) -> Dict[str, Any]:
        return super().hf_config_to_megatron_kwargs(self.language_model_config(hf_config))  # type: ignore[misc]

    def megatron_to_hf_config(self, config: Any) -> Dict[str, Any]:
        raise ValueError(f"{type(self).__name__}: cannot write config.json from the Megatron model alone: "
                         f"{self.hf_source_needed}")

    def detect_hf_layout(self, hf_state, hf_config):
        # the text family's key reading (the expert layout) on the language model's tensors, text-only names
        return super().detect_hf_layout(_TextKeys(hf_state),  # type: ignore[misc]
                                        self.language_model_config(hf_config))

    def mapping_registry(self) -> MegatronMappingRegistry:
        text = super().mapping_registry()  # type: ignore[misc]
        return MegatronMappingRegistry(*language_model_mappings(text, type(self).__name__))


@Qwen3_5Bridge.register_bridge(source="Qwen3_5ForConditionalGeneration", target=GPT_MODEL)
class Qwen3_5VLBridge(_VisionLanguage, Qwen3_5Bridge):
    """HF Qwen3_5ForConditionalGeneration's language model <-> Megatron-Core GPTModel (vision tower and MTP layer
    carried)."""

    hf_model_type = "qwen3_5"


@Qwen3_5MoeBridge.register_bridge(source="Qwen3_5MoeForConditionalGeneration", target=GPT_MODEL)
class Qwen3_5MoeVLBridge(_VisionLanguage, Qwen3_5MoeBridge):
    """HF Qwen3_5MoeForConditionalGeneration's language model <-> Megatron-Core GPTModel (vision tower and MTP layer
    carried)."""

    hf_model_type = "qwen3_5_moe"
