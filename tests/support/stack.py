"""The whole Waddle stack as real processes on free ports, for end-to-end tests.

``start_stack`` migrates a fresh database (a SQLite file under the test's
temporary folder, or a fresh PostgreSQL schema), starts the store, N
channel shards and M edges with ``python -m ...`` on port 0, waits for each
one's ready line, and stops everything on exit. Services can be killed and
restarted on the same ports for fault tests.

``python -m tests.support.stack --json`` does the same from the command line
(development mode on) for tests written in other languages: it prints one
JSON line with ``edge_url``, ``edge_urls`` and ``jwt_secret`` and runs until
SIGTERM or until its standard input closes. ``--edges N`` starts N edges,
``--env NAME=VALUE`` (repeatable) sets a variable for every service. Lines
on standard input are commands, each answered with one JSON line:
``restart_edge [i]`` kills edge ``i`` (default 0) and starts it again on the
same port (answer ``{"event": "edge_restarted", "edge": i}``); anything else
is answered ``{"event": "error", ...}``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jwt
import orjson

from waddle_common.supervise import Service, run_to_completion, start_service

JWT_SECRET = "test-secret-" + "x" * 20


@dataclass(eq=False)
class Stack:
    tmp: Path
    database_url: str
    base_env: dict[str, str]
    store: Service
    channels: list[Service] = field(default_factory=list)
    edges: list[Service] = field(default_factory=list)
    jwt_secret: str = JWT_SECRET

    # -- addresses ----------------------------------------------------------

    @property
    def store_address(self) -> str:
        return f"127.0.0.1:{self.store.port('grpc_port')}"

    @property
    def shard_addresses(self) -> list[str]:
        return [f"127.0.0.1:{c.port('grpc_port')}" for c in self.channels]

    def edge_port(self, i: int = 0) -> int:
        return self.edges[i].port("http_port")

    @property
    def edge_url(self) -> str:
        return f"http://127.0.0.1:{self.edge_port(0)}"

    def http_url(self, path: str, edge: int = 0) -> str:
        return f"http://127.0.0.1:{self.edge_port(edge)}{path}"

    def ws_url(self, channel_id: str, edge: int = 0) -> str:
        return f"ws://127.0.0.1:{self.edge_port(edge)}/channel/{channel_id}/websocket"

    def metrics_urls(self) -> dict[str, str]:
        urls = {"edge": self.http_url("/metrics")}
        urls["store"] = f"http://127.0.0.1:{self.store.port('metrics_port')}/metrics"
        urls["channel"] = f"http://127.0.0.1:{self.channels[0].port('metrics_port')}/metrics"
        return urls

    # -- tokens -------------------------------------------------------------

    def token(
        self,
        user_id: str,
        username: str | None = None,
        *,
        permissions: Sequence[str] = ("read", "write"),
        ttl: float = 3600,
        **claims: Any,
    ) -> str:
        body: dict[str, Any] = {
            "sub": user_id,
            "username": username or user_id,
            "permissions": list(permissions),
            "exp": int(time.time() + ttl),
            **claims,
        }
        return jwt.encode(body, self.jwt_secret, algorithm="HS256")

    # -- services -----------------------------------------------------------

    async def start_shard(self, i: int, *, port: int = 0, log_name: str | None = None) -> Service:
        """Start channel shard ``i`` (not added to ``channels``)."""
        return await start_service(
            f"channel{i}",
            "channel_service",
            {
                **self.base_env,
                "WADDLE_CHANNEL_PORT": str(port),
                "WADDLE_CHANNEL_METRICS_PORT": "0",
                "WADDLE_STORE_ADDRESS": self.store_address,
            },
            log_path=self.tmp / (log_name or f"channel{i}.log"),
        )

    async def start_edge(self, i: int, env: Mapping[str, str] | None = None) -> Service:
        """Start edge ``i`` towards every shard started so far (not added to
        ``edges``); ``env`` adds to or overrides its environment."""
        return await start_service(
            f"edge{i}",
            "edge",
            {
                **self.base_env,
                "WADDLE_EDGE_PORT": "0",
                "WADDLE_EDGE_ID": f"edge-{i}",
                "WADDLE_CHANNEL_SHARDS": ",".join(self.shard_addresses),
                "WADDLE_STORE_ADDRESS": self.store_address,
                **(env or {}),
            },
            log_path=self.tmp / f"edge{i}.log",
        )

    # -- faults -------------------------------------------------------------

    def _env(self, extra: Mapping[str, str]) -> dict[str, str]:
        return {**self.base_env, **extra}

    async def restart_store(self, *, kill: bool = True) -> None:
        port = self.store.port("grpc_port")
        await (self.store.kill() if kill else self.store.stop())
        self.store = await start_service(
            "store",
            "store_service",
            self._env({**self.store.env, "WADDLE_STORE_PORT": str(port)}),
            log_path=self.tmp / "store.log",
        )

    async def restart_channel(self, i: int = 0, *, kill: bool = True) -> None:
        old = self.channels[i]
        port = old.port("grpc_port")
        await (old.kill() if kill else old.stop())
        self.channels[i] = await start_service(
            f"channel{i}",
            "channel_service",
            {**old.env, "WADDLE_CHANNEL_PORT": str(port)},
            log_path=self.tmp / f"channel{i}.log",
        )

    async def restart_edge(self, i: int = 0, *, kill: bool = True) -> None:
        old = self.edges[i]
        port = old.port("http_port")
        await (old.kill() if kill else old.stop())
        self.edges[i] = await start_service(
            f"edge{i}",
            "edge",
            {**old.env, "WADDLE_EDGE_PORT": str(port)},
            log_path=self.tmp / f"edge{i}.log",
        )

    async def stop(self) -> None:
        for svc in [*self.edges, *self.channels, self.store]:
            with contextlib.suppress(Exception):
                await svc.stop(timeout=15)


async def migrate(database_url: str) -> None:
    await run_to_completion("store_service.migrate", {"WADDLE_DATABASE_URL": database_url})


@contextlib.asynccontextmanager
async def start_stack(
    tmp_path: Path,
    *,
    database_url: str | None = None,
    dev_mode: bool = False,
    shards: int = 1,
    edges: int = 1,
    env: Mapping[str, str] | None = None,
) -> AsyncIterator[Stack]:
    """Start store, ``shards`` channel services and ``edges`` edges; stop them on exit."""
    database_url = database_url or f"sqlite+aiosqlite:///{tmp_path / 'waddle.db'}"
    base = {
        "WADDLE_JWT_SECRET": JWT_SECRET,
        "WADDLE_DATABASE_URL": database_url,
        "WADDLE_LOG_LEVEL": "info",
        "WADDLE_SHUTDOWN_GRACE_SECONDS": "3",
        "WADDLE_DEV_MODE": "1" if dev_mode else "0",
        **(env or {}),
    }
    await migrate(database_url)
    store = await start_service(
        "store",
        "store_service",
        {**base, "WADDLE_STORE_PORT": "0", "WADDLE_STORE_METRICS_PORT": "0"},
        log_path=tmp_path / "store.log",
    )
    stack = Stack(tmp=tmp_path, database_url=database_url, base_env=base, store=store)
    try:
        for i in range(shards):
            stack.channels.append(await stack.start_shard(i))
        for i in range(edges):
            stack.edges.append(await stack.start_edge(i))
        yield stack
    finally:
        await stack.stop()


async def _command(stack: Stack, line: str) -> dict[str, Any]:
    """Run one command line of the ``--json`` CLI; return its answer."""
    words = line.split()
    if words and words[0] == "restart_edge" and len(words) <= 2:
        arg = words[1] if len(words) == 2 else "0"
        i = int(arg) if arg.isdigit() else -1
        if not 0 <= i < len(stack.edges):
            return {"event": "error", "error": f"no such edge: {arg[:20]}"}
        await stack.restart_edge(i)
        return {"event": "edge_restarted", "edge": i, "edge_url": stack.http_url("", edge=i)}
    return {"event": "error", "error": f"unknown command: {line.strip()[:100]}"}


async def _serve_commands(stack: Stack) -> None:
    """Answer command lines on standard input until it closes."""
    loop = asyncio.get_running_loop()
    while line := await loop.run_in_executor(None, sys.stdin.readline):
        if line.strip():
            answer = await _command(stack, line)
            sys.stdout.write(orjson.dumps(answer).decode() + "\n")
            sys.stdout.flush()


def _env_pair(text: str) -> tuple[str, str]:
    name, sep, value = text.partition("=")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE, got {text!r}")
    return name, value


async def _cli(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.support.stack")
    parser.add_argument("--json", action="store_true", help="print one JSON line when ready")
    parser.add_argument("--database-url", default=None)
    parser.add_argument("--edges", type=int, default=1, help="how many edges to start")
    parser.add_argument(
        "--env",
        type=_env_pair,
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="an environment variable for every service (repeatable)",
    )
    args = parser.parse_args(argv)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    with tempfile.TemporaryDirectory(prefix="waddle-stack-") as tmp:
        async with start_stack(
            Path(tmp),
            database_url=args.database_url,
            dev_mode=True,
            edges=args.edges,
            env=dict(args.env),
        ) as stack:
            info = {
                "edge_url": stack.edge_url,
                "edge_urls": [stack.http_url("", edge=i) for i in range(len(stack.edges))],
                "jwt_secret": stack.jwt_secret,
                "tmp": tmp,
            }
            sys.stdout.write(orjson.dumps(info).decode() + "\n")
            sys.stdout.flush()
            commands = asyncio.ensure_future(_serve_commands(stack))
            stopper = asyncio.ensure_future(stop.wait())
            await asyncio.wait([stopper, commands], return_when=asyncio.FIRST_COMPLETED)
            stopper.cancel()
            commands.cancel()
    # The stdin reader thread may still be blocked; do not wait for it.
    os._exit(0)


if __name__ == "__main__":
    raise SystemExit(asyncio.run(_cli(sys.argv[1:])))
