"""Start and stop the systems under test as real processes on free ports.

* ``waddle``: migrate a fresh database (a SQLite file, or a fresh schema in
  the PostgreSQL server named by ``WADDLE_BENCH_DATABASE_URL``), then the
  store, one channel shard and one edge, each with ``python -m``, waiting
  for their ready lines (``waddle_common.supervise``). Rate and connection
  limits are raised for the benchmark; logs (``info``, as in production) go to files.
* ``plain``, ``floor``, ``socketio``, ``channels``: the peers of
  ``bench.peers``, one process each; the last two use the Redis server on
  127.0.0.1:6379. ``plain`` and ``floor`` are the two floors every target is
  a ratio to: the naive aiohttp broadcast, and the prepared-frame,
  write-coalescing one.

Each system is a ``System``: where its WebSockets are, which protocol
adapter the load generator uses, and the pid of every server-side process
(Redis included for the peers that depend on it) for CPU and RSS sampling.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import psycopg
from psycopg import sql
from sqlalchemy.engine import make_url

from waddle_common.supervise import Service, run_to_completion, start_service

SYSTEMS = ("waddle", "plain", "floor", "socketio", "channels")
FLOORS = ("plain", "floor")
LABELS = {
    "waddle": "Waddle",
    "plain": "plain floor (aiohttp, ws.send per member)",
    "floor": "prepared floor (frame once, coalesced writes)",
    "socketio": "python-socketio + Redis",
    "channels": "Django Channels + Redis",
}
JWT_SECRET = "bench-secret-" + "y" * 24
REDIS_PORT = 6379

WADDLE_ENV = {
    "WADDLE_JWT_SECRET": JWT_SECRET,
    "WADDLE_LOG_LEVEL": "info",
    "WADDLE_SHUTDOWN_GRACE_SECONDS": "2",
    "WADDLE_DEV_MODE": "0",
    "WADDLE_MESSAGE_RATE": "1000000",
    "WADDLE_MESSAGE_BURST": "1000000",
    "WADDLE_FRAME_RATE": "1000000",
    "WADDLE_FRAME_BURST": "1000000",
    "WADDLE_EDGE_MAX_CONNECTIONS": "50000",
    "WADDLE_CHANNEL_MAX_CONNECTIONS": "50000",
    "WADDLE_USER_MAX_CONNECTIONS": "50000",
    "WADDLE_JOIN_TIMEOUT_SECONDS": "30",
}


def edge_workers(system: System) -> dict[str, int]:
    """The edge's worker processes by role (``edge <id>``), or the edge itself
    (nothing for a system without one)."""
    edge = next((s for s in system.services if s.name == "edge"), None)
    if edge is None:
        return {}
    try:
        children = psutil.Process(edge.pid).children()
    except psutil.Error:
        children = []
    if not children:
        return {"edge": edge.pid}
    out: dict[str, int] = {}
    for child in children:
        with contextlib.suppress(psutil.Error):
            out["edge " + child.environ().get("WADDLE_EDGE_ID", str(child.pid))] = child.pid
    return out


@dataclass(eq=False)
class System:
    name: str
    proto: str
    base_url: str
    services: list[Service] = field(default_factory=list)
    extra_pids: dict[str, int] = field(default_factory=dict)
    jwt_secret: str | None = None
    database: str = ""

    @property
    def label(self) -> str:
        return LABELS[self.name]

    def pids(self) -> dict[str, int]:
        """Server-side processes by role (edge, channel, store / server, redis),
        and Waddle's edge workers (``edge <id>``) when it has them; their
        supervisor is then ``edge supervisor``."""
        out = {**{s.name: s.pid for s in self.services}, **self.extra_pids}
        workers = edge_workers(self)
        if "edge" not in workers and "edge" in out:
            out["edge supervisor"] = out.pop("edge")
        for role, pid in workers.items():
            out.setdefault(role, pid)
        return out

    def edge_pid(self) -> int:
        """The process that holds the client sockets."""
        for s in self.services:
            if s.name in ("edge", "server"):
                return s.pid
        raise LookupError("no socket-holding process")

    def alive(self) -> bool:
        return all(s.proc.returncode is None for s in self.services)

    def service(self, name: str) -> Service:
        return next(s for s in self.services if s.name == name)

    async def restart(self, name: str, port_key: str, port_var: str, *, kill: bool = True) -> None:
        """Stop one service (SIGKILL, or SIGTERM) and start it again on the same port."""
        old = self.service(name)
        port = old.port(port_key)
        await (old.kill() if kill else old.stop())
        new = await start_service(
            name, old.module, {**old.env, port_var: str(port)}, log_path=old.log_path
        )
        self.services[self.services.index(old)] = new

    async def stop(self) -> None:
        for s in reversed(self.services):
            with contextlib.suppress(Exception):
                await s.stop(timeout=10)


def redis_pid() -> int | None:
    for proc in psutil.process_iter(["name", "cmdline"]):
        name = proc.info.get("name") or ""
        cmd = " ".join(proc.info.get("cmdline") or [])
        if name.startswith("redis-server") and f":{REDIS_PORT}" in cmd:
            return proc.pid
    for proc in psutil.process_iter(["name"]):
        if (proc.info.get("name") or "").startswith("redis-server"):
            return proc.pid
    return None


# -- PostgreSQL: a fresh schema per run ----------------------------------------


def _libpq(url: str) -> str:
    parsed = make_url(url).set(drivername="postgresql")
    query = {k: v for k, v in parsed.query.items() if k != "options"}
    return parsed.set(query=query).render_as_string(hide_password=False)


def create_schema(url: str) -> tuple[str, str]:
    """Create ``waddle_bench_<hex>`` in ``url``'s database; return (schema, its URL)."""
    schema = f"waddle_bench_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(_libpq(url), autocommit=True, connect_timeout=5) as conn:
        conn.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(schema)))
    parsed = make_url(url).set(drivername="postgresql+psycopg")
    query = {**parsed.query, "options": f"-csearch_path={schema}"}
    return schema, parsed.set(query=query).render_as_string(hide_password=False)


