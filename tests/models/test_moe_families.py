"""The MoE families without a process group: which HF expert layout a checkpoint's keys and shapes give (one tensor
per expert, fused in either orientation, a mix refused naming both), the mapping tables each layout resolves to
(sequential and grouped-GEMM Megatron names), the multi-token-prediction layers read from the keys (config fields,
mapping tables, the layer re-addressing, the embedding / head copies), and the named errors for what megatron-core
0.16.1 cannot express."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("megatron.core")
transformers = pytest.importorskip("transformers")

import megatron_bridge_ext.models  # noqa: E402,F401  (registers the bridges)
from megatron_bridge_ext.dispatch import get_model_bridge  # noqa: E402
from megatron_bridge_ext.mappings import (  # noqa: E402
    AutoMapping,
    ConversionContext,
    CopiesMapping,
    ExpertFC1Mapping,
    MegatronParamMapping,
)
from megatron_bridge_ext.models.moe import PER_EXPERT, ExpertLayout, detect_expert_layout  # noqa: E402
from megatron_bridge_ext.models.mtp import MTPLayers, layer_mappings_at  # noqa: E402
from megatron_bridge_ext.mcore.versions import mtp_layer_module  # noqa: E402
from megatron_bridge_ext.registry import MegatronMappingRegistry  # noqa: E402

D, F, E = 64, 24, 4
TINY = dict(vocab_size=97, hidden_size=D, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            max_position_embeddings=64)


def _state(shapes):
    return {k: torch.empty(v, device="meta") for k, v in shapes.items()}


def _per_expert(layers=(0, 1)):
    out = {"model.embed_tokens.weight": (97, D)}
    for layer in layers:
        for e in range(E):
            p = f"model.layers.{layer}.mlp.experts.{e}"
            out.update({f"{p}.gate_proj.weight": (F, D), f"{p}.up_proj.weight": (F, D),
                        f"{p}.down_proj.weight": (D, F)})
    return out


def _fused(fc1_t, fc2_t, layers=(0, 1), d=D, f=F):
    out = {"model.embed_tokens.weight": (97, d)}
    for layer in layers:
        p = f"model.layers.{layer}.mlp.experts"
        out[f"{p}.gate_up_proj"] = (E, d, 2 * f) if fc1_t else (E, 2 * f, d)
        out[f"{p}.down_proj"] = (E, f, d) if fc2_t else (E, d, f)
    return out


@pytest.mark.parametrize("fc1_t,fc2_t", [(False, False), (True, True), (True, False), (False, True)])
def test_fused_layouts_and_their_orientation_come_from_the_shapes(fc1_t, fc2_t):
    got = detect_expert_layout(_state(_fused(fc1_t, fc2_t)), "Fam", hidden_size=D, expert_ffn=F)
    assert got == ExpertLayout(fused=True, fc1_transposed=fc1_t, fc2_transposed=fc2_t)


def test_per_expert_and_empty_checkpoints():
    assert detect_expert_layout(_state(_per_expert()), "Fam", hidden_size=D, expert_ffn=F) == PER_EXPERT
    default = ExpertLayout(fused=True, fc1_transposed=True)
    assert detect_expert_layout(_state({"model.norm.weight": (D,)}), "Fam", hidden_size=D, expert_ffn=F,
                                default=default) == default


def test_orientation_the_shapes_cannot_tell_is_the_family_default():
    # hidden 48 == 2F: [E, 48, 48] either way; down [E, 48, 24] is the normal orientation
    state = _state(_fused(False, False, d=2 * F))
    for default in (ExpertLayout(fused=True), ExpertLayout(fused=True, fc1_transposed=True)):
        got = detect_expert_layout(state, "Fam", hidden_size=2 * F, expert_ffn=F, default=default)
        assert got.fc1_transposed == default.fc1_transposed and not got.fc2_transposed


def test_mixed_layouts_are_refused_naming_both():
    shapes = {**_per_expert(layers=(0,)), **_fused(False, False, layers=(1,))}
    with pytest.raises(ValueError, match=r"Fam: the checkpoint mixes expert layouts: one tensor per expert \(e\.g\. "
                                         r"model\.layers\.0\.mlp\.experts\.0\.gate_proj\.weight\) and fused expert "
                                         r"tensors \(e\.g\. model\.layers\.1\.mlp\.experts\.gate_up_proj\)"):
        detect_expert_layout(_state(shapes), "Fam", hidden_size=D, expert_ffn=F)


def test_fused_tensors_of_another_shape_or_mixed_orientations_are_refused():
    bad = _fused(False, False)
    bad["model.layers.1.mlp.experts.gate_up_proj"] = (E, 2 * F + 2, D)
    with pytest.raises(ValueError, match=r"model\.layers\.1\.mlp\.experts\.gate_up_proj has shape \[4, 50, 64\]; "
                                         r"expected \[E, 48, 64\] or \[E, 64, 48\]"):
        detect_expert_layout(_state(bad), "Fam", hidden_size=D, expert_ffn=F)
    mixed = {**_fused(False, False, layers=(0,)), **_fused(True, False, layers=(1,))}
    with pytest.raises(ValueError, match="stored in both orientations"):
        detect_expert_layout(_state(mixed), "Fam", hidden_size=D, expert_ffn=F)


EXPERT_NAMES = {
    "Qwen3MoeForCausalLM": ("model.layers.3.mlp.experts.5.gate_proj.weight", "model.layers.3.mlp.experts.gate_up_proj"),
    "DeepseekV3ForCausalLM": ("model.layers.3.mlp.experts.5.gate_proj.weight",
                              "model.layers.3.mlp.experts.gate_up_proj"),
    "Qwen2MoeForCausalLM": ("model.layers.3.mlp.experts.5.gate_proj.weight", "model.layers.3.mlp.experts.gate_up_proj"),
    "Glm4MoeForCausalLM": ("model.layers.3.mlp.experts.5.gate_proj.weight", "model.layers.3.mlp.experts.gate_up_proj"),
    "Glm4MoeLiteForCausalLM": ("model.layers.3.mlp.experts.5.gate_proj.weight",
                               "model.layers.3.mlp.experts.gate_up_proj"),
    "GptOssForCausalLM": ("model.layers.3.mlp.experts.5.gate_proj.weight", "model.layers.3.mlp.experts.gate_up_proj"),
}


@pytest.mark.parametrize("arch", sorted(EXPERT_NAMES))
@pytest.mark.parametrize("megatron", ["decoder.layers.3.mlp.experts.local_experts.5.linear_fc1.weight",
                                      "decoder.layers.3.mlp.experts.linear_fc1.weight5"])
def test_sequential_and_grouped_names_resolve_to_the_layer_group_in_both_layouts(arch, megatron):
    per_expert, fused = EXPERT_NAMES[arch]
    for layout, want in ((PER_EXPERT, per_expert), (ExpertLayout(fused=True), fused)):
        bridge = get_model_bridge(arch)
        bridge.hf_layout = layout
        mapping = bridge.registry.megatron_to_hf_lookup(megatron)
        assert mapping is not None and mapping.grouped and mapping.expert == 5, (arch, layout, mapping)
        names = mapping.for_experts(6).hf_names
        assert want in names, (arch, layout, names[:4])
        assert mapping.fused == layout.fused


def test_layout_change_rebuilds_the_table():
    bridge = get_model_bridge("Qwen3MoeForCausalLM")
    cfg = transformers.Qwen3MoeConfig(**TINY, moe_intermediate_size=F, num_experts=E)
    assert bridge.hf_layout == PER_EXPERT
    first = bridge.registry
    assert bridge.use_hf_layout_of(_state(_fused(True, True)), cfg) is True
    assert bridge.hf_layout == ExpertLayout(fused=True, fc1_transposed=True, fc2_transposed=True)
    assert bridge.registry is not first
    assert bridge.use_hf_layout_of(_state(_fused(True, True)), cfg) is False
    assert bridge.use_hf_layout_of(None, cfg) is False  # no source: keep the table


def _config(prefix, **overrides):
    return getattr(transformers, f"{prefix}Config")(**{**TINY, **overrides})


DSV3 = dict(n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=F, n_group=1, topk_group=1,
            q_lora_rank=24, kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=16, v_head_dim=12,
            num_key_value_heads=4, rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
GLM = dict(n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=F, head_dim=16)
OSS = dict(intermediate_size=F, num_local_experts=4, num_experts_per_tok=2, head_dim=16)


@pytest.mark.parametrize("arch,prefix,overrides,match", [
    ("DeepseekV3ForCausalLM", "DeepseekV3", dict(DSV3, attention_bias=True), r"attention_bias=True is not supported"),
    ("DeepseekV3ForCausalLM", "DeepseekV3", dict(DSV3, rope_interleave=False), r"rope_interleave=False"),
    ("DeepseekV3ForCausalLM", "DeepseekV3", dict(DSV3, num_key_value_heads=2),
     r"num_key_value_heads=2 != num_attention_heads=4"),
    ("DeepseekV3ForCausalLM", "DeepseekV3", dict(DSV3, norm_topk_prob=False),
     r"norm_topk_prob=False with sigmoid routing and num_experts_per_tok=2"),
    ("DeepseekV3ForCausalLM", "DeepseekV3", dict(DSV3, n_group=2, topk_group=2),
     r"n_group=2 with num_experts_per_tok=2, topk_group=2: HF scores a group by its top-2 experts"),
    ("DeepseekV3ForCausalLM", "DeepseekV3", dict(DSV3, rope_parameters={
        "rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0, "original_max_position_embeddings": 16,
        "truncate": False}), r"yarn truncate=False is not supported with multi-latent attention"),
    ("DeepseekV3ForCausalLM", "DeepseekV3", dict(DSV3, rope_parameters={
        "rope_type": "linear", "rope_theta": 1e4, "factor": 2.0}), r"llama3 / linear rope scaling is not supported"),
    ("DeepseekV3ForCausalLM", "DeepseekV3", dict(DSV3, num_experts_per_tok=1),
     r"num_experts_per_tok=1 with norm_topk_prob=True is not supported"),
    ("Glm4MoeForCausalLM", "Glm4Moe", dict(GLM, norm_topk_prob=False), r"norm_topk_prob=False"),
    ("Glm4MoeForCausalLM", "Glm4Moe", dict(GLM, num_experts_per_tok=1), r"num_experts_per_tok=1 with norm_topk_prob"),
    ("Qwen2MoeForCausalLM", "Qwen2Moe", dict(num_experts=4, moe_intermediate_size=F, num_experts_per_tok=2,
                                             shared_expert_intermediate_size=0),
     r"shared_expert_intermediate_size=0"),
    ("GptOssForCausalLM", "GptOss", dict(OSS, swiglu_alpha=1.5), r"swiglu_alpha=1\.5 is not supported"),
    ("GptOssForCausalLM", "GptOss", dict(OSS, attention_bias=False), r"attention_bias=False is not supported"),
    ("GptOssForCausalLM", "GptOss", dict(OSS, rope_parameters={
        "rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0, "original_max_position_embeddings": 16,
        "attention_factor": 2.0}), r"yarn attention_factor=2\.0 differs"),
])
def test_unsupported_settings_are_refused_by_name(arch, prefix, overrides, match):
    with pytest.raises(ValueError, match=match):
        get_model_bridge(arch).transformer_config(_config(prefix, **overrides))


@pytest.mark.parametrize("arch,prefix,overrides", [("DeepseekV3ForCausalLM", "DeepseekV3", DSV3),
                                                    ("Glm4MoeForCausalLM", "Glm4Moe", GLM)])
def test_a_single_sigmoid_weight_exports_as_not_renormalised(arch, prefix, overrides):
    """megatron-core renormalises the top-k sigmoid weights only when k > 1 (``topk_routing_with_score_function``):
    a top-1 router exports ``norm_topk_prob=False`` (HF then keeps the one weight as megatron does), and converts
    back; top-2 exports ``norm_topk_prob=True``."""
    bridge = get_model_bridge(arch)
    one = bridge.megatron_to_hf_config(bridge.transformer_config(_config(prefix, **overrides), moe_router_topk=1))
    assert one["norm_topk_prob"] is False and one["num_experts_per_tok"] == 1
    back = bridge.transformer_config(_config(prefix, **{**overrides, "num_experts_per_tok": 1,
                                                        "norm_topk_prob": False}))
    assert back.moe_router_topk == 1
    two = bridge.megatron_to_hf_config(bridge.transformer_config(_config(prefix, **overrides)))
    assert two["norm_topk_prob"] is True


def test_gpt_oss_refuses_expert_tensor_parallelism_but_takes_tp_with_etp1():
    bridge = get_model_bridge("GptOssForCausalLM")
    cfg = _config("GptOss", **OSS)
    with pytest.raises(ValueError, match=r"expert_tensor_parallel_size=2; megatron-core 0\.16\.1 supports expert "
                                         r"biases only with expert_tensor_parallel_size=1"):
        bridge.transformer_config(cfg, tensor_model_parallel_size=2)
    got = bridge.transformer_config(cfg, tensor_model_parallel_size=2, expert_tensor_parallel_size=1)
    assert got.expert_tensor_parallel_size == 1 and got.softmax_type == "learnable"


MTP_FAMILIES = [("DeepseekV3ForCausalLM", "DeepseekV3", DSV3), ("Glm4MoeForCausalLM", "Glm4Moe", GLM)]


def _mtp_keys(layer=2, extra=()):
    """Per-expert experts of layers 0, 1 and the tensors an HF MTP layer at ``layer`` carries."""
    out = _per_expert()
    for name in ("eh_proj.weight", "enorm.weight", "hnorm.weight", "shared_head.norm.weight",
                 "shared_head.head.weight", "embed_tokens.weight", "input_layernorm.weight", *extra):
        out[f"model.layers.{layer}.{name}"] = (D,)
    return out


@pytest.mark.parametrize("arch,prefix,overrides", MTP_FAMILIES)
def test_mtp_layers_come_from_the_checkpoint_keys_not_the_config(arch, prefix, overrides):
    """transformers' configs say num_nextn_predict_layers=1 whether or not the tensors are there: the keys decide."""
    cfg = _config(prefix, **overrides)
    assert cfg.num_nextn_predict_layers == 1
    bridge = get_model_bridge(arch)
    without = bridge.detect_hf_layout(_state(_per_expert()), cfg)
    assert without == PER_EXPERT and without.mtp is None
    assert bridge.transformer_config(cfg).mtp_num_layers is None
    with_mtp = bridge.detect_hf_layout(_state(_mtp_keys()), cfg)
    assert with_mtp == ExpertLayout(mtp=MTPLayers(first=2, count=1))
    assert "1 multi-token-prediction layer(s) (HF model.layers.2)" in with_mtp.describe()
    assert bridge.use_hf_layout_of(_state(_mtp_keys()), cfg) is True
    got = bridge.transformer_config(cfg)
    assert got.mtp_num_layers == 1 and got.num_layers == 2
    assert bridge.megatron_to_hf_config(got)["num_nextn_predict_layers"] == 1
    # the model decides the table for conversion: a model without MTP layers drops them from the table
    got.mtp_num_layers = None
    assert bridge.hf_layout_for_model(got).mtp is None
    assert bridge.megatron_to_hf_config(got)["num_nextn_predict_layers"] == 0


