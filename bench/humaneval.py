"""`codeserve bench humaneval`: functional correctness (pass@k) through codeserve's own API.

Each completion is run with the problem's tests in a fresh interpreter: its own temporary
directory, a time limit, memory/file-size limits and, where the kernel allows an unprivileged
network namespace (`unshare -rn`), no network at all; otherwise sockets are disabled in-process.
"""

from __future__ import annotations

import functools
import math
import resource
import shutil
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
from tqdm import tqdm

from bench.workloads import Problem, humaneval

# The stops of the Codex paper: a completion ends where the next top-level statement begins.
STOPS = ["\ndef ", "\nclass ", "\nif __name__", "\nprint(", "\n#"]

_NO_SOCKETS = (
    "import socket as _s\n"
    "def _refuse(*a, **k):\n    raise OSError('network disabled')\n"
    "_s.socket = _refuse\n_s.create_connection = _refuse\n"
)


@functools.cache
def isolation() -> str:
    """'netns' when `unshare -rn` works here, else 'no-sockets'."""
    if shutil.which("unshare"):
        probe = subprocess.run(["unshare", "-rn", "true"], capture_output=True)
        if probe.returncode == 0:
            return "netns"
    return "no-sockets"


def _limits(cpu_s: int) -> None:
    resource.setrlimit(resource.RLIMIT_CPU, (cpu_s, cpu_s))
    resource.setrlimit(resource.RLIMIT_AS, (2 << 30, 2 << 30))
    resource.setrlimit(resource.RLIMIT_FSIZE, (16 << 20, 16 << 20))


def passes(problem: Problem, completion: str, timeout_s: float = 10.0) -> bool:
    program = (
        problem.prompt + completion + "\n\n" + problem.test + f"\n\ncheck({problem.entry_point})\n"
    )
    mode = isolation()
    if mode == "no-sockets":
        program = _NO_SOCKETS + program
    with tempfile.TemporaryDirectory(prefix="humaneval-") as tmp:
        path = Path(tmp) / "program.py"
        path.write_text(program)
        cmd = [sys.executable, "-I", str(path)]
        if mode == "netns":
            cmd = ["unshare", "-rn", *cmd]
        try:
            proc = subprocess.run(
                cmd,
                cwd=tmp,
                env={"PATH": "/usr/bin:/bin"},
                capture_output=True,
                timeout=timeout_s,
                preexec_fn=lambda: _limits(int(timeout_s) + 1),
            )
        except subprocess.TimeoutExpired:
            return False
        return proc.returncode == 0


def pass_at_k(n: int, c: int, k: int) -> float:
    """The unbiased estimator of Chen et al. (2021): 1 - C(n-c, k) / C(n, k)."""
    if n - c < k:
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def complete(
    url: str,
    model: str,
    problem: Problem,
    n: int,
    temperature: float,
    max_tokens: int,
    api_key: str | None = None,
) -> list[str]:
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    r = httpx.post(
        url + "/v1/completions",
        headers=headers,
        timeout=600,
        json={
            "model": model,
            "prompt": problem.prompt,
            "max_tokens": max_tokens,
            "n": n,
            "temperature": temperature,
            "stop": STOPS,
            "seed": 1234,
        },
    )
    r.raise_for_status()
    return [c["text"] for c in sorted(r.json()["choices"], key=lambda c: c["index"])]


def evaluate(
    url: str,
    model: str,
    *,
    n: int = 1,
    ks: tuple[int, ...] = (1,),
    limit: int | None = None,
    temperature: float | None = None,
    max_tokens: int = 384,
    concurrency: int = 8,
) -> dict:
    problems = humaneval()[:limit]
    temperature = (0.0 if n == 1 else 0.8) if temperature is None else temperature
    results = []
    # Several problems in flight (a batched engine decodes them together); tests run while the
    # model writes the next answers.
    with ThreadPoolExecutor(concurrency) as writers, ThreadPoolExecutor(2) as checker:
        written = [
            writers.submit(complete, url, model, p, n, temperature, max_tokens) for p in problems
        ]
        pending = []
        bar = tqdm(total=len(problems), desc=f"humaneval {model}", unit="problem", file=sys.stderr)
        for p, samples in zip(problems, written, strict=True):
            pending.append((p, [checker.submit(passes, p, s) for s in samples.result()]))
            bar.update()
        bar.close()
        for p, futures in pending:
            results.append({"task_id": p.task_id, "passed": [f.result() for f in futures]})
    correct = [sum(r["passed"]) for r in results]
    return {
        "model": model,
        "problems": len(problems),
        "samples_per_problem": n,
        "temperature": temperature,
        "isolation": isolation(),
        "pass_at": {
            f"pass@{k}": sum(pass_at_k(n, c, k) for c in correct) / len(correct)
            for k in ks
            if k <= n
        },
        "results": results,
    }
