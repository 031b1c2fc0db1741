"""``te_keys`` (no model built): q / k norms over the whole projection (OLMo 2 / Olmo 3 / OLMoE) are this package's
modules in a TE-spec model, not TE's, so they save no ``_extra_state``; per-head q / k norms (TE's ``TENorm``) do."""

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
