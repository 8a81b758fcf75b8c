"""The container image, built with podman from the Dockerfile on a local base.

No registry is needed: ``k8s/ci-prepare-podman.sh`` installs podman and
makes ``localhost/debian-base:bookworm`` with debootstrap, and the build
installs Python from apt on it. The image then runs the migration, the
store, a channel shard and an edge the way the chart runs them (non-root,
read-only root, no capabilities, credentials as files in
``WADDLE_SECRETS_DIR``) and serves a real WebSocket client; the
image's HEALTHCHECK (kept by building in docker format) asks each running
service. Where podman is missing or cannot start containers, the tests skip
and say why.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import jwt
import pytest

from tests.k8s.chart import ROOT
from tests.support.client import WsClient

BASE_IMAGE = os.environ.get("WADDLE_TEST_BASE_IMAGE", "localhost/debian-base:bookworm")
IMAGE = "localhost/waddle:pytest"
# crun fails on this kind of host; runc with explicit ulimits works.
PODMAN = ["podman", "--runtime", "runc"]
ULIMITS = ["--ulimit", "nofile=1024:1024", "--ulimit", "nproc=1024:1024"]
# What the chart's securityContext enforces, as podman flags.
HARDENED = ["--read-only", "--cap-drop", "ALL", "--security-opt", "no-new-privileges"]
JWT_SECRET = "image-test-" + "s" * 32
BUILD_TIMEOUT = 900.0
START_TIMEOUT = 60.0


def run(cmd: list[str], timeout: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)


def tail(text: str, lines: int = 15) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


def podman_unusable_reason() -> str | None:
    """Why podman cannot build and run containers here, or None if it can."""
    if shutil.which("podman") is None:
        return "podman is not installed (k8s/ci-prepare-podman.sh installs it)"
    try:
        info = run([*PODMAN, "info"], timeout=60)
        if info.returncode != 0:
            return f"podman does not work here: {tail(info.stderr, 3)}"
        exists = run([*PODMAN, "image", "exists", BASE_IMAGE], timeout=60)
        if exists.returncode != 0:
            return f"base image {BASE_IMAGE} is missing (k8s/ci-prepare-podman.sh builds it)"
        probe = run(
            [*PODMAN, "run", "--rm", "--network", "host", *ULIMITS, BASE_IMAGE, "true"], 120
        )
        if probe.returncode != 0:
            return f"podman cannot run containers here: {tail(probe.stderr, 3)}"
    except subprocess.TimeoutExpired as exc:
        return f"podman did not answer in time: {exc.cmd}"
    return None


def host_ca_bundle() -> Path | None:
    """The host's trust store, for builds behind a TLS-intercepting proxy."""
    for candidate in (
        os.environ.get("PIP_CERT"),
        os.environ.get("SSL_CERT_FILE"),
        "/etc/ssl/certs/ca-certificates.crt",
    ):
        if candidate and Path(candidate).is_file():
            return Path(candidate)
    return None


@pytest.fixture(scope="module")
def image() -> str:
    reason = podman_unusable_reason()
    if reason is not None:
        pytest.skip(f"image test not run: {reason}")
    cmd = [
        *PODMAN,
        "build",
        # OCI images cannot carry a HEALTHCHECK; docker-format ones can.
        "--format",
        "docker",
        "--network",
        "host",
        *ULIMITS,
        "--build-arg",
        f"BASE_IMAGE={BASE_IMAGE}",
        "--file",
        str(ROOT / "Dockerfile"),
        "--tag",
        IMAGE,
    ]
    ca = host_ca_bundle()
    if ca is not None:
        cmd += [
            "--volume",
            f"{ca}:/run/build-ca.pem:ro",
            "--build-arg",
            "BUILD_CA_BUNDLE=/run/build-ca.pem",
        ]
    started = time.monotonic()
    try:
        built = run([*cmd, str(ROOT)], timeout=BUILD_TIMEOUT)
    except subprocess.TimeoutExpired:
        pytest.fail(f"podman build took longer than {BUILD_TIMEOUT:.0f} s")
    assert built.returncode == 0, f"podman build failed:\n{tail(built.stdout + built.stderr, 40)}"
    print(f"built {IMAGE} from {BASE_IMAGE} in {time.monotonic() - started:.0f} s")
    return IMAGE


@pytest.mark.timeout(BUILD_TIMEOUT + 120)
def test_image_is_non_root_and_has_no_compilers(image: str) -> None:
    inspected = json.loads(run([*PODMAN, "image", "inspect", image], timeout=60).stdout)
    config = inspected[0]["Config"]
    assert config["User"] == "10001:10001"
    assert healthcheck(inspected[0])[:1] == ["python"]
    assert "PYTHONDONTWRITEBYTECODE=1" in config["Env"]
    script = (
        'test "$(id -u)" = 10001 || exit 10; '
        "for c in gcc cc c++ clang make; do command -v $c >/dev/null && exit 11; done; "
        "touch /probe 2>/dev/null && exit 12; "
        "python -c 'import edge, channel_service, store_service' || exit 13; exit 0"
    )
    checked = run(
        [
            *PODMAN,
            "run",
            "--rm",
            "--network",
            "host",
            *ULIMITS,
            *HARDENED,
            image,
            "sh",
            "-c",
            script,
        ],
        timeout=120,
    )
    assert checked.returncode == 0, (
        f"rc={checked.returncode} (10 root, 11 compiler, 12 writable root, 13 import)\n"
        f"{tail(checked.stdout + checked.stderr)}"
    )


