"""``import`` writes what a Transformer Engine (TE) spec model asks for, for every supported family, proved on CPU with
megatron-core's own TE code path (``tests/te_standin.py`` stands in for TE's module classes; ``tests/te_models.py``
builds megatron-core's TE layer specs).

Two spawned worlds of 2 ranks:

1. (plain megatron-core) every family's tiny transformers checkpoint -> AutoBridge -> local-spec chunks at the
   write layout -> ``save_megatron_checkpoint(spec="te")``; the same model built at the read layout is kept as the
   reference (its parameters, rank by rank). Llama is also written with ``spec="local"``, whose keys must be the
   local chunks' own (today's output).
2. (TE stand-in installed before megatron-core is imported) at the read layout: a TE-spec ``GPTModel`` of the
   checkpoint's stored config, parameters poisoned with NaN; its ``sharded_state_dict()`` (over all ranks) against
   the checkpoint's metadata: tensor keys and global shapes, ``_extra_state`` object keys, grid shapes and shards;
   then ``dist_checkpointing.load(..., strict=StrictHandling.RAISE_ALL)`` and ``load_state_dict(strict=True)``;
   every TE parameter equals (``torch.equal``) the reference parameter of the same module (TE fuses the input / pre-MLP
   / MLA latent norms into the next linear: ``linear_qkv.layer_norm_weight`` is the local ``input_layernorm.weight``;
   grouped experts ``weight{i}`` are ``local_experts.{i}``), and every TE module received an empty ``uint8``
   ``_extra_state`` (TE's own value without FP8 state).

Layouts: dense families written at TP2, read at PP2; MoE families written at EP2, read at TP2 (expert-TP 2, GPT-OSS 1)
or, with multi-token prediction, at PP2 (the MTP layer on the last stage); Mixtral, Qwen3-MoE and Llama 4 (MoE layers
with a shared expert interleaved with dense ones, NoPE / chunked-RoPE attention, RoPE-layer q/k L2 norm) are read
into TE's grouped-GEMM experts (``TEGroupedMLP``) as well. OLMo 2 / Olmo 3 (post norms only, whole-projection q / k
norms) and OLMoE (whole-projection q / k norms) use ``tests/distributed/test_olmo_families.py``'s checkpoints,
MiniMax-M2 (whole-projection q / k norms, sigmoid router with correction bias)
``tests/distributed/test_minimax_m2.py``'s; their TE-spec model is described in ``tests/te_models.py``.
NemotronH (megatron-core >= 0.19; ``tests/distributed/test_nemotron_h.py``'s ``M-*-M*M-`` checkpoint, written at TP2,
read at PP2) is read into megatron-core's own TE ``HybridModel`` (``hybrid_layer_specs.hybrid_stack_spec``: each
layer's pre-norm fused into ``mixer.in_proj`` / ``linear_qkv`` / ``linear_fc1``, the final norm TE's), and a
Megatron-LM-style save of that model is exported from its hybrid args; its MoE checkpoint (``ME*EM-E*``, written at
EP2, read at TP2) likewise, its 'E' layers megatron's ``MoETransformerLayer`` with TE's grouped-GEMM experts.
``ARCHITECTURES`` names each case's HF architecture; together they must be ``AutoBridge.list_supported_models()`` (a
family without a case fails ``test_cases_cover_every_supported_architecture``).
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys

import pytest
import torch

if importlib.util.find_spec("megatron.core") is None:  # not importorskip: the TE world must import it after the stand-in
    pytest.skip("megatron-core is not installed", allow_module_level=True)
if importlib.util.find_spec("transformers") is None:
    pytest.skip("transformers is not installed", allow_module_level=True)

from megatron_bridge_ext.launch import spawn_local  # noqa: E402  (imports no megatron module)
from megatron_bridge_ext.mcore.versions import (  # noqa: E402  (reads the distribution metadata)
    MEGATRON_CORE_0_19,
    installed_megatron_core,
    megatron_core_version,
    unmet_megatron_core,
)

HERE = os.path.dirname(os.path.abspath(__file__))
TESTS = os.path.dirname(HERE)

# name -> (write layout, read layout, read into TE grouped-GEMM experts too)
DENSE_W, DENSE_R = dict(tp=2, pp=1), dict(tp=1, pp=2)
MOE_W = dict(tp=1, pp=1, ep=2)
CASES = {
    "llama": (DENSE_W, DENSE_R, False),
    "qwen2": (DENSE_W, DENSE_R, False),
    "mistral": (DENSE_W, DENSE_R, False),
    "qwen3": (DENSE_W, DENSE_R, False),
    "gemma2": (DENSE_W, DENSE_R, False),
    "gemma3": (DENSE_W, DENSE_R, False),
    "gemma4": (DENSE_W, DENSE_R, False),
    "gemma4_released": (DENSE_W, DENSE_R, False),
    "phi3": (DENSE_W, DENSE_R, False),
    "olmo2": (DENSE_W, DENSE_R, False),
    "olmo3": (DENSE_W, DENSE_R, False),
    "mixtral": (MOE_W, dict(tp=2, pp=1), True),
    "qwen3_moe": (MOE_W, dict(tp=2, pp=1), True),
    "qwen2_moe": (MOE_W, dict(tp=2, pp=1), False),
    "gpt_oss": (dict(tp=1, pp=1, ep=2, etp=1), dict(tp=2, pp=1, etp=1), False),
    "deepseek_v3_mtp": (MOE_W, dict(tp=1, pp=2), False),
    "glm4_moe_mtp": (MOE_W, dict(tp=1, pp=2), False),
    "glm4_moe_lite_mtp": (MOE_W, dict(tp=1, pp=2), False),
    "llama4": (MOE_W, dict(tp=2, pp=1), True),
    "olmoe": (MOE_W, dict(tp=2, pp=1), False),
    "minimax_m2": (MOE_W, dict(tp=2, pp=1), False),
}
# DeepSeek sparse attention (megatron-core >= 0.19; refused before, test_dsa_families_refused_before_0_19): the TE
# model is megatron-core's own DSA spec (get_transformer_block_with_experimental_attention_variant_spec), read at PP2
# (its AbsorbedMLA needs sequence parallelism at TP > 1)
DSA_CASES = {
    "deepseek_v32_mtp": (MOE_W, dict(tp=1, pp=2), False),
    "glm_moe_dsa": (MOE_W, dict(tp=1, pp=2), False),  # top-k sharing: each stage starts on a full layer
}
HAS_DSA = megatron_core_version() >= (0, 19, 0)
if HAS_DSA:
    CASES.update(DSA_CASES)
# gated delta-net families (megatron-core >= 0.19; below it they are refused by name,
# test_gated_delta_net_families_need_megatron_core_0_19): tests/distributed/test_qwen3_next.py's and test_qwen3_5.py's
# checkpoints, read into megatron's own experimental-attention-variant TE spec (tests/te_models.py)
GDN_CASES = {
    "qwen3_next": (MOE_W, dict(tp=2, pp=1), False),
    "qwen3_5": (DENSE_W, DENSE_R, False),
    "qwen3_5_moe": (MOE_W, dict(tp=2, pp=1), False),
    "qwen3_5_vl": (DENSE_W, DENSE_R, False),
    "qwen3_5_moe_vl": (MOE_W, dict(tp=2, pp=1), False),
}
if not unmet_megatron_core(MEGATRON_CORE_0_19):
    CASES.update(GDN_CASES)
# hybrid Mamba / attention / MLP models (megatron-core >= 0.19 HybridModel; below it NemotronH is refused by name,
# test_te_checkpoint_of_hybrid_is_refused_below_0_19): tests/distributed/test_nemotron_h.py's checkpoint, read into
# megatron-core's own TE hybrid spec (hybrid_layer_specs.hybrid_stack_spec, tests/te_models.py)
HYBRID_CASES = {
    "nemotron_h": (DENSE_W, DENSE_R, False),
    "nemotron_h_moe": (MOE_W, dict(tp=2, pp=1), False),  # MoE layers (ME*EM-E*): TE's grouped-GEMM experts
}
HAS_HYBRID = not unmet_megatron_core(MEGATRON_CORE_0_19)
if HAS_HYBRID:
    CASES.update(HYBRID_CASES)
# case -> the HF architecture its checkpoint is (one line per case: families added on other branches merge as added
# lines); test_cases_cover_every_supported_architecture holds it to CASES and AutoBridge.list_supported_models()
ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "gemma2": "Gemma2ForCausalLM",
    "gemma3": "Gemma3ForCausalLM",
    "gemma4": "Gemma4ForCausalLM",
    "gemma4_released": "Gemma4ForCausalLM",
    "phi3": "Phi3ForCausalLM",
    "olmo2": "Olmo2ForCausalLM",
    "olmo3": "Olmo3ForCausalLM",
    "mixtral": "MixtralForCausalLM",
    "qwen3_moe": "Qwen3MoeForCausalLM",
    "qwen2_moe": "Qwen2MoeForCausalLM",
    "gpt_oss": "GptOssForCausalLM",
    "deepseek_v3_mtp": "DeepseekV3ForCausalLM",
    "glm4_moe_mtp": "Glm4MoeForCausalLM",
    "glm4_moe_lite_mtp": "Glm4MoeLiteForCausalLM",
    "llama4": "Llama4ForCausalLM",
    "olmoe": "OlmoeForCausalLM",
    "minimax_m2": "MiniMaxM2ForCausalLM",
    "deepseek_v32_mtp": "DeepseekV32ForCausalLM",
    "glm_moe_dsa": "GlmMoeDsaForCausalLM",
    "nemotron_h": "NemotronHForCausalLM",
    "nemotron_h_moe": "NemotronHForCausalLM",
    "qwen3_next": "Qwen3NextForCausalLM",
    "qwen3_5": "Qwen3_5ForCausalLM",
    "qwen3_5_moe": "Qwen3_5MoeForCausalLM",
    "qwen3_5_vl": "Qwen3_5ForConditionalGeneration",
    "qwen3_5_moe_vl": "Qwen3_5MoeForConditionalGeneration",
}


def _make_checkpoints(root: str) -> dict:
    """The tiny transformers checkpoints of the families' own end-to-end tests (random weights, fixed seeds)."""
    from megatron_bridge_ext.testing.tiny_models import tiny_hf_model

    sys.path.insert(0, HERE)
    import test_bridge_dense_families as dense
    import test_glm4_moe_lite as glm4_moe_lite
    import test_bridge_llama as llama
    import test_bridge_mixtral as mixtral
    import test_bridge_moe_families as moe
    import test_gemma4 as gemma4
    import test_llama4 as llama4
    import test_minimax_m2 as minimax
    import test_olmo_families as olmo
    import test_qwen3_5 as qwen3_5
    import test_qwen3_next as qwen3_next

    paths = {}
    for name in CASES:
        path = os.path.join(root, f"hf_{name}")
        paths[name] = path
        if name == "qwen3_next":  # gated delta-net + gated attention, MoE with a gated shared expert
            qwen3_next.make_checkpoint(path, seed=7)
        elif name in ("qwen3_5", "qwen3_5_moe"):  # split delta-net projections
            qwen3_5.make_checkpoint(path, "dense" if name == "qwen3_5" else "moe", seed=7)
        elif name in ("qwen3_5_vl", "qwen3_5_moe_vl"):  # vision-language: vision tower and MTP layer carried
            import test_qwen3_5_vl as qwen3_5_vl

            qwen3_5_vl.make_checkpoint(path, "dense" if name == "qwen3_5_vl" else "moe", seed=7)
        elif name == "minimax_m2":  # whole-projection q/k norms, head_dim != hidden / heads, sigmoid router with bias
            minimax._make_checkpoint(path, seed=7)
        elif name in olmo.CHECKPOINTS:  # OLMo 2 / Olmo 3 (post norms) and OLMoE: whole-projection q/k norms with GQA
            olmo._make_checkpoint(path, name, seed=7)
        elif name in ("llama", "qwen2"):
            llama._make_checkpoint(path, {"vocab_size": 97} if name == "llama" else {}, torch.float32, seed=1,
                                   arch="Qwen2" if name == "qwen2" else "Llama")
        elif name in dense.CHECKPOINTS:
            dense._make_checkpoint(path, name, seed=2)
        elif name in ("gemma4", "gemma4_released"):
            gemma4._make_checkpoint(path, name, seed=2)
        elif name == "mixtral":
            model = tiny_hf_model("Mixtral", mixtral.CONFIG, seed=3)
            moe._randomise(model)
            model.save_pretrained(path, safe_serialization=True)
        elif name == "glm4_moe_lite_mtp":  # its own test's model (a dense layer between MoE layers) and MTP layer
            model = glm4_moe_lite._make_checkpoint(path + "_base", seed=4)
            glm4_moe_lite._write_mtp(path + "_base", path, model, seed=5)
        elif name == "llama4":
            llama4._make_checkpoint(path, seed=7)
        elif name == "deepseek_v32_mtp":  # its own test's model (indexers, top-k below the length) and MTP layer
            import test_deepseek_v32 as deepseek_v32

            model = deepseek_v32._make_checkpoint(path + "_base", seed=4)
            deepseek_v32._write_mtp(path + "_base", path, model, seed=5)
        elif name == "nemotron_h":  # its own test's checkpoint: Mamba, attention and MLP layers (M-*-M*M-)
            import test_nemotron_h as nemotron_h

            nemotron_h._make_checkpoint(path, "hybrid", seed=7)
        elif name == "nemotron_h_moe":  # its own test's MoE checkpoint: Mamba, attention, MLP and MoE layers
            import test_nemotron_h as nemotron_h

            nemotron_h._make_checkpoint(path, "moe", seed=7)
        elif name == "glm_moe_dsa":  # its own test's model: indexers in the full layers only (top-k sharing)
            import test_glm_moe_dsa as glm_moe_dsa

            glm_moe_dsa._make_checkpoint(path, seed=4)
        elif name.endswith("_mtp"):
            family = name[:-len("_mtp")]
            model = moe._make_checkpoint(path + "_base", family, seed=4)
            moe._write_mtp(path + "_base", path, model, seed=5)
        else:
            moe._make_checkpoint(path, name, seed=6)
    return paths