@pytest.mark.parametrize("arch,prefix,overrides", MTP_FAMILIES)
def test_mtp_layers_that_disagree_with_the_config_are_refused_by_name(arch, prefix, overrides):
    bridge = get_model_bridge(arch)
    two = {**_mtp_keys(2), **_mtp_keys(3)}
    with pytest.raises(ValueError, match=r"holds tensors of HF layers \[2, 3\] beyond num_hidden_layers=2 \(e\.g\. "
                                         r"model\.layers\.3\..*\), but config\.json says num_nextn_predict_layers=1: "
                                         r"multi-token-prediction layers are layers 2\.\.2"):
        bridge.detect_hf_layout(_state(two), _config(prefix, **overrides))
    with pytest.raises(ValueError, match=r"HF layers \[3\] beyond num_hidden_layers=2 .* num_nextn_predict_layers=2"):
        bridge.detect_hf_layout(_state(_mtp_keys(3)), _config(prefix, **overrides, num_nextn_predict_layers=2))
    with pytest.raises(ValueError, match=r"HF layers \[2\] beyond num_hidden_layers=2 \(e\.g\. model\.layers\.2\..*"
                                         r"num_nextn_predict_layers=0 \(no multi-token-prediction layers\)"):
        bridge.detect_hf_layout(_state(_mtp_keys(2)), _config(prefix, **overrides, num_nextn_predict_layers=0))


