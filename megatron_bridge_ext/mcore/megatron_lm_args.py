"""Megatron-LM's ``args`` namespace, both ways: the complete namespace a checkpoint of this package carries (what
Megatron-LM itself stores: every argument ``megatron.training.arguments`` defines, the model's values where the model
decides, Megatron-LM's defaults elsewhere), and the model config read back from the namespace of a checkpoint that
Megatron-LM trained (no config of this package in it).

Where the defaults come from: ``megatron.training.arguments`` itself when it imports (the Megatron-LM installed next to
megatron-core: its parser, parsed with no flags), else a table generated from that parser for the Megatron-LM release
of the installed megatron-core (:mod:`.megatron_lm_arg_defaults`: ``core_v0.16.1``'s ``megatron/training``, the
``megatron/training`` the megatron-core 0.19.2 wheel ships). megatron-core 0.16.1's wheel has no
``megatron.training``, and 0.19.2's does not import on Python 3.11 (it uses ``typing.override``); so the package
never depends on it, and the table is regenerated, and checked against the live parser where it imports
(``tests/mcore/test_megatron_lm_args.py``), with::

    python -m megatron_bridge_ext.mcore.megatron_lm_args --write-table

Which values the model decides: the arguments Megatron-LM copies into its ``TransformerConfig`` by name
(``core_transformer_config_from_args``) for the architecture (:data:`ARCH_FIELDS`), plus those it derives
(:func:`model_args`: ``num_experts``, ``swiglu`` / ``quick_geglu``, ``group_query_attention``,
``untie_embeddings_and_output_weights``, ``max_position_embeddings``, ``use_rope_scaling``, the vocabulary and its
padding, the dtype, the parallel sizes, ``transformer_impl``; for a hybrid model, ``hybrid_layer_pattern``).

Hybrid models (NemotronH): Megatron-LM builds a ``HybridModel`` when ``args.hybrid_layer_pattern`` is set
(``megatron.training.utils.is_hybrid_model``); ``core_transformer_config_from_args`` then sets ``is_hybrid_model`` and
copies the ``mamba_*`` sizes. Megatron-LM has no argument for the Mamba convolution width or scan chunk: its TE
hybrid spec builds megatron's ``MambaMixer`` defaults (``d_conv`` 4, ``chunk_size`` 128), which a config read back
from args gets (``mamba_conv_kernel`` / ``mamba_chunk_size`` of the family's defaults).
"""

from __future__ import annotations

import argparse
import enum
import importlib
import sys
from typing import Any, Callable, Dict, Mapping, Optional, Tuple

__all__ = [
    "ARCH_FIELDS",
    "HYBRID_PATTERN_ARGS",
    "megatron_lm_defaults",
    "model_args",
    "megatron_lm_namespace",
    "config_fields_from_args",
]

