"""The model side of Megatron distributed checkpoints: the chunks' sharded state dicts under Megatron-LM's keys
(``model``, or ``model0``, ``model1``, ... with a virtual pipeline), the ``args`` Megatron-LM reads back, the stored
model config, and building / loading chunks from a checkpoint under the current parallel state.

The on-disk layout and the save / load calls are in :mod:`megatron_bridge_ext.io.megatron_checkpoint`.
"""

from __future__ import annotations

import argparse
import contextlib
import os
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Union

import torch
from megatron.core import parallel_state

from megatron_bridge_ext.io import megatron_checkpoint as ckpt_io
from megatron_bridge_ext.io.quantized import strip_quantization
from megatron_bridge_ext.mcore.config import (
    GPTConfig,
    config_from_dict,
    config_to_dict,
)
from megatron_bridge_ext.mcore.cpu_compat import dist_checkpoint_cpu_patches
from megatron_bridge_ext.mcore.names import as_chunks, model_config, unwrap_model
from megatron_bridge_ext.mcore.te_keys import (
    EXTRA_STATE,
    SPECS,
    empty_extra_state,
    te_extra_state_modules,
    te_module_of,
    te_tensor_key,
)
from megatron_bridge_ext.mcore.topology import current_parallel_sizes

__all__ = [
    "model_state_keys",
    "sharded_model_state",
    "to_te_sharded_state_dict",
    "megatron_lm_args",
    "save_megatron_checkpoint",
    "checkpoint_common",
    "config_from_checkpoint",
    "config_from_megatron_lm_args",
    "args_disagreements",
    "checkpoint_spec",
    "extra_state_with_content",
    "load_megatron_checkpoint",
    "cast_to_params_dtype",
]


def model_state_keys(num_chunks: int) -> List[str]:
    """Megatron-LM's state-dict keys of a rank's model chunks: ``model``, or ``model0``, ``model1``, ..."""
    return ["model"] if num_chunks == 1 else [f"model{i}" for i in range(num_chunks)]


def _content_metadata() -> Dict[str, Any]:
    md: Dict[str, Any] = dict(ckpt_io.CONTENT_METADATA)
    md["dp_cp_group"] = parallel_state.get_data_parallel_group(with_context_parallel=True)
    return md


def _sharded_items(state: Any) -> List[Any]:
    """Every ShardedBase in a (nested) sharded state dict."""
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedBase

    return [v for v in nested_values(state) if isinstance(v, ShardedBase)]


def tensor_keys(items: Iterable[Any]) -> List[str]:
    """The checkpoint keys of sharded items' tensors: a ``ShardedTensor``'s key, the keys of the tensors a
    ``ShardedTensorFactory`` builds (megatron-core 0.19's gated delta-net saves ``in_proj.weight`` / ``conv1d.weight``
    as one tensor per section: ``<key>.query``, ``<key>.key``, ...; its Mamba mixer ``in_proj.weight`` as
    ``.z`` / ``.x`` / ``.B`` / ``.C`` / ``.dt``); objects are left out."""
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedObject, ShardedTensor, ShardedTensorFactory

    out = []
    for item in items:
        if isinstance(item, ShardedTensorFactory):
            out += [v.key for v in nested_values(item.build()) if isinstance(v, ShardedTensor)]
        elif not isinstance(item, ShardedObject):
            out.append(item.key)
    return out


