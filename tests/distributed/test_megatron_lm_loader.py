"""Megatron-LM's own loader reads ``import`` checkpoints: a model built the way ``pretrain_gpt.py`` builds it (args from
``megatron.training.arguments.parse_args`` with the model flags of Megatron-LM's example scripts, config from
``core_transformer_config_from_args``, the layer spec ``gpt_builders.gpt_builder`` picks), filled by
``megatron.training.checkpointing.load_checkpoint`` from a checkpoint written by ``import`` at another layout; its
logits must equal the transformers model's (fp32, ``MEGATRON_VS_HF_ATOL``).

- Llama (``examples/llama/train_llama3_8b_h100_fp8.sh``'s model flags, sizes of the tiny model; its
  ``--apply-layernorm-1p`` left out: it would make another model), written at TP2 with the default ``--spec te``,
  loaded at TP1 as a fresh run (``check_checkpoint_args`` runs: no ``--finetune``) and at PP2 with ``--finetune``,
  both with the example's mock-data ``NullTokenizer``, and at TP2 with the ``HuggingFaceTokenizer`` that ``import``
  kept beside the checkpoint (``--tokenizer-model`` as the stored args name it);
- Mixtral (``examples/mixtral/train_mixtral_8x7b_distributed.sh``'s model flags), written at EP2 with ``--spec
  local`` (this CPU run builds the local spec; its MoE layers name their pre-MLP norm as the local spec does), loaded
  at TP2 as a fresh run without ``--no-position-embedding`` and at TP1 with it under ``--finetune``.

``megatron.training`` ships only with megatron-core >= 0.19 (and imports only on Python >= 3.12, for
``typing.override``: the worker adds it from ``typing_extensions`` on 3.11). Under an older megatron-core the
checkpoints are written here and read by the first interpreter in ``MBE_MCORE_PYTHONS`` that has it (so the
0.16.1-written checkpoint is read by Megatron-LM 0.19.2); the test is skipped, with the reason, where none has.

CPU adaptations in the worker, none of them touching what is loaded: ``--transformer-impl local
--use-cpu-initialization --no-rope-fusion --no-persist-layer-norm --no-gradient-accumulation-fusion`` and, for the MoE
model, ``--moe-token-dispatcher-type allgather`` instead of the example's ``alltoall`` (the fused CUDA paths and
streams these select do not exist on a CPU), ``get_device_arch_version`` answers 9 (no device to ask), and a tensor
that ``read_metadata`` asks for on ``cuda`` (the iteration it all-reduces) is made on the CPU.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
LLAMA = dict(vocab_size=97, hidden_size=64, intermediate_size=160, num_hidden_layers=4, num_attention_heads=4,
             num_key_value_heads=2, head_dim=16, max_position_embeddings=128, rms_norm_eps=1e-5,
             tie_word_embeddings=False, rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
MIXTRAL = dict(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, head_dim=16, max_position_embeddings=64, num_local_experts=4,
               num_experts_per_tok=2, tie_word_embeddings=False, rms_norm_eps=1e-5, rope_theta=1000000.0)

# the model flags of Megatron-LM's example scripts, with the tiny models' sizes
LLAMA_FLAGS = [
    "--num-layers", "4", "--hidden-size", "64", "--ffn-hidden-size", "160", "--num-attention-heads", "4",
    "--group-query-attention", "--num-query-groups", "2", "--kv-channels", "16", "--seq-length", "128",
    "--max-position-embeddings", "128", "--position-embedding-type", "rope", "--rotary-base", "10000",
    "--rotary-percent", "1.0", "--attention-dropout", "0.0", "--hidden-dropout", "0.0", "--swiglu",
    "--normalization", "RMSNorm", "--norm-epsilon", "1e-5", "--init-method-std", "0.0134",
    "--untie-embeddings-and-output-weights", "--disable-bias-linear",
]
MIXTRAL_FLAGS = [
    "--disable-bias-linear", "--seq-length", "64", "--max-position-embeddings", "64", "--num-layers", "2",
    "--hidden-size", "64", "--ffn-hidden-size", "96", "--num-attention-heads", "4", "--init-method-std", "0.01",
    "--attention-dropout", "0.0", "--hidden-dropout", "0.0", "--normalization", "RMSNorm", "--norm-epsilon", "1e-5",
    "--position-embedding-type", "rope", "--swiglu", "--untie-embeddings-and-output-weights",
    "--group-query-attention", "--num-query-groups", "2", "--no-masked-softmax-fusion", "--rotary-base", "1000000",
    "--num-experts", "4", "--moe-router-topk", "2", "--moe-router-load-balancing-type", "aux_loss",
    "--moe-aux-loss-coeff", "1e-2",
]
TRAINING = ["--micro-batch-size", "1", "--global-batch-size", "2", "--train-iters", "10", "--lr", "1e-4"]
CPU = ["--transformer-impl", "local", "--use-cpu-initialization", "--no-rope-fusion", "--no-persist-layer-norm",
       "--no-gradient-accumulation-fusion"]
CPU_MOE = ["--moe-token-dispatcher-type", "allgather"]  # the example's alltoall makes CUDA streams
# name -> (checkpoint, vocabulary, flags, tp, pp)
RUNS = {
    "llama_fresh_tp1": ("llama", 97, LLAMA_FLAGS, 1, 1),
    "llama_finetune_pp2": ("llama", 97, LLAMA_FLAGS + ["--finetune"], 1, 2),
    # the tokenizer import kept beside the checkpoint, as the stored args name it
    "llama_hf_tokenizer_fresh_tp2": ("llama", 97, LLAMA_FLAGS + ["--tokenizer-type", "HuggingFaceTokenizer",
                                                                 "--tokenizer-model", "{kept}"], 2, 1),
    "mixtral_fresh_tp2": ("mixtral", 96, MIXTRAL_FLAGS + CPU_MOE, 2, 1),
    "mixtral_finetune_no_position_embedding": ("mixtral", 96, MIXTRAL_FLAGS + CPU_MOE + [
        "--finetune", "--no-position-embedding"], 1, 1),
}


# --------------------------------------------------------------------------------------------------------------------
# the Megatron-LM side (run by an interpreter whose megatron-core ships megatron.training)
# --------------------------------------------------------------------------------------------------------------------


def _cpu_adaptations() -> None:
    import typing

    if not hasattr(typing, "override"):  # megatron.training (0.19) imports typing.override (Python >= 3.12)
        import typing_extensions

        typing.override = typing_extensions.override
    from megatron_bridge_ext.mcore.cpu_compat import apply_cpu_patches

    apply_cpu_patches()
    original = torch.tensor

    def tensor(*args, **kwargs):  # read_metadata all-reduces the iteration in a tensor made on "cuda"
        if str(kwargs.get("device", "")).startswith("cuda"):
            kwargs["device"] = "cpu"
        return original(*args, **kwargs)

    torch.tensor = tensor
    import megatron.training.arguments as arguments

    arguments.get_device_arch_version = lambda: 9  # validate_args asks the device for TP > 1
    os.environ["CUDA_DEVICE_MAX_CONNECTIONS"] = "1"


def _load_and_run(rank: int, world: int, ckpt: str, vocab: int, flags: list, tp: int, pp: int, tokens):
    """One run: args as ``pretrain_gpt.py`` parses them, the model ``gpt_builder`` builds, Megatron-LM's
    ``load_checkpoint``, the logits."""
    os.environ["RANK"], os.environ["WORLD_SIZE"] = str(rank), str(world)
    kept = os.path.join(ckpt, "iter_0000000", "hf")
    flags = [f.replace("{kept}", kept) for f in flags]
    tokenizer = [] if "--tokenizer-type" in flags else ["--tokenizer-type", "NullTokenizer", "--vocab-size", str(vocab)]
    sys.argv = ["pretrain_gpt.py", *flags, *TRAINING, *CPU, *tokenizer, "--load", ckpt,
                "--tensor-model-parallel-size", str(tp), "--pipeline-model-parallel-size", str(pp)]
    from megatron.core import parallel_state
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec, get_gpt_layer_local_spec
    from megatron.training.arguments import core_transformer_config_from_args, parse_args, validate_args
    from megatron.training.checkpointing import load_checkpoint
    from megatron.training.global_vars import set_global_variables, unset_global_variables

    from megatron_bridge_ext.mcore.forward import megatron_logits
    from megatron_bridge_ext.mcore.model_builder import destroy_parallel, init_parallel

    args = parse_args()
    validate_args(args, {})
    unset_global_variables()  # the previous run's
    set_global_variables(args)
    init_parallel(tp=tp, pp=pp)
    try:
        config = core_transformer_config_from_args(args)
        if args.num_experts:  # gpt_builders.gpt_builder: a block spec for MoE models, a layer spec otherwise
            spec = get_gpt_decoder_block_spec(config, use_transformer_engine=False, normalization=args.normalization)
        else:
            spec = get_gpt_layer_local_spec(config.num_moe_experts, config.moe_grouped_gemm, config.qk_layernorm,
                                            config.multi_latent_attention, normalization=config.normalization)
        model = GPTModel(config=config, transformer_layer_spec=spec, vocab_size=args.padded_vocab_size,
                         max_sequence_length=args.max_position_embeddings,
                         pre_process=parallel_state.is_pipeline_first_stage(),
                         post_process=parallel_state.is_pipeline_last_stage(), parallel_output=True,
                         share_embeddings_and_output_weights=not args.untie_embeddings_and_output_weights,
                         position_embedding_type=args.position_embedding_type, rotary_percent=args.rotary_percent,
                         rotary_base=args.rotary_base, rope_scaling=args.use_rope_scaling)
        for p in model.parameters():  # poison: every value must come from the checkpoint
            p.data.fill_(float("nan"))
        iteration, _ = load_checkpoint([model], None, None, strict=True)
        model.eval()
        return iteration, megatron_logits([model], tokens, vocab_size=vocab)
    finally:
        destroy_parallel()


def _mlm_worker(rank: int, world: int, root: str) -> dict:
    _cpu_adaptations()
    tokens = torch.load(os.path.join(root, "tokens.pt"))
    out = {}
    for name, (ckpt, vocab, flags, tp, pp) in RUNS.items():
        try:
            iteration, logits = _load_and_run(rank, world, os.path.join(root, ckpt), vocab, flags, tp, pp,
                                              tokens[ckpt])
            out[name] = {"iteration": iteration, "logits": logits}
        except Exception as e:  # noqa: BLE001  (reported by the test; every rank fails the same run alike)
            out[name] = {"error": f"{type(e).__name__}: {e}"[-4000:]}
    return out


def _run_mlm(root: str) -> None:
    """Every run of :data:`RUNS` in one local world of 2 ranks; rank 0's results saved to ``root/<run>.pt``."""
    from megatron_bridge_ext.launch import spawn_local

    res = spawn_local(_mlm_worker, 2, (root,), timeout=1200)[0]
    for name, r in res.items():
        torch.save(r, os.path.join(root, f"{name}.pt"))