#: arguments that Megatron-LM copies into the model's TransformerConfig under the same name and that describe the
#: architecture (numerics such as dropout included: a run keeps them)
ARCH_FIELDS = (
    "num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups", "kv_channels",
    "seq_length", "attention_dropout", "hidden_dropout", "init_method_std", "normalization", "layernorm_epsilon",
    "layernorm_zero_centered_gamma", "add_bias_linear", "add_qkv_bias", "qk_layernorm", "position_embedding_type",
    "rotary_base", "rotary_percent", "rotary_interleaved", "rope_scaling_factor", "rope_type",
    "rotary_scaling_factor", "mscale", "mscale_all_dim", "softmax_type", "window_size", "window_attn_skip_freq",
    "glu_linear_offset", "activation_func_clamp_value", "attention_output_gate", "multi_latent_attention",
    "q_lora_rank", "kv_lora_rank", "qk_head_dim", "qk_pos_emb_head_dim", "v_head_dim", "mtp_num_layers",
    "moe_ffn_hidden_size", "moe_router_topk", "moe_layer_freq", "moe_shared_expert_intermediate_size",
    "moe_shared_expert_gate", "moe_router_score_function", "moe_router_pre_softmax",
    "moe_router_topk_scaling_factor", "moe_router_enable_expert_bias", "moe_router_num_groups",
    "moe_router_group_topk", "moe_router_dtype", "moe_router_load_balancing_type", "moe_aux_loss_coeff",
    "moe_grouped_gemm", "moe_token_dispatcher_type", "moe_apply_probs_on_input", "yarn_beta_fast", "yarn_beta_slow",
    "yarn_original_max_position_embeddings", "yarn_correction_range_round_to_int", "make_vocab_size_divisible_by",
    "qk_l2_norm", "no_rope_freq",
    # DeepSeek sparse attention (megatron-core >= 0.19; --experimental-attention-variant dsa)
    "dsa_indexer_n_heads", "dsa_indexer_head_dim", "dsa_indexer_topk",
    "dsa_indexer_topk_freq", "dsa_indexer_skip_topk_offset", "dsa_indexer_rope_interleaved",
    "dsa_indexer_rotate_activation", "dsa_indexer_scoring_relu", "dsa_indexer_k_norm_epsilon",
    "dsa_indexer_k_norm_fp32",
    # gated delta-net (megatron-core >= 0.19; Megatron-LM's --experimental-attention-variant, --linear-*)
    "experimental_attention_variant", "linear_attention_freq", "linear_conv_kernel_dim", "linear_key_head_dim",
    "linear_value_head_dim", "linear_num_key_heads", "linear_num_value_heads",
    # hybrid Mamba models (megatron-core >= 0.19 HybridModel; Megatron-LM's load_args_from_checkpoint reads the four
    # sizes, is_hybrid_model is TransformerConfig's)
    "is_hybrid_model", "mamba_state_dim", "mamba_head_dim", "mamba_num_groups", "mamba_num_heads",
)
#: the Megatron-LM arguments naming a hybrid model's layer pattern: ``--hybrid-layer-pattern`` (megatron-core 0.19's
#: Megatron-LM, "the sole indicator that a hybrid model is being run"), and its deprecated older name, which that
#: Megatron-LM forwards to it (``validate_args``, ``load_args_from_checkpoint``)
HYBRID_PATTERN_ARGS = ("hybrid_layer_pattern", "hybrid_override_pattern")

_PLAIN = (bool, int, float, str, type(None))
_TABLE_HEADER = '''"""Generated: the default of every Megatron-LM argument (``megatron.training.arguments.add_megatron_arguments``
parsed with no flags), per megatron-core ``major.minor``: "0.16" from Megatron-LM ``core_v0.16.1``'s
``megatron/training``, "0.19" from the ``megatron/training`` of the megatron-core 0.19.2 wheel. Do not edit; see
:mod:`megatron_bridge_ext.mcore.megatron_lm_args` for how to regenerate.
"""

from megatron_bridge_ext.mcore.megatron_lm_args import _Enum

__all__ = ["DEFAULTS"]
'''


class _Enum:
    """An enum default in the generated table (``megatron.core`` enum class path, member name)."""

    def __init__(self, cls: str, name: str) -> None:
        self.cls, self.name = cls, name

    def __repr__(self) -> str:
        return f"_Enum({self.cls!r}, {self.name!r})"

    def value(self) -> Any:
        module, _, cls = self.cls.rpartition(".")
        try:
            return getattr(getattr(importlib.import_module(module), cls), self.name)
        except (ImportError, AttributeError):
            return self.name  # the enum of another megatron-core: its member name


def _live_defaults() -> Optional[Dict[str, Any]]:
    try:
        from megatron.training.arguments import add_megatron_arguments
    except Exception:  # noqa: BLE001  (absent from 0.16.1; needs Python >= 3.12 in 0.19: any failure means "not here")
        return None
    parser = add_megatron_arguments(argparse.ArgumentParser(allow_abbrev=False))
    return dict(vars(parser.parse_args([])))


def megatron_lm_defaults() -> Tuple[Dict[str, Any], str]:
    """Every Megatron-LM argument with its default, and where they came from (``"megatron.training"`` or
    ``"table core_vX.Y"``): the live parser when it imports, else the table of the newest Megatron-LM release not
    newer than the installed megatron-core (the oldest table for an older one)."""
    live = _live_defaults()
    if live is not None:
        return live, "megatron.training"
    from megatron_bridge_ext.mcore.megatron_lm_arg_defaults import DEFAULTS

    from megatron_bridge_ext.mcore.versions import release_for_installed

    chosen = release_for_installed(DEFAULTS)
    table = {k: (v.value() if isinstance(v, _Enum) else list(v) if isinstance(v, list) else v)
             for k, v in DEFAULTS[chosen].items()}
    return table, f"table core_v{chosen}"


def _activation_name(config: Any) -> str:
    return getattr(getattr(config, "activation_func", None), "__name__", "")


