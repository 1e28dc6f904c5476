"""Engines turn token ids into generated tokens. ``base`` is the seam; ``llama`` wraps llama.cpp."""
