"""A fixed background CPU load for the "contended" runs: N busy-loop processes.

An editor's completion server shares the machine with the editor, a language server and a build.
The suite starts the load itself, once, before the first peer and stops it after the last, so
every peer (interleaved round by round) runs under the same load.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager

_SPIN = "while True: pass"


@contextmanager
def busy_load(processes: int) -> Iterator[list[int]]:
    """Run `processes` busy loops at normal priority, as a build would; yields their pids and
    stops exactly those processes on exit."""
    procs = [subprocess.Popen([sys.executable, "-c", _SPIN]) for _ in range(max(0, processes))]
    try:
        yield [p.pid for p in procs]
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
