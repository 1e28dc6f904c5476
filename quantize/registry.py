"""Add a ladder's rungs to models.toml so ``codeserve serve --model NAME`` serves any of them.

The entries go in one block between marker comments, appended to the file as text so its
comments and layout survive; running the tool again replaces that block instead of adding
duplicate tables. The result is validated with the server's own parser before it is written.
"""

from __future__ import annotations

import json
import os
import re
import tomllib
from pathlib import Path

from quantize.errors import QuantizeError
from server.errors import ConfigError
from server.registry import parse_registry


def model_names(stem: str, types: list[str], prefix: str | None = None) -> dict[str, str]:
    base = prefix or re.sub(r"[^a-z0-9.]+", "-", stem.lower()).strip("-")
    return {t: f"{base}-{t.lower()}" for t in types}


def _markers(stem: str) -> tuple[str, str]:
    return f"# >>> codeserve quantize: {stem}", f"# <<< codeserve quantize: {stem}"


def _without_block(text: str, stem: str) -> str:
    begin, end = _markers(stem)
    return re.sub(re.escape(begin) + r".*?" + re.escape(end) + r"\n?", "", text, flags=re.DOTALL)


def _read(models_file: Path) -> str:
    try:
        return models_file.read_text()
    except FileNotFoundError:
        raise QuantizeError(f"--register: {models_file} not found") from None


def check_names(models_file: Path, stem: str, names: list[str]) -> None:
    """Fail before any work when a name is taken by a model this tool did not write."""
    text = _without_block(_read(models_file), stem)
    try:
        existing = tomllib.loads(text).get("models", {})
    except tomllib.TOMLDecodeError as e:
        raise QuantizeError(f"--register: {models_file} is not valid TOML: {e}") from None
    taken = sorted(set(names) & set(existing))
    if taken:
        raise QuantizeError(
            f"--register: {models_file} already defines {', '.join(taken)}; "
            "pick other names with --model-prefix"
        )


def register(models_file: Path, stem: str, entries: list[tuple[str, Path, str]]) -> None:
    """Write ``(name, gguf path, description)`` entries into the block for ``stem``."""
    begin, end = _markers(stem)
    lines = [begin]
    for name, path, description in entries:
        lines += [
            f"[models.{json.dumps(name)}]",
            f"description = {json.dumps(description)}",
            f"source = {{ path = {json.dumps(str(path.resolve()))} }}",
            "",
        ]
    lines.append(end)
    text = _without_block(_read(models_file), stem).rstrip("\n") + "\n\n" + "\n".join(lines) + "\n"
    try:
        parse_registry(tomllib.loads(text), models_file)
    except (tomllib.TOMLDecodeError, ConfigError) as e:
        raise QuantizeError(f"--register: the updated {models_file} would be invalid: {e}") from e
    tmp = models_file.with_name(models_file.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, models_file)
