"""HTTP layer: protocol shapes and routes; never touches llama.cpp."""
