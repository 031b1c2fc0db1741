"""``te_keys`` (no model built): q / k norms over the whole projection (OLMo 2 / Olmo 3 / OLMoE) are this package's
modules in a TE-spec model, not TE's, so they save no ``_extra_state``; per-head q / k norms (TE's ``TENorm``) do.
Hybrid (NemotronH) layers fuse their pre-norm by their pattern symbol."""

from __future__ import annotations

from types import SimpleNamespace

from megatron_bridge_ext.mcore.te_keys import te_extra_state_modules, te_layout, te_module_of

LOCAL = {  # an OLMo 2 layer stack (no pre-norms, post norms), local-spec keys -> (global shape, leading layer dims)
    "decoder.layers.self_attention.linear_qkv.weight": ((4, 128, 64), 1),
    "decoder.layers.self_attention.q_layernorm.weight": ((4, 64), 1),
    "decoder.layers.self_attention.k_layernorm.weight": ((4, 32), 1),
    "decoder.layers.self_attention.linear_proj.weight": ((4, 64, 64), 1),
    "decoder.layers.self_attention.linear_proj.post_layernorm.weight": ((4, 64), 1),
    "decoder.final_layernorm.weight": ((64,), 0),
}


def _config(whole: bool) -> SimpleNamespace:
    return SimpleNamespace(num_layers=4, num_moe_experts=None, multi_latent_attention=False,
                           qk_layernorm_whole_projection=whole)


def test_whole_projection_qk_norms_save_no_extra_state():
    tensors, objects = te_layout(LOCAL, _config(True))
    assert tensors == {k: v[0] for k, v in LOCAL.items()}
    assert sorted(objects) == ["decoder.final_layernorm._extra_state",
                               "decoder.layers.self_attention.linear_proj._extra_state",
                               "decoder.layers.self_attention.linear_proj.post_layernorm._extra_state",
                               "decoder.layers.self_attention.linear_qkv._extra_state"]
    assert te_module_of("decoder.layers.self_attention.q_layernorm.weight", _config(True)) is None
    assert te_extra_state_modules(["decoder.layers.self_attention.k_layernorm.weight"], False, _config(True)) == []


def test_per_head_qk_norms_are_te_norms():
    _, objects = te_layout(LOCAL, _config(False))
    assert objects["decoder.layers.self_attention.q_layernorm._extra_state"] == (4,)
    assert objects["decoder.layers.self_attention.k_layernorm._extra_state"] == (4,)
    key = "decoder.layers.self_attention.q_layernorm.weight"
    assert te_module_of(key) == key[:-len(".weight")]


def _hybrid(pattern: str) -> SimpleNamespace:
    return SimpleNamespace(num_layers=len(pattern), num_moe_experts=None, multi_latent_attention=False,
                           hybrid_layer_pattern=pattern)


def test_hybrid_layers_fuse_their_pre_norm_by_symbol():
    """megatron-core's TE hybrid spec (``hybrid_layer_specs.hybrid_stack_spec``): each layer's pre-norm is the
    ``layer_norm_weight`` of its first linear, chosen by the layer's symbol; other keys keep their names; every module
    is a layer of its own, so each ``_extra_state`` is a ``(1,)`` grid (the proof against megatron's TE model itself is
    ``tests/distributed/test_te_checkpoint.py``)."""
    from megatron_bridge_ext.mcore.te_keys import te_tensor_key

    config = _hybrid("M*-")
    local = {
        "decoder.layers.0.norm.weight": ((64,), 0),
        "decoder.layers.0.mixer.in_proj.weight": ((280, 64), 0),
        "decoder.layers.0.mixer.norm.weight": ((64,), 0),
        "decoder.layers.0.mixer.out_proj.weight": ((64, 64), 0),
        "decoder.layers.1.input_layernorm.weight": ((64,), 0),
        "decoder.layers.1.self_attention.linear_qkv.weight": ((128, 64), 0),
        "decoder.layers.2.pre_mlp_layernorm.weight": ((64,), 0),
        "decoder.layers.2.mlp.linear_fc1.weight": ((96, 64), 0),
        "decoder.final_norm.weight": ((64,), 0),
    }
    tensors, objects = te_layout(local, config)
    assert sorted(tensors) == sorted([
        "decoder.layers.0.mixer.in_proj.layer_norm_weight", "decoder.layers.0.mixer.in_proj.weight",
        "decoder.layers.0.mixer.norm.weight", "decoder.layers.0.mixer.out_proj.weight",
        "decoder.layers.1.self_attention.linear_qkv.layer_norm_weight",
        "decoder.layers.1.self_attention.linear_qkv.weight",
        "decoder.layers.2.mlp.linear_fc1.layer_norm_weight", "decoder.layers.2.mlp.linear_fc1.weight",
        "decoder.final_norm.weight"])
    assert objects == {f"{m}._extra_state": (1,) for m in (
        "decoder.layers.0.mixer.in_proj", "decoder.layers.0.mixer.out_proj",
        "decoder.layers.1.self_attention.linear_qkv", "decoder.layers.2.mlp.linear_fc1", "decoder.final_norm")}
    assert te_tensor_key("decoder.layers.0.input_layernorm.weight", config) == "decoder.layers.0.input_layernorm.weight"


