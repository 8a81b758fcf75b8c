"""Several edge processes on one port: ``WADDLE_EDGE_WORKERS`` above one.

One Python process uses one core, so a host with more cores runs more edge
processes. ``supervise`` (what ``python -m edge`` becomes) starts N workers
(``python -m edge.worker``), each binding the edge port with
``SO_REUSEPORT``: the kernel spreads new connections over them by a hash of
the client's address, and a worker that is down receives none. Worker ``i``
identifies itself to the channel shards as ``<WADDLE_EDGE_ID>-w<i>``, the
same id after every restart (so the owners' rejoin grace applies to it like
to a restarted single edge), and answers ``/healthz``, ``/readyz`` and
``/metrics`` on its own ops port: ``WADDLE_EDGE_OPS_PORT + 1 + i`` (free ports
when that is ``0``; each worker's ready line names its port).

The supervisor itself serves, on ``WADDLE_EDGE_OPS_PORT``, ``/metrics`` with
every worker's samples labelled ``worker="<i>"`` (one scrape target per
host), ``/readyz`` (ready while every worker is) and ``/healthz`` (the
supervisor runs). A worker that dies is restarted by
``waddle_common.supervise.Supervisor`` with backoff, on its ports, while the
others keep their sockets; SIGTERM drains all workers at once. The port is
reserved for the supervisor's lifetime by a bound, never listening socket
(it receives no connections), so a port of ``0`` resolves to one port for
all workers and nobody else takes it while a worker restarts.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import socket
import sys
from collections.abc import Iterator, Mapping
from typing import Any, TextIO

import aiohttp
import orjson
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector

from waddle_common import logs
from waddle_common.devrun import reachable
from waddle_common.ops_http import bound_port
from waddle_common.settings import Settings
from waddle_common.supervise import Service, ServiceFailed, Supervisor

log = logging.getLogger("edge.workers")

PROBE_TIMEOUT = aiohttp.ClientTimeout(total=3)


def worker_name(i: int) -> str:
    return f"edge-w{i}"


def worker_id(edge_id: str, i: int) -> str:
    return f"{edge_id}-w{i}"


def worker_ops_port(settings: Settings, i: int) -> int:
    return settings.edge_ops_port + 1 + i if settings.edge_ops_port else 0


def worker_env(settings: Settings, port: int, i: int) -> dict[str, str]:
    """What worker ``i`` gets on top of the supervisor's environment."""
    return {
        "WADDLE_EDGE_ID": worker_id(settings.edge_id, i),
        "WADDLE_EDGE_PORT": str(port),
        "WADDLE_EDGE_OPS_PORT": str(worker_ops_port(settings, i)),
        "WADDLE_EDGE_WORKERS": "1",
    }


def check_ports(settings: Settings) -> None:
    last = settings.edge_ops_port + settings.edge_workers
    if settings.edge_ops_port and last > 65535:
        raise ValueError(
            f"WADDLE_EDGE_OPS_PORT={settings.edge_ops_port} leaves no room for "
            f"{settings.edge_workers} workers' ports (up to {last}); choose a lower one, or 0"
        )