def _flat(state):
    """Every ShardedBase of a (nested) sharded state dict, factories built (as the writer builds them)."""
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedBase, apply_factories

    apply_factories(state)
    return [v for v in nested_values(state) if isinstance(v, ShardedBase)]


def _structure(items):
    """tensors: key -> global shape; objects: key -> (grid shape, shard offsets)."""
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    tensors, objects = {}, {}
    for it in items:
        if isinstance(it, ShardedObject):
            shape, offsets = objects.setdefault(it.key, (tuple(it.global_shape), set()))
            offsets.add(tuple(it.global_offset))
        elif getattr(it, "allow_shape_mismatch", False):  # vocabulary rows: padded to the writer's TP, resized on load
            tensors[it.key] = ("padded rows",) + tuple(it.global_shape[1:])
        else:
            tensors[it.key] = tuple(it.global_shape)
    return tensors, objects


def _gathered_structure(items):
    import torch.distributed as dist

    parts = [None] * dist.get_world_size()
    dist.all_gather_object(parts, _structure(items))
    tensors, objects = {}, {}
    for t, o in parts:
        tensors.update(t)
        for k, (shape, offs) in o.items():
            objects.setdefault(k, (shape, set()))[1].update(offs)
    return tensors, objects


def _checkpoint_structure(path: str):
    from megatron.core.dist_checkpointing.serialization import load_sharded_metadata

    meta = load_sharded_metadata(path)
    items = [v for v in meta.values() if v.key != "common_state"]  # megatron-core >= 0.19: the common state in DCP
    return _structure(items)


