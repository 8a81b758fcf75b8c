"""Shard routing on the edge: channels map to links by rendezvous hashing,
and warming up connects every shard before any client arrives."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc
import pytest_asyncio

from edge.connection import Limits, LocalChannels
from edge.metrics import EdgeMetrics
from edge.shards import ShardRouter
from waddle_common.routing import owner_of


@pytest_asyncio.fixture
async def shard_addresses() -> AsyncIterator[list[str]]:
    servers = []
    addresses = []
    for _ in range(2):
        server = grpc.aio.server()
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        servers.append(server)
        addresses.append(f"127.0.0.1:{port}")
    yield addresses
    for server in servers:
        await server.stop(0)


def router(addresses: list[str]) -> ShardRouter:
    metrics = EdgeMetrics()
    return ShardRouter(
        addresses,
        "edge-t",
        LocalChannels(metrics, Limits()),
        metrics,
        options=[],
        publish_timeout=5,
    )


async def test_links_follow_rendezvous_hashing(shard_addresses: list[str]) -> None:
    r = router(shard_addresses)
    try:
        for cid in (f"chan-{i}" for i in range(50)):
            assert r.link_for(cid).address == owner_of(cid, shard_addresses)
    finally:
        await r.close()


async def test_warm_up_connects_every_shard(shard_addresses: list[str]) -> None:
    cold, warm = router(shard_addresses), router(shard_addresses)
    try:
        warm.warm_up()
        async with asyncio.timeout(10):
            for ch in warm.channels.values():
                while (state := ch.get_state()) != grpc.ChannelConnectivity.READY:
                    await ch.wait_for_state_change(state)
        assert warm.ready()
        # Without it a channel stays idle until something uses it.
        assert all(ch.get_state() == grpc.ChannelConnectivity.IDLE for ch in cold.channels.values())
    finally:
        await cold.close()
        await warm.close()