def reserve_port(host: str, port: int) -> socket.socket:
    """Bind (not listen) ``host:port`` with ``SO_REUSEPORT``: the port, resolved
    when ``0``, stays this process's while workers come and go."""
    family, kind, proto, _, address = socket.getaddrinfo(
        host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if family == socket.AF_INET6:
            # As asyncio binds the workers' listeners.
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind(address)
    except OSError:
        sock.close()
        raise
    return sock


class WorkerOutput:
    """The workers' log lines, relayed to this process's stdout as they are,
    except that a worker's ready line becomes ``worker ready``: whoever
    supervises this process waits for its own ready line, once all are."""

    def __init__(self, out: TextIO) -> None:
        self.out = out

    def write(self, text: str) -> int:
        if '"ready":true' in text:
            with contextlib.suppress(orjson.JSONDecodeError):
                entry = orjson.loads(text)
                if isinstance(entry, dict) and entry.pop("ready", None) is True:
                    entry["event"] = "worker ready"
                    text = orjson.dumps(entry).decode() + "\n"
        return self.out.write(text)

    def flush(self) -> None:
        self.out.flush()


class MergedMetrics(Collector):
    """The workers' expositions as one, each sample labelled with its worker."""

    def __init__(self, texts: Mapping[str, str]) -> None:
        self.texts = texts

    def collect(self) -> Iterator[Metric]:
        families: dict[str, Metric] = {}
        for worker, text in self.texts.items():
            for family in text_string_to_metric_families(text):
                merged = families.get(family.name)
                if merged is None:
                    merged = Metric(family.name, family.documentation, family.type, family.unit)
                    families[family.name] = merged
                merged.samples.extend(
                    s._replace(labels={**s.labels, "worker": worker}) for s in family.samples
                )
        yield from families.values()


def merge_metrics(texts: Mapping[str, str], *own: Collector) -> bytes:
    """The workers' metrics, labelled, and the supervisor's own (``own``)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(MergedMetrics(texts))
    for collector in own:
        registry.register(collector)
    return generate_latest(registry)


class Workers:
    """The running workers, as the supervisor's ops listener sees them."""

    def __init__(self, supervisor: Supervisor, settings: Settings, count: int) -> None:
        self.supervisor = supervisor
        self.host = settings.edge_host
        self.count = count
        self.http: aiohttp.ClientSession | None = None
        self.exits = Counter(
            "waddle_edge_worker_exits",
            "Edge workers that exited while they should have been running (each is restarted)",
            ["worker"],
            registry=None,
        )

    def exited(self, name: str, _returncode: int) -> None:
        self.exits.labels(name.removeprefix("edge-w")).inc()

    def current(self) -> list[Service]:
        return [self.supervisor.service(worker_name(i)) for i in range(self.count)]

    async def fetch(self, service: Service, path: str) -> tuple[int, str]:
        """Status and body of a worker's ops ``path``; ``(0, why)`` when it does not answer."""
        assert self.http is not None
        if service.proc.returncode is not None:
            return 0, "not running"
        url = f"http://{reachable(self.host, service.port('ops_port'))}{path}"
        try:
            async with self.http.get(url, timeout=PROBE_TIMEOUT) as r:
                return r.status, await r.text()
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            return 0, type(exc).__name__

    async def metrics(self, _request: web.Request) -> web.Response:
        services = self.current()
        answers = await asyncio.gather(*(self.fetch(s, "/metrics") for s in services))
        texts = {str(i): body for i, (status, body) in enumerate(answers) if status == 200}
        return web.Response(
            body=merge_metrics(texts, self.exits), headers={"Content-Type": CONTENT_TYPE_LATEST}
        )

    async def readyz(self, _request: web.Request) -> web.Response:
        if self.supervisor.stopping.is_set():
            return web.Response(status=503, text="draining\n")
        services = self.current()
        answers = await asyncio.gather(*(self.fetch(s, "/readyz") for s in services))
        waiting = [
            f"{worker_name(i)}: {body.strip() or status}"
            for i, (status, body) in enumerate(answers)
            if status != 200
        ]
        if waiting:
            return web.Response(status=503, text="\n".join(waiting) + "\n")
        return web.Response(text="ready\n")

    async def healthz(self, _request: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    async def start_ops(self, port: int) -> tuple[web.AppRunner, int]:
        self.http = aiohttp.ClientSession()
        app = web.Application()
        app.router.add_get("/metrics", self.metrics)
        app.router.add_get("/readyz", self.readyz)
        app.router.add_get("/healthz", self.healthz)
        runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await runner.setup()
        site = web.TCPSite(runner, self.host, port)
        await site.start()
        return runner, bound_port(site)

    async def close(self) -> None:
        if self.http is not None:
            await self.http.close()


async def supervise(settings: Settings) -> int:
    """Run ``settings.edge_workers`` workers until SIGTERM; the process's exit status."""
    count = settings.edge_workers
    try:
        check_ports(settings)
        reserved = reserve_port(settings.edge_host, settings.edge_port)
    except (ValueError, OSError) as exc:
        log.error("cannot start the edge workers: %s", exc)
        return 1
    port = int(reserved.getsockname()[1])
    supervisor = Supervisor(
        echo=WorkerOutput(sys.stdout),
        tag_lines=False,
        log=lambda line: log.info(line.removeprefix("[waddle] ")),
        on_exit=lambda name, returncode: workers.exited(name, returncode),
    )
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, supervisor.request_stop)
    workers = Workers(supervisor, settings, count)
    ops: web.AppRunner | None = None
    pin = {"ops_port": "WADDLE_EDGE_OPS_PORT"}
    try:
        starting: asyncio.Future[list[Service | BaseException]] = asyncio.gather(
            *(
                supervisor.start(
                    worker_name(i), "edge.worker", worker_env(settings, port, i), pin=pin
                )
                for i in range(count)
            ),
            return_exceptions=True,
        )
        stopped: asyncio.Future[bool] = asyncio.ensure_future(supervisor.stopping.wait())
        waiting: list[asyncio.Future[Any]] = [starting, stopped]
        await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
        if not starting.done():
            starting.cancel()
            with contextlib.suppress(asyncio.CancelledError, ServiceFailed):
                await starting
            return 0
        stopped.cancel()
        failed = [r for r in starting.result() if isinstance(r, BaseException)]
        if failed:
            log.error("an edge worker did not start: %s", failed[0])
            return 1
        ops, ops_port = await workers.start_ops(settings.edge_ops_port)
        logs.announce_ready(
            "edge", http_port=port, ops_port=ops_port, edge_id=settings.edge_id, workers=count
        )
        await supervisor.stopping.wait()
        log.info("draining", extra={"grace_seconds": settings.shutdown_grace_seconds})
        return 0
    finally:
        # Every worker drains at the same time: the pod's grace covers one drain.
        await supervisor.stop(timeout=settings.shutdown_grace_seconds + 5, together=True)
        if ops is not None:
            await ops.cleanup()
        await workers.close()
        reserved.close()
        log.info("stopped")
