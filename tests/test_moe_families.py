"""The MoE families without a process group: which HF expert layout a checkpoint's keys and shapes give (one tensor
per expert, fused in either orientation, a mix refused naming both), the mapping tables each layout resolves to
(sequential and grouped-GEMM Megatron names), and the named errors for what megatron-core 0.16.1 cannot express."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("megatron.core")
transformers = pytest.importorskip("transformers")

import megatron_bridge_ext.models  # noqa: E402,F401  (registers the bridges)
from megatron_bridge_ext.dispatch import get_model_bridge  # noqa: E402
from megatron_bridge_ext.models.common import PER_EXPERT, ExpertLayout, detect_expert_layout  # noqa: E402

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
    ("Glm4MoeForCausalLM", "Glm4Moe", dict(GLM, norm_topk_prob=False), r"norm_topk_prob=False"),
    ("Qwen2MoeForCausalLM", "Qwen2Moe", dict(num_experts=4, moe_intermediate_size=F, num_experts_per_tok=2,
                                             shared_expert_intermediate_size=0),
     r"shared_expert_intermediate_size=0"),
    ("GptOssForCausalLM", "GptOss", dict(OSS, swiglu_alpha=1.5), r"swiglu_alpha=1\.5 is not supported"),
    ("GptOssForCausalLM", "GptOss", dict(OSS, attention_bias=False), r"attention_bias=False is not supported"),
    ("GptOssForCausalLM", "GptOss", dict(OSS, quantization_config={"quant_method": "mxfp4"}),
     r"quantized checkpoints are not supported \(quantization_config=\{'quant_method': 'mxfp4'\}\)"),
    ("GptOssForCausalLM", "GptOss", dict(OSS, rope_parameters={
        "rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0, "original_max_position_embeddings": 16,
        "attention_factor": 2.0}), r"yarn attention_factor=2\.0 differs"),
])
def test_unsupported_settings_are_refused_by_name(arch, prefix, overrides, match):
    with pytest.raises(ValueError, match=match):
        get_model_bridge(arch).transformer_config(_config(prefix, **overrides))


def test_gpt_oss_refuses_expert_tensor_parallelism_but_takes_tp_with_etp1():
    bridge = get_model_bridge("GptOssForCausalLM")
    cfg = _config("GptOss", **OSS)
    with pytest.raises(ValueError, match=r"expert_tensor_parallel_size=2; megatron-core 0\.16\.1 supports expert "
                                         r"biases only with expert_tensor_parallel_size=1"):
        bridge.transformer_config(cfg, tensor_model_parallel_size=2)
    got = bridge.transformer_config(cfg, tensor_model_parallel_size=2, expert_tensor_parallel_size=1)
    assert got.expert_tensor_parallel_size == 1 and got.softmax_type == "learnable"


@pytest.mark.parametrize("arch,prefix,overrides", [("DeepseekV3ForCausalLM", "DeepseekV3", DSV3),
                                                   ("Glm4MoeForCausalLM", "Glm4Moe", GLM)])
def test_multi_token_prediction_tensors_are_refused(arch, prefix, overrides):
    """transformers builds no MTP layers and neither do we: such a checkpoint is refused, not silently cut."""
    cfg = _config(prefix, **overrides)
    state = _state({**_per_expert(), "model.layers.2.eh_proj.weight": (D, 2 * D)})
    with pytest.raises(ValueError, match=r"multi-token-prediction layer tensors \(e\.g\. model\.layers\.2\.eh_proj"
                                         r"\.weight; num_hidden_layers=2\)"):
        get_model_bridge(arch).detect_hf_layout(state, cfg)


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