def drop_schema(url: str, schema: str) -> None:
    with psycopg.connect(_libpq(url), autocommit=True, connect_timeout=5) as conn:
        conn.execute("SET lock_timeout = '10s'")
        conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(schema)))


# -- launchers -------------------------------------------------------------------


@contextlib.asynccontextmanager
async def waddle(
    tmp: Path, database_url: str | None, env: Mapping[str, str] | None = None
) -> AsyncIterator[System]:
    schema = ""
    if database_url:
        schema, url = create_schema(database_url)
        kind = "postgresql"
    else:
        url = f"sqlite+aiosqlite:///{tmp / 'waddle.db'}"
        kind = "sqlite"
    system = System("waddle", "waddle", "", jwt_secret=JWT_SECRET, database=kind)
    try:
        base = {**WADDLE_ENV, "WADDLE_DATABASE_URL": url, **(env or {})}
        await run_to_completion("store_service.migrate", base)
        store = await start_service(
            "store",
            "store_service",
            {**base, "WADDLE_STORE_PORT": "0", "WADDLE_STORE_METRICS_PORT": "0"},
            log_path=tmp / "store.log",
        )
        system.services.append(store)
        store_addr = f"127.0.0.1:{store.port('grpc_port')}"
        channel = await start_service(
            "channel",
            "channel_service",
            {
                **base,
                "WADDLE_CHANNEL_PORT": "0",
                "WADDLE_CHANNEL_METRICS_PORT": "0",
                "WADDLE_STORE_ADDRESS": store_addr,
            },
            log_path=tmp / "channel.log",
        )
        system.services.append(channel)
        edge = await start_service(
            "edge",
            "edge",
            {
                **base,
                "WADDLE_EDGE_PORT": "0",
                "WADDLE_EDGE_ID": "bench-edge",
                "WADDLE_CHANNEL_SHARDS": f"127.0.0.1:{channel.port('grpc_port')}",
                "WADDLE_STORE_ADDRESS": store_addr,
            },
            log_path=tmp / "edge.log",
        )
        system.services.append(edge)
        system.base_url = f"ws://127.0.0.1:{edge.port('http_port')}"
        yield system
    finally:
        await system.stop()
        if schema and database_url:
            with contextlib.suppress(Exception):
                drop_schema(database_url, schema)


@contextlib.asynccontextmanager
async def peer(name: str, tmp: Path) -> AsyncIterator[System]:
    module = {
        "plain": "bench.peers.plain",
        "floor": "bench.peers.floor",
        "socketio": "bench.peers.sio",
        "channels": "bench.peers.django_channels",
    }[name]
    tag = uuid.uuid4().hex[:8]
    env = {
        "BENCH_PORT": "0",
        "BENCH_REDIS_CHANNEL": f"bench-sio-{tag}",
        "BENCH_REDIS_PREFIX": f"benchdc{tag}:",
    }
    # Both floors speak the same frames.
    system = System(name, "floor" if name in FLOORS else name, "")
    try:
        server = await start_service("server", module, env, log_path=tmp / f"{name}.log")
        system.services.append(server)
        system.base_url = f"ws://127.0.0.1:{server.port('http_port')}"
        if name not in FLOORS:
            pid = redis_pid()
            if pid is not None:
                system.extra_pids["redis"] = pid
        yield system
    finally:
        await system.stop()


@contextlib.asynccontextmanager
async def launch(
    name: str, tmp: Path, database_url: str | None, env: Mapping[str, str] | None = None
) -> AsyncIterator[System]:
    """Start ``name``; ``env`` adds ``WADDLE_`` variables to every Waddle service."""
    os.makedirs(tmp, exist_ok=True)
    if name == "waddle":
        async with waddle(tmp, database_url, env) as system:
            yield system
    else:
        async with peer(name, tmp) as system:
            yield system
