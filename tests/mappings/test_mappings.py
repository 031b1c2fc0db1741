"""Parameter mappings without megatron: each TP rank's Megatron tensor equals the plain-torch reference of the
semantics file, and the tensors of all ranks convert back to the original HF tensors bit for bit."""

from types import SimpleNamespace

import pytest
import torch
from conftest import rand
from reference import gate_up_shard, qkv_shard, same

import megatron_bridge_ext  # noqa: F401
from megatron_bridge_ext.mappings import (
    AutoMapping,
    ColumnParallelMapping,
    ConcatenatedQKVMapping,
    ConversionContext,
    ExpertUpMapping,
    GatedMLPMapping,
    KVMapping,
    QKVMapping,
    ReplicatedMapping,
    RowParallelMapping,
)
from megatron_bridge_ext.mcore.layout import detect_layout


def _cfg(H, G, d, D):
    return SimpleNamespace(num_attention_heads=H, num_query_groups=G, kv_channels=d, hidden_size=D)


def _each_rank(mapping, hf, tp, out_shape=None, **ctx):
    outs = []
    for t in range(tp):
        c = ConversionContext(tp_size=tp, tp_rank=t, **ctx)
        if out_shape is None:
            outs.append(mapping.hf_to_megatron(hf, c))
        else:  # straight into an existing (parameter-like) tensor
            out = torch.full(out_shape, 7, dtype=torch.int16).view(torch.bfloat16)
            assert mapping.hf_to_megatron(hf, c, out=out).data_ptr() == out.data_ptr()
            outs.append(out)
    return outs


@pytest.mark.parametrize("H,G,d,D,tp,gate", [(8, 2, 4, 12, 2, False), (6, 6, 3, 5, 3, False), (4, 1, 5, 7, 1, False),
                                           (8, 4, 2, 6, 4, True), (8, 8, 4, 9, 8, False),
                                           (8, 2, 4, 12, 4, False), (8, 1, 2, 5, 4, True)])  # G < tp
@pytest.mark.parametrize("bias", [False, True])
def test_qkv_mapping(H, G, d, D, tp, gate, bias):
    rest = () if bias else (D,)
    q, k, v = rand((H * d * (2 if gate else 1), *rest)), rand((G * d, *rest)), rand((G * d, *rest))
    m = QKVMapping("decoder.layers.0.self_attention.linear_qkv.weight", "q", "k", "v", output_gate=gate)
    cfg = _cfg(H, G, d, D)
    shards = _each_rank(m, {"q": q, "k": k, "v": v}, tp, out_shape=(((H * (2 if gate else 1)) + 2 * G) * d // tp,
                                                                      *rest), config=cfg)
    for t, s in enumerate(shards):
        assert same(s, qkv_shard(q, k, v, H, G, d, tp, t, output_gate=gate))
    back = m.megatron_to_hf(shards, ConversionContext(config=cfg))
    assert same(back["q"], q) and same(back["k"], k) and same(back["v"], v)


