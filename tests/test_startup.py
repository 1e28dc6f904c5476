"""Start-up tells the truth: a model that must be served and cannot load stops `codeserve serve`
with the reason; a bad models.toml value is reported once."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from server.errors import ConfigError
from server.registry import parse_registry


def write_models(tmp_path: Path, body: str) -> Path:
    path = tmp_path / "models.toml"
    path.write_text(body)
    return path


def serve(models: Path, port: int = 0, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "server.cli", "serve", "--models-file", str(models)]
    env = {k: v for k, v in os.environ.items() if not k.startswith("CODESERVE_")}
    return subprocess.run(
        [*cmd, "--port", str(port)], capture_output=True, text=True, timeout=timeout, env=env
    )


def test_missing_default_gguf_fails_start_up_with_the_reason(tmp_path):
    models = write_models(
        tmp_path, 'default_model = "m"\n[models.m]\nsource = { path = "absent.gguf" }\n'
    )
    t0 = time.monotonic()
    out = serve(models)
    assert time.monotonic() - t0 < 30
    assert out.returncode != 0
    assert "start-up failed" in out.stderr
    assert f"no such file {tmp_path / 'absent.gguf'}" in out.stderr


def test_truncated_default_gguf_fails_start_up_with_the_reason(tmp_path, model_path):
    with model_path.open("rb") as f:
        (tmp_path / "cut.gguf").write_bytes(f.read(2 << 20))
    models = write_models(
        tmp_path, 'default_model = "m"\n[models.m]\nsource = { path = "cut.gguf" }\n'
    )
    t0 = time.monotonic()
    out = serve(models)
    assert time.monotonic() - t0 < 60
    assert out.returncode != 0
    assert "start-up failed: could not load model 'm'" in out.stderr
    assert "cut.gguf" in out.stderr.rsplit("start-up failed", 1)[1]


def test_a_broken_preload_model_fails_start_up_too(tmp_path, model_path):
    shutil.copy(model_path, tmp_path / "ok.gguf")
    models = write_models(
        tmp_path,
        'default_model = "ok"\n'
        '[models.ok]\nsource = { path = "ok.gguf" }\nn_ctx = 256\n'
        '[models.eager]\nsource = { path = "gone.gguf" }\npreload = true\n',
    )
    out = serve(models)
    assert out.returncode != 0
    assert "could not load model 'eager'" in out.stderr and "gone.gguf" in out.stderr


def test_a_broken_lazy_model_does_not_stop_the_server(tmp_path, model_path):
    models = write_models(
        tmp_path,
        'default_model = "ok"\n'
        f'[models.ok]\nsource = {{ path = "{model_path}" }}\nn_ctx = 256\n'
        '[models.lazy]\nsource = { path = "gone.gguf" }\n',
    )
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "server.cli", "serve", "--models-file", str(models)]
    log = tmp_path / "server.log"
    # A file, not a pipe: nobody reads a pipe while the server runs, and a full one blocks it.
    with log.open("w") as err:
        proc = subprocess.Popen([*cmd, "--port", str(port)], stderr=err, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            assert proc.poll() is None, log.read_text()[-2000:]
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        else:
            pytest.fail("server did not become healthy")
        r = httpx.post(
            url + "/v1/completions", json={"model": "lazy", "prompt": "x", "max_tokens": 1}
        )
        assert r.status_code == 503 and "gone.gguf" in r.json()["error"]["message"]
        assert proc.poll() is None, "a model nobody must preload does not stop the server"
        assert httpx.get(url + "/health").status_code == 200
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_bad_n_ctx_is_the_only_error_reported(tmp_path):
    raw = {
        "default_model": "m",
        "models": {
            "m": {"source": {"path": "m.gguf"}, "n_ctx": "big"},
            "fast": {"source": {"path": "f.gguf"}, "draft": "m"},
        },
    }
    with pytest.raises(ConfigError) as e:
        parse_registry(raw, tmp_path / "models.toml")
    _path, *problems = str(e.value).splitlines()
    assert problems == [
        'models."m".n_ctx: Input should be a valid integer, unable to parse string as an integer'
    ]


def test_bad_n_ctx_through_the_cli_is_one_error(tmp_path):
    models = write_models(
        tmp_path, 'default_model = "m"\n[models.m]\nsource = { path = "m.gguf" }\nn_ctx = -1\n'
    )
    out = serve(models)
    assert out.returncode == 2
    problems = out.stderr.strip().splitlines()[1:]
    assert problems == ['models."m".n_ctx: Input should be greater than 0'], out.stderr
