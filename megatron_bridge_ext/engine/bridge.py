"""The family contract: :class:`MegatronModelBridge`, which every model family subclasses (see
:mod:`megatron_bridge_ext.models`) with its config translation in both directions and its mapping table, plus what the
conversion loops ask of it (the mapping table for a layout, tasks, conversion contexts).

The loops live apart: import (HF -> Megatron) in :mod:`.importing`, export (Megatron -> HF) and the one consumer of
exported buckets in :mod:`.exporting`; the bridge mixes them in, so ``bridge.load_weights_hf_to_megatron`` and
``bridge.stream_weights_megatron_to_hf`` are its entry points.
"""

from __future__ import annotations

import logging
from typing import Any, Dict, Hashable, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import torch

from megatron_bridge_ext.engine.checks import KNOWN_NON_WEIGHTS, check_config_against_tensors, check_raw_config
from megatron_bridge_ext.engine.exporting import DEFAULT_BUCKET_BYTES, ExportLoop, HFWeightTuple
from megatron_bridge_ext.engine.importing import ImportLoop, MegatronWeightTuple
from megatron_bridge_ext.engine.peers import Watch, current_watch
from megatron_bridge_ext.engine.progress import progress
from megatron_bridge_ext.engine.tasks import ConversionTasks, GlobalOrder, ParamMeta, WeightConversionTask, build_tasks
from megatron_bridge_ext.engine.transport import Scratch, Transport
from megatron_bridge_ext.io.hf_checkpoint import carried_names
from megatron_bridge_ext.mappings import EXPERTS, ConversionContext
from megatron_bridge_ext.mcore.layout import detect_layout
from megatron_bridge_ext.mcore.names import LocalParam, ModelView, as_chunks, model_config
from megatron_bridge_ext.mcore.versions import require_megatron_core_for, unmet_megatron_core
from megatron_bridge_ext.naming import WORD_EMBEDDINGS, is_routed_expert
from megatron_bridge_ext.registry import MegatronMappingRegistry

logger = logging.getLogger(__name__)

__all__ = [
    "MegatronModelBridge",
    "WeightConversionTask",
    "ConversionTasks",
    "MegatronWeightTuple",
    "HFWeightTuple",
    "DEFAULT_BUCKET_BYTES",
    "progress",
]

Model = Union[torch.nn.Module, Sequence[torch.nn.Module]]


