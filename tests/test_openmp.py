"""libgomp's waiting policy, set before llama.cpp's CPU backend loads it (server/__init__.py).

A second engine in one process (an embedding model beside the default one) made libgomp sleep at
every barrier of every decode (bench.second_engine measures that; tests do not time it)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest


def _libgomp_settings(**env: str) -> dict[str, str]:
    """What libgomp read in a fresh process that imports codeserve, then llama_cpp."""
    environ = {
        k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")
    }
    out = subprocess.run(
        [sys.executable, "-c", "import server.cli, llama_cpp"],
        env={**environ, **env, "OMP_DISPLAY_ENV": "VERBOSE"},
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    settings = {}
    for line in out.stderr.splitlines():
        name, sep, value = line.strip().partition(" = ")
        if sep:
            settings[name] = value.strip("'")
    if "OMP_WAIT_POLICY" not in settings:
        pytest.skip("llama.cpp was built without OpenMP: nothing of libgomp's to set")
    return settings


def test_codeserve_sets_a_spinning_policy_that_keeps_libgomps_spin_count():
    got = _libgomp_settings()
    assert got["OMP_WAIT_POLICY"] == "ACTIVE"
    assert got["GOMP_SPINCOUNT"] == "300000"


@pytest.mark.parametrize(
    ("env", "policy"),
    [({"OMP_WAIT_POLICY": "PASSIVE"}, "PASSIVE"), ({"GOMP_SPINCOUNT": "5"}, None)],
)
def test_a_users_own_openmp_setting_wins(env, policy):
    got = _libgomp_settings(**env)
    if policy is not None:
        assert got["OMP_WAIT_POLICY"] == policy
    else:  # only the spin count given: codeserve chooses no policy either
        assert got["GOMP_SPINCOUNT"] == "5"
        assert got["OMP_WAIT_POLICY"] != "ACTIVE"
