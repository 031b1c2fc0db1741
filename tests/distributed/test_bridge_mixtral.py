"""Mixture of experts end to end: a transformers MixtralForCausalLM checkpoint -> megatron-core GPTModel with MoE
layers split with expert parallelism (EP2, EP4, TP2xEP2 with expert-TP 2, PP2xEP2) -> HF. Megatron logits are
compared with the HF model's, and the exported checkpoint with the source (key set, dtypes, torch.equal); every EP
rank exports its own experts. One spawned world of 4 gloo ranks."""

from __future__ import annotations

import os

import pytest
import torch

pytest.importorskip("megatron.core")
transformers = pytest.importorskip("transformers")

from megatron_bridge_ext.launch import spawn_local  # noqa: E402
from megatron_bridge_ext.io import SafeTensorsSource  # noqa: E402
from megatron_bridge_ext.testing.tiny_models import make_tiny_checkpoint  # noqa: E402
from megatron_bridge_ext.testing.tolerances import MEGATRON_VS_HF_ATOL  # noqa: E402

CONFIG = dict(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, head_dim=16, max_position_embeddings=64, num_local_experts=4,
              num_experts_per_tok=2, tie_word_embeddings=False, rms_norm_eps=1e-5)
# name, tp, pp, ep
LAYOUTS = [("ep2", 1, 1, 2), ("ep4", 1, 1, 4), ("tp2ep2", 2, 1, 2), ("pp2ep2", 1, 2, 2)]


def _worker(rank: int, world: int, ckpt: str, tokens: torch.Tensor, out_root: str) -> dict:
    from megatron_bridge_ext.mcore.cpu_compat import apply_cpu_patches

    apply_cpu_patches()
    import torch.distributed as dist

    from megatron_bridge_ext.auto_bridge import AutoBridge
    from megatron_bridge_ext.mcore.model_builder import destroy_parallel, init_parallel
    from megatron_bridge_ext import ops
    from megatron_bridge_ext.mcore.forward import megatron_logits

    from megatron_bridge_ext.testing.calls import count_calls

    # every call of the fused expert ops in this rank, by op name
    calls = count_calls(ops, ("expert_pack_fc1", "expert_pack_fc2", "expert_unpack_fc1", "expert_unpack_fc2"))

    results = {}
    for name, tp, pp, ep in LAYOUTS:
        init_parallel(tp=tp, pp=pp, ep=ep)
        bridge = AutoBridge.from_hf_pretrained(ckpt)
        calls.clear()
        chunks = bridge.to_megatron_model(params_dtype=torch.float32)
        imported = dict(calls)
        n_local = sum(1 for c in chunks for k in c.state_dict() if "local_experts" in k and "linear_fc1.weight" in k)
        logits = megatron_logits(chunks, tokens)
        calls.clear()
        bridge.save_hf_pretrained(chunks, os.path.join(out_root, name), max_shard_bytes=64 * 1024,
                                  bucket_bytes=16 * 1024, show_progress=False)
        results[name] = (logits if rank == 0 else None, n_local)
        results[f"{name}_calls"] = (imported, dict(calls))
        if name == "ep2":  # every rank iterates; rank 0 (the destination) counts the expert tensors that alias a
            # parameter of its own: with copy=False its own experts are views of them, with copy=True none is
            storages = {p.untyped_storage().data_ptr() for c in chunks for p in c.parameters()}
            for copy in (False, True):
                seen = [t.untyped_storage().data_ptr() in storages
                        for n, t in bridge.export_hf_weights(chunks, copy=copy, show_progress=False)
                        if ".experts." in n]
                results[f"ep2_aliasing_copy={copy}"] = (sum(seen), len(seen))
        if name == "tp2ep2":  # the generator variant yields exactly this rank's loaded tensors, by local name
            params = {k: v for c in chunks for k, v in c.state_dict().items() if "_extra_state" not in k}
            streamed = {n: t for n, t, _ in bridge.model_bridge.stream_weights_hf_to_megatron(bridge.hf_pretrained,
                                                                                            chunks)}
            results["streamed_equal"] = set(streamed) == set(params) and all(
                torch.equal(streamed[k], params[k]) for k in params)
        destroy_parallel()
        dist.barrier()
    return results


