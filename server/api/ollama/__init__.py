"""Ollama API dialect (/api/*): wire shapes, NDJSON streams and its error envelope."""
