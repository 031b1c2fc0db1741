"""Per-model bridges: one file per model family (config translation both ways + mapping table); importing this
package registers them."""

from megatron_bridge_ext.models import llama, mixtral, qwen2  # noqa: F401

__all__ = ["llama", "mixtral", "qwen2"]