def _diff(want, have):
    """Differences between two structures, one line each."""
    out = []
    for kind, a, b in (("tensor", want[0], have[0]), ("object", want[1], have[1])):
        for key in sorted(set(a) | set(b)):
            x, y = a.get(key), b.get(key)
            if x and y and x[0] == "padded rows" and tuple(y[1:]) == tuple(x[1:]):
                continue
            if x != y:
                out.append(f"{kind} {key}: model {a.get(key)} checkpoint {b.get(key)}")
    return out


def _write_worker(rank: int, world: int, paths: dict, root: str) -> dict:
    from megatron_bridge_ext.mcore.cpu_compat import apply_cpu_patches

    apply_cpu_patches()
    from megatron_bridge_ext.auto_bridge import AutoBridge
    from megatron_bridge_ext.mcore.checkpoint import save_megatron_checkpoint, sharded_model_state
    from megatron_bridge_ext.mcore.model_builder import destroy_parallel, init_parallel
    from megatron_bridge_ext.testing.parity import compare_megatron_checkpoints

    out = {}
    for name, (write, read, _) in CASES.items():
        bridge = AutoBridge.from_hf_pretrained(paths[name])
        arch = bridge.hf_config.architectures[0]
        if arch != ARCHITECTURES[name]:
            raise AssertionError(f"case {name}: the checkpoint is a {arch}, ARCHITECTURES says {ARCHITECTURES[name]}")
        init_parallel(**write)
        chunks = bridge.to_megatron_model(params_dtype=torch.float32)
        with open(os.path.join(paths[name], "config.json")) as f:
            hf_config = json.load(f)
        save_megatron_checkpoint(chunks, os.path.join(root, name, "te"), architecture=arch, hf_config=hf_config,
                                 side_files=paths[name],  # what import --via-model writes
                                 carried=bridge.model_bridge.carried_hf_params)
        if name == "llama":  # --spec local: the local chunks' own keys, as before
            local = os.path.join(root, name, "local")
            save_megatron_checkpoint(chunks, local, architecture=arch, spec="local")
            want = _gathered_structure(_flat(sharded_model_state(chunks, "local")))
            if rank == 0:
                out["local_spec_diff"] = _diff(want, _checkpoint_structure(os.path.join(local, "iter_0000000")))
        destroy_parallel()
        # the streamed conversion (no model; the two ranks share the tensors), recording the same layout; a small
        # buffer, so that a layer's experts are converted in runs of a few experts and the files are many
        stream = os.path.join(root, name, "stream")
        AutoBridge.from_hf_pretrained(paths[name]).save_megatron_checkpoint(
            stream, spec="te", dtype=torch.float32, layout=write, file_bytes=64 << 10, buffer_bytes=16 << 10)
        if rank == 0:
            out[f"{name}:stream_diff"] = compare_megatron_checkpoints(stream, os.path.join(root, name, "te"))
        init_parallel(**read)
        chunks = bridge.to_megatron_model(params_dtype=torch.float32)
        ref = {f"{i}:{n}": p.detach().clone() for i, c in enumerate(chunks) for n, p in c.named_parameters()}
        torch.save(ref, os.path.join(root, name, f"ref_rank{rank}.pt"))
        destroy_parallel()
    return out