def model_args(config: Any, parallel: Mapping[str, Any], *, spec: str = "te",
               tokenizer: Optional[Mapping[str, Any]] = None) -> Dict[str, Any]:
    """The arguments the model decides, as Megatron-LM would store them for a run of this model.

    Args:
        config: the model's ``GPTConfig``.
        parallel: the layout it was written at (``tp``, ``pp``, ``vpp``, ``ep``, ``etp``, ``world``).
        spec: ``"te"`` or ``"local"``: ``transformer_impl`` ``transformer_engine`` or ``local``.
        tokenizer: ``tokenizer_type`` / ``tokenizer_model`` (e.g. the side files kept beside the checkpoint).
    """
    import torch

    from megatron_bridge_ext.mcore.config import default_vocab_divisor, padded_vocab_size

    out: Dict[str, Any] = {}
    for name in ARCH_FIELDS:
        value = getattr(config, name, None)
        if isinstance(value, tuple):
            value = list(value)
        if isinstance(value, _PLAIN) or (isinstance(value, list) and all(isinstance(x, _PLAIN) for x in value)):
            out[name] = value
    heads = config.num_attention_heads
    groups = config.num_query_groups or heads
    vocab = config.vocab_size
    tp, pp = int(parallel.get("tp", 1)), int(parallel.get("pp", 1))
    world = int(parallel.get("world", tp * pp))
    act = _activation_name(config)
    divisor = config.make_vocab_size_divisible_by or (default_vocab_divisor(vocab) if vocab else 128)
    out.update(
        num_query_groups=groups, group_query_attention=groups != heads,
        num_experts=config.num_moe_experts,
        swiglu=bool(config.gated_linear_unit and act == "silu"),
        quick_geglu=bool(config.gated_linear_unit and act == "quick_gelu"),
        squared_relu=act == "squared_relu",
        untie_embeddings_and_output_weights=not config.share_embeddings_and_output_weights,
        max_position_embeddings=config.seq_length,
        use_rope_scaling=bool(config.rope_scaling),
        rotary_seq_len_interpolation_factor=config.seq_len_interpolation_factor,
        vocab_size=vocab, make_vocab_size_divisible_by=divisor,
        padded_vocab_size=padded_vocab_size(vocab, tp, config.make_vocab_size_divisible_by) if vocab else None,
        params_dtype=config.params_dtype, bf16=config.params_dtype == torch.bfloat16,
        fp16=config.params_dtype == torch.float16,
        tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
        virtual_pipeline_model_parallel_size=parallel.get("vpp"),
        expert_model_parallel_size=int(parallel.get("ep", 1)),
        expert_tensor_parallel_size=parallel.get("etp") or tp,
        world_size=world, data_parallel_size=world // (tp * pp),
        transformer_impl="transformer_engine" if spec == "te" else "local",
        ckpt_format="torch_dist", use_dist_ckpt=True, use_mcore_models=True,
    )
    if not config.add_bias_linear:  # as Megatron-LM's validate_args stores it (no bias: no bias-GeLU fusion)
        out["bias_gelu_fusion"] = False
    pattern = getattr(config, "hybrid_layer_pattern", None)
    if pattern:
        out.update(is_hybrid_model=True, hybrid_layer_pattern=pattern)
    if tokenizer:
        out.update(tokenizer)
    return out


def megatron_lm_namespace(config: Any, parallel: Mapping[str, Any], *, iteration: int = 0, spec: str = "te",
                          tokenizer: Optional[Mapping[str, Any]] = None) -> argparse.Namespace:
    """The complete ``args`` a Megatron-LM checkpoint of this model carries: :func:`megatron_lm_defaults`, then
    :func:`model_args`, then what ``save_checkpoint`` would have set for a checkpoint without optimizer or RNG state
    at ``iteration`` (``no_save_optim`` / ``no_save_rng``, counters at 0)."""
    args, _ = megatron_lm_defaults()
    model = model_args(config, parallel, spec=spec, tokenizer=tokenizer)
    if "hybrid_layer_pattern" in model and "hybrid_layer_pattern" not in args:  # an older Megatron-LM's name
        model["hybrid_override_pattern"] = model.pop("hybrid_layer_pattern")
    args.update(model)
    args.update(no_save_optim=True, no_save_rng=True, iteration=iteration, consumed_train_samples=0,
                skipped_train_samples=0, consumed_valid_samples=0, rank=0)
    return argparse.Namespace(**args)


