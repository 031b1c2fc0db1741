"""The checkpoint keys of a Transformer Engine (TE) layer spec, as data: from the sharded keys of a local-spec model
and its config, without building any model.

megatron-core writes a ``GPTModel``'s tensors under keys that mostly do not depend on the layer spec: the local spec's
``sharded_state_dict_keys_map`` already renames its standalone norms to the names of TE's fused modules
(``input_layernorm.`` -> ``self_attention.linear_qkv.layer_norm_``, ``pre_mlp_layernorm.`` ->
``mlp.linear_fc1.layer_norm_``), and routed experts are stacked alike (sequential or grouped-GEMM). What differs,
read from megatron-core's ``get_gpt_layer_with_transformer_engine_spec`` (0.16.1, 0.19.2) and checked against a model
it builds (``tests/distributed/test_te_checkpoint.py``):

1. **Tensors.** A TE mixture-of-experts layer keeps a standalone ``pre_mlp_layernorm`` (its MLP has no fused
   ``linear_fc1``), while the local spec's key map renames it for every layer. A TE multi-latent-attention (MLA) layer
   fuses the q / kv latent norms into the up projections (``linear_q_up_proj.layer_norm_weight``,
   ``linear_kv_up_proj.layer_norm_weight``) and, in a dense layer, the pre-MLP norm into ``mlp.linear_fc1``, while the
   local MLA spec has no key map at all. :func:`te_tensor_key` renames exactly these; shapes do not change.
2. **``_extra_state`` objects.** Every TE module (``Linear``, ``LayerNormLinear``, ``GroupedLinear``, the norms, and
   ``DotProductAttention`` where its state dict is saved) stores one ``ShardedObject`` ``<module>._extra_state``,
   sharded like the module's tensors without their own dimensions: ``(layers,)`` for stacked layers, ``(layers,
   experts)`` / ``(experts,)`` for routed experts, ``(1,)`` for a module outside stacked layers. Without FP8 state
   its value is what TE's ``get_extra_state`` returns then: an empty ``uint8`` tensor (:func:`empty_extra_state`).
   megatron-core's local linear layers already store such objects (holding None); the norms, and the core attention
   of GPT-OSS (learnable softmax offset) and of multi-token-prediction layers, are TE-only. A TE model loaded with
   ``strict=StrictHandling.RAISE_ALL`` needs every one of them.
3. **Modules of this package in a TE spec.** Query / key norms over the whole projection (OLMo 2 / Olmo 3 / OLMoE,
   ``qk_layernorm_whole_projection``) have no TE class: a TE-spec model of such a config builds this package's
   ``WholeQueryRMSNorm`` / ``WholeKeyRMSNorm`` as ``q_layernorm`` / ``k_layernorm`` (in TE's attention), which save
   their TP-sharded weight and no ``_extra_state`` (:func:`te_module_of` with the config). Without pre-norms
   (``pre_layernorms=False``, OLMo 2 / Olmo 3) ``linear_qkv`` / ``linear_fc1`` are TE's plain column-parallel linear:
   the same keys, no ``layer_norm_weight`` (the local spec has no ``input_layernorm`` / ``pre_mlp_layernorm`` either).

4. **Hybrid models** (megatron-core >= 0.19 ``HybridModel``, NemotronH; a config with a ``hybrid_layer_pattern``).
   Their layers are not stacked (one key per layer, ``decoder.layers.{i}.``), and this package builds them from a
   local spec with standalone pre-norms (``mcore.hybrid_builder``) without a key map. megatron-core's TE
   ``hybrid_stack_spec`` (``models/hybrid/hybrid_layer_specs.py``) fuses each layer's pre-norm into its first linear
   (``TELayerNormColumnParallelLinear``): a Mamba layer's ``norm.`` is ``mixer.in_proj.layer_norm_`` (the layer's
   ``norm`` is an ``IdentityOp``), an attention layer's ``input_layernorm.`` is
   ``self_attention.linear_qkv.layer_norm_``, an MLP layer's ``pre_mlp_layernorm.`` is ``mlp.linear_fc1.layer_norm_``
   (:func:`te_tensor_key`, by the layer's symbol in the pattern); an MoE layer ('E') keeps its standalone
   ``pre_mlp_layernorm`` (``TENorm``) and the GPT MoE keys (router, experts, shared experts). The stack's final
   norm is TE's ``TENorm``
   (``decoder.final_norm``, an ``_extra_state`` of its own); ``mixer.in_proj`` / ``mixer.out_proj`` are TE linears;
   the mixer's gated norm (``mixer.norm``, ``mamba_ssm``'s ``RMSNormGated``), its convolution and per-head vectors
   are not TE modules, and TE's core attention saves nothing without a learnable softmax offset. Each ``_extra_state``
   is a ``(1,)`` grid (no stacked layers).

A streaming writer that knows the local keys, their global shapes and how many leading dimensions are layer / expert
offsets produces the same checkpoint with :func:`te_layout`.
"""

