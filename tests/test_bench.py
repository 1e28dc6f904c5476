"""The benchmark suite runs end to end (--quick, as CI affords) and its pieces are correct."""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
from pathlib import Path

import llama_cpp
import pytest

from bench import humaneval as he
from bench.harness import percentile, summary
from bench.suite import Results, _paired, _ratios
from bench.workloads import humaneval


@pytest.fixture(scope="module")
def problems():
    return humaneval()


def test_humaneval_ships_164_problems(problems):
    assert len(problems) == 164 and problems[0].task_id == "HumanEval/0"


def test_canonical_solutions_pass_and_wrong_ones_fail(problems):
    assert all(he.passes(p, p.canonical_solution) for p in problems[:5])
    assert not he.passes(problems[0], "    return None\n")
    assert not he.passes(problems[0], "    while True:\n        pass\n", timeout_s=2)


def test_generated_code_has_no_network(problems):
    p = problems[0]
    probe = (
        "    import socket\n    s = socket.socket()\n    s.settimeout(1)\n"
        "    s.connect(('127.0.0.1', 9))\n" + p.canonical_solution
    )
    # connecting fails before the solution runs, so the program cannot pass
    assert not he.passes(p, probe)
    assert he.isolation() in ("netns", "no-sockets")


def test_pass_at_k_estimator():
    assert he.pass_at_k(10, 0, 1) == 0.0
    assert he.pass_at_k(10, 10, 5) == 1.0
    assert he.pass_at_k(10, 3, 1) == pytest.approx(0.3)
    assert he.pass_at_k(5, 1, 2) == pytest.approx(1 - (4 * 3) / (5 * 4))


def test_summaries():
    s = summary([3.0, 1.0, 2.0, float("nan")])
    assert (s["median"], s["min"], s["max"]) == (2.0, 1.0, 3.0)
    assert percentile([1, 2, 3, 4, 5], 0.5) == 3 and percentile([1, 2], 0.95) == pytest.approx(1.95)


def test_paired_ratios_pair_requests_and_skip_failed_ones():
    ours = {"decode_tok_s": [10.0, 20.0, float("nan")], "ttft_ms": [1.0, 2.0]}
    theirs = {"decode_tok_s": [5.0, 40.0, 1.0], "ttft_ms": [1.0]}
    # 2.0 and 0.5 (medians of the columns would give 15 / 5 = 3); ttft_ms does not line up.
    assert _paired(ours, theirs) == {"decode_tok_s (paired)": 1.25}


def test_concurrent_runs_get_a_ratio_paired_round_by_round():
    res = Results(
        concurrent={
            "codeserve": {8: [100.0, 130.0, 90.0]},
            "llama-server": {8: [110.0, 100.0, 95.0]},
        }
    )
    concurrent = {
        peer: {str(c): summary(v) for c, v in by.items()} for peer, by in res.concurrent.items()
    }
    r = _ratios(["codeserve", "llama-server"], res, {"codeserve": {}}, concurrent)["llama-server"]
    assert r["aggregate_tok_s@8"] == pytest.approx(100.0 / 100.0)  # medians of the columns
    # rounds: 0.909, 1.3, 0.947
    assert r["aggregate_tok_s@8 (paired)"] == pytest.approx(90.0 / 95.0)


def test_humaneval_through_the_api(server):
    out = he.evaluate(server.url, "smollm2-135m", limit=2, max_tokens=64)
    assert out["problems"] == 2 and len(out["results"]) == 2
    assert 0.0 <= out["pass_at"]["pass@1"] <= 1.0
    assert all(len(r["passed"]) == 1 for r in out["results"])