MLA_ARCHS = ("DeepseekV3ForCausalLM", "Glm4MoeLiteForCausalLM")  # multi-latent attention


@pytest.mark.parametrize("arch", ["DeepseekV3ForCausalLM", "Glm4MoeForCausalLM", "Glm4MoeLiteForCausalLM"])
@pytest.mark.parametrize("experts", [PER_EXPERT, ExpertLayout(fused=True)])
def test_mtp_mapping_table(arch, experts):
    """MTP layer 0 of a 2-layer model is HF layer 2: every per-layer mapping re-addressed, MTP's own tensors, the
    embedding / head copies on the main model's parameters; the decoder layers unchanged."""
    import dataclasses

    bridge = get_model_bridge(arch)
    bridge.hf_layout = dataclasses.replace(experts, mtp=MTPLayers(first=2, count=1))
    reg = bridge.registry
    t = f"mtp.layers.0.{mtp_layer_module()}"  # the installed megatron-core's name
    attn = ({"linear_kv_up_proj.weight": "self_attn.kv_b_proj.weight"} if arch in MLA_ARCHS else
            {"linear_qkv.weight": {"q": "self_attn.q_proj.weight", "k": "self_attn.k_proj.weight",
                                   "v": "self_attn.v_proj.weight"}})
    want = {
        "mtp.layers.0.enorm.weight": "model.layers.2.enorm.weight",
        "mtp.layers.0.hnorm.weight": "model.layers.2.hnorm.weight",
        "mtp.layers.0.eh_proj.weight": "model.layers.2.eh_proj.weight",
        "mtp.layers.0.final_layernorm.weight": "model.layers.2.shared_head.norm.weight",
        f"{t}.input_layernorm.weight": "model.layers.2.input_layernorm.weight",
        f"{t}.pre_mlp_layernorm.weight": "model.layers.2.post_attention_layernorm.weight",
        f"{t}.mlp.router.weight": "model.layers.2.mlp.gate.weight",
        f"{t}.mlp.router.expert_bias": "model.layers.2.mlp.gate.e_score_correction_bias",
        f"{t}.mlp.shared_experts.linear_fc2.weight": "model.layers.2.mlp.shared_experts.down_proj.weight",
        "embedding.word_embeddings.weight": {"main": "model.embed_tokens.weight",
                                             "copy0": "model.layers.2.embed_tokens.weight"},
        "output_layer.weight": {"main": "lm_head.weight", "copy0": "model.layers.2.shared_head.head.weight"},
        "decoder.layers.1.mlp.router.weight": "model.layers.1.mlp.gate.weight",
        **{f"{t}.self_attention.{k}": ({r: f"model.layers.2.{n}" for r, n in v.items()} if isinstance(v, dict)
                                       else f"model.layers.2.{v}") for k, v in attn.items()},
    }
    for megatron, hf in want.items():
        mapping = reg.megatron_to_hf_lookup(megatron)
        assert mapping is not None and mapping.hf_param == hf, (megatron, mapping)
        for name in mapping.hf_names:
            assert reg.hf_to_megatron_lookup(name).megatron_param == megatron, name
    te_name = reg.megatron_to_hf_lookup(f"{t}.self_attention.linear_qkv.layer_norm_weight")  # the fused-norm alias
    assert te_name.hf_param == "model.layers.2.input_layernorm.weight"
    for megatron in (f"{t}.mlp.experts.local_experts.5.linear_fc1.weight", f"{t}.mlp.experts.linear_fc1.weight5"):
        mapping = reg.megatron_to_hf_lookup(megatron)
        assert mapping.grouped and mapping.expert == 5 and mapping.fused == experts.fused, megatron
        names = mapping.for_experts(6).hf_names
        assert ("model.layers.2.mlp.experts.gate_up_proj" if experts.fused else
                "model.layers.2.mlp.experts.5.gate_proj.weight") in names, names[:4]
        assert all(n.startswith("model.layers.2.") for n in names)
    assert isinstance(reg.megatron_to_hf_lookup("embedding.word_embeddings.weight"), CopiesMapping)
    # tied embeddings: the heads copy the embedding
    bridge = get_model_bridge(arch)
    bridge.hf_layout = dataclasses.replace(experts, mtp=MTPLayers(first=2, count=2, tied=True))
    emb = bridge.registry.megatron_to_hf_lookup("embedding.word_embeddings.weight")
    assert emb.hf_names == ["model.embed_tokens.weight", "model.layers.2.embed_tokens.weight",
                            "model.layers.3.embed_tokens.weight", "model.layers.2.shared_head.head.weight",
                            "model.layers.3.shared_head.head.weight"]
    assert bridge.registry.megatron_to_hf_lookup("mtp.layers.1.eh_proj.weight").hf_param == \
        "model.layers.3.eh_proj.weight"