# --------------------------------------------------------------------------------------------------------------------
# the test side
# --------------------------------------------------------------------------------------------------------------------


def _has_training(python: str) -> bool:
    code = "import importlib.util, sys; sys.exit(0 if importlib.util.find_spec('megatron.training') else 1)"
    return subprocess.run([python, "-c", code], capture_output=True, timeout=120).returncode == 0


def _mlm_python() -> str:
    candidates = [sys.executable] + os.environ.get("MBE_MCORE_PYTHONS", "").split()
    for python in candidates:
        if python and os.path.exists(python) and _has_training(python):
            return python
    pytest.skip("no interpreter with megatron.training (megatron-core >= 0.19): this one lacks it and "
                "MBE_MCORE_PYTHONS names none")


def _word_level_tokenizer(vocab_size: int):
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i + 3 for i in range(vocab_size - 3)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                                unk_token="<unk>")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    pytest.importorskip("megatron.core")
    pytest.importorskip("transformers")
    from megatron_bridge_ext.cli.import_hf import import_checkpoint
    from megatron_bridge_ext.testing.parity import hf_logits
    from megatron_bridge_ext.testing.tiny_models import make_tiny_checkpoint

    python = _mlm_python()
    root = str(tmp_path_factory.mktemp("mlm_loader"))
    hf, tokens = {}, {}
    for name, cls, cfg, seed in (("llama", "Llama", LLAMA, 0), ("mixtral", "Mixtral", MIXTRAL, 1)):
        hf[name] = os.path.join(root, f"hf_{name}")
        make_tiny_checkpoint(hf[name], cls, cfg, seed)  # random norms, the rest as transformers initialises it
        if name == "llama":  # a tokenizer of the model's 97 ids, which import keeps beside the checkpoint
            _word_level_tokenizer(cfg["vocab_size"]).save_pretrained(hf[name])
        tokens[name] = torch.randint(0, cfg["vocab_size"], (2, 12), generator=torch.Generator().manual_seed(seed))
    torch.save(tokens, os.path.join(root, "tokens.pt"))
    import_checkpoint(hf["llama"], os.path.join(root, "llama"), tp=2)
    import_checkpoint(hf["mixtral"], os.path.join(root, "mixtral"), ep=2, spec="local")
    env = dict(os.environ, GLOO_SOCKET_IFNAME=os.environ.get("GLOO_SOCKET_IFNAME", "lo"))
    proc = subprocess.run([python, os.path.abspath(__file__), root], capture_output=True, text=True, env=env,
                          timeout=1800)
    assert proc.returncode == 0, proc.stderr[-4000:]
    expected = {name: hf_logits(hf[name], tokens[name]) for name in ("llama", "mixtral")}
    return root, expected, python


