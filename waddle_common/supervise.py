"""Start Waddle services as child processes and know when they are ready.

Each service prints one JSON log line with ``"ready": true`` and the ports
it bound once it is listening; ``start_service`` waits for exactly that
line (or the process's death, or a timeout). Used by ``make run`` and by
the end-to-end tests, which run every service on port 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import orjson


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
    echo: TextIO | None = None,
    timeout: float = 30.0,
    on_line: Callable[[str], None] | None = None,
) -> Service:
    """Run ``python -m module`` with ``env`` added to this process's environment."""
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
                    echo.write(f"[{name}] {line}\n")
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
    text = out.decode("utf-8", "replace")
    if proc.returncode != 0:
        raise ServiceFailed(f"{module} failed ({proc.returncode}):\n{text}")
    return text
