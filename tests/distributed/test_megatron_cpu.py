"""Real megatron-core GPTModels on CPU / gloo against transformers' LlamaForCausalLM.

One spawned world of 4 ranks builds several layouts in turn (TP, PP, VPP, DP replicas, odd vocabulary, tied
embeddings, llama3 RoPE scaling), loads the HF weights with the naive test-only loader of ``_megatron_utils`` and
compares ``parity.megatron_logits`` with the HF logits. The config translation is checked in-process.
"""

from __future__ import annotations

import time

import pytest
import torch

from megatron_bridge_ext.launch import spawn_local
from megatron_bridge_ext.testing.tolerances import MEGATRON_VS_HF_ATOL

try:  # tests/distributed as a package, or (no __init__.py) on sys.path via pytest's default import mode
    from . import _megatron_utils as mu
except ImportError:
    import _megatron_utils as mu

WORLD = 4
TOL = MEGATRON_VS_HF_ATOL  # megatron-core vs transformers, two implementations (testing/tolerances.py)

# name -> (tp, pp, vpp, vocab, tied, llama3)
LAYOUTS = {
    "tp1": (1, 1, None, mu.VOCAB_EVEN, False, False),
    "tp2": (2, 1, None, mu.VOCAB_EVEN, False, False),
    "pp2": (1, 2, None, mu.VOCAB_EVEN, False, False),
    "tp2xpp2": (2, 2, None, mu.VOCAB_EVEN, False, False),
    "pp2_vpp2": (1, 2, 2, mu.VOCAB_EVEN, False, False),
    "tp2_odd_vocab_llama3": (2, 1, None, mu.VOCAB_ODD, False, True),
    "pp2_tied": (1, 2, None, mu.VOCAB_EVEN, True, False),
    "tp1_tied_llama3": (1, 1, None, mu.VOCAB_ODD, True, True),
}
BATCHES = [(2, 8), (1, 64)]  # 64 = max_position_embeddings


def _rank_main(rank: int, world: int, cases: dict, batches: list) -> dict:
    """One rank: every layout in turn. ``cases[(vocab, tied, llama3)] = (hf config dict, hf state dict, hf logits)``.

    transformers is not imported here (the parent computes the HF side), which keeps each rank's start-up short.
    """
    from megatron_bridge_ext.mcore import cpu_compat

    cpu_compat.apply_cpu_patches()
    cpu_compat.apply_cpu_patches()  # idempotent
    assert torch.cuda.current_device() == "cpu"
    from megatron.core import parallel_state as ps

    from megatron_bridge_ext.mcore.config import padded_vocab_size
    from megatron_bridge_ext.mcore.forward import megatron_logits
    from megatron_bridge_ext.mcore.model_builder import build_model_chunks, destroy_parallel, init_parallel
    from megatron_bridge_ext.models.llama import LlamaBridge

    hf_to_transformer_config = LlamaBridge().transformer_config

    out: dict = {"diffs": {}, "keys": {}, "logits_sum": {}, "times": {}}
    for name, (tp, pp, vpp, vocab, tied, llama3) in LAYOUTS.items():
        t0 = time.perf_counter()
        hf_cfg, hf_sd, ref = cases[(vocab, tied, llama3)]
        init_parallel(tp, pp, vpp)
        cfg = hf_to_transformer_config(
            hf_cfg, tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
            virtual_pipeline_model_parallel_size=vpp,
        )
        chunks = build_model_chunks(cfg)
        mu.naive_load(
            chunks, hf_sd, hf_cfg, tp=tp, tp_rank=ps.get_tensor_model_parallel_rank(), pp=pp,
            pp_rank=ps.get_pipeline_model_parallel_rank(), padded_vocab=padded_vocab_size(vocab, tp),
        )
        diffs = []
        for b, r in zip(batches, ref):
            got = megatron_logits(chunks, b)
            diffs.append(mu.max_abs_diff(got, r))
        out["diffs"][name] = diffs
        out["logits_sum"][name] = float(got.double().sum())
        out["keys"][name] = {
            "pp_rank": ps.get_pipeline_model_parallel_rank(),
            "chunks": [mu.out_keys(c) for c in chunks],
            "layer_numbers": [[layer.layer_number for layer in c.decoder.layers] for c in chunks],
        }
        destroy_parallel()
        out["times"][name] = time.perf_counter() - t0
    out["cpu_s"] = time.process_time()
    return out