from __future__ import annotations

from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

from megatron_bridge_ext.naming import (EXTRA_STATE, INPUT_NORM, KV_LATENT_NORM, MTP_LAYERS, PRE_MLP_NORM,
                                        Q_LATENT_NORM, fused_norm_key, mtp_layer, plain_norm_key, split_layer_key)

__all__ = [
    "SPECS",
    "EXTRA_STATE",
    "TE_MODULES",
    "MAMBA_NORM",
    "HYBRID_FUSED_NORMS",
    "HYBRID_UNFUSED",
    "WHOLE_PROJECTION_NORMS",
    "empty_extra_state",
    "is_dsa",
    "layer_kinds",
    "te_tensor_key",
    "te_module_of",
    "te_extra_state_modules",
    "te_layout",
]

#: the layer specs ``import --spec`` writes the keys of
SPECS = ("te", "local")
#: the last name of every module that a TE layer spec builds from a TE class (and so saves ``_extra_state``):
#: TE linears (fused with a norm or not), TE norms, and TE's core attention
TE_MODULES = frozenset({
    "linear_qkv", "linear_proj", "linear_fc1", "linear_fc2",
    "linear_q_proj", "linear_q_down_proj", "linear_q_up_proj", "linear_kv_down_proj", "linear_kv_up_proj",
    "input_layernorm", "pre_mlp_layernorm", "q_layernorm", "k_layernorm", "final_layernorm", "post_layernorm",
    "enorm", "hnorm", "eh_proj", "core_attention",
    # DeepSeek sparse attention (megatron-core >= 0.19): the standalone kv latent norm and the indexer's modules
    "kv_layernorm", "linear_wq_b", "linear_wk", "k_norm", "linear_weights_proj",
    "in_proj", "out_proj", "out_norm",  # gated delta-net (megatron-core 0.19): TE linears and its gated output norm
    # (Mamba mixers of hybrid models: in_proj / out_proj too)
    "final_norm",  # the final norm of a hybrid model's stack (megatron-core 0.19 HybridStack: TENorm)
})
#: a Mamba layer's pre-norm: standalone in the local hybrid spec, fused into ``mixer.in_proj`` in the TE one
MAMBA_NORM = ("norm.", "mixer.in_proj.layer_norm_")
#: the pre-norm of each hybrid layer symbol (megatron's ``hybrid_layer_allocation.Symbols``) that the TE hybrid spec
#: fuses into the layer's first linear
HYBRID_FUSED_NORMS = {"M": MAMBA_NORM, "*": INPUT_NORM, "-": PRE_MLP_NORM}
#: hybrid layer symbols whose TE keys are the local spec's: an MoE layer ('E', megatron's ``MoETransformerLayer``)
#: keeps a standalone ``pre_mlp_layernorm`` (``TENorm``: an ``_extra_state`` of its own), its experts are stacked
#: alike (sequential or grouped-GEMM), its shared experts' linears are TE linears under the same names
HYBRID_UNFUSED = frozenset({"E"})


def empty_extra_state():
    """What a TE module without FP8 state saves as ``_extra_state`` (TE 2.x ``get_extra_state``)."""
    import torch

    return torch.empty(0, dtype=torch.uint8)


