"""Several edges and several channel shards: routing by rendezvous hashing,
fan-out across edges, and the production defaults (no development routes)."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator

import aiohttp
import pytest
import pytest_asyncio

from tests.support.client import WsClient
from tests.support.stack import Stack, start_stack
from waddle_common.routing import owner_of

pytestmark = [pytest.mark.e2e, pytest.mark.asyncio(loop_scope="module")]


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def cluster(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Stack]:
    async with start_stack(tmp_path_factory.mktemp("cluster"), shards=2, edges=2) as s:
        yield s


@pytest_asyncio.fixture(loop_scope="module")
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


def channels_on_each_shard(shards: list[str]) -> dict[str, str]:
    found: dict[str, str] = {}
    while len(found) < len(shards):
        cid = f"c-{uuid.uuid4().hex[:8]}"
        found.setdefault(owner_of(cid, shards), cid)
    return found


async def test_members_on_different_edges_and_shards_chat(
    cluster: Stack, http: aiohttp.ClientSession
) -> None:
    by_shard = channels_on_each_shard(cluster.shard_addresses)
    assert len(by_shard) == 2
    for shard, cid in by_shard.items():
        a = await WsClient.connect(http, cluster.ws_url(cid, edge=0), token=cluster.token("ann"))
        b = await WsClient.connect(http, cluster.ws_url(cid, edge=1), token=cluster.token("ben"))
        assert (await a.recv())["type"] == "initial_state"
        state_b = await b.recv()
        assert {u["userId"] for u in state_b["onlineUsers"]} == {"ann", "ben"}
        assert (await a.recv())["type"] == "user_connected"
        await a.send({"type": "message", "content": f"via {shard}"})
        assert (await b.recv_message())["content"] == f"via {shard}"
        await b.send({"type": "typing", "isTyping": True})
        assert (await a.recv_type("typing"))["userId"] == "ben"
        await a.close()
        await b.close()
    # Each shard really owned one of the channels: both report a publish.
    for svc in cluster.channels:
        async with http.get(f"http://127.0.0.1:{svc.port('metrics_port')}/metrics") as resp:
            text = await resp.text()
        line = next(
            ln for ln in text.splitlines() if ln.startswith("waddle_channel_publishes_total")
        )
        assert 'result="ok"' in line and float(line.split()[-1]) >= 1


async def test_dev_token_route_absent_without_dev_mode(
    cluster: Stack, http: aiohttp.ClientSession
) -> None:
    async with http.post(cluster.http_url("/dev/token"), json={"username": "x"}) as resp:
        assert resp.status == 404


async def test_fresh_edge_becomes_ready_without_any_client(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    async with (
        start_stack(tmp_path_factory.mktemp("ready"), shards=2) as stack,
        aiohttp.ClientSession() as http,
    ):
        status = 0
        async with asyncio.timeout(15):
            while status != 200:  # readiness follows the gRPC channels' state
                async with http.get(stack.http_url("/readyz")) as resp:
                    status = resp.status
                if status != 200:
                    await asyncio.sleep(0.1)
        # Every shard gets a stream at once (the edge watches each one's
        # health to route around a shard that is down), before any client.
        async with asyncio.timeout(15):
            text = ""
            while "waddle_edge_shard_streams 2.0" not in text:
                async with http.get(stack.http_url("/metrics")) as resp:
                    text = await resp.text()
                await asyncio.sleep(0.05)