def test_quick_bench_writes_its_report(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "server.cli", "bench", "--quick", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    (report,) = tmp_path.glob("*.json")
    rep = json.loads(report.read_text())
    for peer in ("codeserve", "raw"):
        assert rep["single_stream"][peer]["decode_tok_s"]["median"] > 0
        assert rep["single_stream"][peer]["prefill_tok_s"]["median"] > 0
    assert rep["aggregate_tok_s"]["codeserve"]["1"]["median"] > 0
    assert rep["ratios_codeserve_over"]["raw"]["decode_tok_s"] > 0
    assert rep["ratios_codeserve_over"]["raw"]["decode_tok_s (paired)"] > 0
    assert rep["physical_limit"]["memory_bandwidth_gbs"] > 0
    assert report.with_suffix(".png").stat().st_size > 1000
    md = report.with_suffix(".md").read_text()
    assert "| decode tokens/s" in md
    # The editor trace and the round robin of short prompts, on codeserve (raw serves no HTTP).
    assert rep["editor_trace"]["figures"]["codeserve"]["return_ms"]["median"] > 0
    assert rep["round_robin"]["figures"]["codeserve"]["ttft_ms"]["median"] > 0
    assert "| return / warm (issue #13: ≤ 2) |" in md and "round robin" in md
    # Both ran the installed wheel's llama.cpp, and the report says so (LD_LIBRARY_PATH, set for
    # another build's sake, would put that build's libraries first).
    wheel_libs = (Path(llama_cpp.__file__).parent / "lib").resolve()
    libs = rep["libraries"]
    assert libs["codeserve"] == libs["raw"]
    assert {Path(p).name.split(".")[0] for p in libs["raw"]} >= {"libllama", "libggml-cpu"}
    assert {Path(p).parent.resolve() for p in libs["raw"]} == {wheel_libs}
    assert f"`{wheel_libs}/`" in md or f"`{Path(libs['raw'][0]).parent}/`" in md


def test_client_overhead_is_checked(server):
    import httpx

    from bench import client

    out = client.check_overhead(server.url)
    assert 0 < out["cpu_s"] < client.MAX_OVERHEAD_S
    # A client built per request (what httpx.get/httpx.stream do) is what the check exists for.
    fresh = client.overhead(lambda: httpx.get(server.url + "/health"), rounds=5)
    assert fresh["cpu_s"] > client.MAX_OVERHEAD_S
    with pytest.raises(client.HarnessTooSlow, match="harness"):
        client.check_overhead(server.url, limit_s=1e-9)


def test_stream_reuses_one_connection(server):
    from bench import client

    body = {"prompt": "def f(x):\n", "max_tokens": 4, "temperature": 0}
    a = client.stream(server.url, body)
    sock = client.connection(server.url)._conn.sock
    b = client.stream(server.url, body)
    assert client.connection(server.url)._conn.sock is sock
    for s in (a, b):
        assert s.tokens > 0 and 0 < s.ttft_s <= s.latency_s


def test_dialects_quick(server):
    from bench import dialects
    from tests.conftest import FIM_MODEL

    out = dialects.run(server.url, FIM_MODEL, rounds=1, prefix_chars=200, tokens=4)
    for route in ("/infill", "/v1/completions"):
        assert out["ttft_ms"][route]["median"] > 0
    assert "/api/generate" in out["ttft_ms"] or "404" in out["skipped"]["/api/generate"]
    assert "| /infill |" in dialects.markdown(out)


def test_shared_cpu_quick(server):
    from bench import shared_cpu

    urls = {"a": server.url, "b": server.url}
    out = shared_cpu.measure(urls, "smollm2-135m", loads=[0, 1], rounds=2, tokens=8)
    assert [r["load"] for r in out["rows"]] == [0, 1]
    for row in out["rows"]:
        assert all(v > 0 for v in row["decode_tok_s"].values())
        assert all(len(v) == 2 for v in row["runs"]["ttft_ms"].values())
    assert "| 1 | " in shared_cpu.markdown(out)


def test_busy_load_starts_and_stops_its_processes():
    import os

    from bench.contention import busy_load

    with busy_load(2) as pids:
        assert len(pids) == 2
        for pid in pids:
            os.kill(pid, 0)  # alive
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


def _children(pid: int) -> list[int]:
    kids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:  # the parent's pid, after the state
            kids.append(int(stat.parent.name))
    return kids


def test_a_stopped_suite_stops_its_servers_and_busy_loops(tmp_path):
    import os
    import signal

    cmd = [sys.executable, "-m", "server.cli", "bench", "--quick", "--contend", "1"]
    proc = subprocess.Popen([*cmd, "--out", str(tmp_path)], stderr=subprocess.PIPE, text=True)
    try:
        for line in proc.stderr:  # the bar's first round: the server is up, the load running
            if "round 1" in line:
                break
        kids = _children(proc.pid)
        assert len(kids) >= 2, kids  # codeserve and one busy loop
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 128 + signal.SIGTERM
        left = [pid for pid in kids if Path(f"/proc/{pid}").exists()]
    finally:
        proc.kill()
        proc.wait()
        for pid in kids:  # whatever the outcome, nothing is left to load the next tests
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    assert not left, left


def test_batched_speculation_bench_reports_both_modes(model_path):
    from bench.batched_speculation import bench_target, markdown

    rep = bench_target(model_path, "q8_0", rounds=1, n=1, simple=True)
    modes = {(r["streams"], r["mode"]) for r in rep["rows"]}
    simple = {(1, "simple off"), (1, "simple prompt_lookup")}
    assert modes == {(s, m) for s in (1, 8) for m in ("off", "prompt_lookup")} | simple
    # each engine's lookup is compared with its own plain decode
    assert {r["mode"] for r in rep["rows"] if r["ratio"] == 1.0} >= {"off", "simple off"}
    assert "single simple prompt_lookup" in rep["identical"]
    assert rep["cost"] and "verify(n)/step" in rep["cost"]
    assert "| 8 |" in markdown({"targets": [rep]})


def test_streams_quick(server, model_path):
    from bench import streams
    from bench.harness import token_counter

    count = token_counter(model_path, prompt=False)
    urls = {"a": server.url, "b": server.url}
    out = streams.measure(urls, "smollm2-135m", [1, 2], 1, 8, count)
    assert [r["streams"] for r in out["rows"]] == [1, 2]
    for row in out["rows"]:
        assert all(v > 0 for v in row["tokens_per_s"].values())
    assert "| 2 | " in streams.markdown(out)


def test_streams_long_prompts_are_distinct_stretches_of_source_with_fixed_answers(server):
    from bench import streams

    bodies = streams._bodies("smollm2-135m", 4, "1-2", 4, 8, 600)
    prompts = [b["prompt"] for b in bodies]
    assert all(len(p) > 600 for p in prompts)
    # No two share a chunk a cache could reuse: different stretches, not one text re-salted.
    bodies_text = [p.split("\n", 1)[1] for p in prompts]
    assert len({t[:200] for t in bodies_text}) == 4
    assert all(b["ignore_eos"] and b["max_tokens"] == 8 for b in bodies)
    out = streams.measure({"a": server.url}, "smollm2-135m", [2], 1, 4, prompt_chars=600)
    assert out["prompt_chars"] == 600 and out["rows"][0]["tokens_per_s"]["a"] > 0


def test_second_engine_bench_measures_both_configurations_over_http():
    from bench import second_engine
    from bench.harness import target

    target(second_engine.EMBEDDING_MODEL)  # pulled, as main() does
    rep = second_engine.measure(target().name, starts=1, rounds=1, tokens=8)
    assert [r["server"] for r in rep["rows"]] == list(second_engine.SERVERS)
    for row in rep["rows"]:
        assert row["before"] > 0 and row["after"] > 0
    assert "| libgomp default |" in second_engine.markdown(rep)
