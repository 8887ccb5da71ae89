"""gguf-serve: convert Qwen3-class checkpoints to GGUF and serve them through llama.cpp."""

__version__ = "0.1.0"