def to_te_sharded_state_dict(state: Dict[str, Any], config: Any, *, extra_state: bool = True) -> Dict[str, Any]:
    """A local-spec chunk's sharded state dict as a Transformer Engine (TE) spec model of ``config`` saves it, in
    place (see :mod:`megatron_bridge_ext.mcore.te_keys`): tensor keys renamed (:func:`te_tensor_key`); with
    ``extra_state``, every TE module's ``_extra_state`` object holding what TE saves without FP8 state (the local
    linears' objects re-filled, the TE-only ones added under ``te_extra_state/<key>/<offset>``, sharded like their
    module's tensors, replicated as megatron-core replicates them); without, the local objects are dropped.

    Returns:
        ``state`` itself.
    """
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedObject, ShardedTensor, ShardedTensorFactory
    from megatron.core.transformer.utils import make_sharded_object_for_checkpoint

    tensors = []
    for item in _sharded_items(state):
        if not isinstance(item, ShardedObject):
            item.key = te_tensor_key(item.key, config)
            tensors.append(item)
    have = set()
    for name in list(state):
        item = state[name]
        if isinstance(item, ShardedObject) and item.key.endswith("." + EXTRA_STATE):
            if not extra_state:
                del state[name]
                continue
            item.data = empty_extra_state()
            have.add((item.key, tuple(item.global_offset)))
    if not extra_state:
        return state
    # one object per TE module and layer / expert position, sharded like the module's tensors (their leading
    # offsets); a module without tensors (a multi-token-prediction layer's core attention) is not stacked: (1,)
    grids: Dict[str, List[List[Any]]] = {m: [] for m in te_extra_state_modules((t.key for t in tensors),
                                                                              config=config)}
    for item in tensors:
        module = te_module_of(item.key, config)
        if module not in grids:
            continue
        if isinstance(item, ShardedTensorFactory):  # its offsets are those of the tensors it builds
            item = next(v for v in nested_values(item.build()) if isinstance(v, ShardedTensor))
        grids[module].append([(axis, item.global_offset[axis], item.global_shape[axis])
                              for axis in range(item.prepend_axis_num)])
    for module, grid in grids.items():
        key = f"{module}.{EXTRA_STATE}"
        for offsets in grid or [[]]:
            where = tuple(o for _, o, _ in offsets) or (0,)
            if (key, where) in have:
                continue
            have.add((key, where))
            state[f"te_extra_state/{key}/{'_'.join(map(str, where))}"] = make_sharded_object_for_checkpoint(
                empty_extra_state(), key, offsets)
    return state


def sharded_model_state(chunks: Sequence[torch.nn.Module], spec: str = "local", *, extra_state: bool = True,
                        metadata: Optional[Mapping[str, Any]] = None) -> Dict[str, Any]:
    """``{"model": sd}`` or ``{"model0": sd0, ...}``: each chunk's ``sharded_state_dict`` (global tensor keys; the
    ShardedTensors view the parameters, so loading fills them in place) as Megatron-LM's ``generate_state_dict``
    builds it for the ``torch_dist`` format.

    Args:
        chunks: this rank's chunks (local-spec models built by this package).
        spec: ``"local"``: the keys the chunks save; ``"te"``: the keys and ``_extra_state`` objects a Transformer
            Engine spec model of the same config saves (:func:`to_te_sharded_state_dict`).
        extra_state: keep the ``_extra_state`` objects (False: tensors only, for loading).
        metadata: the sharded-state-dict metadata (default: what Megatron-LM passes without a distributed optimizer).
    """
    if spec not in SPECS:
        raise ValueError(f"spec must be one of {SPECS}, got {spec!r}")
    chunks = as_chunks(chunks)
    md = _content_metadata() if metadata is None else {**metadata, **{
        "dp_cp_group": parallel_state.get_data_parallel_group(with_context_parallel=True)}}
    out = {}
    for key, chunk in zip(model_state_keys(len(chunks)), chunks):
        sd = unwrap_model(chunk).sharded_state_dict(metadata=md)
        if spec == "te":
            to_te_sharded_state_dict(sd, model_config(chunks), extra_state=extra_state)
        elif not extra_state:
            sd = {k: v for k, v in sd.items() if not k.endswith("." + EXTRA_STATE)}
        out[key] = sd
    return out


def megatron_lm_args(config: GPTConfig, parallel: Mapping[str, Any], iteration: int = 0, *, spec: str = "te",
                     tokenizer: Optional[Mapping[str, Any]] = None) -> argparse.Namespace:
    """The complete ``args`` a Megatron-LM checkpoint of this model carries (every Megatron-LM argument: the
    model's values, Megatron-LM's defaults elsewhere; see :mod:`megatron_bridge_ext.mcore.megatron_lm_args`), so
    that ``load_checkpoint``, ``check_checkpoint_args`` and ``--use-checkpoint-args`` find what they read."""
    from megatron_bridge_ext.mcore.megatron_lm_args import megatron_lm_namespace

    return megatron_lm_namespace(config, parallel, iteration=iteration, spec=spec, tokenizer=tokenizer)