@pytest.fixture(scope="module")
def moe_results(tmp_path_factory):
    root = tmp_path_factory.mktemp("mixtral")
    ckpt = str(root / "hf")
    model = make_tiny_checkpoint(ckpt, "Mixtral", CONFIG, seed=0)  # random norms
    tokens = torch.randint(0, CONFIG["vocab_size"], (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        hf_logits = model.eval()(tokens).logits.float()
    per_rank = spawn_local(_worker, 4, (ckpt, tokens, str(root / "out")), timeout=600)
    return ckpt, str(root / "out"), per_rank, hf_logits


@pytest.mark.parametrize("name,tp,pp,ep", LAYOUTS, ids=[x[0] for x in LAYOUTS])
def test_moe_logits_match_hf(moe_results, name, tp, pp, ep):
    _, _, per_rank, hf_logits = moe_results
    got = per_rank[0][name][0]
    diff = (got - hf_logits).abs().max().item()
    assert diff <= MEGATRON_VS_HF_ATOL, f"{name}: max |logit diff| {diff:.3e}"
    # each rank holds E / ep experts per local layer
    layers_per_rank = CONFIG["num_hidden_layers"] // pp
    assert all(r[name][1] == layers_per_rank * CONFIG["num_local_experts"] // ep for r in per_rank)


def test_stream_hf_to_megatron_yields_the_loaded_tensors(moe_results):
    _, _, per_rank, _ = moe_results
    assert all(r["streamed_equal"] for r in per_rank)


@pytest.mark.parametrize("name,tp,pp,ep", LAYOUTS, ids=[x[0] for x in LAYOUTS])
def test_moe_experts_convert_with_one_op_call_per_layer(moe_results, name, tp, pp, ep):
    """Import: every rank packs its local experts of a layer with one expert_pack_fc1 and one expert_pack_fc2 call;
    export: with expert-TP (tp2ep2: etp = tp) the destination (rank 0) unpacks each layer's experts with one call of
    each unpack op; without it each HF expert tensor is a view of a gathered expert parameter and no op runs (the
    round-trip test checks their values)."""
    _, _, per_rank, _ = moe_results
    layers_per_rank = CONFIG["num_hidden_layers"] // pp
    for rank, r in enumerate(per_rank):
        imported, exported = r[f"{name}_calls"]
        assert imported == {"expert_pack_fc1": layers_per_rank, "expert_pack_fc2": layers_per_rank}, (rank, imported)
        want = {"expert_unpack_fc1": CONFIG["num_hidden_layers"],
                "expert_unpack_fc2": CONFIG["num_hidden_layers"]} if rank == 0 and tp > 1 else {}
        assert exported == want, (rank, exported)


def test_export_hands_out_the_destinations_own_experts_as_its_parameters(moe_results):
    """EP2 without expert-TP: with copy=False, rank 0's own experts' HF tensors (gate, up, down) are views of its
    expert parameters (nothing copied; the round-trip test checks their values); with copy=True none aliases them."""
    per_rank = moe_results[2]
    n = CONFIG["num_hidden_layers"] * CONFIG["num_local_experts"] * 3  # HF expert tensors
    assert per_rank[0]["ep2_aliasing_copy=False"] == (n // 2, n)
    assert per_rank[0]["ep2_aliasing_copy=True"] == (0, n)


@pytest.mark.parametrize("name,tp,pp,ep", LAYOUTS, ids=[x[0] for x in LAYOUTS])
def test_moe_round_trip_bit_exact(moe_results, name, tp, pp, ep):
    ckpt, out_root, _, _ = moe_results
    with SafeTensorsSource(ckpt) as src, SafeTensorsSource(os.path.join(out_root, name)) as dst:
        assert set(src.keys()) == set(dst.keys()), set(src.keys()) ^ set(dst.keys())
        for key in src.keys():
            assert src[key].dtype == dst[key].dtype and torch.equal(src[key], dst[key]), key
