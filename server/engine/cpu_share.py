"""How many CPU threads llama.cpp should run with, given what other processes do on our cores.

llama.cpp's CPU threads meet at a barrier after every operation of the graph. When another process
holds one of the cores they run on, every barrier waits for that core's next time slice, and a
decode with as many threads as cores can run slower than with one thread fewer (measured:
``bench/results/2026-11-22-threads.md``). A laptop running an editor, a browser and a build is
that machine, and llama-server's fixed ``-t`` cannot notice.

:class:`CpuShare` reads, on Linux, how busy this process's cores are (``/proc/stat``) and how much
of that is this process's own CPU time (``/proc/self/stat``), and offers the largest thread count
that fits in the cores the others leave: never more than configured, never fewer than one.
Elsewhere (no ``/proc``) it always offers the configured count.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass

# Seconds between readings; the load the others put on the cores is smoothed over about two
# readings.
INTERVAL = 0.25
_SMOOTHING = 0.5
# A thread fits while the others leave at least (threads - fit) cores; coming back takes
# HYSTERESIS more, so a load near the line does not flip the count every reading. The lines are
# in what this class reads, which is less than the others would take on their own: they share
# the cores with our threads (a busy loop beside 2 of ours reads as 0.74-0.77 of a core).
# Measured on 2 cores (bench/results/2026-11-23-threads-by-step.md): a decode step of up to
# SMALL_STEP tokens (one stream, or eight streams with drafts) runs slower with 2 threads than
# with 1 from a reading of about 0.3, a prompt batch (more work between barriers) from about 0.5.
FIT_TOKEN = 0.3
FIT_BATCH = 0.5
HYSTERESIS = 0.1
SMALL_STEP = 32
# A rest shorter than SHORT_REST (a client reading one answer and sending the next) leaves the
# reading window open: nothing else fits in it. After a longer one the window starts again with
# the work (in the bench, another server may have decoded meanwhile), but the thread counts from
# before stand: a load that took a thread is rarely gone a few seconds later, and a first token
# run with a thread the others hold waits at every barrier. After STALE they are forgotten.
SHORT_REST = 0.02
STALE = 30.0


@dataclass(frozen=True)
class CpuTimes:
    busy: float  # seconds our cores spent running anything since boot
    own: float  # seconds this process has run


def read_proc(cpus: frozenset[int]) -> CpuTimes | None:
    """Busy time of ``cpus`` and this process's CPU time, from /proc; None where there is none."""
    try:
        with open("/proc/stat", "rb") as f:
            stat = f.read()
        with open("/proc/self/stat", "rb") as f:
            own = f.read()
    except OSError:
        return None
    return parse_proc(stat, own, cpus)


def parse_proc(stat: bytes, own: bytes, cpus: frozenset[int]) -> CpuTimes | None:
    """/proc/stat and /proc/self/stat as CpuTimes; None for a shape this does not know (it runs
    inside every decode step, so it never raises)."""
    try:
        busy = _busy(stat, cpus)
        return CpuTimes(busy, _own(own)) if busy is not None else None
    except (ValueError, IndexError):
        return None


def _busy(stat: bytes, cpus: frozenset[int]) -> float | None:
    """Seconds ``cpus`` ran anything, from /proc/stat's per-core lines (None: none of them)."""
    ticks, seen = 0, False
    for line in stat.split(b"\n"):
        if not (line.startswith(b"cpu") and line[3:4].isdigit()):
            continue
        name, *values = line.split()
        if int(name[3:]) in cpus:
            # user nice system idle iowait irq softirq steal; old kernels stop before steal
            v = [*map(int, values[:8]), 0, 0, 0][:8]
            ticks += v[0] + v[1] + v[2] + v[5] + v[6] + v[7]  # guest time is inside user
            seen = True
    return ticks / os.sysconf("SC_CLK_TCK") if seen else None


def _own(stat: bytes) -> float:
    """Seconds this process ran (utime + stime), from /proc/self/stat."""
    fields = stat[stat.rindex(b")") + 2 :].split()  # after "pid (comm) ": field 3 onwards
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def affinity() -> frozenset[int]:
    try:
        return frozenset(os.sched_getaffinity(0))
    except AttributeError:
        return frozenset(range(os.cpu_count() or 1))


class CpuShare:
    """Thread counts for the next ``llama_decode``: call :meth:`threads` before each."""

    def __init__(
        self,
        configured: int,
        cpus: frozenset[int] | None = None,
        *,
        read: Callable[[frozenset[int]], CpuTimes | None] = read_proc,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.configured = configured
        self.cpus = cpus if cpus is not None else affinity()
        self._read, self._clock = read, clock
        self._last = read(self.cpus)
        self._at = clock()
        self.others: float | None = None  # cores the other processes keep busy, smoothed
        self.current = (configured, configured)
        self._rested_at: float | None = None
        self._reading_due = False

    def rest(self) -> None:
        """The engine has nothing to do. What others do meanwhile says little about the load
        when work comes back (in the bench, another server decoding between our requests): a
        rest longer than SHORT_REST is left out of the readings."""
        if self._rested_at is None:
            self._rested_at = self._clock()

    def threads(self) -> tuple[int, int]:
        """(threads for a step of up to SMALL_STEP tokens, threads for a larger batch)."""
        if self._last is None or self.configured <= 1:
            return self.current
        now = self._clock()
        if self._rested_at is not None:
            # The first step after a rest carries a new request's first token: reading /proc
            # (tenths of a millisecond) would delay it, so any reading waits for the next step.
            rested, self._rested_at = now - self._rested_at, None
            if rested >= SHORT_REST:  # the new work is measured from the next step
                self._reading_due, self.others = True, None
                if rested >= STALE:
                    self.current = (self.configured, self.configured)
            return self.current
        if self._reading_due:
            self._reading_due = False
            self._last, self._at = self._read(self.cpus) or self._last, now
            return self.current
        if now - self._at < INTERVAL:
            return self.current
        sample = self._read(self.cpus)
        if sample is None:
            return self.current
        spent = (sample.busy - self._last.busy) - (sample.own - self._last.own)
        load = max(0.0, spent / (now - self._at))
        self._last, self._at = sample, now
        fresh = self.others is None
        self.others = (
            load if self.others is None else _SMOOTHING * load + (1 - _SMOOTHING) * self.others
        )
        free = len(self.cpus) - self.others
        # The first reading of new work decides from the line alone: hysteresis keeps a count
        # steady within a stretch of work, but carried across a rest it would keep a thread away
        # for as long as a light load stays in the band, because a heavier one came and went.
        token, batch = (self.configured, self.configured) if fresh else self.current
        self.current = (self._fit(free, token, FIT_TOKEN), self._fit(free, batch, FIT_BATCH))
        return self.current

    def _fit(self, free: float, n: int, fit: float) -> int:
        while n > 1 and free < n - fit:
            n -= 1
        while n < self.configured and free >= n + 1 - fit + HYSTERESIS:
            n += 1
        return n
