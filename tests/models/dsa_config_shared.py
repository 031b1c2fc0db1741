"""What the config tests of the DeepSeek sparse attention families (``test_deepseek_v32_config.py``,
``test_glm_moe_dsa_config.py``) share: the megatron-core gate, the tiny sizes both families are tested at, the fixed
batch their logits are compared on, and the refusal under megatron-core < 0.19."""

from __future__ import annotations

from typing import Any, Callable

import pytest
import torch

from megatron_bridge_ext.dispatch import get_model_bridge
from megatron_bridge_ext.mcore.versions import MEGATRON_CORE_0_19, installed_megatron_core, unmet_megatron_core

HAS_DSA = unmet_megatron_core(MEGATRON_CORE_0_19) is None
needs_dsa = pytest.mark.skipif(not HAS_DSA, reason="megatron-core < 0.19 has no DSA (the refusal is tested below)")
#: MLA, MoE and indexer sizes of both tiny configs (each family adds its layer count and its own fields)
TINY_DSA = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=4,
                max_position_embeddings=128, initializer_range=0.03, n_routed_experts=6, num_experts_per_tok=2,
                moe_intermediate_size=32, q_lora_rank=24, kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=16,
                v_head_dim=12, index_topk=7, index_head_dim=16, index_n_heads=4, first_k_dense_replace=1)


def logits(model: torch.nn.Module) -> torch.Tensor:
    """The model's logits on a fixed batch (2 x 24 tokens, seed 1)."""
    ids = torch.randint(0, TINY_DSA["vocab_size"], (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return model(ids, use_cache=False).logits


def assert_refused_before_megatron_core_0_19(arch: str, make_config: Callable[[], Any]) -> None:
    """Under megatron-core < 0.19 the family refuses both ways, naming the architecture, the feature, the release it
    needs and the installed one."""
    refusal = rf"{arch}: DeepSeek sparse attention .*needs megatron-core >= 0\.19\.0; megatron-core " \
        rf"{installed_megatron_core()} is installed"
    bridge = get_model_bridge(arch)
    with pytest.raises(ValueError, match=refusal):
        bridge.transformer_config(make_config())
    with pytest.raises(ValueError, match=refusal):
        bridge.megatron_to_hf_config(None)
