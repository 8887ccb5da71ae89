"""Safetensors checkpoints -> verified GGUF files."""
