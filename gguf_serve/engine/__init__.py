"""llama.cpp runtime: no HTTP here."""