def config_fields_from_args(args: Any) -> Dict[str, Any]:
    """``GPTConfig`` fields from a Megatron-LM ``args`` namespace (the inverse of :func:`model_args`, as Megatron-LM's
    ``core_transformer_config_from_args`` reads them): only the arguments the namespace has and that are not None.

    Raises:
        ValueError: an activation this package cannot name, or no layer / hidden / head count.
    """
    import torch
    import torch.nn.functional as F

    def get(name: str, default: Any = None) -> Any:
        return getattr(args, name, default)

    missing = [n for n in ("num_layers", "hidden_size", "num_attention_heads") if get(n) is None]
    if missing:
        raise ValueError(f"the checkpoint's args lack {missing}: not a Megatron-LM GPT checkpoint")
    out: Dict[str, Any] = {}
    for name in ARCH_FIELDS:
        value = get(name)
        if value is not None:
            out[name] = tuple(value) if isinstance(value, list) and name == "window_size" else value
    if not get("group_query_attention", False):
        out["num_query_groups"] = out["num_attention_heads"]
    if get("num_experts"):
        out["num_moe_experts"] = get("num_experts")
    pattern = next((get(n) for n in HYBRID_PATTERN_ARGS if get(n)), None)
    if pattern:  # a hybrid model (Megatron-LM's is_hybrid_model(args)); the Mamba sizes are in ARCH_FIELDS
        out.update(hybrid_layer_pattern=pattern, is_hybrid_model=True)
    else:
        out = {k: v for k, v in out.items() if not k.startswith("mamba_") and k != "is_hybrid_model"}
    if get("multi_latent_attention", False):  # Megatron-LM's latent q / kv norms use the model's epsilon
        out["latent_layernorm_epsilon"] = get("layernorm_epsilon")
    activation: Callable = F.gelu
    if get("swiglu", False):
        out["gated_linear_unit"], activation = True, F.silu
    elif get("quick_geglu", False):
        from megatron.core.fusions.fused_bias_geglu import quick_gelu

        out["gated_linear_unit"], activation = True, quick_gelu
    elif get("squared_relu", False):
        from megatron.core.activations import squared_relu

        activation = squared_relu
    out["activation_func"] = activation
    out["share_embeddings_and_output_weights"] = not get("untie_embeddings_and_output_weights", False)
    if get("max_position_embeddings") is not None:
        out["seq_length"] = get("max_position_embeddings")
    out["rope_scaling"] = bool(get("use_rope_scaling", False))
    if get("rotary_seq_len_interpolation_factor") is not None:
        out["seq_len_interpolation_factor"] = get("rotary_seq_len_interpolation_factor")
    dtype = get("params_dtype")
    if not isinstance(dtype, torch.dtype):
        dtype = torch.bfloat16 if get("bf16", False) else torch.float16 if get("fp16", False) else torch.float32
    out["params_dtype"] = dtype
    return out


def _write_table(path: Optional[str] = None) -> str:
    """Add (or replace) the live parser's defaults in the generated table, under the installed megatron-core's
    ``major.minor``; returns the path written."""
    import os
    import pprint

    live = _live_defaults()
    if live is None:
        raise RuntimeError("megatron.training.arguments does not import here: put a Megatron-LM checkout of the "
                           "release matching the installed megatron-core on PYTHONPATH")
    from megatron_bridge_ext.mcore import megatron_lm_arg_defaults as mod

    from megatron_bridge_ext.mcore.versions import megatron_core_minor

    version = megatron_core_minor()
    tables = dict(mod.DEFAULTS)

    def encode(v: Any) -> Any:
        return _Enum(f"{type(v).__module__}.{type(v).__name__}", v.name) if isinstance(v, enum.Enum) else v

    tables[version] = {k: encode(v) for k, v in sorted(live.items())}
    path = path or mod.__file__
    lines = [_TABLE_HEADER, "DEFAULTS = {"]
    for v in sorted(tables, key=lambda x: tuple(int(p) for p in x.split("."))):
        lines.append(f"    {v!r}: {{")
        for k, val in sorted(tables[v].items()):
            lines.append(f"        {k!r}: {pprint.saferepr(val)},")
        lines.append("    },")
    lines.append("}")
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    os.replace(tmp, path)
    return path


if __name__ == "__main__":  # python -m megatron_bridge_ext.mcore.megatron_lm_args --write-table
    if sys.argv[1:] != ["--write-table"]:
        raise SystemExit("usage: python -m megatron_bridge_ext.mcore.megatron_lm_args --write-table")
    from megatron_bridge_ext.mcore import megatron_lm_args as _module  # the importable module's _Enum, not __main__'s

    print(_module._write_table())