class MegatronModelBridge(ImportLoop, ExportLoop):
    """Orchestrates HF <-> Megatron conversion for one architecture.

    Subclasses (one per model family, see :mod:`megatron_bridge_ext.models`) provide the config translation both ways
    (:meth:`hf_config_to_megatron_kwargs`, :meth:`megatron_to_hf_config`) and :meth:`mapping_registry`, and register
    themselves with :meth:`register_bridge`.
    """

    #: HF tensor names that exist only in some checkpoints and are produced on export only when the source has them.
    tied_output_hf_name: str = "lm_head.weight"
    #: the HF architecture (``config.architectures[0]``) and ``model_type`` this bridge writes on export; the
    #: architecture defaults to the name the bridge is registered under
    hf_architecture: Optional[str] = None
    hf_model_type: Optional[str] = None
    #: the oldest megatron-core release this family converts with (its layers are not in older ones: the family
    #: refuses itself there, see :meth:`require_megatron_core`); None: every supported release. ``list-models``
    #: reports it.
    min_megatron_core: Optional[Tuple[int, int, int]] = None
    #: what of ``min_megatron_core`` the family needs (its layers), named in the refusal
    min_megatron_core_feature: str = "the family"
    #: the HF tensor layout :meth:`mapping_registry` builds for until a source checkpoint says otherwise (see
    #: :meth:`detect_hf_layout`); None for families with one layout
    default_hf_layout: Optional[Hashable] = None
    #: config.json fields the family cannot do without, checked as written (before transformers fills in defaults)
    required_hf_fields: Tuple[str, ...] = ("hidden_size", "num_attention_heads", "num_hidden_layers", "vocab_size",
                                           "intermediate_size")
    #: fnmatch patterns of HF tensors an import may leave unused by default: buffers, not weights
    known_non_weights: Tuple[str, ...] = KNOWN_NON_WEIGHTS
    #: features of the family that no Megatron-LM argument carries, set or not (a config rebuilt from a checkpoint's
    #: Megatron-LM args alone would guess them): ``config_from_megatron_lm_args`` then asks for the HF source
    not_in_megatron_lm_args: Tuple[str, ...] = ()
    #: fnmatch patterns of HF tensors the family carries rather than converts (a vision-language checkpoint's vision
    #: tower): an import leaves them out of the Megatron model, an export with the source writes them back unchanged
    carried_hf_params: Tuple[str, ...] = ()
    #: why an export needs the source checkpoint (refused without one, before anything is exchanged); None: it does not
    hf_source_needed: Optional[str] = None

    def __init__(self) -> None:
        self._registry: Optional[MegatronMappingRegistry] = None
        self._order: Optional[GlobalOrder] = None
        self._transport = Transport()
        self._scratch = Scratch()  # HF tensors of exports with copy=False (one task at a time)
        self.show_progress = True
        #: the HF tensor layout of the mapping table in use (set from the source checkpoint's keys)
        self.hf_layout: Optional[Hashable] = self.default_hf_layout
        #: seconds a collective wait may make no progress before the awaited rank is declared frozen (None:
        #: ``$MEGATRON_BRIDGE_PEER_TIMEOUT``, else 600); see :mod:`megatron_bridge_ext.engine.peers`
        self.peer_timeout: Optional[float] = None

    @classmethod
    def unmet_megatron_core(cls) -> Optional[str]:
        """``"needs megatron-core >= X; Y is installed"`` when the installed megatron-core is older than the family's
        :attr:`min_megatron_core`, else None."""
        return unmet_megatron_core(cls.min_megatron_core)

    def require_megatron_core(self) -> None:
        """Refuse the family under a megatron-core older than its :attr:`min_megatron_core` (checked by
        :meth:`transformer_config`, and by the families' own config translations that can run without it).

        Raises:
            ValueError: naming the architecture, :attr:`min_megatron_core_feature`, the release needed and the
                installed one.
        """
        if self.min_megatron_core is not None:
            require_megatron_core_for(self.min_megatron_core, self.hf_architecture or type(self).__name__,
                                      self.min_megatron_core_feature)

    def carried_hf(self, names: Iterable[str]) -> List[str]:
        """The names among ``names`` the family carries (:attr:`carried_hf_params`), in their order."""
        return carried_names(names, self.carried_hf_params)

    def watch(self, name: str) -> Watch:
        """The failure watch of a collective operation (the running one when nested)."""
        return current_watch() or Watch(name, self.peer_timeout)

    def release_buffers(self) -> None:
        """Free the export buffers kept between exports (at most two messages, one send buffer and the scratch
        memory of the largest task)."""
        self._transport.release()
        self._scratch.release()

    # ----------------------------------------------------------------------------------------------------------------
    # What a model family provides
    # ----------------------------------------------------------------------------------------------------------------

    def hf_config_to_megatron_kwargs(self, hf_config: Any) -> Dict[str, Any]:
        """``GPTConfig`` fields for an HF config (object or dict); families compose them from the pieces of
        ``models.hf_config`` (and ``models.moe`` / ``models.mtp``)."""
        raise NotImplementedError(f"{type(self).__name__} must implement hf_config_to_megatron_kwargs")

    def transformer_config(self, hf_config: Any, **overrides: Any):
        """Megatron ``GPTConfig`` for an HF config; ``overrides`` (any TransformerConfig field) are applied last.

        Raises:
            ValueError: a megatron-core older than the family's :attr:`min_megatron_core` (see
                :meth:`require_megatron_core`), settings megatron-core cannot express (named), unknown override
                names, or sizes the parallel layout cannot split.
        """
        from megatron_bridge_ext.mcore.config import build_gpt_config

        self.require_megatron_core()
        return build_gpt_config(self.hf_config_to_megatron_kwargs(hf_config), overrides)

    def megatron_to_hf_config(self, config: Any) -> Dict[str, Any]:
        """The HF ``config.json`` (as a dict) of a Megatron ``GPTConfig``: here its ``architectures`` and
        ``model_type``; families add the fields they compose from the reverses of their ``models.hf_config`` pieces."""
        if self.hf_architecture is None or self.hf_model_type is None:
            raise NotImplementedError(f"{type(self).__name__} sets no hf_architecture / hf_model_type")
        return {"architectures": [self.hf_architecture], "model_type": self.hf_model_type}

    def language_model_config(self, hf_config: Any) -> Any:
        """The config the family reads its fields from (``AutoBridge.hf_config``): the checkpoint's config, or the
        language model's part of a vision-language config."""
        return hf_config

    def mapping_registry(self) -> MegatronMappingRegistry:
        """The parameter mappings of this architecture (for ``self.hf_layout`` where the family has several)."""
        raise NotImplementedError(f"{type(self).__name__} must implement mapping_registry")

    def detect_hf_layout(self, hf_state: Mapping[str, torch.Tensor], hf_config: Any) -> Optional[Hashable]:
        """Which of the architecture's HF tensor layouts a checkpoint uses (e.g. one tensor per expert or fused
        expert tensors), read from its keys (and the shapes of its lazy tensors); families with several layouts
        override it. The default: ``default_hf_layout``.

        Raises:
            ValueError: a checkpoint that mixes layouts, naming a tensor of each.
        """
        return self.default_hf_layout

    def hf_layout_for_model(self, config: Any) -> Optional[Hashable]:
        """The HF tensor layout in which to convert a Megatron model of ``config`` (its TransformerConfig): by
        default the current one. Families whose layout also depends on the model (DeepSeek-V3's
        multi-token-prediction layers: converted when the model has them) adjust it; the engine asks before it
        builds the conversion tasks, so an export without a source writes what the model holds.
        """
        return self.hf_layout

    def use_hf_layout_for_model(self, megatron_model: Model) -> bool:
        """Build the mapping table for the layout :meth:`hf_layout_for_model` gives for this model.

        Returns:
            True when the table changed (the cached global order is dropped; tasks built before are stale).
        """
        return self._use_layout(self.hf_layout_for_model(model_config(as_chunks(megatron_model))))

    def _use_layout(self, layout: Optional[Hashable]) -> bool:
        if layout == self.hf_layout:
            return False
        self.hf_layout = layout
        self._registry = None
        self._order = None
        return True

    def use_hf_layout_of(self, hf_state: Optional[Mapping[str, torch.Tensor]], hf_config: Any) -> bool:
        """Build the mapping table for the layout of a source checkpoint (no source: keep the current one).

        Returns:
            True when the table changed (the cached global order is dropped; tasks built before are stale).
        """
        if hf_state is None:
            return False
        return self._use_layout(self.detect_hf_layout(hf_state, hf_config))

    def check_hf_config(self, raw_config: Mapping[str, Any], where: str) -> None:
        """The raw ``config.json`` (as written, before transformers fills in defaults) has every field in
        :attr:`required_hf_fields`, as a positive integer.

        Raises:
            ValueError: naming ``where`` (the file), the family and the missing or bad fields.
        """
        check_raw_config(raw_config, self.required_hf_fields, type(self).__name__, where)

    def check_hf_checkpoint(self, hf_pretrained: Any) -> None:
        """The checkpoint's config agrees with its tensors (headers only): layer count, vocabulary rows, heads x
        head_dim, experts per layer. The mapping table is chosen for the checkpoint's layout first.

        Raises:
            ValueError: naming both sides (the config field and value, the tensor, its file and shape).
        """
        self.use_hf_layout_of(hf_pretrained.state, hf_pretrained.config)
        kwargs = self.hf_config_to_megatron_kwargs(hf_pretrained.config)
        where = getattr(hf_pretrained, "config_path", None) or getattr(hf_pretrained, "path", "HF checkpoint")
        check_config_against_tensors(kwargs, self.registry, hf_pretrained.state, where)

    def maybe_modify_loaded_hf_weight(
        self, hf_param: Union[str, Dict[str, Any]], hf_state: Mapping[str, torch.Tensor]
    ) -> Union[torch.Tensor, Dict[str, Any]]:
        """Read the HF tensor(s) of a mapping; override to rename, dequantise, ... (tensors are lazy views).

        A role may name a list of tensors (a layer's experts, one per expert): it reads as a list.
        """
        if isinstance(hf_param, str):
            return hf_state[hf_param]
        return {role: hf_state[name] if isinstance(name, str) else [hf_state[n] for n in name]
                for role, name in hf_param.items()}

    def maybe_modify_converted_hf_weight(
        self, task: WeightConversionTask, converted: Dict[str, torch.Tensor]
    ) -> Dict[str, torch.Tensor]:
        """Post-process the HF tensors of one exported task; by default unchanged."""
        return converted

    @classmethod
    def register_bridge(cls, *, source: Union[type, str], target: type):
        """Class decorator registering a bridge for an HF architecture (class or class name) and a Megatron class."""
        from megatron_bridge_ext.dispatch import register_bridge

        return register_bridge(source=source, target=target)

    # ----------------------------------------------------------------------------------------------------------------
    # Names and tasks
    # ----------------------------------------------------------------------------------------------------------------

    @property
    def registry(self) -> MegatronMappingRegistry:
        if self._registry is None:
            self._registry = self.mapping_registry()
        return self._registry

    @property
    def global_order(self) -> GlobalOrder:
        """The cached global order and metadata (rebuilt automatically when the model structure changes)."""
        if self._order is None:
            self._order = GlobalOrder(self.registry, self._layout_of)
        return self._order

    def _layout_of(self, p: LocalParam) -> str:
        mapping = self.registry.megatron_to_hf_lookup(p.global_name)
        if mapping is not None and mapping.layout is not None:
            return mapping.layout
        return detect_layout(p.module, p.tensor, p.global_name)

    def build_conversion_tasks(self, hf_keys: Optional[Iterable[str]], megatron_model: Model, *,
                               stored_keys: Optional[Iterable[str]] = None) -> ConversionTasks:
        """Tasks for every global parameter in the global order; owned ones carry the local tensor(s). Built once
        per call and passed down (``conversion_tasks=``): an export reuses them while they fit its source.

        Args:
            hf_keys: the HF checkpoint's keys (checked for every mapping's HF names), or None to skip the check.
            megatron_model: this rank's model chunk or list of virtual-pipeline chunks.
            stored_keys: without ``hf_keys``, the keys of the HF checkpoint an export reproduces (its optional
                copies, e.g. a tied ``lm_head.weight``, are then exported).

        Raises:
            ValueError: naming every Megatron parameter without a mapping, or every HF key a mapping needs that the
                checkpoint lacks.
        """
        chunks = as_chunks(megatron_model)
        return self._tasks(hf_keys, chunks, hf_keys if hf_keys is not None else stored_keys)

    def _hf_copies(self, view: ModelView, stored_keys: Optional[Iterable[str]]) -> Dict[str, List[str]]:
        """Global Megatron name -> HF names that hold copies of its tensor in the checkpoint: with tied embeddings,
        the output layer a checkpoint stores (``lm_head.weight``) is a copy of the embedding."""
        if stored_keys is None or not view.tied:
            return {}
        keys = stored_keys if isinstance(stored_keys, (set, frozenset, dict)) else set(stored_keys)
        return {WORD_EMBEDDINGS: [self.tied_output_hf_name]} if self.tied_output_hf_name in keys else {}

    def _tasks(self, hf_keys, chunks, stored_keys=None) -> ConversionTasks:
        self.use_hf_layout_for_model(chunks)
        view = ModelView(chunks)  # the one walk of the model for this call
        copies = self._hf_copies(view, stored_keys)
        tasks, meta = build_tasks(view, self.global_order, hf_keys, type(self).__name__, copies)
        return ConversionTasks(tasks, meta, self.hf_layout, copies, view)

    def _reuse_tasks(self, given: Optional[Sequence[WeightConversionTask]], chunks: Sequence[torch.nn.Module],
                     stored_keys: Optional[Iterable[str]] = None) -> ConversionTasks:
        """``given`` when they were built for the current mapping table (and, with a source, for its copies), else
        tasks built now."""
        self.use_hf_layout_for_model(chunks)
        if isinstance(given, ConversionTasks) and given.layout == self.hf_layout and (
                stored_keys is None or given.has_copies(self._hf_copies(given.view, stored_keys))):
            return given
        return self._tasks(None, chunks, stored_keys)

    def _context(self, task: WeightConversionTask, view: ModelView, hf_config: Any) -> ConversionContext:
        topo = view.topo
        index, count, _ = topo.shard_of(task.members[0] if task.is_group else task.global_param_name)
        model_cfg = view.config
        hf_vocab = getattr(hf_config, "vocab_size", None)
        if hf_vocab is None:  # no HF config: the unpadded vocabulary the Megatron config carries
            hf_vocab = getattr(model_cfg, "vocab_size", None)
        return ConversionContext(
            tp_size=count,
            tp_rank=index,
            ep_size=topo.ep_size if is_routed_expert(task.global_param_name) else 1,
            ep_rank=topo.ep_rank if is_routed_expert(task.global_param_name) else 0,
            config=model_cfg,
            hf_vocab_size=hf_vocab,
            padded_vocab_size=view.padded_vocab_size,
            layout=task.layout,
        )

    def _export_context(self, task: WeightConversionTask, meta: ParamMeta, num_shards: int, view: ModelView,
                        hf_config: Any) -> ConversionContext:
        """The context of unpacking a task's gathered shards: a dense task's shard count is its TP size (1 for a
        replicated tensor); an expert group keeps the expert-parallel sizes."""
        ctx = self._context(task, view, hf_config)
        ctx.tp_rank = 0
        if meta.layout != EXPERTS:
            ctx.tp_size = num_shards
        return ctx
