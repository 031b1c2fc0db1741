"""Test and demo support: tiny transformers checkpoints and parity helpers (HF logits, checkpoint comparison)."""
