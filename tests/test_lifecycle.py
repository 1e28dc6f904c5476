"""Model lifecycle: keep_alive parsing, the manager's idle timer (fake engine), and the real
server unloading and reloading models over both APIs."""

from __future__ import annotations

import asyncio
import math
import time
import tomllib
from collections.abc import Iterator
from pathlib import Path

import httpx
import ollama
import pytest

from server.errors import ConfigError
from server.keepalive import NEVER, parse_keep_alive
from server.manager import DEFAULT_KEEP_ALIVE_S, ModelManager
from server.registry import parse_registry
from server.settings import ServerSettings
from tests.conftest import REPO, LiveServer, make_settings
from tests.fakes import FakeEngine

# -- keep_alive values ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        ("5m", 300.0),
        ("1h30m", 5400.0),
        ("300ms", 0.3),
        ("1.5s", 1.5),
        (30, 30.0),
        (2.5, 2.5),
        ("45", 45.0),
        (0, 0.0),
        ("0", 0.0),
        (-1, NEVER),
        ("-1m", NEVER),
        ("-1", NEVER),
    ],
)
def test_keep_alive_spellings(value, seconds):
    assert parse_keep_alive(value) == pytest.approx(seconds)


@pytest.mark.parametrize("value", ["", "5 minutes", "m", "5d", True, None, [1], "1h-5m"])
def test_keep_alive_rejects(value):
    with pytest.raises(ValueError):
        parse_keep_alive(value)


def _registry(tmp_path: Path, **tables):
    models = {}
    for name, extra in tables.items():
        (tmp_path / f"{name}.gguf").write_bytes(b"\0" * (1 << 20))
        models[name] = {"source": {"path": f"{name}.gguf"}, "n_ctx": 256, **extra}
    return parse_registry({"default_model": "a", "models": models}, tmp_path / "models.toml")


def test_registry_keep_alive_is_typed(tmp_path):
    reg = _registry(tmp_path, a={}, b={"keep_alive": "10m"}, c={"keep_alive": -1})
    assert reg.models["a"].keep_alive is None
    assert reg.models["b"].keep_alive == 600 and reg.models["c"].keep_alive == math.inf
    with pytest.raises(ConfigError, match=r'models\."d"\.keep_alive'):
        _registry(tmp_path, a={}, d={"keep_alive": "ten minutes"})


# -- the manager's idle timer, on a fake engine -------------------------------------------------


def _manager(tmp_path, **tables) -> ModelManager:
    reg = _registry(tmp_path, **tables)
    settings = ServerSettings(memory_budget_mb=1000, cache_dir=tmp_path / "cache")
    return ModelManager(reg, settings, lambda path, cfg: FakeEngine(size_bytes=1 << 20))


def test_default_keep_alive_rules(tmp_path):
    m = _manager(tmp_path, a={}, b={}, c={"preload": True}, d={"keep_alive": 0})
    cfg = m.registry.models
    assert m.configured_keep_alive(cfg["a"]) == NEVER  # the default model
    assert m.configured_keep_alive(cfg["b"]) == DEFAULT_KEEP_ALIVE_S
    assert m.configured_keep_alive(cfg["c"]) == NEVER  # preloaded
    assert m.configured_keep_alive(cfg["d"]) == 0


def test_idle_timer_unloads_and_leases_block_it(tmp_path):
    async def main():
        m = _manager(tmp_path, a={}, b={"keep_alive": 0.05})
        w = await m.get("b", hold=True)
        await asyncio.sleep(0.15)
        assert m.is_loaded("b")  # held: the timer has not started
        m.release(w)
        await asyncio.sleep(0.15)
        assert not m.is_loaded("b")
        w = await m.get("b", hold=True)
        m.release(w, keep_alive=0.0)  # a request's keep_alive 0: unload right away
        await asyncio.sleep(0.01)
        assert not m.is_loaded("b")
        await m.get("a")
        w = await m.get("b", hold=True)
        m.release(w, keep_alive=NEVER)
        await asyncio.sleep(0.15)
        assert m.is_loaded("a") and m.is_loaded("b")
        assert await m.request_unload("b") and not m.is_loaded("b")
        await m.close()

    asyncio.run(main())


def test_unload_request_waits_for_running_requests(tmp_path):
    async def main():
        m = _manager(tmp_path, a={}, b={})
        w = await m.get("b", hold=True)
        assert await m.request_unload("b")
        assert m.is_loaded("b")  # still held by a request
        m.release(w, keep_alive=NEVER)  # its own keep_alive does not cancel the unload
        await asyncio.sleep(0.01)
        assert not m.is_loaded("b")
        await m.close()

    asyncio.run(main())


# -- the real server ----------------------------------------------------------------------------

IDLE = "smollm2-135m-idle"  # keep_alive = "2s" in its models.toml table
OTHER = "smollm2-135m-ctx512"