def test_layer_mappings_at_re_addresses_only_decoder_layer_mappings():
    table = [AutoMapping("embedding.word_embeddings.weight", "model.embed_tokens.weight"),
             AutoMapping("decoder.layers.*.input_layernorm.weight", "model.layers.*.input_layernorm.weight"),
             ExpertFC1Mapping("decoder.layers.*.mlp.experts.local_experts.*.linear_fc1.weight",
                              gate="model.layers.*.mlp.experts.*.gate_proj.weight",
                              up="model.layers.*.mlp.experts.*.up_proj.weight")]
    moved = layer_mappings_at(table, "mtp.layers.1.transformer_layer", "model.layers.7")  # any prefix given
    assert [(m.megatron_param, m.hf_param) for m in moved] == [
        ("mtp.layers.1.transformer_layer.input_layernorm.weight", "model.layers.7.input_layernorm.weight"),
        ("mtp.layers.1.transformer_layer.mlp.experts.local_experts.*.linear_fc1.weight",
         {"gate": "model.layers.7.mlp.experts.*.gate_proj.weight",
          "up": "model.layers.7.mlp.experts.*.up_proj.weight"}),
    ]
    assert type(moved[1]) is ExpertFC1Mapping and table[1].megatron_param.startswith("decoder.")  # copies
    reg = MegatronMappingRegistry(*moved)
    m = reg.megatron_to_hf_lookup("mtp.layers.1.transformer_layer.mlp.experts.local_experts.3.linear_fc1.weight")
    assert m.expert == 3 and m.for_experts(4).hf_param["up"][3] == "model.layers.7.mlp.experts.3.up_proj.weight"
    with pytest.raises(ValueError, match=r"maps a decoder-layer parameter to \['lm_head\.weight'\], outside "
                                         r"model\.layers\.\*\."):
        layer_mappings_at([MegatronParamMapping("decoder.layers.*.x", "lm_head.weight")], "mtp.layers.0", "m")