def _local_name(te_name: str) -> str:
    """The local-spec parameter holding what a TE-spec parameter holds (module-level facts of the two specs)."""
    import re

    m = re.match(r"^(.*)\.mlp\.experts\.linear_fc([12])\.(weight|bias)(\d+)$", te_name)
    if m:  # TE grouped-GEMM experts: one tensor per local expert
        return f"{m.group(1)}.mlp.experts.local_experts.{m.group(4)}.linear_fc{m.group(2)}.{m.group(3)}"
    for te, local in ((".self_attention.linear_qkv.layer_norm_", ".input_layernorm."),
                      (".self_attention.in_proj.layer_norm_", ".input_layernorm."),  # gated delta-net layers
                      (".mixer.in_proj.layer_norm_", ".norm."),  # Mamba layers of hybrid models
                      (".mlp.linear_fc1.layer_norm_", ".pre_mlp_layernorm."),
                      (".self_attention.linear_q_up_proj.layer_norm_", ".self_attention.q_layernorm."),
                      (".self_attention.linear_kv_up_proj.layer_norm_", ".self_attention.kv_layernorm.")):
        if te in te_name:
            return te_name.replace(te, local)
    return te_name


def _te_worker(rank: int, world: int, root: str) -> dict:
    sys.path.insert(0, TESTS)
    import te_standin

    te_standin.install()  # before megatron-core is imported in this process
    from megatron_bridge_ext.mcore.cpu_compat import apply_cpu_patches

    apply_cpu_patches()
    from megatron.core import dist_checkpointing, parallel_state
    from megatron.core.dist_checkpointing.validation import StrictHandling
    from te_models import build_te_chunks

    from megatron_bridge_ext.io.megatron_checkpoint import read_checkpoint_info
    from megatron_bridge_ext.mcore.checkpoint import config_from_checkpoint, model_state_keys
    from megatron_bridge_ext.mcore.model_builder import destroy_parallel, init_parallel

    out = {}
    for name, (_, read, grouped) in CASES.items():
        for variant, source in [(v, s) for v in (("sequential", "grouped") if grouped else ("sequential",))
                                for s in ("te", "stream")]:
            case = f"{name}/{variant}" + ("/stream" if source == "stream" else "")
            init_parallel(**read)
            info = read_checkpoint_info(os.path.join(root, name, source))
            config = config_from_checkpoint(info, **({"moe_grouped_gemm": True} if variant == "grouped" else {}))
            chunks = build_te_chunks(config)
            for c in chunks:  # poison: every value must come from the checkpoint
                for p in c.parameters():
                    p.data.fill_(float("nan"))
            keys = model_state_keys(len(chunks))
            md = {"dp_cp_group": parallel_state.get_data_parallel_group(with_context_parallel=True)}
            want = _gathered_structure(_flat({k: c.sharded_state_dict(metadata=md) for k, c in zip(keys, chunks)}))
            if rank == 0:
                out[f"{case}:diff"] = _diff(want, _checkpoint_structure(info.path))
                out[f"{case}:counts"] = (len(want[0]), len(want[1]))
            state = {k: c.sharded_state_dict(metadata=md) for k, c in zip(keys, chunks)}
            not_loaded = []
            try:
                loaded = dist_checkpointing.load(state, info.path, strict=StrictHandling.RAISE_ALL)
                for k, c in zip(keys, chunks):
                    # TE's DotProductAttention has extra state that its sharded_state_dict leaves out, so a strict
                    # load_state_dict misses it: Megatron-LM retries ignoring "_extra_state" keys; so does this
                    res = c.load_state_dict(loaded[k], strict=False)
                    not_loaded += list(res.unexpected_keys) + [m for m in res.missing_keys
                                                               if not m.endswith(".core_attention._extra_state")]
            except Exception as e:  # noqa: BLE001  (reported by the test, with the rank)
                out[f"{case}:load_error:rank{rank}"] = f"{type(e).__name__}: {e}"[:2000]
                destroy_parallel()
                continue
            ref = torch.load(os.path.join(root, name, f"ref_rank{rank}.pt"))
            wrong, compared = [], 0
            for i, c in enumerate(chunks):
                for n, p in c.named_parameters():
                    r = ref.get(f"{i}:{_local_name(n)}")
                    compared += 1
                    if r is None or r.shape != p.shape or not torch.equal(r, p.detach()):
                        wrong.append(f"{i}:{n}")
            extra = []  # what every TE module received as _extra_state: TE's empty uint8 tensor, or nothing for a
            for c in chunks:  # core attention whose extra state is not saved (see above)
                for n, m in c.named_modules():
                    got = getattr(m, "loaded_extra_state", "n/a")
                    if got is None and isinstance(m, te_standin.DotProductAttention):
                        continue
                    if isinstance(m, te_standin._ExtraState) and not (
                            isinstance(got, torch.Tensor) and got.dtype == torch.uint8 and got.numel() == 0):
                        extra.append(f"{n}: {got!r}"[:200])
            out[f"{case}:rank{rank}"] = {"wrong": wrong, "compared": compared, "extra_state": extra,
                                         "not_loaded": not_loaded}
            if case in MLM_FIXTURES:  # the TE model, now holding the reference weights, saved as Megatron-LM saves
                _save_as_megatron_lm(rank, chunks, keys, md, config, read, os.path.join(root, name), te_standin)
            destroy_parallel()
    return out


