"""Per-model bridges: one file per model family, importing it registers the bridge."""

from megatron_bridge_ext.models import llama, mixtral, qwen2  # noqa: F401

__all__ = ["llama", "mixtral", "qwen2"]
