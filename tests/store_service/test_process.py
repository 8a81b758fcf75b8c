"""``python -m store_service`` as a real process (readiness line, health, metrics, SIGTERM); its loop."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import grpc.aio
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from store_service import __main__ as store_main
from store_service.migrate import NOT_MIGRATED
from store_service.server import StartupError, start
from tests.store_service.conftest import store_settings
from tests.store_service.helpers import eventually
from waddle_common import logs

ROOT = Path(__file__).resolve().parents[2]
READY_TIMEOUT = 30.0
EXIT_TIMEOUT = 20.0


def launch(database_url: str, workdir: Path) -> tuple[subprocess.Popen[bytes], Path, Path]:
    stdout, stderr = workdir / "store.out", workdir / "store.err"
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "WADDLE_DATABASE_URL": database_url,
        "WADDLE_STORE_HOST": "127.0.0.1",
        "WADDLE_STORE_PORT": "0",
        "WADDLE_STORE_METRICS_PORT": "0",
        "WADDLE_SHUTDOWN_GRACE_SECONDS": "2",
    }
    with stdout.open("wb") as out, stderr.open("wb") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "store_service"], cwd=workdir, env=env, stdout=out, stderr=err
        )
    return proc, stdout, stderr


@pytest.fixture
def reaper() -> Iterator[list[subprocess.Popen[bytes]]]:
    """Kill whatever a failed test left running."""
    procs: list[subprocess.Popen[bytes]] = []
    yield procs
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=EXIT_TIMEOUT)


def json_lines(path: Path) -> list[dict[str, Any]]:
    lines = []
    for line in path.read_text().splitlines():
        try:
            lines.append(json.loads(line))
        except ValueError:
            continue  # a half-written line
    return lines


def ready_line(path: Path) -> dict[str, Any] | None:
    return next((entry for entry in json_lines(path) if entry.get("ready") is True), None)


async def test_process_reports_ports_serves_and_exits_zero_on_sigterm(
    migrated_url: str, tmp_path: Path, reaper: list[subprocess.Popen[bytes]]
) -> None:
    proc, stdout, stderr = launch(migrated_url, tmp_path)
    reaper.append(proc)

    def started() -> bool:
        assert proc.poll() is None, stderr.read_text()
        return ready_line(stdout) is not None

    await eventually(started, READY_TIMEOUT)
    ready = ready_line(stdout)
    assert ready is not None
    assert ready["service"] == "store"
    grpc_port, metrics_port = ready["grpc_port"], ready["metrics_port"]
    assert isinstance(grpc_port, int) and grpc_port > 0
    assert isinstance(metrics_port, int) and metrics_port > 0

    async with grpc.aio.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
        reply = await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=""), timeout=10
        )
        assert reply.status == health_pb2.HealthCheckResponse.SERVING

    timeout = aiohttp.ClientTimeout(total=10)
    async with aiohttp.ClientSession(timeout=timeout) as http:
        async with http.get(f"http://127.0.0.1:{metrics_port}/metrics") as response:
            assert response.status == 200
            body = await response.text()
        async with http.get(f"http://127.0.0.1:{metrics_port}/healthz") as response:
            assert response.status == 200
    assert "waddle_store_append_seconds" in body
    assert "waddle_grpc_server_seconds" in body

    proc.send_signal(signal.SIGTERM)
    code = await asyncio.to_thread(proc.wait, EXIT_TIMEOUT)
    assert code == 0, stderr.read_text()
    assert [e["event"] for e in json_lines(stdout)][-2:] == ["stopping", "stopped"]


async def test_process_refuses_an_unmigrated_database(
    db_url: str, tmp_path: Path, reaper: list[subprocess.Popen[bytes]]
) -> None:
    proc, stdout, stderr = launch(db_url, tmp_path)
    reaper.append(proc)
    code = await asyncio.to_thread(proc.wait, EXIT_TIMEOUT)
    assert code == 1
    [line] = stderr.read_text().splitlines()
    assert line.startswith(NOT_MIGRATED)
    assert ready_line(stdout) is None


async def test_start_refuses_an_unmigrated_database(db_url: str) -> None:
    with pytest.raises(StartupError, match="database not migrated: run `make migrate`"):
        await start(store_settings(db_url))


async def test_start_reports_a_database_it_cannot_open(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    # The database's folder would have to be inside a regular file.
    with pytest.raises(StartupError, match=r"^cannot open database"):
        await start(store_settings(f"sqlite+aiosqlite:///{blocker / 'x.db'}"))


async def test_start_reports_an_unreachable_database() -> None:
    # Port 1: nothing listens, the connection is refused at once.
    with pytest.raises(StartupError, match=r"^database unreachable"):
        await start(store_settings("postgresql+psycopg://postgres@127.0.0.1:1/test"))


def test_main_runs_the_store_on_uvloop(monkeypatch: pytest.MonkeyPatch) -> None:
    loops: list[str] = []

    async def fake_serve(_settings: object) -> int:
        loops.append(type(asyncio.get_running_loop()).__module__)
        return 0

    monkeypatch.setattr(store_main, "serve", fake_serve)
    monkeypatch.setattr(logs, "setup", lambda *_args: None)
    policy = asyncio.get_event_loop_policy()
    try:
        with pytest.raises(SystemExit) as exited:
            store_main.main()
    finally:
        # uvloop.install() swaps the process-wide policy; give pytest its own back.
        asyncio.set_event_loop_policy(policy)
    assert exited.value.code == 0
    assert loops == ["uvloop"]
