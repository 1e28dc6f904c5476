"""The editor-trace and round-robin workloads: trace generation, summaries, and a live run."""

from __future__ import annotations

import math

import pytest

from bench import editor_trace, round_robin
from bench.editor_session import N_FILES, TEMPLATES, TOP_LINES, make_trace, source_files


def words(text: str) -> int:
    return len(text.split())


@pytest.fixture(scope="module")
def files() -> list[str]:
    return source_files(300, salt="run-1", count=words)


def test_five_salted_real_files_of_the_asked_size(files):
    assert len(files) == N_FILES == 5
    assert len(set(files)) == 5
    for f in files:
        first = f.split("\n", 1)[0]
        assert first.startswith("# run-1 server/") and first.endswith(".py")
        assert 250 < words(f) <= 300  # cut at a line end just under the size
    assert source_files(300, salt="run-2", count=words)[0] != files[0]


def _text(fim) -> str:
    return fim.prefix + fim.suffix


@pytest.mark.parametrize("seed", range(8))
def test_one_edit_per_visit_round_robin(files, seed):
    visits = make_trace(files, rounds=4, seed=seed)
    assert [v.file for v in visits] == list(range(5)) * 4
    assert [v.kind for v in visits] == ["cold"] * 5 + ["return"] * 15
    before = [f.rstrip("\n").split("\n") for f in files]
    for v in visits:
        after = _text(v.request).split("\n")
        old = before[v.file]
        assert after[0] == old[0]  # the salt line is never edited
        if v.op == "insert":
            assert after[: v.line] + after[v.line + 1 :] == old
        else:
            assert len(after) == len(old) and after[v.line] != old[v.line]
            assert after[: v.line] + after[v.line + 1 :] == old[: v.line] + old[v.line + 1 :]
        if v.edit == "top":
            assert 1 <= v.line <= TOP_LINES and v.round > 0
        else:  # typed at the cursor: the request's prefix ends with the edited line
            assert v.request.prefix.endswith(after[v.line])
        # One keystroke later: a character more at the cursor, the suffix unchanged.
        assert v.keystroke.suffix == v.request.suffix
        assert v.keystroke.prefix[:-1] == v.request.prefix
        before[v.file] = _text(v.keystroke).split("\n")
    assert {v.edit for v in visits} <= {"local", "top"}


def test_trace_mixes_local_and_top_edits(files):
    visits = [v for seed in range(4) for v in make_trace(files, rounds=4, seed=seed)]
    top = sum(v.edit == "top" for v in visits) / sum(v.round > 0 for v in visits)
    assert 0.05 < top < 0.4  # mostly near the cursor, sometimes near the top
    assert {v.op for v in visits} == {"insert", "change"}


def test_trace_is_deterministic_for_a_seed(files):
    assert make_trace(files, 3, seed=1) == make_trace(files, 3, seed=1)
    assert make_trace(files, 3, seed=1) != make_trace(files, 3, seed=2)


def test_template_renders_continues_fim_prompt():
    t = TEMPLATES["starcoder"]
    assert t.render("def f(", "\n") == "<fim_prefix>def f(<fim_suffix>\n<fim_middle>"
    one = {"<|fim_prefix|>", "<|fim_suffix|>", "<|fim_middle|>"}
    assert editor_trace.pick_template(lambda m: 1 if m in one else 5) is TEMPLATES["qwen"]
    assert editor_trace.pick_template(lambda m: 5) is TEMPLATES["starcoder"]


def test_summaries_per_peer():
    rows = [
        ("a", "cold", 100.0, "local", 100, 0),
        ("a", "warm", 10.0, "local", 2, 98),
        ("a", "return", 30.0, "local", 20, 80),
        ("a", "warm", 20.0, "local", 2, 98),
        ("a", "return", 50.0, "top", 95, 5),
        ("a", "warm", 30.0, "local", 2, 98),
        ("b", "cold", 90.0, "local", 100, 0),
        ("b", "warm", 9.0, "local", None, None),  # a server that reports no timings
    ]
    records = [
        {"peer": p, "kind": k, "ttft_ms": ms, "edit": e, "prompt_n": n, "cache_n": c}
        for p, k, ms, e, n, c in rows
    ]
    out = editor_trace.summarise(records)
    a, b = out["a"], out["b"]
    assert a["cold_ms"]["median"] == 100 and a["warm_ms"]["median"] == 20
    assert a["return_ms"]["median"] == 40 and a["return_top_ms"]["runs"] == [50.0]
    assert a["return_over_warm"] == pytest.approx(2.0)
    assert a["evaluated_tokens"]["return_local"] == 20 and a["prompt_tokens"] == 100
    assert math.isnan(b["return_over_warm"]) and b["return_ms"]["runs"] == []
    md = editor_trace.markdown(out, {"files": 5, "prompt_tokens": 100, "rounds": 2, "tokens": 4})
    assert "| return / warm (issue #13: ≤ 2) | 2.00 | nan |" in md
    assert "| cold: first visit of a file | 100.0 [100] | 90.0 [100] |" in md


