"""Mapping registry: wildcard grammar, precedence, dict hf_param, layer-norm aliases, cache, validation."""

from __future__ import annotations

import pytest

from megatron_bridge_ext.mappings import MegatronParamMapping
from megatron_bridge_ext.registry import MegatronMappingRegistry


class Plain(MegatronParamMapping):
    pass


class QKV(MegatronParamMapping):
    pass


class GateUp(MegatronParamMapping):
    pass


class Special(MegatronParamMapping):
    pass


def _llama_moe_registry() -> MegatronMappingRegistry:
    L = "decoder.layers.*"
    return MegatronMappingRegistry(
        Plain("embedding.word_embeddings.weight", "model.embed_tokens.weight"),
        Plain("output_layer.weight", "lm_head.weight"),
        Plain("decoder.final_layernorm.weight", "model.norm.weight"),
        Plain(f"{L}.self_attention.linear_qkv.layer_norm_weight", "model.layers.*.input_layernorm.weight"),
        QKV(
            f"{L}.self_attention.linear_qkv.weight",
            {
                "q": "model.layers.*.self_attn.q_proj.weight",
                "k": "model.layers.*.self_attn.k_proj.weight",
                "v": "model.layers.*.self_attn.v_proj.weight",
            },
        ),
        Plain(f"{L}.self_attention.linear_proj.weight", "model.layers.*.self_attn.o_proj.weight"),
        Plain(f"{L}.pre_mlp_layernorm.weight", "model.layers.*.post_attention_layernorm.weight"),
        Plain(f"{L}.mlp.router.weight", "model.layers.*.mlp.gate.weight"),
        GateUp(
            f"{L}.mlp.experts.local_experts.*.linear_fc1.weight",
            {
                "gate": "model.layers.*.mlp.experts.*.gate_proj.weight",
                "up": "model.layers.*.mlp.experts.*.up_proj.weight",
            },
        ),
        Plain(f"{L}.mlp.experts.linear_fc2.weight*", "model.layers.*.mlp.experts.*.down_proj.weight"),
        GateUp(
            f"{L}.mlp.linear_fc1.weight",
            {"gate": "model.layers.*.mlp.gate_proj.weight", "up": "model.layers.*.mlp.up_proj.weight"},
        ),
        Plain(f"{L}.mlp.linear_fc2.weight", "model.layers.*.mlp.down_proj.weight"),
        Plain("vision.**", "model.vision_tower.**"),
    )


def test_megatron_to_hf_resolves_wildcards():
    reg = _llama_moe_registry()
    m = reg.megatron_to_hf_lookup("decoder.layers.12.self_attention.linear_proj.weight")
    assert type(m) is Plain
    assert m.megatron_param == "decoder.layers.12.self_attention.linear_proj.weight"
    assert m.hf_param == "model.layers.12.self_attn.o_proj.weight"

    m = reg.megatron_to_hf_lookup("decoder.layers.3.self_attention.linear_qkv.weight")
    assert type(m) is QKV
    assert m.hf_param == {
        "q": "model.layers.3.self_attn.q_proj.weight",
        "k": "model.layers.3.self_attn.k_proj.weight",
        "v": "model.layers.3.self_attn.v_proj.weight",
    }

    m = reg.megatron_to_hf_lookup("decoder.layers.7.mlp.experts.local_experts.31.linear_fc1.weight")
    assert type(m) is GateUp
    assert m.hf_param == {
        "gate": "model.layers.7.mlp.experts.31.gate_proj.weight",
        "up": "model.layers.7.mlp.experts.31.up_proj.weight",
    }

    m = reg.megatron_to_hf_lookup("decoder.layers.0.mlp.experts.linear_fc2.weight15")
    assert m.hf_param == "model.layers.0.mlp.experts.15.down_proj.weight"

    m = reg.megatron_to_hf_lookup("embedding.word_embeddings.weight")
    assert m.megatron_param == "embedding.word_embeddings.weight" and m.hf_param == "model.embed_tokens.weight"


