"""bench.tokenpath: a few tokens of the real default model, every stage of their path timed."""

from __future__ import annotations

import json

import pytest

from bench import tokenpath
from bench.tokenpath_stages import LATENCY, LOOP, STEP, Accumulated, markdown, report
from server.engine.base import HANDOVER_WAIT_S


@pytest.fixture(scope="module")
def rep() -> dict:
    return tokenpath.run(tokens=6, rounds=1, variants=("basehttp",))


def test_every_stage_of_every_token_is_timed(rep):
    for variant in ("served", "basehttp"):
        rows = rep["_rows"][variant]
        assert len(rows) == 5  # tokens 1..5: token 0's decode was the prompt's
        for row in rows[:-1]:  # the last token has no next llama_decode
            for s in [*LATENCY, *STEP, *LOOP]:
                assert s.key in row, (variant, s.key)
                assert row[s.key] >= 0, (variant, s.key, row[s.key])


def test_stages_add_up_to_their_totals(rep):
    for rows in rep["_rows"].values():
        for row in rows[:-1]:
            # Contiguous stages: their sum is the total, to rounding.
            chain = sum(row[s.key] for s in LATENCY)
            assert chain == pytest.approx(row["latency"], abs=0.01)
            step = sum(row[s.key] for s in STEP)
            assert step == pytest.approx(row["step"], abs=0.01)
            for s in [*LATENCY, *STEP]:
                assert row[s.key] <= max(row["latency"], row["step"])
            assert row["decode"] < row["step"]
            assert row["client_iti"] > 0


def test_report_has_the_figures_the_note_quotes(rep):
    served = rep["variants"]["served"]
    assert served["totals"]["decode"]["median"] > 0
    assert served["totals"]["client_tok_s"]["median"] > 0
    assert served["threads"]["decode thread (+ llama.cpp's first worker)"]["cpu_us_per_token"] > 0
    assert served["threads"]["client process"]["threads"] >= 1
    text = markdown({**rep, "command": "python -m bench.tokenpath"})
    assert "| **llama_decode returned → frame at the client** |" in text
    assert "served median | served p90 | basehttp median" in text


def test_a_frame_the_engine_waited_for_left_before_the_next_step(rep):
    rows = rep["_rows"]["served"]
    waited = [r for r in rows if "wait" in r]  # none if llama.cpp ran fewer threads than cores
    sent = [r for r in rows if "sent_ahead" in r]
    assert len(sent) >= len(waited) / 2, "most waits ended with the frame taken"
    for r in sent:
        assert r["sent_ahead"] > 0, r
        assert r["wait"] < (HANDOVER_WAIT_S + 0.010) * 1e6, r  # bounded (a wake-up may be late)


def test_a_stage_no_token_passed_through_is_null_in_strict_json():
    acc = Accumulated()
    figures = {"decode": 10.0, "step": 12.0, "client_iti": 13.0, "latency": 2.0, "loop_busy": 1.0}
    acc.add_round([figures], streamed=1)
    out = report(acc)
    assert out["latency_path"][LATENCY[0].key] == {
        "label": LATENCY[0].label,
        "thread": LATENCY[0].thread,
        "median_us": None,
        "p90_us": None,
        "n": 0,
    }
    json.dumps(out, allow_nan=False)  # what --json writes must parse anywhere
