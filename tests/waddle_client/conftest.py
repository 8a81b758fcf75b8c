"""Fixtures: a protocol-speaking test peer and clients with fast, deterministic backoff."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest_asyncio

from tests.waddle_client.peer import Peer
from waddle_client import WaddleClient

ClientFactory = Callable[..., WaddleClient]


@pytest_asyncio.fixture
async def peer() -> AsyncIterator[Peer]:
    p = Peer()
    await p.start()
    try:
        yield p
    finally:
        await p.stop()


@pytest_asyncio.fixture
async def make_client(peer: Peer) -> AsyncIterator[ClientFactory]:
    clients: list[WaddleClient] = []

    def make(*, url: Any = None, token: str | None = "tok", **kw: Any) -> WaddleClient:
        kw.setdefault("backoff_base", 0.01)
        kw.setdefault("backoff_cap", 0.04)
        kw.setdefault("random", lambda: 0.5)
        kw.setdefault("heartbeat", None)
        client = WaddleClient(url or peer.url, peer.channel_id, token, **kw)
        clients.append(client)
        return client

    try:
        yield make
    finally:
        for client in clients:
            await client.close()
