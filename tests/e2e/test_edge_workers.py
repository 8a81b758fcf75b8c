"""WADDLE_EDGE_WORKERS=2: two edge processes on one port, end to end.

Real store, channel and edge processes; real WebSocket clients. Which worker
holds a socket is read from the workers' own metrics (each answers on its
ops port), one connection at a time."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.support.client import WsClient
from tests.support.stack import Stack, start_stack
from waddle_common import wire

pytestmark = [pytest.mark.e2e, pytest.mark.asyncio(loop_scope="function")]

WORKERS_ENV = {"WADDLE_EDGE_WORKERS": "2", "WADDLE_SHUTDOWN_GRACE_SECONDS": "3"}


@contextlib.asynccontextmanager
async def two_workers(tmp_path: Path) -> AsyncIterator[tuple[Stack, aiohttp.ClientSession]]:
    async with start_stack(tmp_path, env=WORKERS_ENV) as stack, aiohttp.ClientSession() as http:
        yield stack, http


def worker_lines(stack: Stack) -> dict[str, dict[str, Any]]:
    """The latest ready line of each worker (by edge id), from the edge's output."""
    found: dict[str, dict[str, Any]] = {}
    for line in stack.edges[0].lines:
        if '"worker ready"' in line:
            entry = orjson.loads(line)
            found[entry["edge_id"]] = entry
    return found


async def until(condition: Any, timeout: float = 20.0) -> None:
    """Poll ``condition`` (another process's metrics or output), bounded."""
    async with asyncio.timeout(timeout):
        while not await condition():  # noqa: ASYNC110 - the state lives in other processes
            await asyncio.sleep(0.05)


async def sockets(http: aiohttp.ClientSession, ops_port: int) -> int:
    async with http.get(f"http://127.0.0.1:{ops_port}/metrics") as r:
        text = await r.text()
    for family in text_string_to_metric_families(text):
        if family.name == "waddle_edge_connections":
            return int(family.samples[0].value)
    raise AssertionError("no waddle_edge_connections")


async def counts(http: aiohttp.ClientSession, stack: Stack) -> dict[str, int]:
    lines = worker_lines(stack)
    return {eid: await sockets(http, entry["ops_port"]) for eid, entry in sorted(lines.items())}


async def connect_placed(
    http: aiohttp.ClientSession, stack: Stack, cid: str, user: str
) -> tuple[WsClient, str]:
    """Connect one client and tell which worker took it (its socket count rose)."""
    before = await counts(http, stack)
    client = await WsClient.connect(http, stack.ws_url(cid), token=stack.token(user))
    assert (await client.recv())["type"] == "initial_state"
    placed: list[str] = []

    async def moved() -> bool:
        after = await counts(http, stack)
        placed[:] = [eid for eid in after if after[eid] == before.get(eid, 0) + 1]
        return len(placed) == 1 and sum(after.values()) == sum(before.values()) + 1

    await until(moved)
    return client, placed[0]


async def everyone_gets(clients: list[WsClient], content: str) -> None:
    for client in clients:
        frame = await client.recv_match(type="message")
        assert frame["message"]["content"] == content


async def test_workers_share_the_port_chat_together_and_a_killed_one_comes_back(
    tmp_path: Path,
) -> None:
    async with two_workers(tmp_path) as (stack, http):
        edge = stack.edges[0]
        workers = worker_lines(stack)
        assert sorted(workers) == ["edge-0-w0", "edge-0-w1"]
        assert {w["http_port"] for w in workers.values()} == {edge.port("http_port")}
        assert len({w["ops_port"] for w in workers.values()}) == 2

        cid = f"lobby-{uuid.uuid4().hex[:6]}"
        placed: dict[str, list[WsClient]] = {eid: [] for eid in workers}
        for i in range(40):
            client, eid = await connect_placed(http, stack, cid, f"user{i}")
            placed[eid].append(client)
            if i >= 7 and all(placed.values()):
                break
        on_w0, on_w1 = placed["edge-0-w0"], placed["edge-0-w1"]
        assert on_w0 and on_w1, "one port, connections on both workers"

        # A user on one worker talks to users on the other, in one channel.
        await on_w0[0].send({"type": "message", "content": "from w0"})
        await everyone_gets(on_w0 + on_w1, "from w0")
        await on_w1[0].send({"type": "message", "content": "from w1"})
        await everyone_gets(on_w0 + on_w1, "from w1")

        # The supervisor's scrape covers both workers, labelled.
        async with http.get(f"http://127.0.0.1:{edge.port('ops_port')}/metrics") as r:
            merged = await r.text()
        assert f'waddle_edge_connections{{worker="0"}} {float(len(on_w0))}' in merged
        assert f'waddle_edge_connections{{worker="1"}} {float(len(on_w1))}' in merged

        # Kill w0: its sockets drop, w1's stay open and keep chatting, and w0
        # comes back under the same id and ops port.
        killed = workers["edge-0-w0"]
        os.kill(killed["pid"], signal.SIGKILL)
        for client in on_w0:
            await client.wait_closed()

        async def restarted() -> bool:
            now = worker_lines(stack).get("edge-0-w0")
            return now is not None and now["pid"] != killed["pid"]

        await until(restarted, timeout=30)
        back = worker_lines(stack)["edge-0-w0"]
        assert back["ops_port"] == killed["ops_port"]
        assert any("edge-w0" in line and "SIGKILL" in line for line in edge.lines)
        async with http.get(f"http://127.0.0.1:{edge.port('ops_port')}/metrics") as r:
            merged = await r.text()
        assert 'waddle_edge_worker_exits_total{worker="0"} 1.0' in merged
        assert 'worker_exits_total{worker="1"}' not in merged
        assert all(not c.ws.closed for c in on_w1)
        await on_w1[0].send({"type": "message", "content": "still here"})
        await everyone_gets(on_w1, "still here")

        # New connections reach the restarted worker again and join the same chat.
        newcomer: WsClient | None = None
        for i in range(40):
            client, eid = await connect_placed(http, stack, cid, f"late{i}")
            if eid == "edge-0-w0":
                newcomer = client
                break
            on_w1.append(client)
        assert newcomer is not None, "the restarted worker takes connections"
        await newcomer.send({"type": "message", "content": "back on w0"})
        await everyone_gets([newcomer, *on_w1], "back on w0")


async def test_sigterm_drains_every_worker(tmp_path: Path) -> None:
    async with two_workers(tmp_path) as (stack, http):
        cid = f"drain-{uuid.uuid4().hex[:6]}"
        clients: list[WsClient] = []
        where: set[str] = set()
        for i in range(40):
            client, eid = await connect_placed(http, stack, cid, f"user{i}")
            clients.append(client)
            where.add(eid)
            if i >= 5 and len(where) == 2:
                break
        assert len(where) == 2
        pids = [w["pid"] for w in worker_lines(stack).values()]
        edge = stack.edges[0]
        edge.proc.send_signal(signal.SIGTERM)
        # Each client reads on its own, as real ones do (the close handshake needs it).
        codes = await asyncio.gather(*(c.wait_closed(timeout=15) for c in clients))
        assert codes == [wire.CLOSE_RESTART] * len(clients)
        assert await asyncio.wait_for(edge.proc.wait(), 20) == 0
        for pid in pids:
            with pytest.raises(ProcessLookupError):
                os.kill(pid, 0)