def test_star_matches_digits_only_and_double_star_spans_dots():
    reg = _llama_moe_registry()
    assert reg.megatron_to_hf_lookup("decoder.layers.a.b.self_attention.linear_proj.weight") is None
    assert reg.megatron_to_hf_lookup("decoder.layers.x.self_attention.linear_proj.weight") is None
    assert reg.megatron_to_hf_lookup("decoder.layers..self_attention.linear_proj.weight") is None
    assert reg.megatron_to_hf_lookup("decoder.layers.1.2.self_attention.linear_proj.weight") is None
    # anchored at both ends
    assert reg.megatron_to_hf_lookup("module.decoder.layers.1.mlp.linear_fc2.weight") is None
    assert reg.megatron_to_hf_lookup("decoder.layers.1.mlp.linear_fc2.weight.extra") is None
    assert reg.megatron_to_hf_lookup("output_layer.weightX") is None
    # `.` in a pattern is literal, not a regex wildcard
    assert reg.megatron_to_hf_lookup("decoder.layers.1.mlpXlinear_fc2.weight") is None

    m = reg.megatron_to_hf_lookup("vision.blocks.3.attn.qkv.weight")
    assert m.hf_param == "model.vision_tower.blocks.3.attn.qkv.weight"
    m = reg.hf_to_megatron_lookup("model.vision_tower.a.b.c")
    assert m.megatron_param == "vision.a.b.c"


def test_hf_to_megatron_lookup():
    reg = _llama_moe_registry()
    m = reg.hf_to_megatron_lookup("model.layers.5.self_attn.k_proj.weight")
    assert type(m) is QKV
    assert m.megatron_param == "decoder.layers.5.self_attention.linear_qkv.weight"
    assert m.hf_param["v"] == "model.layers.5.self_attn.v_proj.weight"
    m = reg.hf_to_megatron_lookup("model.layers.2.mlp.experts.9.up_proj.weight")
    assert m.megatron_param == "decoder.layers.2.mlp.experts.local_experts.9.linear_fc1.weight"
    assert m.hf_param == {
        "gate": "model.layers.2.mlp.experts.9.gate_proj.weight",
        "up": "model.layers.2.mlp.experts.9.up_proj.weight",
    }
    m = reg.hf_to_megatron_lookup("model.layers.2.mlp.experts.9.down_proj.weight")
    assert m.megatron_param == "decoder.layers.2.mlp.experts.linear_fc2.weight9"
    m = reg.hf_to_megatron_lookup("lm_head.weight")
    assert m.megatron_param == "output_layer.weight"
    assert reg.hf_to_megatron_lookup("model.layers.2.mlp.experts.x.down_proj.weight") is None
    assert reg.hf_to_megatron_lookup("nothing.here") is None


def test_fused_expert_tensors_resolve_to_their_layer_group():
    """A fused HF expert tensor (no expert index in its name) resolves to its layer's expert group with the expert
    index left open, whether its pattern has a layer wildcard (decoder layers) or none (an MTP layer's, spelled
    out); per-expert names still carry their expert."""
    from megatron_bridge_ext.mappings import ExpertFC1Mapping, ExpertFC2Mapping

    reg = MegatronMappingRegistry(
        ExpertFC1Mapping("mtp.layers.0.mlp.experts.local_experts.*.linear_fc1.weight",
                         gate_up="model.layers.4.mlp.experts.gate_up_proj"),
        ExpertFC1Mapping("decoder.layers.*.mlp.experts.local_experts.*.linear_fc1.weight",
                         gate_up="model.layers.*.mlp.experts.gate_up_proj"),
        ExpertFC2Mapping("decoder.layers.*.mlp.experts.local_experts.*.linear_fc2.weight",
                         "model.layers.*.mlp.experts.*.down_proj.weight"),
    )
    for name, megatron in (("model.layers.2.mlp.experts.gate_up_proj",
                            "decoder.layers.2.mlp.experts.local_experts.*.linear_fc1.weight"),
                           ("model.layers.4.mlp.experts.gate_up_proj",
                            "mtp.layers.0.mlp.experts.local_experts.*.linear_fc1.weight")):
        m = reg.hf_to_megatron_lookup(name)
        assert m.megatron_param == megatron and m.hf_param == {"gate_up": name}
        assert getattr(m, "expert", None) is None
    m = reg.hf_to_megatron_lookup("model.layers.2.mlp.experts.5.down_proj.weight")
    assert m.megatron_param == "decoder.layers.2.mlp.experts.local_experts.*.linear_fc2.weight" and m.expert == 5


