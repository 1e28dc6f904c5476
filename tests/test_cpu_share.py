"""CpuShare: the thread count offered for the load other processes put on our cores."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from server.engine.cpu_share import (
    INTERVAL,
    STALE,
    CpuShare,
    CpuTimes,
    affinity,
    parse_proc,
    read_proc,
)


class FakeMachine:
    """Cores whose busy time grows by ``others`` cores' worth plus ours, on a clock we move."""

    def __init__(self) -> None:
        self.now = 0.0
        self.busy = 0.0
        self.own = 0.0
        self.others = 0.0

    def run(self, seconds: float, ours: float = 1.0) -> None:
        self.now += seconds
        self.busy += (self.others + ours) * seconds
        self.own += ours * seconds

    def read(self, cpus: frozenset[int]) -> CpuTimes:
        return CpuTimes(self.busy, self.own)


def share(m: FakeMachine, configured: int = 2, cores: int = 2) -> CpuShare:
    return CpuShare(configured, frozenset(range(cores)), read=m.read, clock=lambda: m.now)


def settle(s: CpuShare, m: FakeMachine, others: float, readings: int = 8) -> int:
    """The thread count for one-token steps once ``others`` cores have been busy a while."""
    m.others = others
    for _ in range(readings):
        m.run(INTERVAL)
        s.threads()
    return s.threads()[0]


def test_a_quiet_machine_keeps_every_configured_thread():
    m = FakeMachine()
    s = share(m)
    assert settle(s, m, 0.0) == 2
    assert settle(s, m, 0.2) == 2  # an editor's light load: the second thread still fits


def test_a_busy_core_takes_a_thread_and_gives_it_back_when_free():
    m = FakeMachine()
    s = share(m)
    assert settle(s, m, 1.0) == 1
    assert s.others == pytest.approx(1.0, abs=0.01)
    assert settle(s, m, 2.0) == 1  # never fewer than one
    assert settle(s, m, 0.0) == 2


def test_prompt_batches_keep_their_threads_under_more_load_than_decode_steps():
    m = FakeMachine()
    s = share(m)
    settle(s, m, 0.4)
    assert s.threads() == (1, 2)  # measured: 2 threads still evaluate a prompt as fast here
    settle(s, m, 0.74)  # a busy loop beside our two threads reads as about this
    assert s.threads() == (1, 1)
    settle(s, m, 0.0)
    assert s.threads() == (2, 2)


def test_work_after_a_long_rest_starts_with_every_thread_and_its_own_reading():
    m = FakeMachine()
    s = share(m)
    assert settle(s, m, 2.0) == 1
    s.rest()
    m.run(STALE, ours=0.0)
    m.others = 0.0
    assert s.threads() == (2, 2)
    first_step(s, m, (2, 2))
    assert settle(s, m, 0.0, readings=1) == 2
    s.rest()
    m.others = 2.0
    m.run(STALE, ours=0.0)
    assert s.threads() == (2, 2)
    first_step(s, m, (2, 2))
    assert settle(s, m, 2.0, readings=1) == 1  # one reading of a real load is enough


def test_a_pause_keeps_the_threads_a_load_took_but_its_own_load_is_not_read():
    m = FakeMachine()
    s = share(m)
    assert settle(s, m, 1.0) == 1
    s.rest()
    m.others = 2.0
    m.run(3.0, ours=0.0)  # another server decodes while this one waits
    m.others = 0.0
    assert s.threads() == (1, 1)  # the next first token does not wait for the busy core
    first_step(s, m, (1, 1))
    assert settle(s, m, 0.0, readings=1) == 2  # the wait's load is not held against it


def test_a_short_rest_between_requests_leaves_the_reading_window_open():
    m = FakeMachine()
    reads = []
    s = CpuShare(
        2, frozenset({0, 1}), read=lambda c: reads.append(1) or m.read(c), clock=lambda: m.now
    )
    m.others = 1.0
    for _ in range(8):
        m.run(INTERVAL)
        s.threads()
    assert s.current == (1, 1)
    before = len(reads)
    for _ in range(10):  # requests of 30 ms, a client's 5 ms between them
        s.rest()
        m.run(0.005, ours=0.0)
        n = len(reads)
        assert s.threads() == (1, 1)
        assert len(reads) == n  # the first token waits for no reading
        m.run(0.03)
        s.threads()
    assert len(reads) == before + 1  # one reading over the 350 ms, none at a request's start
    m.others = 0.0
    for _ in range(40):  # readings go on across the requests: the thread comes back
        s.rest()
        m.run(0.005, ours=0.0)
        s.threads()
        m.run(0.03)
        s.threads()
    assert s.current == (2, 2)


def first_step(s: CpuShare, m: FakeMachine, threads: tuple[int, int]) -> None:
    """The step after the first one since a rest (10 ms later), which takes the reading the
    new work is measured from: the first reads nothing, it carries a first token."""
    m.run(0.01)
    assert s.threads() == threads


def test_the_first_step_after_a_rest_reads_nothing():
    m = FakeMachine()
    reads = []
    s = CpuShare(
        2, frozenset({0, 1}), read=lambda c: reads.append(1) or m.read(c), clock=lambda: m.now
    )
    s.rest()
    m.run(3.0, ours=0.0)
    before = len(reads)
    s.threads()
    assert len(reads) == before
    m.run(0.01)
    s.threads()
    assert len(reads) == before + 1


def test_a_load_near_the_line_does_not_flip_the_count():
    m = FakeMachine()
    s = share(m)
    assert settle(s, m, 0.7) == 1
    assert settle(s, m, 0.25) == 1  # it comes back only once the others are down to 0.2 cores
    assert settle(s, m, 0.15) == 2