def test_copies_mapping_checks_each_ranks_rows_and_writes_every_copy():
    main = torch.randn(10, 4)
    copy = main.clone()
    mapping = CopiesMapping("embedding.word_embeddings.weight", "model.embed_tokens.weight",
                            ["model.layers.2.embed_tokens.weight"])
    shards = []
    for rank in range(2):
        ctx = ConversionContext(tp_size=2, tp_rank=rank, layout="column", padded_vocab_size=12)
        out = torch.empty(6, 4)
        got = mapping.hf_to_megatron({"main": main, "copy0": copy}, ctx, out=out)
        assert got is out
        shards.append(out)
    assert torch.equal(torch.cat(shards)[:10], main) and not shards[1][4:].any()  # padded rows are zero
    exported = mapping.megatron_to_hf(shards, ConversionContext(tp_size=2, layout="column", hf_vocab_size=10))
    assert list(exported) == ["model.embed_tokens.weight", "model.layers.2.embed_tokens.weight"]
    assert torch.equal(exported["model.embed_tokens.weight"], main)
    assert torch.equal(exported["model.layers.2.embed_tokens.weight"], main)
    assert exported["model.layers.2.embed_tokens.weight"].data_ptr() != exported["model.embed_tokens.weight"].data_ptr()
    copy[7, 1] += 1.0  # a row of TP rank 1 (rows 6..11 of the padded vocabulary)
    ok = ConversionContext(tp_size=2, tp_rank=0, layout="column", padded_vocab_size=12)
    mapping.hf_to_megatron({"main": main, "copy0": copy}, ok)  # rank 0's rows agree
    with pytest.raises(ValueError, match=r"embedding\.word_embeddings\.weight: HF tensor model\.layers\.2\."
                                         r"embed_tokens\.weight \(\[10, 4\] torch\.float32\) is stored as a copy of "
                                         r"model\.embed_tokens\.weight \(\[10, 4\] torch\.float32\) but differs from "
                                         r"it in the rows of tensor-parallel rank 1 of 2"):
        mapping.hf_to_megatron({"main": main, "copy0": copy},
                               ConversionContext(tp_size=2, tp_rank=1, layout="column", padded_vocab_size=12))
    with pytest.raises(ValueError, match=r"is stored as a copy of .* but differs"):
        mapping.hf_to_megatron({"main": main, "copy0": main.double()}, ok)