def test_first_registered_match_wins():
    reg = MegatronMappingRegistry(
        Special("decoder.layers.0.mlp.linear_fc1.weight", "special.fc1"),
        Plain("decoder.layers.*.mlp.linear_fc1.weight", "model.layers.*.fc1"),
        Special("decoder.layers.1.mlp.linear_fc1.weight", "never.used"),
        Plain("decoder.**", "hf.**"),
        Special("decoder.layers.2.mlp.linear_fc2.weight", "shadowed.by.double.star"),
    )
    m0 = reg.megatron_to_hf_lookup("decoder.layers.0.mlp.linear_fc1.weight")
    assert type(m0) is Special and m0.hf_param == "special.fc1"  # exact, registered first
    m1 = reg.megatron_to_hf_lookup("decoder.layers.1.mlp.linear_fc1.weight")
    assert type(m1) is Plain and m1.hf_param == "model.layers.1.fc1"  # wildcard registered before the exact one
    m2 = reg.megatron_to_hf_lookup("decoder.layers.2.mlp.linear_fc2.weight")
    assert type(m2) is Plain and m2.hf_param == "hf.layers.2.mlp.linear_fc2.weight"
    h = reg.hf_to_megatron_lookup("shadowed.by.double.star")
    assert type(h) is Special and h.megatron_param == "decoder.layers.2.mlp.linear_fc2.weight"
    h = reg.hf_to_megatron_lookup("hf.layers.1.mlp.linear_fc1.weight")
    assert h.megatron_param == "decoder.layers.1.mlp.linear_fc1.weight" and type(h) is Plain
    h = reg.hf_to_megatron_lookup("never.used")
    assert type(h) is Special and h.megatron_param == "decoder.layers.1.mlp.linear_fc1.weight"


def test_layer_norm_aliases_both_ways():
    reg = _llama_moe_registry()
    # registered fused name answers the plain name
    m = reg.megatron_to_hf_lookup("decoder.layers.4.input_layernorm.weight")
    assert m is not None
    assert m.megatron_param == "decoder.layers.4.input_layernorm.weight"
    assert m.hf_param == "model.layers.4.input_layernorm.weight"
    # registered plain name answers the fused name
    m = reg.megatron_to_hf_lookup("decoder.layers.4.mlp.linear_fc1.layer_norm_weight")
    assert m.megatron_param == "decoder.layers.4.mlp.linear_fc1.layer_norm_weight"
    assert m.hf_param == "model.layers.4.post_attention_layernorm.weight"
    # no alias for unrelated names, and the alias needs a component boundary
    assert reg.megatron_to_hf_lookup("decoder.layers.4.xinput_layernorm.weight") is None
    assert reg.megatron_to_hf_lookup("decoder.layers.4.input_layernorm.bias") is None

    biases = MegatronMappingRegistry(
        Plain("decoder.layers.*.input_layernorm.bias", "model.layers.*.ln1.bias"),
        Plain("decoder.layers.*.mlp.linear_fc1.layer_norm_bias", "model.layers.*.ln2.bias"),
    )
    m = biases.megatron_to_hf_lookup("decoder.layers.9.self_attention.linear_qkv.layer_norm_bias")
    assert m.hf_param == "model.layers.9.ln1.bias"
    m = biases.megatron_to_hf_lookup("decoder.layers.9.pre_mlp_layernorm.bias")
    assert m.hf_param == "model.layers.9.ln2.bias"