@dataclass(eq=False)
class Container:
    name: str
    proc: asyncio.subprocess.Process
    ready: dict[str, Any] = field(default_factory=dict)
    lines: list[str] = field(default_factory=list)

    def port(self, key: str) -> int:
        return int(self.ready[key])

    def output(self) -> str:
        return tail("\n".join(self.lines))


class Containers:
    """Services started from the image; every one is removed on exit."""

    def __init__(self, image: str, data: Path) -> None:
        self.image = image
        self.data = data
        self.prefix = f"waddle-test-{uuid.uuid4().hex[:8]}"
        self.started: list[Container] = []

    def _cmd(self, name: str, env: Mapping[str, str], module: str) -> list[str]:
        cmd = [*PODMAN, "run", "--rm", "--name", name, "--network", "host", *ULIMITS, *HARDENED]
        cmd += ["--volume", f"{self.data}:/data"]
        for key, value in env.items():
            cmd += ["--env", f"{key}={value}"]
        return [*cmd, self.image, "python", "-m", module]

    async def run_once(self, module: str, env: Mapping[str, str], timeout: float) -> str:
        name = f"{self.prefix}-{module.replace('.', '-').replace('_', '-')}"
        proc = await asyncio.create_subprocess_exec(
            *self._cmd(name, env, module),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        try:
            out, _ = await asyncio.wait_for(proc.communicate(), timeout)
        except TimeoutError:
            await self._remove(name)
            raise AssertionError(f"{module} did not finish within {timeout} s") from None
        text = out.decode(errors="replace")
        assert proc.returncode == 0, f"{module} exited {proc.returncode}:\n{tail(text)}"
        return text

    async def start(self, role: str, module: str, env: Mapping[str, str]) -> Container:
        name = f"{self.prefix}-{role}"
        proc = await asyncio.create_subprocess_exec(
            *self._cmd(name, env, module),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        container = Container(name, proc)
        self.started.append(container)
        assert proc.stdout is not None
        try:
            async with asyncio.timeout(START_TIMEOUT):
                async for raw in proc.stdout:
                    line = raw.decode(errors="replace").rstrip()
                    container.lines.append(line)
                    with contextlib.suppress(ValueError):
                        entry = json.loads(line)
                        if isinstance(entry, dict) and entry.get("ready") is True:
                            container.ready = entry
                            break
        except TimeoutError:
            raise AssertionError(
                f"{role} was not ready within {START_TIMEOUT} s:\n{container.output()}"
            ) from None
        assert container.ready, f"{role} exited before it was ready:\n{container.output()}"
        # Keep draining its output so that the container never blocks on a full pipe.
        asyncio.get_running_loop().create_task(self._drain(container))
        return container

    @staticmethod
    async def _drain(container: Container) -> None:
        assert container.proc.stdout is not None
        async for raw in container.proc.stdout:
            container.lines.append(raw.decode(errors="replace").rstrip())

    async def stop(self, container: Container, grace: int = 20) -> int:
        """SIGTERM (what the kubelet sends), then wait for the process to exit."""
        stopper = await asyncio.create_subprocess_exec(
            *PODMAN,
            "stop",
            "--time",
            str(grace),
            container.name,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
        )
        await asyncio.wait_for(stopper.wait(), grace + 30)
        return await asyncio.wait_for(container.proc.wait(), 30)

    async def _remove(self, name: str) -> None:
        proc = await asyncio.create_subprocess_exec(
            *PODMAN,
            "rm",
            "--force",
            "--ignore",
            name,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
        )
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(proc.wait(), 60)

    async def close(self) -> None:
        for container in reversed(self.started):
            await self._remove(container.name)
            with contextlib.suppress(TimeoutError, ProcessLookupError):
                await asyncio.wait_for(container.proc.wait(), 30)


@contextlib.asynccontextmanager
async def containers(image: str, data: Path) -> AsyncIterator[Containers]:
    pool = Containers(image, data)
    try:
        yield pool
    finally:
        await pool.close()


@pytest.fixture
def data_dir(tmp_path: Path) -> Iterator[Path]:
    data = tmp_path / "data"
    data.mkdir()
    # The image's user (10001) writes the SQLite file here.
    data.chmod(0o777)
    yield data


def healthcheck(inspected: dict[str, Any]) -> list[str]:
    """The image's HEALTHCHECK command (podman reports it beside Config, docker inside)."""
    found = inspected.get("Healthcheck") or inspected["Config"].get("Healthcheck")
    assert found, "the image has no HEALTHCHECK (built in OCI format?)"
    test: list[str] = found["Test"]
    assert test[0] == "CMD", test
    return test[1:]


async def podman(args: list[str], timeout: float) -> subprocess.CompletedProcess[str]:
    return await asyncio.to_thread(run, [*PODMAN, *args], timeout)


async def wait_ready(http: aiohttp.ClientSession, url: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    last = "no answer"
    while time.monotonic() < deadline:
        with contextlib.suppress(aiohttp.ClientError, TimeoutError):
            async with http.get(url, timeout=aiohttp.ClientTimeout(total=2)) as response:
                if response.status == 200:
                    return
                last = f"HTTP {response.status}"
        await asyncio.sleep(0.2)  # poll interval of a bounded wait, not a delay
    raise AssertionError(f"{url} not ready within {timeout} s ({last})")


@pytest.mark.e2e
@pytest.mark.timeout(BUILD_TIMEOUT + 240)
async def test_services_start_from_the_image_and_serve_a_websocket(
    image: str, data_dir: Path
) -> None:
    # Credentials as the chart hands them over: files named after their variables.
    secrets = data_dir / "secrets"
    secrets.mkdir()
    (secrets / "WADDLE_DATABASE_URL").write_text("sqlite+aiosqlite:////data/waddle.db\n")
    (secrets / "WADDLE_JWT_SECRET").write_text(JWT_SECRET + "\n")
    database = {"WADDLE_SECRETS_DIR": "/data/secrets"}
    common = {"WADDLE_LOG_LEVEL": "info", "WADDLE_SHUTDOWN_GRACE_SECONDS": "3"}
    async with containers(image, data_dir) as pool, aiohttp.ClientSession() as http:
        await pool.run_once("store_service.migrate", {**common, **database}, timeout=120)
        store = await pool.start(
            "store",
            "store_service",
            {
                **common,
                **database,
                "WADDLE_STORE_HOST": "127.0.0.1",
                "WADDLE_STORE_PORT": "0",
                "WADDLE_STORE_METRICS_PORT": "0",
            },
        )
        store_address = f"127.0.0.1:{store.port('grpc_port')}"
        channel = await pool.start(
            "channel",
            "channel_service",
            {
                **common,
                "WADDLE_CHANNEL_HOST": "127.0.0.1",
                "WADDLE_CHANNEL_PORT": "0",
                "WADDLE_CHANNEL_METRICS_PORT": "0",
                "WADDLE_STORE_ADDRESS": store_address,
            },
        )
        edge = await pool.start(
            "edge",
            "edge",
            {
                **common,
                "WADDLE_EDGE_HOST": "127.0.0.1",
                "WADDLE_EDGE_PORT": "0",
                "WADDLE_EDGE_ID": "podman-edge",
                "WADDLE_SECRETS_DIR": "/data/secrets",
                "WADDLE_CHANNEL_SHARDS": f"127.0.0.1:{channel.port('grpc_port')}",
                "WADDLE_STORE_ADDRESS": store_address,
            },
        )
        base = f"http://127.0.0.1:{edge.port('http_port')}"
        await wait_ready(http, f"{base}/readyz")

        token = jwt.encode(
            {
                "sub": "u-image",
                "username": "imagetest",
                "permissions": ["read", "write"],
                "exp": int(time.time()) + 600,
            },
            JWT_SECRET,
            algorithm="HS256",
        )
        client = await WsClient.connect(
            http,
            f"ws://127.0.0.1:{edge.port('http_port')}/channel/image-smoke/websocket",
            token=token,
        )
        first = await client.recv(timeout=15)
        assert first["type"] == "initial_state", first
        assert first["channelId"] == "image-smoke"
        await client.close()

        async with http.get(f"{base}/metrics", timeout=aiohttp.ClientTimeout(total=10)) as response:
            assert "waddle_edge_connects_total" in await response.text()
        for role, container in (("store", store), ("channel", channel)):
            url = f"http://127.0.0.1:{container.port('metrics_port')}/healthz"
            async with http.get(url, timeout=aiohttp.ClientTimeout(total=5)) as response:
                assert response.status == 200, role

        # The image's HEALTHCHECK asks each service on its port (given here, as
        # these ran on port 0), and fails when nothing answers there.
        inspected = json.loads((await podman(["image", "inspect", image], timeout=60)).stdout)
        check = healthcheck(inspected[0])
        for container, variable, key in (
            (store, "WADDLE_STORE_METRICS_PORT", "metrics_port"),
            (channel, "WADDLE_CHANNEL_METRICS_PORT", "metrics_port"),
            (edge, "WADDLE_EDGE_PORT", "http_port"),
        ):
            port = f"{variable}={container.port(key)}"
            done = await podman(["exec", "--env", port, container.name, *check], timeout=60)
            assert done.returncode == 0, f"{container.name}: {done.stdout}{done.stderr}"
            nothing = f"{variable}=1"
            done = await podman(["exec", "--env", nothing, container.name, *check], timeout=60)
            assert done.returncode != 0, f"{container.name}: healthy with nothing listening"

        # The kubelet's SIGTERM reaches PID 1 of the image and the edge drains and exits.
        started = time.monotonic()
        code = await pool.stop(edge)
        assert code == 0, f"edge exited {code} on SIGTERM:\n{edge.output()}"
        assert time.monotonic() - started < 15, "edge drain took longer than its grace"
