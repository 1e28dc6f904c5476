"""The ladder: one ``llama_model_quantize`` call per rung, several rungs at once.

Each rung runs in its own Python subprocess rather than a thread: an abort inside llama.cpp then
ends that process, not the tool, and its stderr (where llama.cpp reports the tensors it had to
store in a fallback type) is captured per rung. A fresh interpreter (not multiprocessing's
spawn) also works when the caller is a script without a ``__main__`` guard. Files are written
as ``NAME.tmp`` and renamed when complete, and a failed ladder removes every rung this run
wrote, so a failure never leaves a file that looks usable.
"""

from __future__ import annotations

import ctypes
import json
import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path

from quantize.errors import QuantizeError

# Largest first. F16 is always built: it is the reference every other rung is measured against.
LADDER = ("F16", "Q8_0", "Q6_K", "Q5_K_M", "Q4_K_M", "Q4_0", "Q3_K_M", "Q2_K")
REFERENCE = "F16"
_PROBLEM = re.compile(r"error|fail|abort|assert|exception|returned", re.IGNORECASE)
_FALLBACK = re.compile(r"(\d+) of (\d+) tensor\(s\) required fallback quantization")


@dataclass(frozen=True)
class Rung:
    type: str
    path: Path
    size_bytes: int
    seconds: float
    # "180 of 272": tensors whose rows do not fit the type's block size (e.g. 576 columns for
    # K-quants' 256) and were stored in another type, so the rung is not what its name says.
    fallback: str | None = None
    built: bool = True  # False when the file came from source preparation, not the quantizer


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def parse_types(spec: str | None) -> list[str]:
    """``"q4_k_m,Q8_0"`` -> ladder order, F16 included; unknown names are an error."""
    if not spec:
        return list(LADDER)
    asked = {s.strip().upper() for s in spec.split(",") if s.strip()}
    unknown = asked - set(LADDER)
    if unknown:
        raise QuantizeError(
            f"--types: unknown type(s) {', '.join(sorted(unknown))}; the ladder has "
            + ", ".join(LADDER)
        )
    return [t for t in LADDER if t in asked or t == REFERENCE]


def rung_path(out: Path, stem: str, qtype: str) -> Path:
    return out / f"{stem}-{qtype}.gguf"


def _ftype(qtype: str) -> int:
    import llama_cpp

    return int(getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{qtype}"))


def _worker(argv: list[str]) -> None:
    """Subprocess body: ``SRC DST TYPE NTHREAD REQUANTIZE``; prints a JSON line on success."""
    import llama_cpp

    src, dst, qtype, nthread, requantize = argv
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = _ftype(qtype)
    params.nthread = int(nthread)
    params.allow_requantize = requantize == "1"
    tmp = dst + ".tmp"
    start = time.perf_counter()
    rc = llama_cpp.llama_model_quantize(src.encode(), tmp.encode(), ctypes.byref(params))
    if rc != 0:
        Path(tmp).unlink(missing_ok=True)
        sys.exit(f"llama_model_quantize returned {rc}")
    os.replace(tmp, dst)
    print(json.dumps({"seconds": time.perf_counter() - start}), flush=True)


class _Workers:
    """Runs worker subprocesses and can stop the ones still running when another fails."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._procs: set[subprocess.Popen] = set()
        self._stopped = False

    def run(self, src: Path, dst: Path, qtype: str, nthread: int, requantize: bool):
        code = "import sys; from quantize.ladder import _worker; _worker(sys.argv[1:])"
        args = [str(src), str(dst), qtype, str(nthread), "1" if requantize else "0"]
        # The package may be run from a checkout rather than installed: make it importable.
        root = str(Path(__file__).resolve().parent.parent)
        env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])),
        }
        with self._lock:
            if self._stopped:
                raise QuantizeError("stopped")
            proc = subprocess.Popen(
                [sys.executable, "-c", code, *args],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                errors="replace",
                env=env,
            )
            self._procs.add(proc)
        try:
            out, err = proc.communicate()
        finally:
            with self._lock:
                self._procs.discard(proc)
        if proc.returncode != 0:
            how = (
                f"crashed (signal {-proc.returncode})"
                if proc.returncode < 0
                else f"failed (exit {proc.returncode})"
            )
            lines = [line for line in err.splitlines() if line.strip()]
            # llama.cpp logs every tensor; the lines that say what went wrong are what matter.
            tail = "\n".join([line for line in lines if _PROBLEM.search(line)][-6:] or lines[-8:])
            raise QuantizeError(f"llama.cpp {how} quantizing {src.name} to {qtype}:\n{tail}")
        m = _FALLBACK.search(err)
        return json.loads(out.splitlines()[-1])["seconds"], (
            f"{m.group(1)} of {m.group(2)}" if m else None
        )

    def stop(self) -> None:
        with self._lock:
            self._stopped = True
            for proc in self._procs:
                proc.kill()


def build_ladder(
    src: Path,
    out: Path,
    stem: str,
    types: Iterable[str],
    *,
    requantize: bool = False,
    prebuilt: dict[str, Path] | None = None,
    jobs: int | None = None,
    progress: Callable[[str], None] = print,
) -> list[Rung]:
    """Quantize ``src`` into every type in ``types``; ``prebuilt`` rungs are taken as they are.

    ``requantize`` lets llama.cpp quantize an already quantized source (the caller decides).
    """
    prebuilt = prebuilt or {}
    types = [t for t in LADDER if t in set(types)]
    todo = [t for t in types if t not in prebuilt]
    cores = available_cores()
    jobs = max(1, min(jobs or cores, len(todo) or 1))
    nthread = max(1, cores // jobs)
    rungs = {
        t: Rung(t, p, p.stat().st_size, 0.0, built=False) for t, p in prebuilt.items() if t in types
    }
    if todo:
        progress(
            f"quantize: {len(todo)} rung(s) from {src.name}, {jobs} at a time, "
            f"{nthread} thread(s) each"
        )
    workers = _Workers()
    with ThreadPoolExecutor(jobs) as pool:
        try:
            futures = {
                pool.submit(workers.run, src, rung_path(out, stem, t), t, nthread, requantize): t
                for t in todo
            }
            for n_done, fut in enumerate(as_completed(futures), 1):
                t = futures[fut]
                seconds, fallback = fut.result()
                dst = rung_path(out, stem, t)
                rungs[t] = Rung(t, dst, dst.stat().st_size, seconds, fallback)
                note = f"  ({fallback} tensors fell back to other types)" if fallback else ""
                progress(
                    f"quantize: [{n_done}/{len(todo)}] {t:<7} "
                    f"{rungs[t].size_bytes / 2**20:8.1f} MiB {seconds:6.1f}s{note}"
                )
        except BaseException:
            workers.stop()
            pool.shutdown(wait=True, cancel_futures=True)
            # Only what this run completed goes: an older rung not reached yet stays as it was.
            for rung in rungs.values():
                if rung.built:
                    rung.path.unlink(missing_ok=True)
            for t in todo:
                dst = rung_path(out, stem, t)
                dst.with_name(dst.name + ".tmp").unlink(missing_ok=True)
            raise
    return [rungs[t] for t in types]