def _parallel_of(chunks: Sequence[torch.nn.Module]) -> Dict[str, Any]:
    sizes = current_parallel_sizes()
    world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    return {
        "tp": sizes.get("tensor_model_parallel_size", 1),
        "pp": sizes.get("pipeline_model_parallel_size", 1),
        "vpp": sizes.get("virtual_pipeline_model_parallel_size"),
        "ep": sizes.get("expert_model_parallel_size", 1),
        "etp": sizes.get("expert_tensor_parallel_size"),
        "world": world,
        "chunks": len(as_chunks(chunks)),
    }


def save_megatron_checkpoint(
    chunks: Sequence[torch.nn.Module],
    root: str,
    *,
    architecture: str,
    hf_config: Optional[Mapping[str, Any]] = None,
    iteration: int = 0,
    overwrite: bool = False,
    spec: str = "te",
    tokenizer: Optional[Mapping[str, Any]] = None,
    side_files: Optional[str] = None,
    carried: Sequence[str] = (),
) -> str:
    """Write this rank's chunks as a Megatron-LM distributed checkpoint (collective; see
    :mod:`megatron_bridge_ext.io.megatron_checkpoint` for the layout).

    Args:
        chunks: this rank's GPTModel chunk(s) under the current parallel state.
        root: the checkpoint root (``root/iter_0000000``, ``root/latest_checkpointed_iteration.txt``).
        architecture: the HF architecture whose bridge converts the model (stored, for export without an HF source).
        hf_config: the source checkpoint's ``config.json`` (stored as well).
        iteration: the iteration number.
        overwrite: replace an existing checkpoint of that iteration (only once the new one is complete).
        spec: whose keys to write: ``"te"`` (default), those of a Transformer Engine layer spec of the same config,
            ``_extra_state`` objects included (what training jobs build); ``"local"``, those of megatron-core's
            local spec (what the chunks themselves save).
        tokenizer: ``args.tokenizer_type`` / ``args.tokenizer_model``; default: with ``side_files`` holding a
            tokenizer, ``HuggingFaceTokenizer`` at the copy kept beside the checkpoint.
        side_files: the HF checkpoint directory whose side files (tokenizer, generation config, chat template,
            config.json) are kept in ``iter_.../hf/`` (export without an HF source restores them).
        carried: fnmatch patterns of the source's tensors the family carries (the bridge's ``carried_hf_params``),
            kept unchanged in ``iter_.../hf/carried.safetensors``.

    Returns:
        The iteration directory.
    """
    chunks = as_chunks(chunks)
    dist_checkpoint_cpu_patches()
    common = checkpoint_common(model_config(chunks), _parallel_of(chunks), root, architecture=architecture,
                               hf_config=hf_config, iteration=iteration, spec=spec, tokenizer=tokenizer,
                               side_files=side_files)
    return ckpt_io.save_distributed_checkpoint(sharded_model_state(chunks, spec), root, iteration=iteration,
                                               common=common, overwrite=overwrite, side_files=side_files,
                                               carried=carried)


def checkpoint_common(config: Any, parallel: Mapping[str, Any], root: str, *, architecture: str,
                      hf_config: Optional[Mapping[str, Any]] = None, iteration: int = 0, spec: str = "te",
                      tokenizer: Optional[Mapping[str, Any]] = None, side_files: Optional[str] = None
                      ) -> Dict[str, Any]:
    """The common entries of a checkpoint of a model of ``config`` written at layout ``parallel`` (``tp``, ``pp``,
    ``vpp``, ``ep``, ``etp``, ``world``, ``chunks``): Megatron-LM's ``args`` and this package's own entry
    (architecture, model config, layout, model keys, spec, HF config). See :func:`save_megatron_checkpoint`.

    Raises:
        ValueError: ``config`` is not a ``GPTConfig`` of this package.
    """
    if not isinstance(config, GPTConfig):
        raise ValueError(f"save_megatron_checkpoint: the chunks carry a {type(config).__name__}, expected the "
                         "GPTConfig of a model built by this package (it stores the fields needed to rebuild it)")
    parallel = dict(parallel)
    bridge_entry = {
        "format_version": ckpt_io.FORMAT_VERSION,
        "architecture": architecture,
        "model_config": config_to_dict(config),
        "parallel": parallel,
        "model_keys": model_state_keys(int(parallel.get("chunks") or 1)),
        "spec": spec,
        "hf_config": ckpt_io.json_safe(strip_quantization(hf_config)) if hf_config is not None else None,
    }
    if tokenizer is None and side_files is not None and _has_tokenizer(side_files):
        final = os.path.join(os.path.abspath(root), ckpt_io.iteration_dir_name(iteration), ckpt_io.HF_SIDE_DIR)
        tokenizer = {"tokenizer_type": "HuggingFaceTokenizer", "tokenizer_model": final}
    return {"args": megatron_lm_args(config, parallel, iteration, spec=spec, tokenizer=tokenizer),
            ckpt_io.BRIDGE_KEY: bridge_entry}


