"""Ollama model names (``name:tag``) → registry entries.

Ollama clients send ``name:tag`` and list models as ``name:latest``. The rule, first match wins:

1. the name exactly as sent is a registry entry;
2. without a ``:latest`` tag it is one (``smollm2-135m:latest`` → ``smollm2-135m``);
3. ``name:tag`` with the colon written as a dash is one (``qwen2.5-coder:1.5b`` →
   ``qwen2.5-coder-1.5b``), which is how the registry spells sizes;
4. the same, ignoring case.

Anything else is a 404 in Ollama's shape.
"""

from __future__ import annotations

from server.errors import InvalidRequest, ModelNotFound
from server.registry import Registry


def candidates(name: str) -> list[str]:
    base = name.removesuffix(":latest")
    out = [name, base]
    if ":" in base:
        model, _, tag = base.rpartition(":")
        out.append(f"{model}-{tag}")
    return out


def resolve(registry: Registry, name: str) -> str:
    """The registry name an Ollama model name refers to."""
    name = name.strip()
    if not name:
        raise InvalidRequest("model is required", param="model")
    tries = candidates(name)
    for c in tries:
        if registry.get(c) is not None:
            return c
    lowered = {n.lower(): n for n in registry.models}
    for c in tries:
        if c.lower() in lowered:
            return lowered[c.lower()]
    raise ModelNotFound(
        f"model '{name}' not found; models: {', '.join(tagged(n) for n in registry.models)}",
        param="model",
    )


def tagged(registry_name: str) -> str:
    """How /api/tags and /api/ps list a registry entry."""
    return registry_name if ":" in registry_name else f"{registry_name}:latest"
