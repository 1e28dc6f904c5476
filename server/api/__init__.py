"""HTTP layer: OpenAI wire shapes, handlers, SSE, error rendering."""
