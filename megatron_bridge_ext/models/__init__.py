"""Per-model bridges: one file per model family (config translation both ways + mapping table); importing this
package registers them. The families compose both from the building blocks beside them: ``tables`` (dense mapping
tables), ``moe`` (expert layouts, experts, routers, MoE patterns), ``mtp`` (multi-token-prediction layers) and
``hf_config`` (HF ``config.json`` <-> ``GPTConfig`` fields), ``gated_delta_net`` (linear / full attention layers of
Qwen3-Next and Qwen3.5)."""

from megatron_bridge_ext.models import (  # noqa: F401
    deepseek_v3,
    gemma2,
    gemma3,
    gemma4,
    glm4_moe,
    glm4_moe_lite,
    gpt_oss,
    llama,
    llama4,
    minimax_m2,
    mistral,
    mixtral,
    olmo2,
    olmoe,
    phi3,
    qwen2,
    qwen2_moe,
    qwen3,
    qwen3_moe,
    qwen3_next,
    qwen3_5,
    qwen3_5_moe,
)

__all__ = [
    "deepseek_v3",
    "gemma2",
    "gemma3",
    "gemma4",
    "glm4_moe",
    "glm4_moe_lite",
    "gpt_oss",
    "llama",
    "llama4",
    "minimax_m2",
    "mistral",
    "mixtral",
    "olmo2",
    "olmoe",
    "phi3",
    "qwen2",
    "qwen2_moe",
    "qwen3",
    "qwen3_moe",
    "qwen3_next",
    "qwen3_5",
    "qwen3_5_moe",
]