# TE-model checkpoints saved by megatron-core's own dist_checkpointing.save with only what Megatron-LM stores (its
# args, no config of this package), for export: family/variant -> HF architecture
MLM_FIXTURES = {k: v for k, v in {"llama/sequential": "LlamaForCausalLM", "qwen3_moe/grouped": "Qwen3MoeForCausalLM",
                                  "deepseek_v3_mtp/sequential": "DeepseekV3ForCausalLM",
                                  "nemotron_h/sequential": "NemotronHForCausalLM",
                                  "nemotron_h_moe/sequential": "NemotronHForCausalLM"}.items()
                if k.split("/")[0] in CASES}
FP8_STATE = {"recipe": "DelayedScaling(fp8_format=HYBRID, amax_history_len=1024)", "scale_fwd": [448.0, 448.0, 1.0],
             "amax_history_fwd": [[0.25, 0.5, 1.0]], "extra_fp8_variables": {"num_gemms": 1}}


def _save_as_megatron_lm(rank, chunks, keys, md, config, layout, root, te_standin):
    """``mlm_te``: the TE model as Megatron-LM's ``save_checkpoint`` writes it (model keys, ``args`` as Megatron-LM
    stores them, checkpoint_version, iteration 5, tracker); ``mlm_fp8``: the same with every TE module's
    ``_extra_state`` holding (pickled) FP8 scaling state; ``mlm_fp8_weights`` (first fixture): one weight stored as
    float8_e4m3fn; ``mlm_bad_args``: args that say a wider FFN than the tensors hold."""
    import dataclasses
    import pickle

    import torch.distributed as dist
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    from megatron_bridge_ext.mcore.megatron_lm_args import megatron_lm_namespace

    parallel = {"tp": layout.get("tp", 1), "pp": layout.get("pp", 1), "ep": layout.get("ep", 1),
                "etp": layout.get("etp"), "world": dist.get_world_size()}
    variants = {"mlm_te": {}, "mlm_fp8": {"fp8": True}, "mlm_bad_args": {"ffn": 16}}
    if not os.path.exists(os.path.join(os.path.dirname(root), "mlm_fp8_weights")):
        variants["mlm_fp8_weights"] = {"fp8_weight": True}
    for variant, how in variants.items():
        te_standin.FP8_EXTRA_STATE = pickle.dumps(FP8_STATE) if how.get("fp8") else None
        args = megatron_lm_namespace(config, parallel, spec="te", iteration=5)
        if how.get("ffn"):
            args.ffn_hidden_size += how["ffn"]
        state = {k: c.sharded_state_dict(metadata=md) for k, c in zip(keys, chunks)}
        if how.get("fp8_weight"):
            for sd in state.values():  # every layer's shard of that tensor
                for n, v in list(sd.items()):
                    if isinstance(v, ShardedTensor) and v.key == "decoder.layers.self_attention.linear_proj.weight":
                        sd[n] = dataclasses.replace(v, data=v.data.to(torch.float8_e4m3fn), dtype=torch.float8_e4m3fn)
        state.update(args=args, checkpoint_version=3.0, iteration=5)
        path = os.path.join(root if variant != "mlm_fp8_weights" else os.path.dirname(root), variant)
        if rank == 0:
            os.makedirs(os.path.join(path, "iter_0000005"), exist_ok=True)
        dist.barrier()
        dist_checkpointing.save(state, os.path.join(path, "iter_0000005"))
        if rank == 0:
            with open(os.path.join(path, "latest_checkpointed_iteration.txt"), "w") as f:
                f.write("5")
        dist.barrier()
    te_standin.FP8_EXTRA_STATE = None


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("te_ckpt"))
    paths = _make_checkpoints(root)
    written = spawn_local(_write_worker, 2, (paths, root), timeout=900)
    checked = spawn_local(_te_worker, 2, (root,), timeout=900)
    out = dict(written[0])
    for r in checked:
        out.update(r)
    out["root"], out["paths"] = root, paths
    return out


def test_cases_cover_every_supported_architecture():
    """Every architecture ``AutoBridge`` converts has a case here (a new family must add one: the import proofs above
    claim every family), and every case is named with the architecture its checkpoint is (checked on load)."""
    from megatron_bridge_ext.auto_bridge import AutoBridge

    # the DSA, gated delta-net and hybrid cases below megatron-core 0.19: their refusal (below)
    cases = set(CASES) | set(DSA_CASES) | set(GDN_CASES) | set(HYBRID_CASES)
    assert sorted(ARCHITECTURES) == sorted(cases), sorted(set(ARCHITECTURES) ^ cases)
    covered, supported = set(ARCHITECTURES.values()), set(AutoBridge.list_supported_models())
    assert covered == supported, {"without a case": sorted(supported - covered),
                                  "not supported": sorted(covered - supported)}


@pytest.mark.skipif(HAS_DSA, reason="megatron-core >= 0.19 converts the DSA families (their CASES above)")
@pytest.mark.parametrize("name", list(DSA_CASES))
def test_dsa_families_refused_before_0_19(name, tmp_path):
    """Under megatron-core < 0.19 a DSA checkpoint is refused by name, with the installed version, before anything
    is built (the streamed import included)."""
    from megatron_bridge_ext.auto_bridge import AutoBridge
    from megatron_bridge_ext.mcore.versions import installed_megatron_core

    sys.path.insert(0, HERE)
    import test_deepseek_v32 as deepseek_v32
    import test_glm_moe_dsa as glm_moe_dsa

    path = str(tmp_path / "hf")
    {"deepseek_v32_mtp": deepseek_v32, "glm_moe_dsa": glm_moe_dsa}[name]._make_checkpoint(path, seed=4)
    with pytest.raises(ValueError, match=rf"{ARCHITECTURES[name]}: .*megatron-core >= 0\.19\.0; megatron-core "
                                         rf"{installed_megatron_core()} is installed"):
        AutoBridge.from_hf_pretrained(path).save_megatron_checkpoint(str(tmp_path / "out"), spec="te")