def test_a_load_in_the_band_after_a_rest_gets_the_count_a_fresh_start_would():
    m = FakeMachine()
    s = share(m)
    assert settle(s, m, 1.5) == 1  # a build came and went
    s.rest()
    m.others = 0.25  # the editor's light load stays
    m.run(1.0, ours=0.0)
    assert s.threads() == (1, 1)  # the first token still runs with the count from before
    first_step(s, m, (1, 1))
    assert settle(s, m, 0.25, readings=1) == 2
    assert settle(s, m, 0.25) == 2


def test_many_cores_give_back_only_what_the_others_take():
    m = FakeMachine()
    s = share(m, configured=8, cores=16)
    assert settle(s, m, 6.0) == 8  # 10 cores left: the 8 threads fit
    assert settle(s, m, 11.0) == 5
    assert settle(s, m, 0.0) == 8


def test_readings_are_spaced_and_one_thread_is_left_alone():
    m = FakeMachine()
    reads = []
    s = CpuShare(
        2, frozenset({0, 1}), read=lambda c: reads.append(1) or m.read(c), clock=lambda: m.now
    )
    for _ in range(15):  # one and a half intervals
        m.run(INTERVAL / 10)
        s.threads()
    assert len(reads) == 2  # the first at start, then one per interval
    one = CpuShare(1, frozenset({0, 1}), read=m.read, clock=lambda: m.now)
    assert settle(one, m, 2.0) == 1


def test_without_proc_the_configured_count_stands():
    m = FakeMachine()
    s = CpuShare(2, frozenset({0, 1}), read=lambda c: None, clock=lambda: m.now)
    assert settle(s, m, 2.0) == 2


def test_proc_text_in_other_shapes_reads_as_missing_or_is_padded():
    from server.engine.cpu_share import _busy

    hz = os.sysconf("SC_CLK_TCK")
    old = b"cpu  1 2 3 4 5 6 7\ncpu0 10 0 5 100 0 1 1\ncpu1 20 0 0 100 0 0 0\n"  # no steal
    assert _busy(old, frozenset({0, 1})) == pytest.approx(37 / hz)
    assert _busy(old, frozenset({0})) == pytest.approx(17 / hz)
    assert _busy(b"cpu  1 2 3 4 5 6 7 8\n", frozenset({0})) is None  # no per-core lines
    own = b"42 (python3 (x)) R " + b"0 " * 10 + b"300 200 0 0\n"  # utime 300, stime 200
    assert parse_proc(old, own, frozenset({0})) == CpuTimes(17 / hz, 500 / hz)
    assert parse_proc(b"cpu0 x y\n", own, frozenset({0})) is None
    assert parse_proc(old, b"42 (truncated", frozenset({0})) is None


def test_decode_steps_run_with_the_step_count_and_prompt_batches_with_theirs(model_path, registry):
    """llama.cpp picks its batch count for any step over one token; a step of eight streams is
    a decode step all the same, so the context sets the count it wants before each decode."""
    import llama_cpp

    from server.engine.cpu_share import SMALL_STEP
    from server.engine.model import Model
    from tests.conftest import batch_context

    model = Model.load(model_path, registry.models["smollm2-135m"])
    ctx = batch_context(model, n_ctx=2048, n_seq=8)
    try:
        ctx.set_threads((1, 2), SMALL_STEP)
        ctx.decode([(1, 0, seq, True) for seq in range(8)])  # one token for each of 8 streams
        assert llama_cpp.llama_n_threads_batch(ctx.ptr) == 1
        ctx.decode([(1, pos, 0, pos == 99) for pos in range(1, 100)])  # a prompt
        assert llama_cpp.llama_n_threads_batch(ctx.ptr) == 2
        assert llama_cpp.llama_n_threads(ctx.ptr) == 1
    finally:
        ctx.close()
        model.close()


@pytest.mark.skipif(not os.path.exists("/proc/stat"), reason="Linux /proc")
def test_proc_sees_another_process_keep_a_core_busy():
    cpus = affinity()
    hog = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.3)
        a, t0 = read_proc(cpus), time.monotonic()
        time.sleep(1.0)
        b, t1 = read_proc(cpus), time.monotonic()
    finally:
        hog.kill()
        hog.wait()
    assert a is not None and b is not None
    others = ((b.busy - a.busy) - (b.own - a.own)) / (t1 - t0)
    assert 0.7 < others < len(cpus) + 0.1
    assert b.own - a.own < 0.2  # this process slept


def test_the_server_decodes_with_fewer_threads_while_the_cores_are_busy(server, client):
    from server.engine.base import available_cores
    from tests.test_lifecycle import metric

    cores = available_cores()
    if cores < 2:
        pytest.skip("one core: there is no thread to give up")
    count = {"model": "smollm2-135m", "prompt": "1, 2, 3, 4, 5,", "temperature": 0}

    def threads() -> float:
        return metric(server.url, "codeserve_cpu_threads", model="smollm2-135m")

    client.post("/v1/completions", json={**count, "max_tokens": 40}).raise_for_status()
    before = threads()  # all cores on a quiet machine; a busy one may already take some
    hogs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(cores)]
    try:
        time.sleep(0.5)
        r = client.post("/v1/completions", json={**count, "max_tokens": 150})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 150
        assert threads() < cores
    finally:
        for h in hogs:
            h.kill()
            h.wait()
    # The cores are free again, but for whatever else this machine runs: the count read before
    # the load comes back within a few requests (each one's first reading decides afresh).
    after = []
    for _ in range(4):
        time.sleep(0.5)
        r = client.post("/v1/completions", json={**count, "max_tokens": 150})
        assert r.status_code == 200
        after.append(threads())
        if after[-1] >= before:
            break
    assert after[-1] >= before, after
