"""The shape contract of every mapping (``megatron_shape`` / ``hf_shapes``, computed from geometry) against what the
conversions really make: each mapping is run on real tensors at every rank of several layouts (TP, vocabulary
padding, output gate, fewer query groups than TP ranks, EP x expert-TP, fused / transposed / interleaved HF
layouts), and the shapes it declares must be those of its outputs, names in the same order."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from megatron_bridge_ext.mappings import (
    COLUMN,
    REPLICATED,
    ROW,
    AutoMapping,
    ColumnParallelMapping,
    ConcatenatedQKVMapping,
    ConversionContext,
    CopiesMapping,
    ExpertFC1Mapping,
    ExpertFC2Mapping,
    ExpertUpMapping,
    FusedGatedMLPMapping,
    GatedMLPMapping,
    GDNConv1dMapping,
    GDNInProjMapping,
    GDNSplitInProjMapping,
    HeadShardedNormMapping,
    KVMapping,
    KeyAsValueQKVMapping,
    QKVMapping,
    ReplicatedMapping,
    RowParallelMapping,
    ZeroCenteredNormMapping,
    shapes_of,
)

H, G, D_HEAD, HIDDEN, FFN, E = 8, 2, 4, 16, 12, 4
CONFIG = SimpleNamespace(num_attention_heads=H, num_query_groups=G, kv_channels=D_HEAD, hidden_size=HIDDEN)


def _t(*shape):
    return torch.randn(*shape)


def _dense_cases():
    q, kv = H * D_HEAD, G * D_HEAD
    return [
        ("replicated", ReplicatedMapping("decoder.final_layernorm.weight", "model.norm.weight"), _t(HIDDEN), None),
        ("column", ColumnParallelMapping("l.linear_fc1.weight", "fc1"), _t(32, HIDDEN), None),
        ("column_vocab_padded", ColumnParallelMapping("embedding.word_embeddings.weight", "emb"), _t(37, HIDDEN),
         None),
        ("row", RowParallelMapping("l.linear_proj.weight", "o"), _t(HIDDEN, 32), None),
        ("row_bias", RowParallelMapping("l.linear_proj.bias", "o_b"), _t(HIDDEN), None),
        ("auto_column", AutoMapping("l.a.weight", "a"), _t(32, HIDDEN), COLUMN),
        ("auto_row", AutoMapping("l.b.weight", "b"), _t(HIDDEN, 32), ROW),
        ("auto_replicated", AutoMapping("l.c.weight", "c"), _t(HIDDEN), REPLICATED),
        ("copies", CopiesMapping("embedding.word_embeddings.weight", "emb", ["lm_head", "mtp.emb"]),
         None, COLUMN),
        ("qkv", QKVMapping("l.linear_qkv.weight", q="q", k="k", v="v"),
         {"q": _t(q, HIDDEN), "k": _t(kv, HIDDEN), "v": _t(kv, HIDDEN)}, None),
        ("qkv_bias", QKVMapping("l.linear_qkv.bias", q="qb", k="kb", v="vb"),
         {"q": _t(q), "k": _t(kv), "v": _t(kv)}, None),
        ("qkv_gate", QKVMapping("l.linear_qkv.weight", q="q", k="k", v="v", output_gate=True),
         {"q": _t(2 * q, HIDDEN), "k": _t(kv, HIDDEN), "v": _t(kv, HIDDEN)}, None),
        # a layer of its own geometry (Gemma 4's full-attention layers: 1 group of head_dim 8 against CONFIG's 2 of 4)
        ("qkv_own_dims", QKVMapping("l.linear_qkv.weight", q="q", k="k", v="v", dims=(H, 1, 2 * D_HEAD)),
         {"q": _t(H * 2 * D_HEAD, HIDDEN), "k": _t(2 * D_HEAD, HIDDEN), "v": _t(2 * D_HEAD, HIDDEN)}, None),
        ("qkv_key_as_value", KeyAsValueQKVMapping("l.linear_qkv.weight", q="q", k="k", dims=(H, 1, 2 * D_HEAD)),
         {"q": _t(H * 2 * D_HEAD, HIDDEN), "k": _t(2 * D_HEAD, HIDDEN)}, None),
        ("kv", KVMapping("l.linear_kv.weight", k="k", v="v"), {"k": _t(kv, HIDDEN), "v": _t(kv, HIDDEN)}, None),
        ("qkv_concatenated", ConcatenatedQKVMapping("l.linear_qkv.weight", "qkv"), _t(q + 2 * kv, HIDDEN), None),
        ("q_norm_whole", HeadShardedNormMapping("l.q_layernorm.weight", "qn", heads="q"), _t(q), None),
        ("k_norm_whole", HeadShardedNormMapping("l.k_layernorm.weight", "kn", heads="k"), _t(kv), None),
        ("gated_mlp", GatedMLPMapping("l.linear_fc1.weight", gate="g", up="u"),
         {"gate": _t(FFN, HIDDEN), "up": _t(FFN, HIDDEN)}, None),
        ("fused_mlp", FusedGatedMLPMapping("l.linear_fc1.weight", "gu"), _t(2 * FFN, HIDDEN), None),
        ("fused_mlp_interleaved_transposed",
         FusedGatedMLPMapping("l.linear_fc1.weight", "gu", interleaved=True, transposed=True), _t(HIDDEN, 2 * FFN),
         None),
        ("fused_mlp_bias", FusedGatedMLPMapping("l.linear_fc1.bias", "gub"), _t(2 * FFN), None),
    ]


DENSE = _dense_cases()


@pytest.mark.parametrize("tp", [1, 2, 4])
@pytest.mark.parametrize("case", DENSE, ids=[c[0] for c in DENSE])
def test_dense_mapping_shapes(case, tp):
    _, mapping, hf, layout = case
    if hf is None:  # copies: the main tensor and two equal copies
        main = _t(37, HIDDEN)
        hf = {"main": main, "copy0": main.clone(), "copy1": main.clone()}
    ctxs = [ConversionContext(tp_size=tp, tp_rank=r, config=CONFIG, hf_vocab_size=37,
                              padded_vocab_size=40, layout=layout) for r in range(tp)]
    if isinstance(mapping, HeadShardedNormMapping) and mapping.heads == "k" and G % tp:
        # fewer key heads than TP ranks (megatron replicates them): refused, both ways
        with pytest.raises(ValueError, match=f"num_query_groups = {G} is not a multiple of "
                                             f"tensor_model_parallel_size = {tp}"):
            mapping.megatron_shape(shapes_of(hf), ctxs[0])
        with pytest.raises(ValueError, match="num_query_groups"):
            mapping.hf_to_megatron(hf, ctxs[0])
        return
    shards = []
    for ctx in ctxs:
        got = mapping.hf_to_megatron(hf, ctx)
        assert mapping.megatron_shape(shapes_of(hf), ctx) == tuple(got.shape), ctx
        shards.append(got.clone())
    replicated = layout == REPLICATED or isinstance(mapping, ReplicatedMapping) or (
        isinstance(mapping, RowParallelMapping) and shards[0].dim() < 2)
    if replicated:
        shards = shards[:1]
    ctx = ConversionContext(tp_size=len(shards), tp_rank=0, config=CONFIG, hf_vocab_size=37, padded_vocab_size=40,
                            layout=layout)
    out = mapping.megatron_to_hf(shards, ctx)
    declared = mapping.hf_shapes(tuple(shards[0].shape), len(shards), ctx)
    assert list(declared) == list(out), (list(declared), list(out))
    assert declared == {name: tuple(t.shape) for name, t in out.items()}


def _expert_cases():
    return [
        ("fc1_per_expert", ExpertFC1Mapping("l.local_experts.*.linear_fc1.weight", gate="e.*.g", up="e.*.u"),
         lambda: {"gate": [_t(FFN, HIDDEN) for _ in range(E)], "up": [_t(FFN, HIDDEN) for _ in range(E)]}),
        ("fc1_fused", ExpertFC1Mapping("l.linear_fc1.weight*", gate_up="e.gate_up"),
         lambda: {"gate_up": _t(E, 2 * FFN, HIDDEN)}),
        ("fc1_fused_transposed_interleaved",
         ExpertFC1Mapping("l.linear_fc1.weight*", gate_up="e.gate_up", transposed=True, interleaved=True),
         lambda: {"gate_up": _t(E, HIDDEN, 2 * FFN)}),
        ("fc1_fused_bias", ExpertFC1Mapping("l.linear_fc1.bias*", gate_up="e.gate_up_bias"),
         lambda: {"gate_up": _t(E, 2 * FFN)}),
        ("fc2_per_expert", ExpertFC2Mapping("l.local_experts.*.linear_fc2.weight", "e.*.d"),
         lambda: {"down": [_t(HIDDEN, FFN) for _ in range(E)]}),
        ("fc2_fused", ExpertFC2Mapping("l.linear_fc2.weight*", "e.down", fused=True),
         lambda: {"down_fused": _t(E, HIDDEN, FFN)}),
        ("fc2_fused_transposed", ExpertFC2Mapping("l.linear_fc2.weight*", "e.down", fused=True, transposed=True),
         lambda: {"down_fused": _t(E, FFN, HIDDEN)}),
        ("fc2_bias", ExpertFC2Mapping("l.linear_fc2.bias*", "e.down_bias", fused=True),
         lambda: {"down_fused": _t(E, HIDDEN)}),
        ("fc1_not_gated", ExpertUpMapping("l.local_experts.*.linear_fc1.weight", "e.*.u"),
         lambda: {"up": [_t(FFN, HIDDEN) for _ in range(E)]}),
    ]


EXPERTS = _expert_cases()


@pytest.mark.parametrize("ep,etp", [(1, 1), (2, 1), (1, 2), (2, 2), (4, 1)])
@pytest.mark.parametrize("case", EXPERTS, ids=[c[0] for c in EXPERTS])
def test_expert_mapping_shapes(case, ep, etp):
    _, pattern, make = case
    mapping = pattern.for_experts(E)
    hf = make()
    shards = []
    for ep_rank in range(ep):
        for etp_rank in range(etp):
            ctx = ConversionContext(tp_size=etp, tp_rank=etp_rank, ep_size=ep, ep_rank=ep_rank, config=CONFIG)
            got = mapping.hf_to_megatron(hf, ctx)  # this holder's local experts, stacked
            assert mapping.megatron_shape(shapes_of(hf), ctx) == tuple(got.shape[1:]), (ep_rank, etp_rank)
            shards.append(got.clone())
    ctx = ConversionContext(tp_size=etp, tp_rank=0, ep_size=ep, ep_rank=0, config=CONFIG)
    out = mapping.megatron_to_hf(shards, ctx)
    declared = mapping.hf_shapes(tuple(shards[0].shape), len(shards), ctx)
    assert list(declared) == list(out), (list(declared), list(out))
    assert declared == {name: tuple(t.shape) for name, t in out.items()}


def test_contract_errors_name_the_tensor():
    """The contract refuses what the conversion refuses, naming the tensor and the setting."""
    ctx = ConversionContext(tp_size=3, tp_rank=0, config=CONFIG)
    with pytest.raises(ValueError, match=r"fc1 has 32 rows, not divisible by tensor_model_parallel_size = 3"):
        ColumnParallelMapping("l.linear_fc1.weight", "fc1").megatron_shape((32, HIDDEN), ctx)
    with pytest.raises(ValueError, match=r"o has 32 columns, not divisible by tensor_model_parallel_size = 3"):
        RowParallelMapping("l.linear_proj.weight", "o").megatron_shape((HIDDEN, 32), ctx)
    with pytest.raises(ValueError, match=r"l.linear_qkv.weight.*num_query_groups = 2 is not divisible by tp_size = 3"):
        QKVMapping("l.linear_qkv.weight", q="q", k="k", v="v").megatron_shape(
            {"q": (32, HIDDEN), "k": (8, HIDDEN), "v": (8, HIDDEN)}, ctx)


# gated delta-net (Qwen3-Next / Qwen3.5): 4 key heads of 3, 8 value heads of 5 (r = 2), conv kernel 4
GDN = SimpleNamespace(linear_num_key_heads=4, linear_num_value_heads=8, linear_key_head_dim=3,
                      linear_value_head_dim=5)
GDN_QK, GDN_V, GDN_HV = 4 * 3, 8 * 5, 8


def _gdn_cases():
    return [
        ("in_proj_qkvz_ba", GDNInProjMapping("l.in_proj.weight", qkvz="qkvz", ba="ba"),
         {"qkvz": _t(2 * GDN_QK + 2 * GDN_V, HIDDEN), "ba": _t(2 * GDN_HV, HIDDEN)}),
        ("in_proj_split", GDNSplitInProjMapping("l.in_proj.weight", qkv="qkv", z="z", b="b", a="a"),
         {"qkv": _t(2 * GDN_QK + GDN_V, HIDDEN), "z": _t(GDN_V, HIDDEN), "b": _t(GDN_HV, HIDDEN),
          "a": _t(GDN_HV, HIDDEN)}),
        ("conv1d", GDNConv1dMapping("l.conv1d.weight", "conv"), _t(2 * GDN_QK + GDN_V, 1, 4)),
        ("zero_centered_norm", ZeroCenteredNormMapping("l.out_norm.weight", "norm"),
         (1.0 + 0.2 * _t(5)).clamp(0.5, 2.0)),
    ]


GDN_CASES = _gdn_cases()


@pytest.mark.parametrize("tp", [1, 2, 4])
@pytest.mark.parametrize("case", GDN_CASES, ids=[c[0] for c in GDN_CASES])
def test_gated_delta_net_mapping_shapes(case, tp):
    """Declared shapes are made ones, and the HF tensors come back bit for bit at every TP size (the gated norm's
    weights drawn in [0.5, 2], where ``w - 1`` is exact)."""
    _, mapping, hf = case
    replicated = isinstance(mapping, ZeroCenteredNormMapping)
    ctxs = [ConversionContext(tp_size=tp, tp_rank=r, config=GDN) for r in range(tp)]
    shards = []
    for ctx in ctxs:
        got = mapping.hf_to_megatron(hf, ctx)
        assert mapping.megatron_shape(shapes_of(hf), ctx) == tuple(got.shape), ctx
        shards.append(got.clone())
    if replicated:
        shards = shards[:1]
    ctx = ConversionContext(tp_size=len(shards), tp_rank=0, config=GDN)
    out = mapping.megatron_to_hf(shards, ctx)
    declared = mapping.hf_shapes(tuple(shards[0].shape), len(shards), ctx)
    assert list(declared) == list(out), (list(declared), list(out))
    assert declared == {name: tuple(t.shape) for name, t in out.items()}
    originals = hf if isinstance(hf, dict) else {None: hf}
    for role, name in (mapping.hf_param.items() if isinstance(mapping.hf_param, dict) else [(None, mapping.hf_param)]):
        assert torch.equal(out[name], originals[role]), name


def test_gated_delta_net_heads_must_split_over_tp():
    ctx = ConversionContext(tp_size=8, tp_rank=0, config=GDN)
    with pytest.raises(ValueError, match=r"l.conv1d.weight: linear_num_key_heads = 4 is not divisible by "
                                         r"tensor_model_parallel_size = 8"):
        GDNConv1dMapping("l.conv1d.weight", "conv").megatron_shape((2 * GDN_QK + GDN_V, 1, 4), ctx)
    with pytest.raises(ValueError, match=r"HF tensor qkvz has shape \[10, 16\], expected 104 rows"):
        GDNInProjMapping("l.in_proj.weight", qkvz="qkvz", ba="ba").hf_to_megatron(
            {"qkvz": _t(10, HIDDEN), "ba": _t(2 * GDN_HV, HIDDEN)}, ConversionContext(config=GDN))