@pytest.mark.parametrize("name", list(GDN_CASES))
def test_gated_delta_net_families_need_megatron_core_0_19(name, tmp_path):
    """From megatron-core 0.19 the gated delta-net families are cases above; below it ``import`` (the streamed
    writer, no model) refuses them naming the architecture, the version they need and the installed one."""
    from megatron_bridge_ext.auto_bridge import AutoBridge

    if not unmet_megatron_core(MEGATRON_CORE_0_19):
        assert name in CASES
        return
    sys.path.insert(0, HERE)
    import test_qwen3_5 as qwen3_5
    import test_qwen3_next as qwen3_next

    path = str(tmp_path / "hf")
    if name == "qwen3_next":
        qwen3_next.make_checkpoint(path, seed=7)
    elif name.endswith("_vl"):
        import test_qwen3_5_vl as qwen3_5_vl

        qwen3_5_vl.make_checkpoint(path, "dense" if name == "qwen3_5_vl" else "moe", seed=7)
    else:
        qwen3_5.make_checkpoint(path, "dense" if name == "qwen3_5" else "moe", seed=7)
    with pytest.raises(ValueError, match=rf"{ARCHITECTURES[name]}: .*needs megatron-core >= 0\.19\.0; megatron-core "
                                         rf"{installed_megatron_core()} is installed"):
        AutoBridge.from_hf_pretrained(path).save_megatron_checkpoint(str(tmp_path / "out"), spec="te",
                                                                     dtype=torch.float32, layout=DENSE_W)
    assert not os.path.exists(tmp_path / "out" / "iter_0000000")


def test_local_spec_keeps_the_local_keys(results):
    assert results["local_spec_diff"] == []


CHECKS = [f"{n}/{v}{s}" for n, (_, _, g) in CASES.items() for v in (("sequential", "grouped") if g else ("sequential",))
          for s in ("", "/stream")]


@pytest.mark.parametrize("name", list(CASES))
def test_streamed_checkpoint_equals_the_model_paths(results, name):
    """``import`` without a model (two ranks, each converting a share of the tensors, small files) writes what the
    model path writes at the same recorded layout: tensor keys, global shapes, dtypes and bytes, every
    ``_extra_state`` object, the common state (Megatron-LM's args, this package's entry)."""
    assert results[f"{name}:stream_diff"] == [], "\n".join(results[f"{name}:stream_diff"][:20])


@pytest.mark.parametrize("case", CHECKS)
def test_checkpoint_has_exactly_the_te_models_keys(results, case):
    assert results[f"{case}:diff"] == [], "\n".join(results[f"{case}:diff"])
    tensors, objects = results[f"{case}:counts"]
    assert tensors > 0 and objects > 0


@pytest.mark.parametrize("case", CHECKS)
def test_te_model_loads_strictly_with_the_same_parameters(results, case):
    errors = {k: v for k, v in results.items() if k.startswith(f"{case}:load_error")}
    assert not errors, errors
    for rank in range(2):
        r = results[f"{case}:rank{rank}"]
        assert r["compared"] > 0
        assert r["wrong"] == [], r["wrong"][:10]
        assert r["extra_state"] == [], r["extra_state"][:10]
        assert r["not_loaded"] == [], r["not_loaded"][:10]


# --------------------------------------------------------------------------------------------------------------------
# checkpoints that Megatron-LM (a TE-spec model, megatron-core's own save) wrote: export and verify
# --------------------------------------------------------------------------------------------------------------------


def _assert_same_tensors(out_dir: str, src_dir: str) -> None:
    from megatron_bridge_ext.io import SafeTensorsSource

    with SafeTensorsSource(out_dir) as got, SafeTensorsSource(src_dir) as src:
        assert sorted(got.keys()) == sorted(src.keys())
        bad = [k for k in src.keys() if not torch.equal(got[k], src[k])]
        assert not bad, bad[:10]


@pytest.mark.parametrize("case", list(MLM_FIXTURES))
def test_export_of_a_megatron_lm_te_checkpoint_with_its_architecture(results, case, tmp_path):
    """No config of this package in the checkpoint: the config is rebuilt from its args for --hf-architecture; the
    export holds the source's tensors bit for bit and a config.json with the source's sizes."""
    import json

    from megatron_bridge_ext.cli.export import export_checkpoint
    from megatron_bridge_ext.launch import WorkerError

    name = case.split("/")[0]
    if name == "deepseek_v3_mtp":
        # Megatron-LM's args cannot say the latent norms' epsilon (its MLA uses the model's, 1e-5 here; HF fixes
        # 1e-6): refused, named; with the HF source it exports
        with pytest.raises((ValueError, WorkerError), match="latent_layernorm_epsilon=1e-05.*1e-06"):
            export_checkpoint(os.path.join(results["root"], name, "mlm_te"), str(tmp_path / "refused"),
                              hf_architecture=MLM_FIXTURES[case])
        res = export_checkpoint(os.path.join(results["root"], name, "mlm_te"), str(tmp_path / "out"),
                                hf_source=results["paths"][name])
        assert res["config_from"].startswith("--hf-source") and res["fp8_state"] == []
        _assert_same_tensors(str(tmp_path / "out"), results["paths"][name])
        return
    res = export_checkpoint(os.path.join(results["root"], name, "mlm_te"), str(tmp_path / "out"),
                            hf_architecture=MLM_FIXTURES[case])
    assert res["config_from"].startswith("the checkpoint's Megatron-LM args") and res["fp8_state"] == []
    _assert_same_tensors(str(tmp_path / "out"), results["paths"][name])
    if name.startswith("nemotron_h"):  # the hybrid args (hybrid_layer_pattern, mamba_*, MoE) said pattern and sizes
        import transformers

        got, src = (transformers.AutoConfig.from_pretrained(d) for d in (str(tmp_path / "out"),
                                                                          results["paths"][name]))
        # Megatron-LM has no argument for the scan chunk (its TE hybrid spec builds megatron's default, 128)
        for key in ("layers_block_type", "hidden_size", "num_attention_heads", "num_key_value_heads", "head_dim",
                    "intermediate_size", "vocab_size", "mamba_num_heads", "mamba_head_dim", "n_groups",
                    "ssm_state_size", "conv_kernel", "layer_norm_epsilon", "mlp_hidden_act", "n_routed_experts",
                    "num_experts_per_tok", "moe_intermediate_size", "moe_shared_expert_intermediate_size", "n_group",
                    "topk_group", "norm_topk_prob", "routed_scaling_factor"):
            assert getattr(got, key) == getattr(src, key), key
        return
    with open(tmp_path / "out" / "config.json") as f:
        got = json.load(f)
    with open(os.path.join(results["paths"][name], "config.json")) as f:
        src = json.load(f)
    for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "vocab_size",
                "intermediate_size", "rms_norm_eps"):
        assert got.get(key) == src.get(key), key


