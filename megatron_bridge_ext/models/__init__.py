"""Per-model bridges: one file per model family (config translation both ways + mapping table); importing this
package registers them."""

from megatron_bridge_ext.models import gemma2, gemma3, llama, mistral, mixtral, phi3, qwen2, qwen3  # noqa: F401

__all__ = ["gemma2", "gemma3", "llama", "mistral", "mixtral", "phi3", "qwen2", "qwen3"]
