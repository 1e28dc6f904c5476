"""codeserve: a local, OpenAI-compatible inference server for small code models."""

__version__ = "0.1.0"
