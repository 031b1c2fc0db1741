"""Parity helpers: an HF model's own logits, and a tensor-by-tensor comparison of two HF checkpoints."""

from __future__ import annotations

from typing import Any, Dict

import torch

from megatron_bridge_ext.io import SafeTensorsSource

__all__ = ["hf_logits", "compare_checkpoints"]


def hf_logits(path: str, input_ids: torch.Tensor) -> torch.Tensor:
    """fp32 logits of the transformers model saved at ``path`` (no cache)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, use_safetensors=True,
                                                 local_files_only=True).eval()
    with torch.no_grad():
        return model(input_ids=input_ids, use_cache=False).logits.float()


def compare_checkpoints(a: str, b: str) -> Dict[str, Any]:
    """Key sets, dtypes, shapes and bytes of two HF checkpoints compared with ``torch.equal``."""
    with SafeTensorsSource(a) as src, SafeTensorsSource(b) as dst:
        ka, kb = set(src.keys()), set(dst.keys())
        same_keys = ka == kb
        exact = same_keys
        mismatched = []
        nbytes = 0
        for k in sorted(ka & kb):
            x, y = src[k], dst[k]
            nbytes += x.numel() * x.element_size()
            if x.dtype != y.dtype or x.shape != y.shape or not torch.equal(x, y):
                exact = False
                mismatched.append(k)
        return {"tensors": len(ka), "bytes": nbytes, "same_keys": same_keys, "bit_exact": exact,
                "mismatched": mismatched, "missing": sorted(ka - kb), "unexpected": sorted(kb - ka)}
