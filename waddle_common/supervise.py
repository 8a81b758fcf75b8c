"""Start Waddle services as child processes, know when they are ready, keep them running.

Each service prints one JSON log line with ``"ready": true`` and the ports
it bound once it is listening; ``start_service`` waits for exactly that
line (or the process's death, or a timeout). Used by ``make run`` and by
the end-to-end tests, which run every service on port 0.

``Supervisor`` (what ``make run`` uses) restarts a service that dies, the
way Kubernetes restarts a container: after a delay that doubles with each
crash in a row (``Backoff``), with a line that names the service and how
it died, on the ports it had, while the other services keep running.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import orjson


class Echo(Protocol):
    """Where a service's output lines are copied (a terminal, a relay)."""

    def write(self, text: str, /) -> int: ...

    def flush(self) -> None: ...


class ServiceFailed(RuntimeError):
    """A service exited or did not become ready in time."""


@dataclass(eq=False)
class Service:
    name: str
    module: str
    env: dict[str, str]
    proc: asyncio.subprocess.Process
    ready: dict[str, Any]
    log_path: Path | None
    lines: list[str] = field(default_factory=list)
    _pump: asyncio.Task[None] | None = None

    @property
    def pid(self) -> int:
        return self.proc.pid

    def port(self, key: str) -> int:
        return int(self.ready[key])

    def log_tail(self, n: int = 40) -> str:
        return "\n".join(self.lines[-n:])

    async def stop(self, sig: int = signal.SIGTERM, timeout: float = 15.0) -> int:
        """Signal the process and wait for it; SIGKILL after ``timeout``."""
        if self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(sig)
            try:
                await asyncio.wait_for(self.proc.wait(), timeout)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    self.proc.kill()
                await self.proc.wait()
        if self._pump is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._pump, 5)
        rc = self.proc.returncode
        assert rc is not None
        return rc

    async def kill(self) -> int:
        return await self.stop(signal.SIGKILL, timeout=10.0)


async def start_service(
    name: str,
    module: str,
    env: Mapping[str, str],
    *,
    log_path: Path | None = None,
    echo: Echo | None = None,
    timeout: float = 30.0,
    on_line: Callable[[str], None] | None = None,
    tag: bool = True,
) -> Service:
    """Run ``python -m module`` with ``env`` added to this process's environment.

    ``echo`` gets each output line prefixed with ``[name]``, or as it is
    when ``tag`` is false (a supervisor whose own output is JSON lines)."""
    full_env = {**os.environ, **env, "PYTHONUNBUFFERED": "1"}
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        module,
        env=full_env,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    ready: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
    service = Service(name, module, dict(env), proc, {}, log_path)
    log_file = log_path.open("a", encoding="utf-8") if log_path else None

    async def pump() -> None:
        assert proc.stdout is not None
        try:
            async for raw in proc.stdout:
                line = raw.decode("utf-8", "replace").rstrip("\n")
                service.lines.append(line)
                if len(service.lines) > 5000:
                    del service.lines[:1000]
                if log_file:
                    log_file.write(line + "\n")
                    log_file.flush()
                if echo is not None:
                    echo.write(f"[{name}] {line}\n" if tag else f"{line}\n")
                    echo.flush()
                if on_line is not None:
                    on_line(line)
                if not ready.done() and '"ready"' in line:
                    with contextlib.suppress(orjson.JSONDecodeError):
                        entry = orjson.loads(line)
                        if isinstance(entry, dict) and entry.get("ready") is True:
                            ready.set_result(entry)
        finally:
            if log_file:
                log_file.close()
            if not ready.done():
                ready.set_exception(ServiceFailed(f"{name} exited before it was ready"))

    service._pump = asyncio.create_task(pump(), name=f"pump:{name}")
    try:
        service.ready = await asyncio.wait_for(asyncio.shield(ready), timeout)
    except (TimeoutError, ServiceFailed) as exc:
        await service.kill()
        raise ServiceFailed(
            f"{name} did not become ready ({type(exc).__name__}); "
            f"last output:\n{service.log_tail()}"
        ) from None
    except asyncio.CancelledError:
        # Whoever waited gave up (e.g. Ctrl-C during start-up): leave nothing behind.
        await service.kill()
        raise
    return service