#: files that make a directory an HF tokenizer (what ``AutoTokenizer.from_pretrained`` reads)
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "spiece.model")


def _has_tokenizer(directory: str) -> bool:
    return any(os.path.isfile(os.path.join(directory, n)) for n in _TOKENIZER_FILES)


def config_from_checkpoint(info: "ckpt_io.MegatronCheckpointInfo", **overrides: Any) -> GPTConfig:
    """The ``GPTConfig`` stored in a checkpoint, for the current parallel state (``overrides`` last).

    Raises:
        ValueError: a checkpoint without a stored model config (not written by this package).
    """
    if info.model_config is None:
        raise ValueError(f"{info.path}: the checkpoint stores no model config (it was not written by "
                         "megatron_bridge_ext); give the HF config with --hf-source")
    for key, value in current_parallel_sizes().items():
        overrides.setdefault(key, value)
    return config_from_dict(info.model_config, overrides)


#: the model-defining fields a Megatron-LM ``args`` namespace and a config must agree on (MoE / MLA / hybrid ones when
#: the model has experts / multi-latent attention / a hybrid layer pattern)
_AGREE = ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups", "kv_channels",
          "normalization", "layernorm_epsilon", "layernorm_zero_centered_gamma", "gated_linear_unit",
          "activation_func", "add_bias_linear", "add_qkv_bias", "qk_layernorm", "position_embedding_type",
          "rotary_base", "rotary_percent", "share_embeddings_and_output_weights", "num_moe_experts",
          "multi_latent_attention", "mtp_num_layers", "softmax_type", "qk_l2_norm", "no_rope_freq")
_AGREE_MOE = ("moe_ffn_hidden_size", "moe_router_topk", "moe_shared_expert_intermediate_size",
              "moe_router_score_function", "moe_layer_freq", "moe_router_topk_scaling_factor",
              "moe_router_enable_expert_bias", "moe_router_num_groups", "moe_router_group_topk")
_AGREE_MLA = ("q_lora_rank", "kv_lora_rank", "qk_head_dim", "qk_pos_emb_head_dim", "v_head_dim")
_AGREE_HYBRID = ("hybrid_layer_pattern", "is_hybrid_model", "mamba_state_dim", "mamba_head_dim", "mamba_num_groups",
                 "mamba_num_heads")


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return list(a) == list(b)
    if isinstance(a, float) or isinstance(b, float):
        return a is not None and b is not None and float(a) == float(b)
    return a == b


def args_disagreements(args: Any, config: Any) -> List[str]:
    """Where a Megatron-LM ``args`` namespace and a model config describe different models: one
    ``"<field>: args <value>, config <value>"`` per field (dtypes aside: export may cast)."""
    from megatron_bridge_ext.mcore.megatron_lm_args import config_fields_from_args

    fields = config_fields_from_args(args)
    names = list(_AGREE)
    if fields.get("num_moe_experts") or getattr(config, "num_moe_experts", None):
        names += _AGREE_MOE
    if fields.get("multi_latent_attention") or getattr(config, "multi_latent_attention", False):
        names += _AGREE_MLA
    if fields.get("hybrid_layer_pattern") or getattr(config, "hybrid_layer_pattern", None):
        names += _AGREE_HYBRID
    out = []
    for name in names:
        if name not in fields and name != "hybrid_layer_pattern":  # a pattern on one side only: different models
            continue
        a, b = fields.get(name), getattr(config, name, None)
        if name == "activation_func":
            a, b = getattr(a, "__name__", a), getattr(b, "__name__", b)
        if name == "no_rope_freq" and isinstance(a, int) and not isinstance(a, bool) and a > 0:
            a = [1 if (i + 1) % a == 0 else 0 for i in range(int(fields["num_layers"]))]  # as TransformerConfig does
        if not _same(a, b):
            out.append(f"{name}: args {a!r}, config {b!r}")
    return out