def test_megatron_configs_without_hf_equivalent_are_refused():
    glm = get_model_bridge("Glm4MoeForCausalLM")
    cfg = glm.transformer_config(_config("Glm4Moe", **GLM, first_k_dense_replace=1))
    cfg.moe_layer_freq = [1, 0]
    with pytest.raises(ValueError, match=r"moe_layer_freq=\[1, 0\]: HF has dense layers only before the first MoE"):
        glm.megatron_to_hf_config(cfg)
    qwen = get_model_bridge("Qwen3MoeForCausalLM")
    cfg = qwen.transformer_config(_config("Qwen3Moe", num_experts=4, moe_intermediate_size=F, num_experts_per_tok=2))
    cfg.moe_router_score_function = "sigmoid"
    with pytest.raises(ValueError, match=r"moe_router_score_function='sigmoid'"):
        qwen.megatron_to_hf_config(cfg)
    ds = get_model_bridge("DeepseekV3ForCausalLM")
    cfg = ds.transformer_config(_config("DeepseekV3", **DSV3, rms_norm_eps=1e-5))
    assert cfg.latent_layernorm_epsilon == 1e-6 and cfg.layernorm_epsilon == 1e-5  # HF's fixed latent-norm eps
    cfg.latent_layernorm_epsilon = 1e-5
    with pytest.raises(ValueError, match=r"latent_layernorm_epsilon=1e-05 .*HF fixes the q / kv latent norms' "
                                         r"epsilon at 1e-06"):
        ds.megatron_to_hf_config(cfg)
