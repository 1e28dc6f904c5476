"""`codeserve pull` of a Hugging Face source, through huggingface-hub's real download path.

The test starts a local server that answers the Hub's file API as huggingface-hub expects it
(read from its file_download.py): HEAD and GET on /{repo}/resolve/{revision}/{file}, with
X-Repo-Commit, ETag/X-Linked-Etag (the sha256 of an LFS file), Content-Length and Range support.
`codeserve pull` runs as a subprocess with HF_ENDPOINT pointing at it.
"""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

REPO_ID = "acme/tiny-GGUF"
FILE = "tiny-q4.gguf"
# Two revisions of the same file, with different bytes (large enough to take several chunks).
CONTENT = {
    "main": (b"GGUF main revision " * 20000, "1" * 40),
    "v2": (b"GGUF second revision " * 30000, "2" * 40),
    # Past two of huggingface-hub's 10 MiB read chunks: only whole chunks count as received.
    "big": (bytes(range(256)) * (24 << 12), "3" * 40),
}


@dataclass
class FakeHub:
    url: str = ""
    requests: list[tuple[str, str, str | None]] = field(default_factory=list)
    cut_first_get_at: int | None = None  # drop the connection after this many body bytes
    serve_instead: bytes | None = None  # bytes that do not match the advertised sha256


def _handler(hub: FakeHub) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: object) -> None:
            pass

        def _resolve(self) -> tuple[bytes, str] | None:
            m = re.fullmatch(rf"/{re.escape(REPO_ID)}/resolve/([^/]+)/{re.escape(FILE)}", self.path)
            return CONTENT.get(m.group(1)) if m else None

        def _headers(self, data: bytes, commit: str, status: int, length: int) -> None:
            etag = f'"{hashlib.sha256(data).hexdigest()}"'
            self.send_response(status)
            self.send_header("X-Repo-Commit", commit)
            self.send_header("ETag", etag)
            self.send_header("X-Linked-Etag", etag)
            self.send_header("X-Linked-Size", str(len(data)))
            self.send_header("Accept-Ranges", "bytes")
            self.send_header("Content-Length", str(length))
            self.send_header("Content-Type", "application/octet-stream")

        def do_HEAD(self) -> None:
            hub.requests.append(("HEAD", self.path, self.headers.get("Range")))
            found = self._resolve()
            if found is None:
                self.send_error(404)
                return
            data, commit = found
            self._headers(data, commit, 200, len(data))
            self.end_headers()

        def do_GET(self) -> None:
            rng = self.headers.get("Range")
            first_get = not any(r[0] == "GET" for r in hub.requests)
            hub.requests.append(("GET", self.path, rng))
            found = self._resolve()
            if found is None:
                self.send_error(404)
                return
            data, commit = found
            body = hub.serve_instead if hub.serve_instead is not None else data
            start = int(re.fullmatch(r"bytes=(\d+)-", rng).group(1)) if rng else 0
            self._headers(data, commit, 206 if rng else 200, len(body) - start)
            if rng:
                self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
            self.end_headers()
            if first_get and hub.cut_first_get_at is not None:
                self.wfile.write(body[start : hub.cut_first_get_at])
                self.wfile.flush()
                self.close_connection = True  # the client sees a body cut short
                return
            self.wfile.write(body[start:])

    return Handler


@pytest.fixture
def hub() -> Iterator[FakeHub]:
    state = FakeHub()
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(state))
    state.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield state
    server.shutdown()
    thread.join(timeout=10)


def pull(tmp_path: Path, hub: FakeHub, **source: str) -> subprocess.CompletedProcess[str]:
    entries = ", ".join(f'{k} = "{v}"' for k, v in {"hf": REPO_ID, "file": FILE, **source}.items())
    models = tmp_path / "models.toml"
    models.write_text(f'default_model = "tiny"\n[models.tiny]\nsource = {{ {entries} }}\n')
    env = {
        **os.environ,
        "HF_ENDPOINT": hub.url,
        "HF_HOME": str(tmp_path / "hf"),
        "HF_HUB_DISABLE_XET": "1",
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "NO_PROXY": "127.0.0.1",
    }
    for proxy in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "HF_HUB_OFFLINE"):
        env.pop(proxy, None)
    cmd = [sys.executable, "-m", "server.cli", "pull", "--models-file", str(models)]
    cmd += ["--cache-dir", str(tmp_path / "cache")]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)