#: GPTConfig fields of this package's families that no Megatron-LM argument carries
_NOT_IN_ARGS = ("attn_logit_softcapping", "final_logit_softcapping", "embedding_scale", "post_self_attn_layernorm",
                "post_mlp_layernorm", "local_rotary_base", "softmax_scale", "rotary_proportion", "value_rms_norm",
                "layer_output_scalar", "pre_layernorms", "qk_layernorm_whole_projection", "attention_chunk_size",
                "attn_temperature_floor_scale", "attn_temperature_scale", "qk_norm_nope_layers",
                "rope_scaling_low_freq_factor", "rope_scaling_high_freq_factor",
                "rope_scaling_original_max_position_embeddings",
                "full_attention_kv_channels", "full_attention_num_query_groups", "full_attention_k_eq_v")


def _not_in_args(config: Any) -> List[str]:
    """The fields of :data:`_NOT_IN_ARGS` that ``config`` sets (differ from GPTConfig's defaults)."""
    import dataclasses

    defaults = {f.name: f.default for f in dataclasses.fields(GPTConfig)}
    out = [f"{n}={getattr(config, n)!r}" for n in _NOT_IN_ARGS
           if hasattr(config, n) and getattr(config, n) != defaults.get(n)]
    if getattr(config, "position_embedding_type", None) == "yarn":  # Megatron-LM has no GPT YaRN factor / mscale
        out.append("YaRN RoPE (yarn_rotary_scaling_factor, yarn_mscale, yarn_mscale_all_dim)")
    return out


def config_from_megatron_lm_args(args: Any, bridge: Any, *, hf_config: Any = None, where: str = "",
                                 **overrides: Any) -> GPTConfig:
    """The model config of a checkpoint that Megatron-LM trained (its ``args``, no config of this package), for the
    family of ``bridge`` (an HF architecture's model bridge), under the current parallel state.

    Without ``hf_config`` the family's own translation fills in what ``args`` cannot say: the generic fields read from
    ``args`` (:func:`~megatron_bridge_ext.mcore.megatron_lm_args.config_fields_from_args`) make the family's HF config
    (``megatron_to_hf_config``), which makes the config (``transformer_config``), as for an HF checkpoint. With an HF
    config (``--hf-source``) that config is used. Either way ``args`` and the result must describe the same model.

    Raises:
        ValueError: ``args`` and the config disagree (every field named with both values), or ``args`` lacks what a
            GPT model needs.
    """
    from megatron_bridge_ext.mcore.config import build_gpt_config
    from megatron_bridge_ext.mcore.megatron_lm_args import config_fields_from_args

    for key, value in current_parallel_sizes().items():
        overrides.setdefault(key, value)
    fields = config_fields_from_args(args)
    source = "--hf-source"
    if hf_config is None:
        source = f"the {getattr(bridge, 'hf_architecture', None) or type(bridge).__name__} family"
        vocab = getattr(args, "vocab_size", None) or getattr(args, "padded_vocab_size", None)
        if vocab is None:
            raise ValueError(f"{where}: the checkpoint's args name no vocabulary size (vocab_size, padded_vocab_size);"
                             " give the HF config with --hf-source")
        generic = build_gpt_config({**fields, "vocab_size": int(vocab)}, {})
        try:
            hf_config = bridge.megatron_to_hf_config(generic)
        except ValueError as e:
            raise ValueError(f"{where}: the checkpoint's Megatron-LM args describe no model of {source}: {e}; give "
                             "the HF config with --hf-source") from e
    config = bridge.transformer_config(hf_config, **{"params_dtype": fields["params_dtype"], **overrides})
    if source != "--hf-source":
        unsaid = _not_in_args(config) + list(getattr(bridge, "not_in_megatron_lm_args", ()))
        if unsaid:
            raise ValueError(f"{where}: models of {source} have {', '.join(unsaid)}, which Megatron-LM's args cannot "
                             "say (their values would be guesses); give the HF config with --hf-source")
    diff = args_disagreements(args, config)
    if diff:
        raise ValueError(f"{where}: the checkpoint's Megatron-LM args and {source} describe different models: "
                         + "; ".join(diff))
    return config


