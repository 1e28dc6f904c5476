"""Safe defaults: loopback only, unless a key (or an explicit opt-out) guards a wider bind."""

from __future__ import annotations

import pytest

from server.errors import ConfigError
from server.settings import ServerSettings


def test_defaults_are_local():
    s = ServerSettings(_env_file=None)
    assert s.host == "127.0.0.1" and s.port == 8000 and s.api_key is None


def test_non_loopback_without_key_is_refused():
    with pytest.raises(ConfigError, match="API key"):
        ServerSettings(host="0.0.0.0")


@pytest.mark.parametrize("kw", [{"api_key": "k"}, {"allow_unauthenticated_remote": True}])
def test_non_loopback_with_key_or_opt_out(kw):
    assert ServerSettings(host="0.0.0.0", **kw).host == "0.0.0.0"


@pytest.mark.parametrize("host", ["localhost", "127.0.0.2", "::1"])
def test_loopback_forms(host):
    assert ServerSettings(host=host).host == host


def test_environment_variables(monkeypatch):
    monkeypatch.setenv("CODESERVE_PORT", "9001")
    monkeypatch.setenv("CODESERVE_API_KEY", "from-env")
    s = ServerSettings()
    assert s.port == 9001 and s.api_key.get_secret_value() == "from-env"