def cached_files(tmp_path: Path) -> list[Path]:
    """Model bytes in the Hugging Face cache: its blobs and the snapshot entries linking them."""
    root = tmp_path / "hf" / "hub"
    return [p for p in root.rglob("*") if {"blobs", "snapshots"} & set(p.parts) and not p.is_dir()]


def test_download_with_progress_then_served_from_cache(tmp_path, hub):
    data, commit = CONTENT["main"]
    out = pull(tmp_path, hub, sha256=hashlib.sha256(data).hexdigest())
    assert out.returncode == 0, out.stderr
    path = Path(out.stdout.split(": ", 1)[1].rsplit(" (", 1)[0])
    assert path.read_bytes() == data
    assert f"snapshots/{commit}/{FILE}" in str(path)
    assert [r[0] for r in hub.requests] == ["HEAD", "HEAD", "GET"]  # ours checks the pin first
    # huggingface-hub's progress bar, sized from the metadata, reached the whole file.
    assert "100%" in out.stderr and FILE in out.stderr
    hub.requests.clear()
    again = pull(tmp_path, hub, sha256=hashlib.sha256(data).hexdigest())
    assert again.returncode == 0 and again.stdout == out.stdout
    assert hub.requests == [], "a pulled model is served from the cache without the network"


def test_revision_is_the_one_fetched(tmp_path, hub):
    data, commit = CONTENT["v2"]
    out = pull(tmp_path, hub, revision="v2")
    assert out.returncode == 0, out.stderr
    assert {path for _, path, _ in hub.requests} == {f"/{REPO_ID}/resolve/v2/{FILE}"}
    path = Path(out.stdout.split(": ", 1)[1].rsplit(" (", 1)[0])
    assert path.read_bytes() == data and commit in str(path)
    refs = tmp_path / "hf" / "hub" / f"models--{REPO_ID.replace('/', '--')}" / "refs" / "v2"
    assert refs.read_text() == commit


def test_interrupted_download_resumes_from_where_it_stopped(tmp_path, hub):
    data, _ = CONTENT["big"]
    hub.cut_first_get_at = 15 << 20
    out = pull(tmp_path, hub, revision="big", sha256=hashlib.sha256(data).hexdigest())
    assert out.returncode == 0, out.stderr
    ranges = [r[2] for r in hub.requests if r[0] == "GET"]
    assert len(ranges) == 2 and ranges[0] is None, ranges
    start = int(re.fullmatch(r"bytes=(\d+)-", ranges[1] or "").group(1))
    assert 0 < start <= hub.cut_first_get_at, "the retry asked only for what was missing"
    assert "resume" in out.stderr  # huggingface-hub says it is resuming
    path = Path(out.stdout.split(": ", 1)[1].rsplit(" (", 1)[0])
    assert path.read_bytes() == data


def test_sha256_mismatch_is_refused_and_leaves_nothing(tmp_path, hub):
    data, _ = CONTENT["main"]
    expected = hashlib.sha256(data).hexdigest()
    hub.serve_instead = bytes(reversed(data))  # same size, other bytes
    out = pull(tmp_path, hub, sha256=expected)
    assert out.returncode == 2
    assert "sha256 mismatch" in out.stderr and expected in out.stderr
    assert cached_files(tmp_path) == []
    assert not list((tmp_path / "cache").rglob("*.gguf"))
    # Nothing cached means the next pull downloads again (and, with the right bytes, succeeds).
    hub.serve_instead = None
    hub.requests.clear()
    again = pull(tmp_path, hub, sha256=expected)
    assert again.returncode == 0, again.stderr
    assert [r[0] for r in hub.requests] == ["HEAD", "HEAD", "GET"]


def test_a_pin_the_hub_contradicts_is_refused_before_downloading(tmp_path, hub):
    data, _ = CONTENT["main"]
    out = pull(tmp_path, hub, sha256="0" * 64)
    assert out.returncode == 2
    assert "sha256 mismatch" in out.stderr and hashlib.sha256(data).hexdigest() in out.stderr
    assert [r[0] for r in hub.requests] == ["HEAD"], "no byte of the file was fetched"
    assert cached_files(tmp_path) == []