def test_export_of_a_megatron_lm_te_checkpoint_with_its_hf_source(results, tmp_path):
    from megatron_bridge_ext.cli.export import export_checkpoint

    case = next(iter(MLM_FIXTURES))
    name = case.split("/")[0]
    res = export_checkpoint(os.path.join(results["root"], name, "mlm_te"), str(tmp_path / "out"),
                            hf_source=results["paths"][name])
    assert res["config_from"] == f"--hf-source {results['paths'][name]}"
    _assert_same_tensors(str(tmp_path / "out"), results["paths"][name])


def test_fp8_scaling_state_changes_no_weight(results, tmp_path):
    """Every TE module carries FP8 scaling state: reported, never applied; the weights are exported as stored."""
    from megatron_bridge_ext.cli.export import export_checkpoint

    case = next(iter(MLM_FIXTURES))
    name = case.split("/")[0]
    res = export_checkpoint(os.path.join(results["root"], name, "mlm_fp8"), str(tmp_path / "out"),
                            hf_architecture=MLM_FIXTURES[case])
    assert "decoder.layers.self_attention.linear_qkv._extra_state" in res["fp8_state"], res["fp8_state"]
    _assert_same_tensors(str(tmp_path / "out"), results["paths"][name])


def test_weights_stored_as_fp8_are_refused_by_name(results, tmp_path):
    from megatron_bridge_ext.cli.export import export_checkpoint
    from megatron_bridge_ext.launch import WorkerError

    case = next(iter(MLM_FIXTURES))
    with pytest.raises((ValueError, WorkerError), match=r"stored quantized.*linear_proj\.weight \(torch\.float8_e4m3fn\)"):
        export_checkpoint(os.path.join(results["root"], "mlm_fp8_weights"), str(tmp_path / "out"),
                          hf_architecture=MLM_FIXTURES[case])
    assert not os.path.exists(tmp_path / "out")


def test_args_that_disagree_with_the_tensors_are_refused_naming_both(results, tmp_path):
    from megatron_bridge_ext.cli.export import export_checkpoint
    from megatron_bridge_ext.launch import WorkerError

    case = next(iter(MLM_FIXTURES))
    name = case.split("/")[0]
    with pytest.raises((ValueError, WorkerError), match=r"other shapes than the checkpoint's Megatron-LM args.*"
                                                        r"linear_fc2\.weight: checkpoint \[\d+, 64, \d+\]"):
        export_checkpoint(os.path.join(results["root"], name, "mlm_bad_args"), str(tmp_path / "out"),
                          hf_architecture=MLM_FIXTURES[case])
    with pytest.raises((ValueError, WorkerError), match=r"does not describe the model.*ffn_hidden_size: args \d+, "
                                                        r"source \d+"):
        export_checkpoint(os.path.join(results["root"], name, "mlm_bad_args"), str(tmp_path / "out2"),
                          hf_source=results["paths"][name])
    assert not os.path.exists(tmp_path / "out") and not os.path.exists(tmp_path / "out2")


def test_export_without_architecture_or_source_is_refused(results, tmp_path):
    from megatron_bridge_ext.cli.export import export_checkpoint
    from megatron_bridge_ext.launch import WorkerError

    name = next(iter(MLM_FIXTURES)).split("/")[0]
    with pytest.raises((ValueError, WorkerError), match="--hf-architecture NAME or give the HF source"):
        export_checkpoint(os.path.join(results["root"], name, "mlm_te"), str(tmp_path / "out"))


def test_verify_reads_a_megatron_lm_te_checkpoint(results):
    from megatron_bridge_ext.cli.verify import verify_checkpoint

    name = next(iter(MLM_FIXTURES)).split("/")[0]
    res = verify_checkpoint(results["paths"][name], os.path.join(results["root"], name, "mlm_te"), tp=2)
    assert res["ok"], res
    assert res["rows"]["compared"] > 0 and res["max_logit_diff"] <= 1e-4


def test_inspect_tells_the_spec_the_fp8_state_and_quantized_weights(results):
    from megatron_bridge_ext.cli.inspect import describe_megatron

    name = next(iter(MLM_FIXTURES)).split("/")[0]
    root = os.path.join(results["root"], name)
    ours = describe_megatron(os.path.join(root, "te"))
    assert ours["spec"] == "te" and ours["config_from"] == "the config stored in the checkpoint"
    assert ours["fp8_state"] == [] and ours["quantized"] == [] and ours["args"]["transformer_impl"] == \
        "transformer_engine"
    if name == "llama":
        assert describe_megatron(os.path.join(root, "local"))["spec"] == "local"
    fp8 = describe_megatron(os.path.join(root, "mlm_fp8"))
    assert fp8["spec"] == "te" and fp8["config_from"].startswith("Megatron-LM args") and fp8["fp8_state"]
    quantized = describe_megatron(os.path.join(results["root"], "mlm_fp8_weights"))
    assert quantized["quantized"] == ["decoder.layers.self_attention.linear_proj.weight"]
    assert quantized["dtypes"].get("float8_e4m3fn") == 1