async def run_to_completion(module: str, env: Mapping[str, str], timeout: float = 120.0) -> str:
    """Run a one-shot module (e.g. the migration); return its output or raise."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        module,
        env={**os.environ, **env},
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), timeout)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise ServiceFailed(f"{module} timed out") from None
    except asyncio.CancelledError:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()
        raise
    text = out.decode("utf-8", "replace")
    if proc.returncode != 0:
        raise ServiceFailed(f"{module} failed ({proc.returncode}):\n{text}")
    return text


def describe_exit(returncode: int) -> str:
    """How a process ended: ``was killed by SIGKILL``, ``exited with status 1``."""
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        return f"was killed by {name}"
    return f"exited with status {returncode}"


@dataclass
class Backoff:
    """Delays between restarts of a crashing service, like the kubelet's CrashLoopBackOff.

    The first restart waits ``initial`` seconds, each further one in a row
    twice as long, up to ``maximum``; a run that lasted ``reset_after``
    seconds starts the series again.
    """

    initial: float = 1.0
    maximum: float = 30.0
    reset_after: float = 60.0
    _next: float = field(default=0.0, init=False, repr=False)

    def __post_init__(self) -> None:
        if not 0 < self.initial <= self.maximum:
            raise ValueError("Backoff needs 0 < initial <= maximum")
        self._next = self.initial

    def next_delay(self, ran_for: float) -> float:
        """The wait before the next start, after a run that lasted ``ran_for`` seconds."""
        if ran_for >= self.reset_after:
            self._next = self.initial
        delay = self._next
        self._next = min(self._next * 2, self.maximum)
        return delay


@dataclass(eq=False)
class _Watched:
    name: str
    module: str
    env: dict[str, str]
    service: Service
    backoff: Backoff
    started_at: float
    task: asyncio.Task[None] | None = None


class Supervisor:
    """Runs services and restarts the one that dies, leaving the others alone.

    ``start`` starts a service and waits until it is ready, raising
    ``ServiceFailed`` if it never is (a first start that fails is a
    configuration error to report, not to retry). From then on a watcher
    restarts it whenever it exits, after ``Backoff`` delays, on the ports it
    bound the first time (``pin`` maps a ready-line key to the variable that
    sets that port), so that the services talking to it find it again.
    ``request_stop`` (safe to call from a signal handler) ends all restarts;
    ``stop`` then stops the services, the last started first.
    """

    def __init__(
        self,
        *,
        echo: Echo | None = None,
        log: Callable[[str], None] | None = None,
        backoff: Callable[[], Backoff] = Backoff,
        ready_timeout: float = 30.0,
        tag_lines: bool = True,
        on_exit: Callable[[str, int], None] | None = None,
    ) -> None:
        self.echo = echo
        self._tag = tag_lines
        # Told (name, return code) of every unexpected exit, before the restart.
        self._on_exit = on_exit
        self._log = log or (lambda line: print(line, flush=True))
        self._backoff = backoff
        self._ready_timeout = ready_timeout
        self._watched: list[_Watched] = []
        self.stopping = asyncio.Event()

    def log(self, message: str) -> None:
        self._log(f"[waddle] {message}")

    def service(self, name: str) -> Service:
        """The current (or last) process of service ``name``."""
        for watched in self._watched:
            if watched.name == name:
                return watched.service
        raise KeyError(name)

    async def start(
        self, name: str, module: str, env: Mapping[str, str], *, pin: Mapping[str, str]
    ) -> Service:
        service = await start_service(
            name, module, env, echo=self.echo, timeout=self._ready_timeout, tag=self._tag
        )
        pinned = {**env, **{var: str(service.port(key)) for key, var in pin.items()}}
        watched = _Watched(name, module, pinned, service, self._backoff(), time.monotonic())
        self._watched.append(watched)
        self.log(f"{name} is up (pid {service.pid})")
        watched.task = asyncio.create_task(self._keep_running(watched), name=f"watch:{name}")
        return service

    def request_stop(self) -> None:
        self.stopping.set()

    async def _stopped_within(self, delay: float) -> bool:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.stopping.wait(), delay)
        return self.stopping.is_set()

    async def _keep_running(self, watched: _Watched) -> None:
        while True:
            returncode = await watched.service.proc.wait()
            if self.stopping.is_set():
                return
            ran_for = time.monotonic() - watched.started_at
            delay = watched.backoff.next_delay(ran_for)
            if self._on_exit is not None:
                self._on_exit(watched.name, returncode)
            self.log(
                f"{watched.name} (pid {watched.service.pid}) {describe_exit(returncode)} "
                f"after {ran_for:.1f} s; restarting it in {delay:g} s"
            )
            while not await self._stopped_within(delay):
                watched.started_at = time.monotonic()
                try:
                    watched.service = await start_service(
                        watched.name,
                        watched.module,
                        watched.env,
                        echo=self.echo,
                        timeout=self._ready_timeout,
                        tag=self._tag,
                    )
                except ServiceFailed as exc:
                    delay = watched.backoff.next_delay(time.monotonic() - watched.started_at)
                    self.log(f"{exc}\n[waddle] trying {watched.name} again in {delay:g} s")
                    continue
                self.log(f"{watched.name} is back (pid {watched.service.pid})")
                break
            else:
                return

    async def stop(self, timeout: float = 15.0, *, together: bool = False) -> None:
        """End every restart, then stop the services, the last started first
        (or all at once with ``together``: peers that drain side by side)."""
        self.stopping.set()
        for watched in self._watched:
            if watched.task is not None:
                watched.task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await watched.task
        if together:
            await asyncio.gather(
                *(w.service.stop(timeout=timeout) for w in self._watched), return_exceptions=True
            )
            return
        for watched in reversed(self._watched):
            with contextlib.suppress(Exception):
                await watched.service.stop(timeout=timeout)