def test_explicit_mapping_wins_over_alias():
    reg = MegatronMappingRegistry(
        Plain("decoder.layers.*.self_attention.linear_qkv.layer_norm_weight", "fused.*"),
        Special("decoder.layers.*.input_layernorm.weight", "plain.*"),
    )
    assert reg.megatron_to_hf_lookup("decoder.layers.3.input_layernorm.weight").hf_param == "plain.3"
    assert reg.megatron_to_hf_lookup("decoder.layers.3.self_attention.linear_qkv.layer_norm_weight").hf_param == (
        "fused.3"
    )
    # alias of an exact name
    reg2 = MegatronMappingRegistry(Plain("input_layernorm.weight", "ln.weight"))
    m = reg2.megatron_to_hf_lookup("self_attention.linear_qkv.layer_norm_weight")
    assert m.megatron_param == "self_attention.linear_qkv.layer_norm_weight" and m.hf_param == "ln.weight"


def test_cache_returns_equal_results_and_does_not_mutate_registered():
    reg = _llama_moe_registry()
    names = [
        "decoder.layers.1.self_attention.linear_qkv.weight",
        "decoder.layers.1.input_layernorm.weight",
        "decoder.final_layernorm.weight",
        "not.a.param",
    ]
    first = [reg.megatron_to_hf_lookup(n) for n in names]
    again = [reg.megatron_to_hf_lookup(n) for n in names]
    for a, b in zip(first, again):
        if a is None:
            assert b is None
        else:
            assert type(a) is type(b) and a.megatron_param == b.megatron_param and a.hf_param == b.hf_param
    # the registered patterns are untouched by resolution
    assert reg.megatron_patterns()[4] == "decoder.layers.*.self_attention.linear_qkv.weight"
    assert list(reg)[4].hf_param["q"] == "model.layers.*.self_attn.q_proj.weight"
    # a fresh registry (no cache) gives the same answer
    fresh = _llama_moe_registry()
    assert fresh.megatron_to_hf_lookup(names[0]).hf_param == first[0].hf_param
    h1 = reg.hf_to_megatron_lookup("model.layers.1.mlp.up_proj.weight")
    h2 = reg.hf_to_megatron_lookup("model.layers.1.mlp.up_proj.weight")
    assert h1.megatron_param == h2.megatron_param == "decoder.layers.1.mlp.linear_fc1.weight"


def test_mismatched_wildcards_raise():
    with pytest.raises(ValueError, match=r"decoder.layers.\*.mlp.linear_fc2.weight.*1 wildcard.*has 0"):
        MegatronMappingRegistry(Plain("decoder.layers.*.mlp.linear_fc2.weight", "model.mlp.down_proj.weight"))
    with pytest.raises(ValueError, match=r"hf_param\['up'\]"):
        MegatronMappingRegistry(
            GateUp("decoder.layers.*.mlp.linear_fc1.weight", {"gate": "m.*.gate", "up": "m.*.*.up"})
        )
    with pytest.raises(ValueError, match="2 wildcard"):
        MegatronMappingRegistry(Plain("a.*.b.**", "c.*"))
    with pytest.raises(ValueError, match="MegatronParamMapping"):
        MegatronMappingRegistry("not a mapping")  # type: ignore[arg-type]


def test_container_api():
    reg = _llama_moe_registry()
    assert len(reg) == 13
    assert [m.megatron_param for m in reg] == reg.megatron_patterns()
    assert reg.megatron_patterns()[0] == "embedding.word_embeddings.weight"
    assert reg.hf_patterns()[1] == "lm_head.weight"
    text = repr(reg)
    assert text.startswith("MegatronMappingRegistry(13 mappings)")
    assert "QKV: decoder.layers.*.self_attention.linear_qkv.weight" in text
    assert len(MegatronMappingRegistry()) == 0
    assert MegatronMappingRegistry().megatron_to_hf_lookup("x") is None