def test_kv_and_concatenated_qkv_mappings():
    H, G, d, D, tp = 8, 4, 3, 10, 2
    q, k, v = rand((H * d, D)), rand((G * d, D)), rand((G * d, D))
    cfg = _cfg(H, G, d, D)
    kv = KVMapping("linear_kv.weight", "k", "v")
    shards = _each_rank(kv, {"k": k, "v": v}, tp, config=cfg)
    for t, s in enumerate(shards):  # per group [k_g; v_g]
        g = G // tp
        want = torch.cat([torch.cat([k[(t * g + i) * d:(t * g + i + 1) * d], v[(t * g + i) * d:(t * g + i + 1) * d]])
                          for i in range(g)])
        assert same(s, want)
    back = kv.megatron_to_hf(shards, ConversionContext(config=cfg))
    assert same(back["k"], k) and same(back["v"], v)

    fused = torch.cat([q, k, v])
    cq = ConcatenatedQKVMapping("linear_qkv.weight", "qkv")
    shards = _each_rank(cq, fused, tp, config=cfg)
    for t, s in enumerate(shards):
        assert same(s, qkv_shard(q, k, v, H, G, d, tp, t))
    assert same(cq.megatron_to_hf(shards, ConversionContext(config=cfg))["qkv"], fused)


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_gated_mlp_mapping(tp):
    F, D = 8, 6
    gate, up = rand((F, D)), rand((F, D))
    m = GatedMLPMapping("linear_fc1.weight", gate="g", up="u")
    shards = _each_rank(m, {"gate": gate, "up": up}, tp, out_shape=(2 * F // tp, D))
    for t, s in enumerate(shards):
        assert same(s, gate_up_shard(gate, up, tp, t))
    back = m.megatron_to_hf(shards, ConversionContext())
    assert same(back["g"], gate) and same(back["u"], up)


@pytest.mark.parametrize("ep,etp", [(1, 1), (2, 1), (1, 2), (2, 2)])
@pytest.mark.parametrize("stacked", [True, False], ids=["grouped", "sequential"])
def test_non_gated_expert_fc1(ep, etp, stacked):
    """NemotronH's non-gated experts: local expert e of EP rank r is global expert r * E/ep + e, rows chunked over
    expert-TP (plain torch below); back to the E HF tensors bit-exact, from stacked or per-expert holders."""
    E, F, D = 4, 6, 5
    ups = [rand((F, D)) for _ in range(E)]
    m = ExpertUpMapping("l.local_experts.*.linear_fc1.weight", "e.*.up_proj.weight").for_experts(E)
    shards = []
    for r in range(ep):
        for t in range(etp):
            ctx = ConversionContext(tp_size=etp, tp_rank=t, ep_size=ep, ep_rank=r)
            want = [ups[r * E // ep + e].chunk(etp, 0)[t] for e in range(E // ep)]
            if stacked:
                got = m.hf_to_megatron({"up": ups}, ctx)
                assert same(got, torch.stack(want))
            else:
                got = [torch.full((F // etp, D), float("nan"), dtype=ups[0].dtype) for _ in range(E // ep)]
                m.hf_to_megatron({"up": ups}, ctx, out=got)
                assert all(same(g, w) for g, w in zip(got, want))
            shards.append(got)
    back = m.megatron_to_hf(shards, ConversionContext(tp_size=etp, ep_size=ep))
    assert list(back) == [f"e.{e}.up_proj.weight" for e in range(E)]
    assert all(same(back[f"e.{e}.up_proj.weight"], ups[e]) for e in range(E))


@pytest.mark.parametrize("tp", [1, 2, 3])
def test_column_row_replicated(tp):
    x = rand((6 * tp, 4 * tp))
    col = ColumnParallelMapping("decoder.layers.0.mlp.linear_fc1.weight", "w")
    shards = _each_rank(col, x, tp)
    assert all(same(s, c) for s, c in zip(shards, torch.chunk(x, tp, 0)))
    assert same(col.megatron_to_hf(shards, ConversionContext())["w"], x)
    row = RowParallelMapping("decoder.layers.0.mlp.linear_fc2.weight", "w")
    shards = _each_rank(row, x, tp)
    assert all(same(s, c) for s, c in zip(shards, torch.chunk(x, tp, 1)))
    assert same(row.megatron_to_hf(shards, ConversionContext())["w"], x)
    bias = rand((5,))  # a row-parallel bias is replicated
    assert all(same(s, bias) for s in _each_rank(row, bias, tp))
    rep = ReplicatedMapping("decoder.final_layernorm.weight", "n")
    assert all(same(s, bias) for s in _each_rank(rep, bias, tp))


@pytest.mark.parametrize("tp,vocab,padded", [(2, 97, 98), (4, 101, 128), (1, 50, 64)])
def test_vocabulary_padding_and_trimming(tp, vocab, padded):
    emb = rand((vocab, 6))
    m = ColumnParallelMapping("embedding.word_embeddings.weight", "e")
    shards = _each_rank(m, emb, tp, padded_vocab_size=padded)
    full = torch.cat(shards)
    assert full.shape == (padded, 6)
    assert same(full[:vocab], emb) and bool((full[vocab:].float() == 0).all())
    assert same(m.megatron_to_hf(shards, ConversionContext(hf_vocab_size=vocab))["e"], emb)


def test_auto_mapping_detects_layouts():
    class ColumnParallelLinear(torch.nn.Module):
        pass

    class RowParallelLinear(torch.nn.Module):
        pass

    w = torch.nn.Parameter(torch.zeros(4, 4))
    assert detect_layout(ColumnParallelLinear(), None, "x.weight") == "column"
    assert detect_layout(RowParallelLinear(), None, "x.weight") == "row"
    assert detect_layout(RowParallelLinear(), None, "x.bias") == "replicated"
    assert detect_layout(None, None, "x.linear_qkv.layer_norm_weight") == "replicated"
    w.tensor_model_parallel, w.partition_dim = True, 1
    assert detect_layout(None, w, "x.weight") == "row"
    w.partition_dim = 0
    assert detect_layout(RowParallelLinear(), w, "x.weight") == "column"  # the attributes win
    x = rand((6, 4))
    auto = AutoMapping("decoder.layers.0.self_attention.linear_proj.weight", "o")
    shards = _each_rank(auto, x, 2, layout=detect_layout(RowParallelLinear(), None, auto.megatron_param))
    assert all(same(s, c) for s, c in zip(shards, torch.chunk(x, 2, 1)))


def test_mapping_errors_name_the_tensor():
    col = ColumnParallelMapping("decoder.layers.0.mlp.linear_fc1.weight", "model.layers.0.mlp.w")
    with pytest.raises(ValueError, match="model.layers.0.mlp.w.*5 rows.*tensor_model_parallel_size = 2"):
        col.hf_to_megatron(rand((5, 4)), ConversionContext(tp_size=2))
    m = QKVMapping("linear_qkv.weight", "q", "k", "v")
    with pytest.raises(RuntimeError, match="tp_size = 3"):  # 2 query groups over 3 TP ranks: neither divides
        m.hf_to_megatron({"q": rand((24, 4)), "k": rand((6, 4)), "v": rand((6, 4))},
                         ConversionContext(tp_size=3, config=_cfg(8, 2, 3, 4)))