def cast_to_params_dtype(chunks: Sequence[torch.nn.Module]) -> List[torch.nn.Module]:
    """Every floating-point parameter and buffer in ``config.params_dtype``, as Megatron-LM's ``Float16Module``
    makes a bf16 / fp16 model (the local spec builds its norms in fp32): a checkpoint then holds one dtype, the one
    a training job's model has, and an export without an HF source reproduces it.

    Except the routers a family keeps in fp32 (:class:`~megatron_bridge_ext.mcore.modules.FP32WeightRouter`,
    ``config.moe_router_fp32_weight``: HF DeepSeek-V3 / GLM-4.5 store ``mlp.gate.weight`` in fp32): rounding them
    would lose what the HF checkpoint holds, and the streamed import stores them in fp32 too."""
    from megatron_bridge_ext.mcore.modules import FP32WeightRouter

    chunks = as_chunks(chunks)
    dtype = model_config(chunks).params_dtype
    for chunk in chunks:
        for module in chunk.modules():
            if isinstance(module, FP32WeightRouter):
                continue
            for name, p in module.named_parameters(recurse=False):
                if p.is_floating_point() and p.dtype != dtype:
                    p.data = p.data.to(dtype)
            for name, b in module.named_buffers(recurse=False):
                if b.is_floating_point() and b.dtype != dtype:
                    setattr(module, name, b.to(dtype))
    return chunks


_FLOAT8 = tuple(getattr(torch, n) for n in ("float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz",
                                             "float8_e8m0fnu") if hasattr(torch, n))


def _check_stored(requested: Mapping[str, Any], meta: Mapping[str, Any], where: str, described_by: str) -> None:
    """Every requested tensor is stored with the model's global shape (vocabulary rows aside: they follow the
    reader's padding) and as floating point: weights stored quantized (FP8) or as integers are refused, named."""
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory

    quantized, shapes = [], []
    for key, item in sorted(requested.items()):
        stored = meta.get(key)
        if stored is None:
            continue
        if isinstance(item, ShardedTensorFactory):  # the global shape is that of the tensors it builds
            item = next(v for v in nested_values(item.build()) if isinstance(v, ShardedTensor))
        dtype = getattr(stored, "dtype", None)
        if dtype is not None and item.data.is_floating_point():
            if dtype in _FLOAT8:
                quantized.append(f"{key} ({dtype})")
            elif not dtype.is_floating_point:
                quantized.append(f"{key} ({dtype}, not a floating-point type)")
        if isinstance(item, ShardedTensor) and not item.allow_shape_mismatch and \
                tuple(stored.global_shape) != tuple(item.global_shape):
            shapes.append(f"{key}: checkpoint {list(stored.global_shape)}, {described_by} {list(item.global_shape)}")
    if quantized:
        more = " ..." if len(quantized) > 10 else ""
        raise ValueError(f"{where}: {len(quantized)} weight(s) are stored quantized, which export does not convert "
                         f"yet (quantized checkpoints: issue #21): {quantized[:10]}{more}")
    if shapes:
        raise ValueError(f"{where}: {len(shapes)} tensor(s) have other shapes than {described_by} gives: "
                         + "; ".join(shapes[:10]) + (" ..." if len(shapes) > 10 else ""))


def checkpoint_spec(chunks: Sequence[torch.nn.Module], path: str, stored_keys: Optional[Iterable[str]] = None) -> str:
    """Whose keys a Megatron checkpoint holds for these chunks: ``"te"`` (a Transformer Engine layer spec: what
    ``import`` writes by default and Megatron-LM trains with) or ``"local"``; decided from the tensor keys alone
    (collective: every rank returns the same).

    Raises:
        ValueError: neither spec's keys are all in the checkpoint, naming what the closer one lacks.
    """
    chunks = as_chunks(chunks)
    config = model_config(chunks)
    stored = set(ckpt_io.tensor_metadata(path) if stored_keys is None else stored_keys)
    local = set(tensor_keys(_sharded_items(sharded_model_state(chunks, "local", extra_state=False))))
    lacking = {"te": sorted({te_tensor_key(k, config) for k in local} - stored), "local": sorted(local - stored)}
    order = ("te", "local")
    votes: List[Any] = [lacking]
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        votes = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(votes, lacking)
    for spec in order:
        if not any(v[spec] for v in votes):
            return spec
    spec = min(order, key=lambda s: sum(len(v[s]) for v in votes))
    names = sorted({k for v in votes for k in v[spec]})
    raise ValueError(f"{path}: the checkpoint lacks {len(names)} tensor(s) this model needs (closest: the "
                     f"{'Transformer Engine' if spec == 'te' else 'local'} spec's keys): {names[:20]}"
                     f"{' ...' if len(names) > 20 else ''}")


