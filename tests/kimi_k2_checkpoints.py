"""Kimi-K2's released ``config.json`` and tiny checkpoints written in its form, for the tests.

Kimi-K2 (``moonshotai/Kimi-K2-Instruct`` / ``-Base``) is DeepSeek-V3's architecture at 384 routed experts: its
config.json names ``architectures: ["DeepseekV3ForCausalLM"]`` but ``model_type: "kimi_k2"`` (a type transformers
has no class for) with an ``auto_map`` into Python files shipped beside the weights, the rope settings in the legacy
``rope_scaling`` form (YaRN, ``"type"``), DeepSeek's original routing fields (``topk_method``, ``scoring_func``) and
the weights in FP8 blocks of 128 x 128 (``quantization_config``).

:data:`RELEASED` is that config.json (the fields the conversion reads, as released). :func:`write_kimi_checkpoint`
writes a tiny transformers DeepSeek-V3 model whose config.json is then rewritten into the release's form (the same
keys and kinds of values, small sizes), and the release's ``configuration_deepseek.py`` / ``modeling_deepseek.py``
replaced by files that raise when imported: a conversion that ran the checkpoint's code fails.
"""

from __future__ import annotations

import json
import os
from typing import Any, Dict

#: Kimi-K2-Instruct's config.json as released (tokenizer ids and the FP8 quantization config included)
RELEASED: Dict[str, Any] = {
    "architectures": ["DeepseekV3ForCausalLM"],
    "auto_map": {"AutoConfig": "configuration_deepseek.DeepseekV3Config",
                 "AutoModel": "modeling_deepseek.DeepseekV3Model",
                 "AutoModelForCausalLM": "modeling_deepseek.DeepseekV3ForCausalLM"},
    "model_type": "kimi_k2",
    "attention_bias": False, "attention_dropout": 0.0, "aux_loss_alpha": 0.001,
    "bos_token_id": 163584, "eos_token_id": 163585, "ep_size": 1, "first_k_dense_replace": 1,
    "hidden_act": "silu", "hidden_size": 7168, "initializer_range": 0.02, "intermediate_size": 18432,
    "kv_lora_rank": 512, "max_position_embeddings": 131072, "moe_intermediate_size": 2048, "moe_layer_freq": 1,
    "n_group": 1, "n_routed_experts": 384, "n_shared_experts": 1, "norm_topk_prob": True,
    "num_attention_heads": 64, "num_experts_per_tok": 8, "num_hidden_layers": 61, "num_key_value_heads": 64,
    "num_nextn_predict_layers": 0, "pretraining_tp": 1, "q_lora_rank": 1536, "qk_nope_head_dim": 128,
    "qk_rope_head_dim": 64, "quantization_config": {"activation_scheme": "dynamic", "fmt": "e4m3",
                                                    "quant_method": "fp8", "weight_block_size": [128, 128]},
    "rms_norm_eps": 1e-06, "rope_theta": 50000.0,
    "rope_scaling": {"beta_fast": 1.0, "beta_slow": 1.0, "factor": 32.0, "mscale": 1.0, "mscale_all_dim": 1.0,
                     "original_max_position_embeddings": 4096, "type": "yarn"},
    "routed_scaling_factor": 2.827, "scoring_func": "sigmoid", "seq_aux": True, "tie_word_embeddings": False,
    "topk_group": 1, "topk_method": "noaux_tc", "torch_dtype": "bfloat16", "transformers_version": "4.48.3",
    "use_cache": True, "v_head_dim": 128, "vocab_size": 163840,
}

#: the release's structure at tiny sizes: MLA with a q LoRA, one dense layer then routed experts (top-8 of 16, one
#: group) beside a shared expert, YaRN x32 with mscale 1 / 1, routed scaling 2.827
TINY: Dict[str, Any] = dict(
    vocab_size=97, hidden_size=64, intermediate_size=80, moe_intermediate_size=24, num_hidden_layers=4,
    num_attention_heads=4, num_key_value_heads=4, q_lora_rank=24, kv_lora_rank=16, qk_nope_head_dim=16,
    qk_rope_head_dim=8, v_head_dim=12, n_routed_experts=16, num_experts_per_tok=8, n_group=1, topk_group=1,
    n_shared_experts=1, first_k_dense_replace=1, routed_scaling_factor=2.827, norm_topk_prob=True,
    max_position_embeddings=256, rms_norm_eps=1e-6, tie_word_embeddings=False,
)
TINY_YARN = {"beta_fast": 1.0, "beta_slow": 1.0, "factor": 32.0, "mscale": 1.0, "mscale_all_dim": 1.0,
             "original_max_position_embeddings": 8, "type": "yarn"}
TINY_ROPE_THETA = 50000.0
#: what the release's Python files become here: importing them fails the test
TRAP = "raise RuntimeError('the checkpoint\\'s own code was executed: {name}')\n"


def transformers_kwargs() -> Dict[str, Any]:
    """``DeepseekV3Config`` keyword arguments of the tiny model (the model written to disk), rope in transformers'
    own ``rope_parameters`` form."""
    rope = {k: v for k, v in TINY_YARN.items() if k != "type"}
    return {**TINY, "rope_parameters": {"rope_type": "yarn", "rope_theta": TINY_ROPE_THETA, **rope}}


def to_release_form(path: str) -> None:
    """Rewrite ``path``'s config.json (written by transformers' DeepSeek-V3) into Kimi-K2's released form and put
    trapped copies of the release's code files beside it."""
    cfg_path = os.path.join(path, "config.json")
    with open(cfg_path) as f:
        cfg = json.load(f)
    cfg.pop("rope_parameters", None)
    cfg.pop("dtype", None)
    for key in ("architectures", "auto_map", "model_type", "topk_method", "scoring_func", "seq_aux", "aux_loss_alpha",
                "ep_size", "moe_layer_freq", "pretraining_tp", "num_nextn_predict_layers", "transformers_version"):
        cfg[key] = RELEASED[key]
    cfg.update(rope_theta=TINY_ROPE_THETA, rope_scaling=dict(TINY_YARN), torch_dtype="float32")
    with open(cfg_path, "w") as f:
        json.dump(cfg, f, indent=2, sort_keys=True)
    for name in ("configuration_deepseek.py", "modeling_deepseek.py"):
        with open(os.path.join(path, name), "w") as f:
            f.write(TRAP.format(name=name))


def write_kimi_checkpoint(path: str, seed: int) -> None:
    """A tiny fp32 Kimi-K2-form checkpoint at ``path`` (random weights, norms and correction biases included)."""
    from megatron_bridge_ext.testing.tiny_models import randomise, tiny_hf_model

    model = tiny_hf_model("DeepseekV3", transformers_kwargs(), seed).float().eval()
    randomise(model, correction_bias=0.3)
    model.save_pretrained(path, safe_serialization=True)
    to_release_form(path)
