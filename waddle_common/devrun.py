"""``make run``: the whole stack on one machine, for trying Waddle out.

Checks that the ports it needs are free, migrates the database, starts
store, channel and edge as three processes with their logs interleaved on
the terminal, and prints the URL and how to get a token. It supervises them
the way Kubernetes would: a service that dies is restarted (with backoff,
on the ports it had, and a line naming it and how it died) while the others
keep running. Ctrl-C stops everything.

Ports come from the usual ``WADDLE_*_PORT`` variables; ``0`` picks a free
one, and the addresses the services reach each other by are derived from
what they actually bound.
"""

from __future__ import annotations

import asyncio
import errno
import signal
import socket
import sys
from collections.abc import Mapping
from dataclasses import dataclass

from waddle_common.settings import Settings
from waddle_common.supervise import ServiceFailed, Supervisor, run_to_completion


@dataclass(frozen=True)
class Port:
    """One listening port of one service, and the variable that sets it."""

    service: str
    variable: str
    ready_key: str
    host: str
    port: int


def ports(settings: Settings) -> list[Port]:
    found = [
        Port("store", "WADDLE_STORE_PORT", "grpc_port", settings.store_host, settings.store_port),
        Port(
            "store",
            "WADDLE_STORE_METRICS_PORT",
            "metrics_port",
            settings.store_host,
            settings.store_metrics_port,
        ),
        Port(
            "channel",
            "WADDLE_CHANNEL_PORT",
            "grpc_port",
            settings.channel_host,
            settings.channel_port,
        ),
        Port(
            "channel",
            "WADDLE_CHANNEL_METRICS_PORT",
            "metrics_port",
            settings.channel_host,
            settings.channel_metrics_port,
        ),
        Port("edge", "WADDLE_EDGE_PORT", "http_port", settings.edge_host, settings.edge_port),
    ]
    if settings.edge_workers > 1:
        # The edge's supervisor; its workers take the ports just above this one.
        found.append(
            Port(
                "edge",
                "WADDLE_EDGE_OPS_PORT",
                "ops_port",
                settings.edge_host,
                settings.edge_ops_port,
            )
        )
    return found


def in_use_hint(taken: list[Port], configured: list[Port]) -> str:
    """What to say about ports something else already listens on, and what to change."""
    which = ", ".join(f"{p.port} on {p.host} ({p.variable}, the {p.service}'s)" for p in taken)
    used = {p.port for p in configured}
    if (
        len(taken) == 1
        and taken[0].port + 1 not in used
        and not _taken(taken[0].host, taken[0].port + 1)
    ):
        change = f"{taken[0].variable}={taken[0].port + 1}"
    else:
        change = " ".join(f"{p.variable}=0" for p in taken)
    noun = "port" if len(taken) == 1 else "ports"
    return (
        f"{noun} {which} already in use. Another Waddle may be running (an earlier "
        f"`make run`?): stop it, or choose other ports, e.g. `{change} make run` "
        "(0 picks a free one)."
    )


def _taken(host: str, port: int) -> bool:
    """Whether binding ``host:port`` fails because something listens there already."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
    except socket.gaierror:
        return False  # the service reports an unusable host itself
    with socket.socket(family, kind, proto) as probe:
        # As the services bind: a port whose old connections linger is free.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(address)
        except OSError as exc:
            return exc.errno == errno.EADDRINUSE
    return False


def port_problems(settings: Settings) -> list[str]:
    """Why the configured ports cannot all be bound: shared or already taken."""
    problems: list[str] = []
    fixed = [p for p in ports(settings) if p.port != 0]
    for i, port in enumerate(fixed):
        for other in fixed[:i]:
            if other.port == port.port:
                problems.append(
                    f"{other.variable} and {port.variable} are both {port.port}: "
                    "give each service its own port."
                )
    taken = [port for port in fixed if _taken(port.host, port.port)]
    if taken:
        problems.append(in_use_hint(taken, fixed))
    return problems


def explain(exc: ServiceFailed, settings: Settings) -> str:
    """The failure, with the variable to change when a port was taken meanwhile."""
    full = str(exc)
    lowered = full.lower()
    # A service's own output is on the terminal already: name it, do not repeat it.
    text, echoed, _ = full.partition("; last output:")
    if echoed:
        text += "; its output is above"
    if "address already in use" in lowered or "cannot listen on" in lowered:
        service = text.split(" ", 1)[0]
        configured = [p for p in ports(settings) if p.port]
        mine = [p for p in configured if p.service == service]
        mine = [p for p in mine if _taken(p.host, p.port)] or mine
        text += "\n" + (in_use_hint(mine, configured) if mine else "A port was already in use.")
    return text


def reachable(host: str, port: int) -> str:
    """The address to dial a service bound to ``host:port`` from this machine."""
    if host in ("", "0.0.0.0"):
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def pins(settings: Settings, service: str) -> Mapping[str, str]:
    return {p.ready_key: p.variable for p in ports(settings) if p.service == service}


async def start_stack(supervisor: Supervisor, settings: Settings) -> str:
    """Migrate, start the three services; return the page's URL."""
    base = {"WADDLE_DEV_MODE": "1"}
    migrated = await run_to_completion("store_service.migrate", base)
    supervisor.log(migrated.strip().splitlines()[-1] if migrated.strip() else "database migrated")
    store = await supervisor.start("store", "store_service", base, pin=pins(settings, "store"))
    addresses = {
        **base,
        "WADDLE_STORE_ADDRESS": reachable(settings.store_host, store.port("grpc_port")),
    }
    channel = await supervisor.start(
        "channel", "channel_service", addresses, pin=pins(settings, "channel")
    )
    addresses["WADDLE_CHANNEL_SHARDS"] = reachable(settings.channel_host, channel.port("grpc_port"))
    edge = await supervisor.start("edge", "edge", addresses, pin=pins(settings, "edge"))
    host = "localhost" if settings.edge_host in ("127.0.0.1", "0.0.0.0", "") else settings.edge_host
    return f"http://{host}:{edge.port('http_port')}/"


def banner(url: str) -> str:
    ws = url.replace("http://", "ws://", 1)
    return (
        f"\n  Waddle is running: open {url} in two browser tabs and chat.\n"
        f"  A token for your own client:\n"
        f'    curl -s -X POST {url}dev/token -d \'{{"username": "alice"}}\'\n'
        f"  then connect to {ws}channel/<id>/websocket with `Authorization: Bearer <token>`.\n"
        "  A service that dies is restarted; Ctrl-C stops everything.\n"
    )


async def main() -> int:
    settings = Settings()
    problems = port_problems(settings)
    if problems:
        for problem in problems:
            print(f"waddle: cannot start: {problem}", file=sys.stderr)
        return 1
    supervisor = Supervisor(echo=sys.stdout)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, supervisor.request_stop)
    starting = asyncio.create_task(start_stack(supervisor, settings))
    stopped = asyncio.create_task(supervisor.stopping.wait())
    try:
        await asyncio.wait({starting, stopped}, return_when=asyncio.FIRST_COMPLETED)
        if starting.done():
            try:
                url = starting.result()
            except ServiceFailed as exc:
                if supervisor.stopping.is_set():
                    return 0  # interrupted while starting: nothing to report
                print(f"waddle: {explain(exc, settings)}", file=sys.stderr)
                return 1
            print(banner(url), flush=True)
            await stopped
        return 0
    finally:
        starting.cancel()
        stopped.cancel()
        await asyncio.gather(starting, stopped, return_exceptions=True)
        await supervisor.stop()


if __name__ == "__main__":
    raise SystemExit(asyncio.run(main()))
