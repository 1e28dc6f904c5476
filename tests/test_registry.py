"""models.toml validation: every problem is a start-up error naming the model and key."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from server.errors import ConfigError
from server.registry import HuggingFaceSource, LocalSource, PyPISource, load_registry

REPO = Path(__file__).resolve().parent.parent

GOOD = """
default_model = "a"
[defaults]
n_ctx = 2048
kv_cache = "q8_0"
[models."a"]
source = { path = "a.gguf" }
[models."b"]
source = { hf = "org/repo", file = "b.gguf" }
draft = "a"
n_ctx = 1024
"""


def load(tmp_path: Path, text: str):
    p = tmp_path / "models.toml"
    p.write_text(text)
    return load_registry(p)


def test_repo_models_file_is_valid():
    reg = load_registry(REPO / "models.toml")
    assert reg.default.name == "smollm2-135m"
    assert isinstance(reg.default.source, PyPISource)
    for name in (
        "qwen2.5-coder-0.5b",
        "qwen2.5-coder-1.5b",
        "qwen2.5-coder-3b",
        "deepseek-coder-1.3b",
        "starcoder2-3b",
        "codegemma-2b",
        "gemma3-270m",
    ):
        assert name in reg.models
    assert len(reg.models["gemma3-270m"].source.wheel_files) == 4


def test_defaults_apply_and_models_override(tmp_path):
    reg = load(tmp_path, GOOD)
    a, b = reg.models["a"], reg.models["b"]
    assert a.n_ctx == 2048 and b.n_ctx == 1024
    assert a.kv_cache == "q8_0" and a.flash_attn, "a quantized V cache needs flash attention"
    assert isinstance(a.source, LocalSource) and isinstance(b.source, HuggingFaceSource)
    assert reg.resolve_path(a.source.path) == (tmp_path / "a.gguf").resolve()


@pytest.mark.parametrize(
    "edit, expected",
    [
        (("n_ctx = 1024", 'n_ctx = "big"'), 'models."b".n_ctx'),
        (("n_ctx = 1024", "n_ctx = -3"), 'models."b".n_ctx'),
        (("n_ctx = 1024", "nctx = 1024"), 'models."b".nctx'),
        (('draft = "a"', 'draft = "zzz"'), 'models."b".draft: names no model: "zzz"'),
        (('default_model = "a"', 'default_model = "nope"'), "default_model: names no model"),
        (('default_model = "a"', ""), "default_model: missing"),
        (('kv_cache = "q8_0"', 'kv_cache = "int3"'), "defaults.kv_cache"),
        (('file = "b.gguf" }', 'file = "b.gguf", colour = 1 }'), 'models."b".source'),
        (('source = { path = "a.gguf" }', 'source = { pypi = "x==1" }'), 'models."a".source'),
    ],
)
def test_bad_files_name_the_model_and_key(tmp_path, edit, expected):
    old, new = edit
    assert old in GOOD
    with pytest.raises(ConfigError) as e:
        load(tmp_path, GOOD.replace(old, new, 1))
    assert expected in str(e.value)


def test_not_toml_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="not valid TOML"):
        load(tmp_path, "default_model = ")
    with pytest.raises(ConfigError, match="not found"):
        load_registry(tmp_path / "absent.toml")


def test_unknown_top_level_key(tmp_path):
    with pytest.raises(ConfigError, match="unknown top-level key"):
        load(tmp_path, GOOD + "\n[servers]\nx = 1\n")


def test_every_model_source_parses_as_its_kind():
    raw = tomllib.loads((REPO / "models.toml").read_text())
    reg = load_registry(REPO / "models.toml")
    for name, table in raw["models"].items():
        kind = {"path": LocalSource, "hf": HuggingFaceSource}.get(
            next(iter(set(table["source"]) & {"path", "hf"}), ""), PyPISource
        )
        assert isinstance(reg.models[name].source, kind)
