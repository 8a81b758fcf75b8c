"""Joining channels writes nothing to the database: a channel row comes with its first message.

One token opens a WebSocket in each of 20 channels and posts in two of
them; the ``channels`` table then holds those two rows and no other.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import aiohttp
import pytest
import pytest_asyncio
from sqlalchemy import select

from store_service.db import create_engine
from store_service.models import ChannelRow
from tests.e2e.conftest import GENEROUS_LIMITS, database
from tests.support.client import WsClient
from tests.support.stack import Stack, start_stack

pytestmark = [pytest.mark.e2e, pytest.mark.asyncio(loop_scope="module")]

JOINED = 20
POSTED = 2


@pytest_asyncio.fixture(scope="module", loop_scope="module", params=["sqlite", "postgres"])
async def stack(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Stack]:
    # One user holds a socket in every channel it joins.
    env = {**GENEROUS_LIMITS, "WADDLE_USER_MAX_CONNECTIONS": str(JOINED)}
    async with (
        database(request.param) as url,
        start_stack(
            tmp_path_factory.mktemp(f"rows-{request.param}"), database_url=url, env=env
        ) as s,
    ):
        yield s


async def channel_rows(database_url: str) -> dict[str, int]:
    """Every row of ``channels``, read from the database itself: id -> last_seq."""
    engine = create_engine(database_url, pool_size=1)
    try:
        async with engine.connect() as conn:
            rows = await conn.execute(select(ChannelRow.id, ChannelRow.last_seq))
            return {cid: int(seq) for cid, seq in rows}
    finally:
        await engine.dispose()


async def test_joins_alone_create_no_channel_rows(
    stack: Stack, http: aiohttp.ClientSession
) -> None:
    token = stack.token("joiner")
    channels = [f"rows-{uuid.uuid4().hex[:8]}-{i}" for i in range(JOINED)]
    clients: list[WsClient] = []
    try:
        for cid in channels:
            client = await WsClient.connect(http, stack.ws_url(cid), token=token)
            clients.append(client)
            state = await client.recv()
            assert (state["type"], state["channelId"], state["lastSeq"]) == (
                "initial_state",
                cid,
                0,
            ), state
        for i, client in enumerate(clients[:POSTED]):
            await client.send({"type": "message", "content": "hello", "clientMsgId": f"k{i}"})
            ack = await client.recv_type("ack")
            assert (ack["clientMsgId"], ack["seq"]) == (f"k{i}", 1)
        # Every socket is still open: the channels were all joined and are
        # still in use when the table is read.
        for client in clients:
            await client.send({"type": "ping"})
            assert (await client.recv_type("pong"))["type"] == "pong"

        assert await channel_rows(stack.database_url) == {cid: 1 for cid in channels[:POSTED]}
    finally:
        for client in clients:
            await client.close()
