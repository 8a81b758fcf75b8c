"""``make run``'s supervisor (waddle_common.devrun), run for real as a process.

The stack starts on port 0; one service is killed with SIGKILL and must come
back on its port with a line that names it and the signal, while the
others keep their processes; Ctrl-C (SIGINT to the process group, as a
terminal sends it) then stops everything within a bound. A port that is
already taken is refused up front, naming the variable to change. The
restart delays and exit descriptions are checked on their own too.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import socket
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from waddle_common import devrun
from waddle_common.settings import Settings
from waddle_common.supervise import Backoff, ServiceFailed, describe_exit

START_TIMEOUT = 60.0
STOP_TIMEOUT = 30.0
ALL_PORTS_FREE = {
    "WADDLE_EDGE_PORT": "0",
    "WADDLE_CHANNEL_PORT": "0",
    "WADDLE_CHANNEL_METRICS_PORT": "0",
    "WADDLE_STORE_PORT": "0",
    "WADDLE_STORE_METRICS_PORT": "0",
}


class Devrun:
    """``python -m waddle_common.devrun`` in its own process group, its output collected."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.lines: list[str] = []
        self._grew = asyncio.Event()
        self._reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        assert self.proc.stdout is not None
        async for raw in self.proc.stdout:
            self.lines.append(raw.decode(errors="replace").rstrip("\n"))
            self._grew.set()
        self._grew.set()

    async def expect(self, pattern: str, timeout: float, start: int = 0) -> re.Match[str]:
        """The first line from ``start`` on matching ``pattern``; fails after ``timeout``."""
        compiled = re.compile(pattern)
        seen = start
        try:
            async with asyncio.timeout(timeout):
                while True:
                    for line in self.lines[seen:]:
                        if match := compiled.search(line):
                            return match
                    seen = len(self.lines)
                    if self._reader.done():
                        break
                    self._grew.clear()
                    await self._grew.wait()
        except TimeoutError:
            pass
        raise AssertionError(f"no line matching {pattern!r}; output:\n{self.output()}")

    def output(self, last: int = 60) -> str:
        return "\n".join(self.lines[-last:])

    async def wait(self, timeout: float) -> int:
        code = await asyncio.wait_for(self.proc.wait(), timeout)
        await asyncio.wait_for(self._reader, 10)
        return code


@contextlib.asynccontextmanager
async def devrun_process(tmp_path: Path, env: dict[str, str]) -> AsyncIterator[Devrun]:
    full_env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("WADDLE_")},
        "WADDLE_JWT_SECRET": "devrun-test-" + "s" * 32,
        "WADDLE_DATABASE_URL": f"sqlite+aiosqlite:///{tmp_path / 'waddle.db'}",
        "WADDLE_SHUTDOWN_GRACE_SECONDS": "2",
        "PYTHONUNBUFFERED": "1",
        **env,
    }
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "waddle_common.devrun",
        env=full_env,
        cwd=tmp_path,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        # Its own process group, like a terminal's foreground job.
        start_new_session=True,
    )
    run = Devrun(proc)
    try:
        yield run
    finally:
        # Whatever happened, nothing it started outlives the test.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        await proc.wait()
        run._reader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await run._reader