def _moe_pattern(config: Any) -> List[int]:
    layers = int(config.num_layers)
    if not getattr(config, "num_moe_experts", None):
        return [0] * layers
    freq = getattr(config, "moe_layer_freq", 1)
    if isinstance(freq, int):
        return [1 if i % freq == 0 else 0 for i in range(layers)]
    if isinstance(freq, (list, tuple)) and len(freq) == layers:
        return [int(bool(x)) for x in freq]
    raise ValueError(f"moe_layer_freq {freq!r} does not describe {layers} layers")


def is_dsa(config: Any) -> bool:
    """Whether ``config`` has DeepSeek sparse attention (megatron-core >= 0.19 ``experimental_attention_variant``)."""
    return getattr(config, "experimental_attention_variant", None) == "dsa"


def layer_kinds(config: Any) -> Tuple[List[bool], bool]:
    """``(per decoder layer: has routed experts, multi-latent attention)`` as megatron-core's block spec reads the
    config (``moe_layer_freq``; multi-token-prediction layers repeat the last decoder layer's spec)."""
    return [bool(p) for p in _moe_pattern(config)], bool(getattr(config, "multi_latent_attention", False))


def _kind_of(config: Any, layer: Optional[int], mtp: Optional[int], key: str) -> Tuple[bool, bool]:
    moe, mla = layer_kinds(config)
    if mtp is not None:
        return moe[-1], mla
    if layer is not None:
        index = layer
        if index >= len(moe):
            raise ValueError(f"{key}: layer {index}, but the config has {len(moe)} layers")
        return moe[index], mla
    if len(set(moe)) > 1:  # megatron-core stacks layers only when they are all alike
        raise ValueError(f"{key}: a stacked layer key, but the config mixes dense and MoE layers (moe_layer_freq "
                         f"{getattr(config, 'moe_layer_freq', None)!r})")
    return moe[0], mla


def te_tensor_key(key: str, config: Any) -> str:
    """The key a TE-spec model saves a tensor under, for the key a local-spec model of ``config`` saves it under.

    Raises:
        ValueError: a layer index outside the config, or a stacked key in a model that mixes layer kinds.
    """
    k = split_layer_key(key)
    if k is None:
        return key
    pattern = getattr(config, "hybrid_layer_pattern", None)
    if pattern:
        return k.prefix + _hybrid_te_rest(key, k, pattern)
    moe, mla = _kind_of(config, k.layer, k.mtp, key)
    rest = k.rest
    if is_dsa(config):  # megatron's TE DSA spec: standalone input / latent norms, the dense pre-MLP norm fused
        rest = fused_norm_key(rest, PRE_MLP_NORM) if not moe else plain_norm_key(rest, PRE_MLP_NORM)
    elif mla:
        rest = fused_norm_key(rest, Q_LATENT_NORM)
        rest = fused_norm_key(rest, KV_LATENT_NORM)
        if not moe:
            rest = fused_norm_key(rest, PRE_MLP_NORM)
    elif moe:
        rest = plain_norm_key(rest, PRE_MLP_NORM)
    return k.prefix + rest


def _hybrid_te_rest(key: str, k: Any, pattern: str) -> str:
    """A hybrid model's layer key (the part after ``decoder.layers.{i}.``) as the TE hybrid spec names it."""
    if k.layer is None or k.mtp is not None:
        raise ValueError(f"{key}: not a key of one layer of a hybrid model (hybrid_layer_pattern={pattern!r}: "
                         "megatron-core saves its layers one key per layer, and no multi-token-prediction layers here)")
    if k.layer >= len(pattern):
        raise ValueError(f"{key}: layer {k.layer}, but hybrid_layer_pattern={pattern!r} has {len(pattern)} layers")
    if pattern[k.layer] in HYBRID_UNFUSED:
        return k.rest
    norm = HYBRID_FUSED_NORMS.get(pattern[k.layer])
    if norm is None:
        raise ValueError(f"{key}: layer {k.layer} is a {pattern[k.layer]!r} layer of hybrid_layer_pattern="
                         f"{pattern!r}, whose Transformer Engine keys are not described (described: "
                         f"{', '.join(repr(s) for s in [*HYBRID_FUSED_NORMS, *sorted(HYBRID_UNFUSED)])})")
    return fused_norm_key(k.rest, norm)


