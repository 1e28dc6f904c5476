"""The CLI is derived from the settings classes: every field is a flag and a variable."""

from __future__ import annotations

import argparse
import re
import subprocess
import sys

import pytest
from pydantic import Field, ValidationError

from server import __version__
from server.cli import build_parser, main, settings_flags
from server.settings import ServerSettings, StoreSettings


def settings_for(argv: list[str]) -> ServerSettings | StoreSettings:
    args = build_parser().parse_args(argv)
    cls, source = args.settings
    return cls(_cli_settings_source=source(parsed_args=args))


def help_text(command: str) -> str:
    sub = build_parser()._subparsers._group_actions[0].choices[command]  # type: ignore[union-attr]
    return re.sub(r"\s+", " ", sub.format_help())


def test_version(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0
    assert capsys.readouterr().out.strip() == f"codeserve {__version__}"


@pytest.mark.parametrize(("command", "cls"), [("serve", ServerSettings), ("pull", StoreSettings)])
def test_every_field_is_a_flag_with_its_default_and_variable(command, cls):
    text = help_text(command)
    for name, field in cls.model_fields.items():
        flag = "--" + name.replace("_", "-")
        env = "CODESERVE_" + name.upper()
        default = field.get_default(call_default_factory=True, validated_data={})
        assert re.search(
            rf"{flag}\b.*?\(default: {re.escape(str(default))}\) \[env: {env}\]", text
        ), f"{flag} in `codeserve {command} --help`"
    assert "default factory" not in text


def test_a_new_field_becomes_a_flag_without_touching_the_cli(monkeypatch):
    class Extended(ServerSettings):
        keep_alive_s: float = Field(300.0, gt=0, description="idle seconds before unloading")

    parser = argparse.ArgumentParser()
    source = settings_flags(parser, Extended)
    assert "--keep-alive-s" in parser.format_help()
    assert "CODESERVE_KEEP_ALIVE_S" in parser.format_help()
    args = parser.parse_args(["--keep-alive-s", "12.5"])
    assert Extended(_cli_settings_source=source(parsed_args=args)).keep_alive_s == 12.5
    monkeypatch.setenv("CODESERVE_KEEP_ALIVE_S", "7")
    assert (
        Extended(_cli_settings_source=source(parsed_args=parser.parse_args([]))).keep_alive_s == 7
    )


def test_flags_override_variables_which_override_defaults(monkeypatch):
    for var in [v for v in __import__("os").environ if v.startswith("CODESERVE_")]:
        monkeypatch.delenv(var)
    assert settings_for(["serve"]).port == 8000
    monkeypatch.setenv("CODESERVE_PORT", "9001")
    monkeypatch.setenv("CODESERVE_ENGINE", "simple")
    s = settings_for(["serve", "--port", "9002"])
    assert s.port == 9002 and s.engine == "simple"


def test_typed_flags():
    s = settings_for(
        ["serve", "--host", "0.0.0.0", "--allow-unauthenticated-remote", "--slots", "4"]
    )
    assert s.host == "0.0.0.0" and s.allow_unauthenticated_remote is True and s.slots == 4
    s = settings_for(["serve", "--api-key", "k", "--no-allow-unauthenticated-remote"])
    assert s.api_key.get_secret_value() == "k" and s.allow_unauthenticated_remote is False
    with pytest.raises(ValidationError, match="engine"):  # the Literal's choices, as from env
        settings_for(["serve", "--engine", "turbo"])


def test_pull_takes_only_the_store_settings():
    assert isinstance(settings_for(["pull", "--model", "x"]), StoreSettings)
    assert "--port" not in help_text("pull")


@pytest.mark.parametrize(
    ("argv", "env", "message"),
    [
        (
            ["serve", "--port", "eighty"],
            {},
            "invalid setting: port: Input should be a valid integer",
        ),
        (["serve", "--slots", "0"], {}, "invalid setting: slots: Input should be greater"),
        (["serve"], {"CODESERVE_QUEUE_SIZE": "many"}, "invalid setting: queue_size"),
        (["serve", "--host", "0.0.0.0"], {}, "refusing to listen on 0.0.0.0 without an API key"),
    ],
)
def test_bad_values_are_one_clear_line(argv, env, message):
    out = subprocess.run(
        [sys.executable, "-m", "server.cli", *argv],
        capture_output=True,
        text=True,
        timeout=60,
        env={**_clean_env(), **env},
    )
    assert out.returncode == 2
    assert message in out.stderr and "Traceback" not in out.stderr


def _clean_env() -> dict[str, str]:
    import os

    return {k: v for k, v in os.environ.items() if not k.startswith("CODESERVE_")}