def test_round_robin_summary():
    laps = {"a": [[50.0, 60.0], [5.0, 7.0], [6.0, 8.0]], "b": [[40.0, 40.0], [4.0, 4.0]]}
    out = round_robin.summarise(laps)
    assert out["a"]["first_lap_ms"]["median"] == 55 and out["a"]["ttft_ms"]["median"] == 6.5
    assert out["b"]["ttft_ms"]["runs"] == [4.0, 4.0]
    assert "| a | 6.5 (5.0–8.0) | 55.0 (50.0–60.0) |" in round_robin.markdown(out, 8, 3)


def test_editor_trace_against_codeserve(server):
    """Small files on the real model, the five first visits and one return: every request
    measured, and the server's own counts show the keystroke request reusing the cached prefix."""
    out = editor_trace.measure(
        {"codeserve": server.url}, None, rounds=2, file_tokens=80, tokens=1, salt="t", visits=6
    )
    records = out["records"]
    assert len(records) == 6 * 2
    assert [r["kind"] for r in records[::2]] == ["cold"] * 5 + ["return"]
    assert all(r["ttft_ms"] > 0 and r["prompt_n"] is not None for r in records)
    assert 60 < out["meta"]["prompt_tokens"] <= 100  # 80-token files plus the template
    # The keystroke request finds its prefix (the file up to the cursor) cached; the suffix
    # after the cursor follows the changed text, so it is evaluated again.
    count = editor_trace.server_tokens(server.url, None)
    visits = make_trace(source_files(80, "t", count), rounds=2, seed=0)
    for r in records:
        if r["kind"] == "warm":
            cursor = count(TEMPLATES["starcoder"].pre + visits[r["visit"]].request.prefix)
            assert r["cache_n"] >= cursor - 2, r
    fig = out["figures"]["codeserve"]
    assert fig["cold_ms"]["median"] > 0 and fig["return_over_warm"] > 0
    assert "| warm: one keystroke later |" in editor_trace.markdown(out["figures"], out["meta"])


def test_round_robin_against_codeserve(server):
    out = round_robin.measure({"codeserve": server.url}, "smollm2-135m", laps=2, tokens=1)
    laps = out["laps"]["codeserve"]
    assert len(laps) == 2 and all(len(lap) == 8 for lap in laps)
    assert out["figures"]["codeserve"]["ttft_ms"]["median"] > 0


def test_llama_server_keeps_its_default_prompt_cache(tmp_path):
    from bench.harness import Target, llama_server_args

    args = llama_server_args(Target("m", tmp_path / "m.gguf", 4096, 2))
    cache_flags = {"--cache-ram", "-cram", "--cache-reuse", "--no-cache-prompt", "--cache-prompt"}
    assert not cache_flags & set(args)
    assert args[args.index("-np") + 1] == "8" and args[args.index("-c") + 1] == str(8 * 4096)


def test_report_shows_the_session_workloads():
    from bench import report

    figures = editor_trace.summarise(
        [
            {"peer": "codeserve", "kind": k, "edit": "local", "ttft_ms": ms}
            | {"prompt_n": 5, "cache_n": 95}
            for k, ms in (("cold", 90.0), ("return", 12.0), ("warm", 8.0))
        ]
    )
    rep = {
        "editor_trace": {
            "figures": figures,
            "meta": {"files": 5, "prompt_tokens": 100, "rounds": 2, "tokens": 4},
        },
        "round_robin": {
            "figures": round_robin.summarise({"codeserve": [[9.0], [3.0]]}),
            "meta": {"prompts": 8, "laps": 2},
        },
        "llama_server_flags": ["-m", "/models/x/m.gguf", "-np", "8"],
    }
    md = "\n".join(report._session_figures(rep))
    assert "| return / warm (issue #13: ≤ 2) | 1.50 |" in md
    assert "| codeserve | 3.0 | 9.0 |" in md
    assert "`-m m.gguf -np 8`" in md and "No prompt-cache flag" in md