def alive(pid: int) -> bool:
    """Running (not exited, nor a zombie waiting to be reaped)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state != "Z"


async def wait_ok(http: aiohttp.ClientSession, url: str, timeout: float = 30.0) -> None:
    last = "no answer"
    try:
        async with asyncio.timeout(timeout):
            while True:
                with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                    async with http.get(url, timeout=aiohttp.ClientTimeout(total=2)) as response:
                        if response.status == 200:
                            return
                        last = f"HTTP {response.status}"
                await asyncio.sleep(0.1)  # poll interval of a bounded wait
    except TimeoutError:
        raise AssertionError(f"{url} not 200 within {timeout} s ({last})") from None


@pytest.mark.e2e
@pytest.mark.timeout(180)
async def test_a_killed_service_is_restarted_and_the_others_keep_running(tmp_path: Path) -> None:
    async with devrun_process(tmp_path, ALL_PORTS_FREE) as run, aiohttp.ClientSession() as http:
        url = (await run.expect(r"Waddle is running: open (\S+) ", START_TIMEOUT))[1]
        pids = {
            name: int((await run.expect(rf"\[waddle\] {name} is up \(pid (\d+)\)", 5))[1])
            for name in ("store", "channel", "edge")
        }
        assert all(alive(pid) for pid in pids.values()), pids
        await wait_ok(http, f"{url}readyz")

        mark = len(run.lines)
        os.kill(pids["edge"], signal.SIGKILL)
        await run.expect(
            rf"\[waddle\] edge \(pid {pids['edge']}\) was killed by SIGKILL .*restarting it in",
            15,
            mark,
        )
        new_edge = int((await run.expect(r"\[waddle\] edge is back \(pid (\d+)\)", 30, mark))[1])
        assert new_edge != pids["edge"] and alive(new_edge)
        # Back on the same port, and attached to the channel shard again.
        await wait_ok(http, f"{url}readyz")
        # The others never noticed: same processes, no line about them.
        assert alive(pids["store"]) and alive(pids["channel"])
        others = [
            line for line in run.lines[mark:] if re.match(r"\[waddle\] (store|channel) ", line)
        ]
        assert others == []

        # Ctrl-C: the terminal signals the whole foreground process group.
        mark = len(run.lines)
        os.killpg(run.proc.pid, signal.SIGINT)
        code = await run.wait(STOP_TIMEOUT)
        assert code == 0, run.output()
        for name, pid in {**pids, "edge": new_edge}.items():
            assert not alive(pid), f"{name} (pid {pid}) still runs after Ctrl-C"
        restarted = [line for line in run.lines[mark:] if "is back" in line]
        assert restarted == [], "Ctrl-C restarted a service"


@pytest.mark.e2e
@pytest.mark.timeout(60)
async def test_a_taken_port_is_refused_naming_its_variable(tmp_path: Path) -> None:
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        env = {**ALL_PORTS_FREE, "WADDLE_EDGE_PORT": str(port)}
        async with devrun_process(tmp_path, env) as run:
            code = await run.wait(30)
    text = run.output()
    assert code == 1, text
    assert f"port {port} on 127.0.0.1 (WADDLE_EDGE_PORT" in text
    assert "Another Waddle may be running" in text
    assert "is up" not in text, "nothing starts when a port is taken"
    assert not (tmp_path / "waddle.db").exists(), "nothing is migrated either"


def test_port_problems_name_shared_and_taken_ports(monkeypatch: pytest.MonkeyPatch) -> None:
    with (
        socket.create_server(("127.0.0.1", 0)) as taken,
        socket.create_server(("127.0.0.1", 0)) as shared,
    ):
        port = taken.getsockname()[1]
        # Given to two services at once (and, held here, taken as well).
        twice = str(shared.getsockname()[1])
        for key, value in {
            **ALL_PORTS_FREE,
            "WADDLE_STORE_METRICS_PORT": str(port),
            "WADDLE_CHANNEL_PORT": twice,
            "WADDLE_CHANNEL_METRICS_PORT": twice,
        }.items():
            monkeypatch.setenv(key, value)
        problems = devrun.port_problems(Settings())
    assert any(
        f"WADDLE_CHANNEL_PORT and WADDLE_CHANNEL_METRICS_PORT are both {twice}" in p
        for p in problems
    )
    (in_use,) = [p for p in problems if "already in use" in p]
    assert f"{port} on 127.0.0.1 (WADDLE_STORE_METRICS_PORT" in in_use
    assert f"{twice} on 127.0.0.1 (WADDLE_CHANNEL_PORT" in in_use
    assert "WADDLE_STORE_METRICS_PORT=0" in in_use, "several taken ports: suggest free ones"
    for key, value in ALL_PORTS_FREE.items():
        monkeypatch.setenv(key, value)
    assert devrun.port_problems(Settings()) == []


def test_backoff_doubles_up_to_its_cap_and_resets_after_a_long_run() -> None:
    backoff = Backoff(initial=1, maximum=8, reset_after=60)
    assert [backoff.next_delay(ran_for=0.5) for _ in range(6)] == [1, 2, 4, 8, 8, 8]
    assert backoff.next_delay(ran_for=61) == 1
    assert backoff.next_delay(ran_for=0.5) == 2
    with pytest.raises(ValueError):
        Backoff(initial=0)


@pytest.mark.parametrize(
    ("returncode", "said"),
    [
        (-signal.SIGKILL, "was killed by SIGKILL"),
        (-signal.SIGSEGV, "was killed by SIGSEGV"),
        (1, "exited with status 1"),
        (0, "exited with status 0"),
    ],
)
def test_exit_descriptions(returncode: int, said: str) -> None:
    assert describe_exit(returncode) == said


@pytest.mark.parametrize(
    ("host", "port", "address"),
    [
        ("127.0.0.1", 5, "127.0.0.1:5"),
        ("0.0.0.0", 5, "127.0.0.1:5"),
        ("::", 5, "[::1]:5"),
        ("10.1.2.3", 5, "10.1.2.3:5"),
    ],
)
def test_services_are_dialled_where_they_listen(host: str, port: int, address: str) -> None:
    assert devrun.reachable(host, port) == address


def test_a_port_taken_after_the_check_is_explained_too(monkeypatch: pytest.MonkeyPatch) -> None:
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        for key, value in {**ALL_PORTS_FREE, "WADDLE_EDGE_PORT": str(port)}.items():
            monkeypatch.setenv(key, value)
        failure = ServiceFailed(
            "edge did not become ready (ServiceFailed); last output:\n"
            f"OSError: [Errno 98] error while attempting to bind on address ('127.0.0.1', {port}): "
            "address already in use"
        )
        text = devrun.explain(failure, Settings())
    assert text.startswith("edge did not become ready (ServiceFailed); its output is above")
    assert "Errno 98" not in text, "the service's output is not repeated"
    assert f"port {port} on 127.0.0.1 (WADDLE_EDGE_PORT" in text
    assert "Another Waddle may be running" in text
