"""What the numbers were measured on, and the physical limit decode speed runs into."""

from __future__ import annotations

import os
import platform
import re
import time
from pathlib import Path

import numpy as np


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_name() -> str:
    """A short file-name-safe label, e.g. '2cpu-amd-epyc'."""
    slug = re.sub(r"[^a-z0-9]+", "-", cpu_model().lower()).strip("-")
    return f"{os.cpu_count()}cpu-{'-'.join(slug.split('-')[:3])}"


def memory_bandwidth_gbs(mib: int = 512, repeats: int = 5) -> float:
    """Best of a few large array copies: bytes read + written per second (GB/s, 1e9)."""
    n = (mib << 20) // 8
    src = np.ones(n)
    dst = np.empty_like(src)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        np.copyto(dst, src)
        best = min(best, time.perf_counter() - t0)
    return 2 * src.nbytes / best / 1e9


def describe() -> dict:
    import llama_cpp

    return {
        "name": machine_name(),
        "cpu": cpu_model(),
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "llama_cpp_python": llama_cpp.__version__,
        "llama_cpp_system_info": llama_cpp.llama_print_system_info().decode(),
        "cmake_args": os.environ.get("CMAKE_ARGS", "default (scripts/install.sh portable x86-64)"),
    }