@pytest.mark.parametrize("name", list(CASES))
def test_streamed_verify_and_inspect_of_each_family(results, name):
    """``verify --no-logits`` without a model (one process reading the streamed checkpoint bucket by bucket) passes
    against the source with every tensor compared; ``inspect`` plans every HF tensor of the family at the layout it
    was written at, onto a Megatron parameter each, and leaves no parameter without its HF tensors."""
    from megatron_bridge_ext.cli.inspect import plan
    from megatron_bridge_ext.cli.verify import verify_checkpoint
    from megatron_bridge_ext.io import SafeTensorsSource

    src = results["paths"][name]
    res = verify_checkpoint(src, os.path.join(results["root"], name, "stream"), logits=False)
    with SafeTensorsSource(src) as hf:
        keys = set(hf.keys())
    assert res["ok"] and res["streamed"] and res["rows"]["compared"] == len(keys), res
    p = plan(src, **CASES[name][0])
    carried = set(p["carried_hf"])  # the vision-language families' vision tower and MTP layer, kept unchanged
    assert carried == ({k for k in keys if k.startswith(("model.visual.", "mtp."))} if name.endswith("_vl") else set())
    assert {k for row in p["rows"] for k in row["hf"]} == keys - carried
    assert p["unmapped_hf"] == [] and p["unmapped_megatron"] == [] and p["missing_hf"] == [], p


@pytest.mark.parametrize("name", list(CASES))
def test_streamed_export_of_each_family_is_bit_exact(results, name, tmp_path):
    """``export`` without a model (one process: each bucket of parameters read from the DCP files, converted, written,
    dropped) of both checkpoints of a family: the streamed one and the model path's (written at TP2 or EP2, read here
    at TP1): the source's tensors bit for bit."""
    from megatron_bridge_ext.cli.export import export_checkpoint

    for source in ("stream", "te"):
        out = str(tmp_path / source)
        res = export_checkpoint(os.path.join(results["root"], name, source), out)
        assert res["streamed"] is True
        _assert_same_tensors(out, results["paths"][name])


MOE_CASES = ["mixtral", "qwen3_moe", "qwen2_moe", "gpt_oss", "deepseek_v3_mtp", "glm4_moe_lite_mtp", "llama4",
             "olmoe", "minimax_m2"]
MOE_CASES += [name for name in ("qwen3_next", "qwen3_5_moe", "qwen3_5_moe_vl") if name in CASES]
FUSED_EXPERTS = ("gpt_oss", "llama4")  # HF stores each layer's experts as [E, ...] tensors


@pytest.mark.parametrize("name", MOE_CASES)
def test_streamed_export_reads_experts_in_runs(results, name, tmp_path, monkeypatch):
    """With a small ``bucket_bytes`` the streamed export reads a layer's experts a run at a time (one expert per run
    here; fused HF expert tensors, GPT-OSS's and Llama 4's, need the whole layer and read it at once) and is still the
    source's tensors bit for bit."""
    from megatron_bridge_ext.cli.export import export_checkpoint
    from megatron_bridge_ext.engine.transport import ExpertsToLoad

    loads = []
    original = ExpertsToLoad.load

    def counted(self, lo=0, hi=None):
        values = original(self, lo, hi)
        loads.append((len(self.tensors), len(values)))
        return values

    monkeypatch.setattr(ExpertsToLoad, "load", counted)
    out = str(tmp_path / "hf")
    res = export_checkpoint(os.path.join(results["root"], name, "stream"), out, bucket_bytes=1)
    assert res["streamed"] is True
    _assert_same_tensors(out, results["paths"][name])
    assert loads, "no expert group was read"
    if name in FUSED_EXPERTS:  # fused [E, ...] HF tensors: every layer's experts at once
        assert all(n == total for total, n in loads), loads
    else:
        assert all(n == 1 for _, n in loads), loads  # one expert per run at this budget
    with pytest.raises(ValueError, match=r"bucket_bytes = 0, expected a positive number of bytes"):
        export_checkpoint(os.path.join(results["root"], name, "stream"), str(tmp_path / "x"), bucket_bytes=0)


def _refused_worker(rank: int, world: int, path: str, root: str) -> str:
    from megatron_bridge_ext.mcore.cpu_compat import apply_cpu_patches

    apply_cpu_patches()
    from megatron_bridge_ext.auto_bridge import AutoBridge

    try:
        AutoBridge.from_hf_pretrained(path).save_megatron_checkpoint(os.path.join(root, "te"), spec="te",
                                                                     dtype=torch.float32)
        return "written"
    except ValueError as e:
        return str(e)


@pytest.mark.skipif(HAS_HYBRID, reason="megatron-core >= 0.19 converts NemotronH (HYBRID_CASES above)")
@pytest.mark.parametrize("case", sorted(HYBRID_CASES))
def test_te_checkpoint_of_hybrid_is_refused_below_0_19(case, tmp_path):
    """``import --spec te`` of a hybrid architecture under a megatron-core without ``HybridModel``: the family is
    refused by name, naming the megatron-core it needs and the installed one; nothing written."""
    sys.path.insert(0, HERE)
    import test_nemotron_h as nemotron_h

    path = str(tmp_path / f"hf_{case}")
    nemotron_h._make_checkpoint(path, "hybrid", seed=7)
    got = spawn_local(_refused_worker, 1, (path, str(tmp_path)), timeout=300)[0]
    assert got.startswith(f"{ARCHITECTURES[case]}: the hybrid Mamba / attention model"), got
    assert "needs megatron-core >= 0.19.0; megatron-core 0.16" in got, got
    assert not os.path.exists(os.path.join(tmp_path, "te", "iter_0000000"))
