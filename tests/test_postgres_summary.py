"""``make test`` finds a local PostgreSQL server, or says loudly how many tests it skipped.

The summary comes from ``tests.support.postgres`` loaded as a pytest plugin;
it is checked on a pytest run of its own over a few generated tests.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import psycopg
import pytest
from sqlalchemy.engine import make_url

from tests.support.postgres import ENV_VAR, base_url, discover

ROOT = Path(__file__).resolve().parents[1]

TESTS = """
import pytest
from tests.support.postgres import base_url

@pytest.mark.parametrize("n", range(3))
def test_needs_postgres(n):
    base_url()

def test_skipped_for_another_reason():
    pytest.skip("not about databases")

def test_plain():
    pass
"""


def test_skipped_postgres_tests_are_counted_loudly(tmp_path: Path) -> None:
    (tmp_path / "test_generated.py").write_text(TESTS)
    env = {k: v for k, v in os.environ.items() if k not in (ENV_VAR, "CI", "PYTEST_ADDOPTS")}
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-p",
            "tests.support.postgres",
            "-p",
            "no:cacheprovider",
            "--rootdir",
            str(tmp_path),
            str(tmp_path),
        ],
        cwd=ROOT,
        env={**env, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    out = done.stdout + done.stderr
    assert done.returncode == 0, out
    assert "1 passed, 4 skipped" in out
    assert "PostgreSQL tests skipped" in out
    assert "SKIPPED 3 PostgreSQL tests" in out, out
    assert f"{ENV_VAR}=postgresql+psycopg://" in out


def test_nothing_to_say_when_none_were_skipped(tmp_path: Path) -> None:
    (tmp_path / "test_generated.py").write_text("def test_plain():\n    pass\n")
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "tests.support.postgres", str(tmp_path)],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stdout
    assert "PostgreSQL tests skipped" not in done.stdout


def test_discovery_finds_nothing_where_nothing_listens() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        free_port = probe.getsockname()[1]
    assert discover(port=free_port) is None


@pytest.mark.postgres
def test_discovery_finds_a_server_on_the_default_port() -> None:
    configured = make_url(base_url())
    if (configured.host, configured.port or 5432) != ("127.0.0.1", 5432):
        pytest.skip(f"{ENV_VAR} names another server than 127.0.0.1:5432")
    found = discover()
    assert found is not None
    conninfo = make_url(found).set(drivername="postgresql").render_as_string(hide_password=False)
    with psycopg.connect(conninfo, connect_timeout=5) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)