@pytest.fixture(scope="module")
def world_results():
    gen = torch.Generator().manual_seed(7)
    batches = [torch.randint(0, mu.VOCAB_ODD, shape, generator=gen) for shape in BATCHES]
    cases = {}
    for _, _, _, vocab, tied, llama3 in LAYOUTS.values():
        key = (vocab, tied, llama3)
        if key not in cases:
            hf_cfg = mu.tiny_llama_config(vocab, tied, llama3)
            model = mu.tiny_llama(hf_cfg, seed=1000 + len(cases))
            cases[key] = (hf_cfg.to_dict(), model.state_dict(), [mu.hf_logits(model, b) for b in batches])
    t0 = time.perf_counter()
    res = spawn_local(_rank_main, WORLD, (cases, batches), timeout=300)
    print(f"\nmegatron CPU world of {WORLD} ranks: {time.perf_counter() - t0:.1f} s; per layout (rank 0): "
          + ", ".join(f"{k} {v:.2f}s" for k, v in res[0]["times"].items())
          + f"; CPU seconds per rank {[round(r['cpu_s'], 1) for r in res]}"
          + "\nmax |megatron - hf|: "
          + ", ".join(f"{k} {max(max(r['diffs'][k]) for r in res):.1e}" for k in LAYOUTS))
    return res


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_logits_match_hf(world_results, layout):
    for rank, res in enumerate(world_results):
        diffs = res["diffs"][layout]
        assert max(diffs) <= TOL, f"{layout}: rank {rank} max |megatron - hf| per batch = {diffs}"
    # every rank (every pipeline and data-parallel replica) returns the same logits
    sums = {res["logits_sum"][layout] for res in world_results}
    assert len(sums) == 1, f"{layout}: ranks disagree: {sums}"


def test_layer_numbers_and_output_layer_keys(world_results):
    """Global 1-based layer numbers per virtual stage; which stage holds output_layer.weight when tied."""
    for res in world_results:
        k = res["keys"]
        r = k["pp2_vpp2"]["pp_rank"]
        # virtual stage s = chunk * pp + pp_rank holds global layer s (1 layer per stage)
        assert k["pp2_vpp2"]["layer_numbers"] == [[r + 1], [2 + r + 1]]
        assert k["pp2"]["layer_numbers"] == [[2 * r + 1, 2 * r + 2]]
        # tied, pp1: the output layer reuses the embedding; no output_layer.weight key
        assert k["tp1_tied_llama3"]["chunks"][0]["output_layer.weight"] is False
        # tied, pp2: the first stage has none, the last stage has its own copy
        assert k["pp2_tied"]["chunks"][0]["output_layer.weight"] is (k["pp2_tied"]["pp_rank"] == 1)
        # untied: the last stage has it
        assert k["pp2"]["chunks"][0]["output_layer.weight"] is (k["pp2"]["pp_rank"] == 1)
        assert k["tp1"]["chunks"][0]["extra_state"] is True


def test_llama3_scaling_changes_logits():
    """The llama3 layouts can fail: dropping the rope scaling changes the HF logits by far more than TOL."""
    cfg = mu.tiny_llama_config(mu.VOCAB_ODD, tied=False, llama3=True)
    plain = mu.tiny_llama_config(mu.VOCAB_ODD, tied=False, llama3=False)
    plain.rope_parameters = {"rope_type": "default", "rope_theta": 500000.0}
    a, b = mu.tiny_llama(cfg, seed=3), mu.tiny_llama(plain, seed=3)
    ids = torch.randint(0, mu.VOCAB_ODD, (1, 64), generator=torch.Generator().manual_seed(7))
    assert mu.max_abs_diff(mu.hf_logits(a, ids), mu.hf_logits(b, ids)) > 100 * TOL


# ---- config translation (in-process, no distributed state) ----