def test_hybrid_moe_layers_keep_the_local_keys():
    """An 'E' layer of the TE hybrid spec (megatron's ``MoETransformerLayer``): a standalone ``pre_mlp_layernorm``
    (``TENorm``, ``_extra_state`` of its own), the router no TE module, the routed experts stacked on their expert
    dimension (an ``_extra_state`` grid of ``(experts,)``), the shared experts' TE linears; the neighbouring MLP
    layer still fuses its pre-norm."""
    config = _hybrid("E-")
    local = {
        "decoder.layers.0.pre_mlp_layernorm.weight": ((64,), 0),
        "decoder.layers.0.mlp.router.weight": ((8, 64), 0),
        "decoder.layers.0.mlp.router.expert_bias": ((8,), 0),
        "decoder.layers.0.mlp.experts.experts.linear_fc1.weight": ((8, 24, 64), 1),
        "decoder.layers.0.mlp.experts.experts.linear_fc2.weight": ((8, 64, 24), 1),
        "decoder.layers.0.mlp.shared_experts.linear_fc1.weight": ((40, 64), 0),
        "decoder.layers.0.mlp.shared_experts.linear_fc2.weight": ((64, 40), 0),
        "decoder.layers.1.pre_mlp_layernorm.weight": ((64,), 0),
        "decoder.layers.1.mlp.linear_fc1.weight": ((96, 64), 0),
    }
    tensors, objects = te_layout(local, config)
    assert sorted(tensors) == sorted([k for k in local if not k.startswith("decoder.layers.1.pre_mlp")] +
                                     ["decoder.layers.1.mlp.linear_fc1.layer_norm_weight"])
    assert objects == {
        "decoder.layers.0.pre_mlp_layernorm._extra_state": (1,),
        "decoder.layers.0.mlp.experts.experts.linear_fc1._extra_state": (8,),
        "decoder.layers.0.mlp.experts.experts.linear_fc2._extra_state": (8,),
        "decoder.layers.0.mlp.shared_experts.linear_fc1._extra_state": (1,),
        "decoder.layers.0.mlp.shared_experts.linear_fc2._extra_state": (1,),
        "decoder.layers.1.mlp.linear_fc1._extra_state": (1,)}


def test_hybrid_keys_outside_the_pattern_are_refused_by_name():
    import pytest

    from megatron_bridge_ext.mcore.te_keys import te_tensor_key

    with pytest.raises(ValueError, match=r"decoder\.layers\.3\.norm\.weight: layer 3, but hybrid_layer_pattern='M\*-'"
                                         r" has 3 layers"):
        te_tensor_key("decoder.layers.3.norm.weight", _hybrid("M*-"))
    with pytest.raises(ValueError, match=r"layer 1 is a 'G' layer of hybrid_layer_pattern='MG'"):
        te_tensor_key("decoder.layers.1.pre_mlp_layernorm.weight", _hybrid("MG"))
    with pytest.raises(ValueError, match=r"not a key of one layer of a hybrid model"):
        te_tensor_key("decoder.layers.norm.weight", _hybrid("M"))
