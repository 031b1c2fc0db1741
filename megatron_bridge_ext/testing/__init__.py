"""Test and demo support: tiny transformers checkpoints, parity helpers (HF logits, checkpoint comparison) and call
counting."""
