"""Many users joining one channel at once, against the real services: each
``initial_state`` carries the joiner's own stored cursor (``readSeq``) and
``unreadCount``, and the edge read those cursors in batched store calls
(``GetReadCursors``), not one call per join."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import aiohttp
import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.support.client import WsClient
from tests.support.stack import Stack
from waddle_pb import store_pb2, store_pb2_grpc

pytestmark = [pytest.mark.e2e, pytest.mark.asyncio(loop_scope="module")]

MESSAGES = 30
JOINERS = 80


async def store_query_count(stack: Stack, query: str) -> float:
    async with (
        aiohttp.ClientSession() as session,
        session.get(stack.metrics_urls()["store"]) as resp,
    ):
        text = await resp.text()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if (
                sample.name == "waddle_store_query_seconds_count"
                and sample.labels.get("query") == query
            ):
                return sample.value
    return 0.0


async def join(
    http: aiohttp.ClientSession, stack: Stack, channel_id: str, user: str
) -> tuple[WsClient, dict[str, Any]]:
    client = await WsClient.connect(http, stack.ws_url(channel_id), token=stack.token(user))
    state = await client.recv_type("initial_state")
    return client, state


async def test_concurrent_joins_each_get_their_own_cursor(
    stack: Stack, http: aiohttp.ClientSession
) -> None:
    channel_id = f"storm-{uuid.uuid4().hex[:8]}"
    writer, _ = await join(http, stack, channel_id, "writer")
    for i in range(MESSAGES):
        await writer.send({"type": "message", "content": f"m{i}"})
    for _ in range(MESSAGES):
        await writer.recv_type("ack")
    await writer.close()
    users = [f"joiner-{i}" for i in range(JOINERS)]
    # Every third joiner has read nothing; the others up to a seq of their own.
    wanted = {user: 0 if i % 3 == 0 else 1 + i % MESSAGES for i, user in enumerate(users)}
    async with grpc.aio.insecure_channel(stack.store_address) as ch:
        stub = store_pb2_grpc.StoreServiceStub(ch)
        await stub.SetReadCursors(
            store_pb2.SetReadCursorsRequest(
                cursors=[
                    store_pb2.ReadCursor(user_id=user, channel_id=channel_id, seq=seq)
                    for user, seq in wanted.items()
                    if seq
                ]
            ),
            timeout=10,
        )
    singles = await store_query_count(stack, "get_read_cursor")
    batched = await store_query_count(stack, "get_read_cursors")

    joined = await asyncio.gather(*(join(http, stack, channel_id, user) for user in users))
    try:
        for user, (_, state) in zip(users, joined, strict=True):
            assert state["lastSeq"] == MESSAGES
            assert (state["readSeq"], state["unreadCount"]) == (
                wanted[user],
                MESSAGES - wanted[user],
            ), user
        calls = await store_query_count(stack, "get_read_cursors") - batched
        assert await store_query_count(stack, "get_read_cursor") == singles
        assert 1 <= calls < JOINERS
    finally:
        await asyncio.gather(*(client.close() for client, _ in joined))