def test_padded_vocab_size():
    from megatron_bridge_ext.mcore.config import padded_vocab_size

    for vocab, tp, div, want in [(100, 1, None, 100), (100, 2, None, 104), (97, 2, None, 98), (97, 1, None, 97),
                                 (128256, 8, None, 129024), (32000, 4, None, 32256), (151936, 8, 128, 152576),
                                 (50257, 1, 128, 50304), (50257, 2, 64, 50304)]:
        assert padded_vocab_size(vocab, tp, div) == want, (vocab, tp, div)
    # independent definition: smallest multiple of divisor*tp >= vocab (divisor: largest power of 2 <= 128 dividing it)
    for vocab in range(1, 300):
        for tp in (1, 2, 4):
            d = max(p for p in (1, 2, 4, 8, 16, 32, 64, 128) if vocab % p == 0)
            m = d * tp
            assert padded_vocab_size(vocab, tp) == -(-vocab // m) * m
    with pytest.raises(ValueError, match="tp=0"):
        padded_vocab_size(100, 0)


def test_config_fields():
    import torch.nn.functional as F

    from megatron_bridge_ext.models.llama import LlamaBridge

    hf_to_transformer_config = LlamaBridge().transformer_config

    hf = mu.tiny_llama_config(mu.VOCAB_ODD, tied=True, llama3=True)
    c = hf_to_transformer_config(hf, tensor_model_parallel_size=2, pipeline_model_parallel_size=2)
    assert (c.num_layers, c.hidden_size, c.ffn_hidden_size, c.num_attention_heads, c.num_query_groups,
            c.kv_channels) == (4, 64, 128, 4, 2, 16)
    assert c.normalization == "RMSNorm" and c.layernorm_epsilon == 1e-5
    assert c.gated_linear_unit and c.activation_func is F.silu and not c.add_bias_linear and not c.add_qkv_bias
    assert c.rotary_base == 500000.0 and c.rope_scaling and c.rope_scaling_factor == 8.0
    assert c.seq_len_interpolation_factor is None
    assert c.share_embeddings_and_output_weights and c.vocab_size == 97 and c.seq_length == 64
    assert c.params_dtype == torch.float32 and c.pipeline_dtype == torch.float32 and not c.bf16
    assert c.use_cpu_initialization and not c.perform_initialization
    assert (c.tensor_model_parallel_size, c.pipeline_model_parallel_size) == (2, 2)

    # legacy dict form (rope_theta / rope_scaling) gives the same rotary settings; bf16 from torch_dtype
    legacy = {k: v for k, v in hf.to_dict().items() if k != "rope_parameters"}
    legacy.update(rope_theta=500000.0, rope_scaling={"type": "llama3", "factor": 4.0, "low_freq_factor": 1.0,
                                                    "high_freq_factor": 4.0,
                                                    "original_max_position_embeddings": 8192},
                  torch_dtype="bfloat16", dtype=None)
    c2 = hf_to_transformer_config(legacy)
    assert c2.rotary_base == 500000.0 and c2.rope_scaling and c2.rope_scaling_factor == 4.0
    assert c2.params_dtype == torch.bfloat16 and c2.bf16 and c2.pipeline_dtype is None
    c3 = hf_to_transformer_config(legacy, params_dtype=torch.float32)
    assert c3.params_dtype == torch.float32 and not c3.bf16

    linear = dict(legacy, rope_scaling={"rope_type": "linear", "factor": 2.0})
    c4 = hf_to_transformer_config(linear)
    assert c4.seq_len_interpolation_factor == 2.0 and not c4.rope_scaling


@pytest.mark.parametrize(
    "rope, match",
    [
        ({"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4}, "'yarn'"),
        ({"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1e4}, "'dynamic'"),
        ({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 2.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 8192, "rope_theta": 1e4}, "low_freq_factor"),
    ],
)
def test_config_rejects_unsupported_rope(rope, match):
    from megatron_bridge_ext.models.llama import LlamaBridge

    hf_to_transformer_config = LlamaBridge().transformer_config

    d = mu.tiny_llama_config().to_dict()
    d["rope_parameters"] = rope
    with pytest.raises(ValueError, match=match):
        hf_to_transformer_config(d)


def test_config_rejects_bad_input():
    from megatron_bridge_ext.models.llama import LlamaBridge

    hf_to_transformer_config = LlamaBridge().transformer_config

    d = mu.tiny_llama_config().to_dict()
    with pytest.raises(ValueError, match="not_a_field"):
        hf_to_transformer_config(d, not_a_field=1)
    with pytest.raises(ValueError, match="attention_bias=True"):
        hf_to_transformer_config(dict(d, attention_bias=True, mlp_bias=False))
    c = hf_to_transformer_config(dict(d, attention_bias=True, mlp_bias=True))
    assert c.add_bias_linear and c.add_qkv_bias


def test_cpu_patches_refuse_cuda(monkeypatch):
    from megatron_bridge_ext.mcore import cpu_compat

    monkeypatch.setattr(cpu_compat, "_APPLIED", False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    before = torch.cuda.current_device
    with pytest.raises(RuntimeError, match="CUDA is available"):
        cpu_compat.apply_cpu_patches()
    assert torch.cuda.current_device is before and not cpu_compat.cpu_patches_applied()


def test_cpu_masks_and_cuda_moves():
    """The CPU mask replacements against their definitions; Tensor.cuda is restored after model construction."""
    from megatron_bridge_ext.mcore import cpu_compat

    s = 7
    i, j = torch.arange(s).unsqueeze(1), torch.arange(s).unsqueeze(0)
    assert torch.equal(cpu_compat._cpu_causal_mask(s), j > i)
    for left, right in [(0, 0), (2, 0), (3, 1), (10, 0)]:
        keep = (j >= i - left) & (j <= i + right)
        assert torch.equal(cpu_compat._cpu_sliding_window_causal_mask(s, s, (left, right)), ~keep), (left, right)
    original = torch.Tensor.cuda
    t = torch.ones(2)
    with cpu_compat.cuda_moves_disabled():
        assert t.cuda() is t
    assert torch.Tensor.cuda is original


_DEEPSEEK_WITHOUT_PATCHES = r"""
import os, sys, torch, transformers
transformers.logging.set_verbosity_error()
src, store = sys.argv[1], sys.argv[2]
torch.manual_seed(0)
yarn = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 16,
        "beta_fast": 32.0, "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 1.0}
cfg = transformers.DeepseekV3Config(
    vocab_size=97, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
    max_position_embeddings=64, rms_norm_eps=1e-5, tie_word_embeddings=False, intermediate_size=80,
    moe_intermediate_size=24, n_routed_experts=4, num_experts_per_tok=2, n_group=2, topk_group=1,
    first_k_dense_replace=1, q_lora_rank=24, kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=16,
    v_head_dim=12, n_shared_experts=1, routed_scaling_factor=2.5, rope_parameters=yarn)
hf = transformers.DeepseekV3ForCausalLM(cfg).float().eval()
hf.save_pretrained(src)
tokens = torch.randint(0, 97, (2, 10), generator=torch.Generator().manual_seed(1))
with torch.no_grad():
    want = hf(tokens).logits

# what a CPU user writes: plain torch.distributed and megatron's own parallel-state call, no apply_cpu_patches
import torch.distributed as dist
dist.init_process_group("gloo", init_method=f"file://{store}", rank=0, world_size=1)
from megatron.core import parallel_state
parallel_state.initialize_model_parallel(tensor_model_parallel_size=1, pipeline_model_parallel_size=1)
from megatron_bridge_ext import AutoBridge
from megatron_bridge_ext.mcore import cpu_compat
print("PATCHED_BEFORE", cpu_compat.cpu_patches_applied())
chunks = AutoBridge.from_hf_pretrained(src).to_megatron_model(params_dtype=torch.float32)
print("PATCHED_AFTER", cpu_compat.cpu_patches_applied())
with torch.no_grad():
    got = chunks[0](tokens, torch.arange(10).unsqueeze(0).expand(2, -1), None)
print("MAXDIFF", float((got[..., :97] - want).abs().max()))
"""


def test_deepseek_v3_builds_on_cpu_without_calling_apply_cpu_patches(tmp_path):
    """A CPU user who builds DeepSeek-V3 (multi-latent attention, experts) through AutoBridge.to_megatron_model
    without calling apply_cpu_patches first, in a fresh process of the installed megatron-core: the package applies
    what that version needs when it builds the model, and megatron-core's own forward gives transformers' logits."""
    import os
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = {**os.environ, "PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "GLOO_SOCKET_IFNAME": os.environ.get("GLOO_SOCKET_IFNAME", "lo")}
    res = subprocess.run([sys.executable, "-c", _DEEPSEEK_WITHOUT_PATCHES, str(tmp_path / "hf"),
                          str(tmp_path / "store")], capture_output=True, text=True, env=env, timeout=600)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "PATCHED_BEFORE False" in res.stdout and "PATCHED_AFTER True" in res.stdout, res.stdout
    diff = float(res.stdout.split("MAXDIFF")[-1].split()[0])
    assert diff <= TOL, f"max |logit diff| {diff:.3e}"