@pytest.fixture(scope="module")
def life(model_path: Path) -> Iterator[LiveServer]:
    raw = tomllib.loads((REPO / "models.toml").read_text())
    raw["models"][IDLE] = {"source": {"path": str(model_path)}, "n_ctx": 512, "keep_alive": "2s"}
    raw["models"][OTHER] = {"source": {"path": str(model_path)}, "n_ctx": 512}
    live = LiveServer(make_settings(), parse_registry(raw, REPO / "models.toml")).start()
    yield live
    live.stop()


@pytest.fixture()
def oc(life) -> ollama.Client:
    return ollama.Client(host=life.url, timeout=120)


def resident(oc: ollama.Client) -> set[str]:
    return {m.model.removesuffix(":latest") for m in oc.ps().models}


def wait_until(pred, timeout: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.1)
    return pred()


def metric(url: str, name: str, **labels: str) -> float:
    want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for line in httpx.get(url + "/metrics").text.splitlines():
        if line.startswith(name + "{"):
            got = ",".join(sorted(line[len(name) + 1 : line.index("}")].split(",")))
            if got == want:
                return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_model_idles_out_and_reloads(life, oc):
    loads = metric(life.url, "codeserve_model_loads_total", model=IDLE)
    oc.generate(model=IDLE, prompt="Hi", options={"num_predict": 4})
    assert IDLE in resident(oc)
    assert wait_until(lambda: IDLE not in resident(oc)), "model did not idle out after 2s"
    assert metric(life.url, "codeserve_model_unloads_total", model=IDLE, reason="idle") >= 1
    assert oc.generate(model=IDLE, prompt="Hi", options={"num_predict": 4}).done
    assert metric(life.url, "codeserve_model_loads_total", model=IDLE) == loads + 2
    assert metric(life.url, "codeserve_model_resident", model=IDLE) == 1
    assert "smollm2-135m" in resident(oc)  # the default model stays


def test_busy_model_is_never_unloaded(life, oc):
    with httpx.Client(base_url=life.url, timeout=60) as c:
        # Greedy, raw: counting runs past 1,000 tokens, so the model is still busy at 3 s.
        options = {"num_predict": 3000, "temperature": 0}
        body = {"model": IDLE, "prompt": "1, 2, 3, 4, 5,", "raw": True, "options": options}
        with c.stream("POST", "/api/generate", json=body) as r:
            t0 = time.monotonic()
            busy = False
            for _ in r.iter_lines():
                if time.monotonic() - t0 > 3:  # longer than its keep_alive
                    busy = True
                    break
            assert busy, "the stream ended before the model had been busy past its keep_alive"
            assert IDLE in resident(oc)
    assert wait_until(lambda: IDLE not in resident(oc))


def test_keep_alive_zero_unloads_now(life, oc):
    assert oc.generate(model=OTHER, prompt="", keep_alive=-1).done_reason == "load"
    far = {m.model: m.expires_at for m in oc.ps().models}[f"{OTHER}:latest"]
    assert far.year > 2200
    assert oc.generate(model=OTHER, prompt="", keep_alive=0).done_reason == "unload"
    assert OTHER not in resident(oc)
    assert metric(life.url, "codeserve_model_unloads_total", model=OTHER, reason="request") >= 1
    # keep_alive 0 on a real request: unloaded as soon as it is answered
    r = oc.chat(model=OTHER, messages=[{"role": "user", "content": "Hi"}], keep_alive=0,
                options={"num_predict": 4})  # fmt: skip
    assert r.done
    assert wait_until(lambda: OTHER not in resident(oc), timeout=3)


def test_openai_side_lifecycle(life):
    import openai

    client = openai.OpenAI(base_url=life.url + "/v1", api_key="x", max_retries=0)
    with httpx.Client(base_url=life.url, timeout=60) as c:
        row = c.post(f"/v1/models/{OTHER}/load", json={"keep_alive": "1h"}).json()
        assert row["id"] == OTHER and row["keep_alive"] == 3600 and row["memory_bytes"] > 0
        listed = {m["id"]: m for m in c.get("/v1/resident_models").json()["data"]}
        assert listed["smollm2-135m"]["keep_alive"] is None  # never
        assert listed[OTHER]["expires_at"] > time.time() + 3000
        # the keep_alive extension field on /v1/completions
        client.completions.create(
            model=OTHER, prompt="x", max_tokens=2, extra_body={"keep_alive": 0}
        )
        assert wait_until(lambda: OTHER not in resident_v1(c), timeout=3)
        c.post(f"/v1/models/{OTHER}/load")
        gone = c.post(f"/v1/models/{OTHER}/unload").json()
        assert gone["unloaded"] is True and OTHER not in resident_v1(c)
        assert c.post("/v1/models/nope/load").status_code == 404
        bad = c.post("/v1/completions", json={"prompt": "x", "keep_alive": "later"})
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "keep_alive"


def resident_v1(c: httpx.Client) -> set[str]:
    return {m["id"] for m in c.get("/v1/resident_models").json()["data"]}
