"""The editor session the trace replays: five salted source files, one edit per visit.

Pure and deterministic for a seed (see ``bench.editor_trace`` for what is measured and why).
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
N_FILES = 5
TOP_LINES = 8  # "near the top": among the first lines, under the salt line
TOP_EDIT_SHARE = 0.2
CURSOR_DRIFT = 12  # lines the cursor moves between two visits of a file

FILE_TOKENS = 1300


@dataclass(frozen=True)
class Template:
    """One of Continue's FIM templates (core/autocomplete/templating) and its stop strings."""

    pre: str
    suf: str
    mid: str
    stops: tuple[str, ...]

    def render(self, prefix: str, suffix: str) -> str:
        return f"{self.pre}{prefix}{self.suf}{suffix}{self.mid}"


# Continue picks the template by model family; here by which markers the vocabulary holds as
# single tokens (see `pick_template`). For a model with neither (SmolLM2), the StarCoder markers
# are plain text, the same tokens on every server.
TEMPLATES = {
    "starcoder": Template(
        "<fim_prefix>",
        "<fim_suffix>",
        "<fim_middle>",
        ("<fim_prefix>", "<fim_suffix>", "<fim_middle>", "<file_sep>", "<|endoftext|>", "\n\n"),
    ),
    "qwen": Template(
        "<|fim_prefix|>",
        "<|fim_suffix|>",
        "<|fim_middle|>",
        (
            "<|endoftext|>",
            "<|fim_prefix|>",
            "<|fim_middle|>",
            "<|fim_suffix|>",
            "<|fim_pad|>",
            "<|repo_name|>",
            "<|file_sep|>",
            "<|im_start|>",
            "<|im_end|>",
            "\n\n",
        ),
    ),
}

TYPED = [
    "result = ",
    "if not items:",
    "for key, value in ",
    "return ",
    "logger.debug(",
    "count += 1",
    "assert ",
    "values = [",
    "with open(path) as f:",
    "raise ValueError(",
]
IMPORTS = [
    "import os",
    "import re",
    "import json",
    "import logging",
    "import itertools",
    "import functools",
    "from pathlib import Path",
    "from typing import Any",
]


@dataclass(frozen=True)
class Fim:
    prefix: str
    suffix: str

    def prompt(self, template: Template) -> str:
        return template.render(self.prefix, self.suffix)


@dataclass(frozen=True)
class Visit:
    index: int
    round: int
    file: int
    edit: str  # "local": typed at the cursor; "top": a line near the top, cursor unmoved
    op: str  # "insert" or "change"
    line: int  # the edited line
    request: Fim  # after the edit
    keystroke: Fim  # the same one character later

    @property
    def kind(self) -> str:
        return "cold" if self.round == 0 else "return"


def source_files(
    n_tokens: int = FILE_TOKENS,
    salt: str = "",
    count: Callable[[str], int] | None = None,
    n: int = N_FILES,
) -> list[str]:
    """`n` real Python files of about `n_tokens` tokens (by `count`; without it, by characters
    at ~3.7 a token), cut at a line end, each starting with a salt line.

    Evenly spread over this repository's server/ modules long enough to give that size.
    """
    count = count or (lambda text: len(text) * 10 // 37)
    # Judged by `count` itself: a file long in characters can still be short in tokens.
    paths = sorted(p for p in (REPO / "server").rglob("*.py") if count(p.read_text()) > n_tokens)
    if len(paths) < n:
        raise ValueError(f"fewer than {n} files in server/ have more than {n_tokens} tokens")
    out = []
    for p in (paths[i * len(paths) // n] for i in range(n)):
        lines = f"# {salt} {p.relative_to(REPO)}\n{p.read_text()}".splitlines(keepends=True)
        lo, hi = 1, len(lines)  # the most lines whose text stays within n_tokens
        while lo < hi:
            mid = (lo + hi + 1) // 2
            lo, hi = (mid, hi) if count("".join(lines[:mid])) <= n_tokens else (lo, mid - 1)
        out.append("".join(lines[:lo]))
    return out


def _fim(lines: list[str], line: int) -> Fim:
    """The cursor at the end of `line`."""
    text = "\n".join(lines)
    at = sum(len(x) + 1 for x in lines[:line]) + len(lines[line])
    return Fim(text[:at], text[at:])


def _indent(lines: list[str], line: int) -> str:
    for x in reversed(lines[: line + 1]):
        if x.strip():
            return x[: len(x) - len(x.lstrip())]
    return ""


def make_trace(files: list[str], rounds: int, seed: int = 0) -> list[Visit]:
    """The whole session, deterministic for `seed`: `rounds` laps over `files`, one edit a visit.

    Line 0 (the salt) is never edited, so a file stays unlike any earlier run's.
    """
    rng = random.Random(seed)
    docs = [f.rstrip("\n").split("\n") for f in files]
    cursors = [rng.randint(len(d) * 3 // 10, len(d) * 8 // 10) for d in docs]
    visits: list[Visit] = []
    for r in range(rounds):
        for i, lines in enumerate(docs):
            op = rng.choice(("insert", "change"))
            top = r > 0 and rng.random() < TOP_EDIT_SHARE  # a first visit types at the cursor
            if top:
                at = rng.randint(1, min(TOP_LINES, len(lines) - 1))
                new = rng.choice([x for x in IMPORTS if x != lines[at]])
                cursor = cursors[i] + (op == "insert" and at <= cursors[i])
            else:
                lo, hi = TOP_LINES + 1, len(lines) - 2
                at = min(max(cursors[i] + rng.randint(-CURSOR_DRIFT, CURSOR_DRIFT), lo), hi)
                indent = _indent(lines, at)
                new = indent + rng.choice([x for x in TYPED if indent + x != lines[at]])
                cursor = at
            if op == "insert":
                lines.insert(at, new)
            else:
                lines[at] = new
            cursors[i] = cursor = min(cursor, len(lines) - 1)
            request = _fim(lines, cursor)
            lines[cursor] += rng.choice("abcdefghijklmnopqrstuvwxyz")
            visits.append(
                Visit(
                    index=len(visits),
                    round=r,
                    file=i,
                    edit="top" if top else "local",
                    op=op,
                    line=at,
                    request=request,
                    keystroke=_fim(lines, cursor),
                )
            )
    return visits