@pytest.mark.parametrize("run", list(RUNS))
def test_megatron_lm_load_checkpoint_gives_the_hf_logits(runs, run):
    from megatron_bridge_ext.testing.tolerances import MEGATRON_VS_HF_ATOL, max_abs_diff

    root, expected, python = runs
    got = torch.load(os.path.join(root, f"{run}.pt"))
    assert "error" not in got, got.get("error")
    assert got["iteration"] == 0
    ckpt = RUNS[run][0]
    diff = max_abs_diff(got["logits"], expected[ckpt])
    assert diff <= MEGATRON_VS_HF_ATOL, (run, python, diff)


def test_stored_args_are_a_complete_megatron_lm_namespace(runs):
    """Every argument the Megatron-LM parser defines is in the stored args (read back by this interpreter)."""
    from megatron_bridge_ext.io.megatron_checkpoint import read_checkpoint_info
    from megatron_bridge_ext.mcore.megatron_lm_args import megatron_lm_defaults

    root, _, _ = runs
    defaults, _ = megatron_lm_defaults()
    for ckpt, impl in (("llama", "transformer_engine"), ("mixtral", "local")):
        args = vars(read_checkpoint_info(os.path.join(root, ckpt)).args)
        assert not set(defaults) - set(args), sorted(set(defaults) - set(args))[:20]
        assert args["transformer_impl"] == impl
        assert args["tokenizer_type"] == ("HuggingFaceTokenizer" if ckpt == "llama" else None)
        assert args["add_position_embedding"] is True and args["data_parallel_random_init"] is False


if __name__ == "__main__":  # the Megatron-LM side, in an interpreter that has megatron.training
    _run_mlm(sys.argv[1])
    print(json.dumps({"done": sys.argv[1]}))