def extra_state_with_content(path: Union[str, "ckpt_io.TorchDistCheckpoint"]) -> List[str]:
    """The ``_extra_state`` keys of a checkpoint (a path or an open one) whose first shard holds something: TE's FP8
    scaling state (pickled into a non-empty uint8 tensor; never unpickled here). Reads one shard per key through the
    restricted reader (no collective); export reports them and leaves them out: they scale activations and weights at
    run time, the stored weights are what an HF checkpoint holds. An object of a class the reader refuses is named in
    the error."""
    opened = isinstance(path, ckpt_io.TorchDistCheckpoint)
    with (contextlib.nullcontext(path) if opened else ckpt_io.open_checkpoint(path)) as ckpt:
        first = {}
        for unique_key, entry in sorted(ckpt.objects.items()):
            if entry.key.endswith("." + EXTRA_STATE) and entry.is_first_shard:
                first.setdefault(entry.key, unique_key)
        out = []
        for key, unique_key in sorted(first.items()):
            v = ckpt.read_object(unique_key)
            if (isinstance(v, torch.Tensor) and v.numel() > 0) or (v is not None and not isinstance(v, torch.Tensor)):
                out.append(key)
    return out


def _not_a_weight(key: str) -> bool:
    key = key.split("/")[0]
    return key.endswith("." + EXTRA_STATE) or key == "common_state"


def load_megatron_checkpoint(chunks: Sequence[torch.nn.Module], path: str, *,
                             described_by: str = "the model config") -> List[torch.nn.Module]:
    """Fill this rank's chunks from a distributed checkpoint written at any layout, by a local-spec or a
    Transformer Engine spec model (:func:`checkpoint_spec`), by this package or by Megatron-LM (collective): each
    rank reads the slices it holds; the result is then loaded with ``load_state_dict(strict=True)`` as Megatron-LM
    does. Before any tensor is read, every requested tensor's stored global shape and dtype are checked.
    ``_extra_state`` objects are not read: TE's FP8 scaling state never reaches a weight (the local modules' own
    extra state is None).

    Args:
        described_by: where the chunks' config came from, for messages (e.g. "the checkpoint's args").

    Raises:
        ValueError: tensors the model needs that the checkpoint lacks, tensors it holds that the model lacks,
            shapes that differ from the model's, weights stored quantized (FP8) or as integers (each named).
    """
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    chunks = as_chunks(chunks)
    sub, _ = ckpt_io.resolve_checkpoint(path)
    with ckpt_io.open_checkpoint(sub) as ckpt:  # its metadata read and checked once for the whole load
        spec = checkpoint_spec(chunks, sub, stored_keys=ckpt.tensors)
        state = sharded_model_state(chunks, spec, extra_state=False)
        requested = {t.key: t for t in _sharded_items(state) if not isinstance(t, ShardedObject)
                     and isinstance(getattr(t, "data", None), torch.Tensor)}
        error = None
        try:
            _check_stored(requested, ckpt.tensors, sub, described_by)
        except ValueError as e:
            error = str(e)
        error = ckpt_io.first_error(error)
        if error is not None:
            raise ValueError(error)
        # TE's _extra_state objects are not read; megatron-core >= 0.19 keeps the common state in the same files
        loaded = ckpt_io.load_distributed_checkpoint(state, ckpt, unrequested_ok=_not_a_weight)
    for key, chunk in zip(state, chunks):
        module = unwrap_model(chunk)
        values = loaded[key]
        for name in module.state_dict():  # the local modules' extra state (None) is not in the checkpoint's request
            if name.endswith("." + EXTRA_STATE) and name not in values:
                values[name] = None
        module.load_state_dict(values, strict=True)
    return chunks