#: modules that a TE-spec model of a config with ``qk_layernorm_whole_projection`` builds from this package's classes
#: (``WholeQueryRMSNorm`` / ``WholeKeyRMSNorm``: no TE class normalises a whole projection), not from TE's
WHOLE_PROJECTION_NORMS = frozenset({"q_layernorm", "k_layernorm"})


def te_module_of(key: str, config: Any = None) -> Optional[str]:
    """The TE module (key prefix) a TE-spec tensor key belongs to, or None when its module is not a TE class
    (embedding, output layer, router, shared-expert gate; with a ``config`` whose q / k norms are over the whole
    projection, ``qk_layernorm_whole_projection``: the q / k norms, this package's modules)."""
    if "." not in key:
        return None
    module, leaf = key.rsplit(".", 1)
    name = module.rsplit(".", 1)[-1]
    if name not in TE_MODULES or leaf == EXTRA_STATE:
        return None
    if name in WHOLE_PROJECTION_NORMS and getattr(config, "qk_layernorm_whole_projection", False):
        return None
    return module


def te_extra_state_modules(te_tensor_keys: Iterable[str], mtp_plain_state: Optional[bool] = None,
                           config: Any = None) -> List[str]:
    """Every TE module that saves ``_extra_state``, given the TE-spec tensor keys (sorted): the modules holding a
    tensor (:func:`te_module_of` with ``config``), and, when the MTP block saves its layers' plain state dicts too
    (``mtp_plain_state``; default: whether the installed megatron-core's does,
    :func:`~megatron_bridge_ext.mcore.versions.mtp_block_saves_plain_state`), each multi-token-prediction layer's
    core attention (TE's ``DotProductAttention`` has ``_extra_state`` although it holds no tensor; a DSA model's core
    attention is megatron's ``DSAttention``, which has none)."""
    if mtp_plain_state is None:
        from megatron_bridge_ext.mcore.versions import mtp_block_saves_plain_state

        mtp_plain_state = mtp_block_saves_plain_state()
    modules = set()
    for key in te_tensor_keys:
        module = te_module_of(key, config)
        if module is not None:
            modules.add(module)
        mtp = mtp_layer(key) if mtp_plain_state and not is_dsa(config) else None
        if mtp is not None:
            modules.add(f"{MTP_LAYERS}{mtp}.transformer_layer.self_attention.core_attention")
    return sorted(modules)


def te_layout(local_tensors: Mapping[str, Tuple[Sequence[int], int]], config: Any
              ) -> Tuple[Dict[str, Tuple[int, ...]], Dict[str, Tuple[int, ...]]]:
    """The TE-spec checkpoint's tensors and ``_extra_state`` objects, from a local-spec model's.

    Args:
        local_tensors: local-spec tensor key -> (global shape, number of leading dimensions that are layer / expert
            offsets: 1 for stacked layers, +1 for routed experts, 0 for a key of its own).
        config: the model config (``num_layers``, ``num_moe_experts``, ``moe_layer_freq``,
            ``multi_latent_attention``, ``qk_layernorm_whole_projection``).

    Returns:
        (TE tensor key -> global shape, ``<module>._extra_state`` -> global shape of its object grid).
    """
    tensors: Dict[str, Tuple[int, ...]] = {}
    grid: Dict[str, Tuple[int, ...]] = {}
    for key, (shape, prepend) in local_tensors.items():
        te_key = te_tensor_key(key, config)
        if te_key in tensors and tensors[te_key] != tuple(shape):
            raise ValueError(f"{te_key}: two local keys map to it with shapes {tensors[te_key]} and {tuple(shape)}")
        tensors[te_key] = tuple(shape)
        module = te_module_of(te_key, config)
        if module is not None:
            grid.setdefault(module, tuple(shape[:prepend]) or (1,))
    objects = {f"{m}.{EXTRA_STATE}": grid.get(m, (1,)) for m in te_extra_state_modules(tensors, config=config)}
    return tensors, objects
