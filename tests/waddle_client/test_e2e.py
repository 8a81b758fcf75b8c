"""``WaddleClient`` against the real stack (store, channel shard, edges as
processes): chat exactly once in order, and no loss or duplicate across a
SIGKILL of the channel shard, of the store, and of the edge a client is on."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Callable, Coroutine
from pathlib import Path
from typing import Any

import grpc
import pytest

from tests.support.stack import Stack, start_stack
from tests.waddle_client.helpers import Recorder
from waddle_client import Ack, ErrorEvent, Message, Presence, State, Typing, WaddleClient
from waddle_pb import store_pb2, store_pb2_grpc

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(180)]

SETTLE = 90.0  # upper bound for everything to be acked/delivered after a fault


def channel(name: str) -> str:
    return f"{name}-{uuid.uuid4().hex[:8]}"


def edge_base(stack: Stack, i: int) -> str:
    return f"http://127.0.0.1:{stack.edge_port(i)}"


def client(stack: Stack, url: str | list[str], cid: str, user: str) -> WaddleClient:
    return WaddleClient(
        url,
        cid,
        stack.token(user),
        token_provider=lambda: stack.token(user),
        backoff_base=0.05,
        backoff_cap=0.5,
        heartbeat=5.0,
    )


async def stored(stack: Stack, cid: str) -> list[store_pb2.StoredMessage]:
    async with grpc.aio.insecure_channel(stack.store_address) as ch:
        stub = store_pb2_grpc.StoreServiceStub(ch)
        page = await stub.MessagesAfter(
            store_pb2.MessagesAfterRequest(channel_id=cid, after_seq=0, limit=10_000), timeout=10
        )
        return list(page.messages)


class Clients:
    """Clients of one test, closed at the end."""

    def __init__(self) -> None:
        self.all: list[WaddleClient] = []

    def add(self, c: WaddleClient) -> tuple[WaddleClient, Recorder]:
        self.all.append(c)
        return c, Recorder(c)

    async def close(self) -> None:
        for c in self.all:
            await c.close()


@pytest.fixture
async def clients() -> AsyncIterator[Clients]:
    group = Clients()
    try:
        yield group
    finally:
        await group.close()


def assert_no_failed_sends(rec: Recorder) -> None:
    failed = [e for e in rec.of(ErrorEvent) if e.client_msg_id and not e.retryable]
    assert failed == []


async def publish_through_fault(
    sender: WaddleClient,
    sender_rec: Recorder,
    reader_rec: Recorder,
    fault: Callable[[], Coroutine[Any, Any, None]],
    *,
    count: int = 50,
    fault_at: int = 15,
    total: int | None = None,
) -> list[str]:
    """Send ``count`` messages steadily with the fault injected at ``fault_at``;
    check every send is acked once and the reader gets every seq once, in order
    (``total`` seqs when others publish too)."""
    ids: list[str] = []
    fault_task: asyncio.Task[None] | None = None
    for i in range(count):
        ids.append(sender.send_nowait(f"m{i}"))
        if i == fault_at:
            fault_task = asyncio.create_task(fault())
        await asyncio.sleep(0.02)  # a steady publisher, not a wait for a condition
    assert fault_task is not None
    await fault_task
    async with asyncio.timeout(SETTLE):
        await sender.flush()
    assert sender.pending == ()
    assert_no_failed_sends(sender_rec)
    acks = await sender_rec.wait_count(Ack, len(ids))
    assert sorted(a.client_msg_id for a in acks) == sorted(ids)
    total = total or count
    assert len({a.seq for a in acks}) == count
    assert all(1 <= a.seq <= total for a in acks)
    seqs = await reader_rec.wait_seqs(total, timeout=SETTLE)
    assert seqs == list(range(1, total + 1)), "every seq exactly once, in order"
    return ids


async def test_two_clients_chat_exactly_once_in_order(tmp_path: Path, clients: Clients) -> None:
    async with start_stack(tmp_path) as stack:
        cid = channel("chat")
        alice, rec_a = clients.add(client(stack, stack.edge_url, cid, "alice"))
        bob, rec_b = clients.add(client(stack, stack.edge_url, cid, "bob"))
        await alice.connect()
        await bob.connect()
        assert set(bob.online_users) == {"alice", "bob"}
        sends = []
        for i in range(20):
            sends.append(alice.send(f"a{i}"))
            sends.append(bob.send(f"b{i}", thread_id="t" if i % 2 else None))
        acks = await asyncio.gather(*sends)
        assert sorted(a.seq for a in acks) == list(range(1, 41))
        for rec in (rec_a, rec_b):
            assert await rec.wait_seqs(40) == list(range(1, 41))
        by_a = rec_a.of(Message)
        assert by_a == rec_b.of(Message)
        assert [m.content for m in by_a if m.user_id == "alice"] == [f"a{i}" for i in range(20)]
        assert [m.content for m in by_a if m.user_id == "bob"] == [f"b{i}" for i in range(20)]
        assert {m.seq: m.id for m in by_a} == {a.seq: a.id for a in acks}
        assert [(m.seq, m.content) for m in await stored(stack, cid)] == [
            (m.seq, m.content) for m in by_a
        ]
        # Typing and presence reach the other client.
        assert await alice.set_typing(True)
        await alice.set_presence("away")
        await rec_b.wait_for(Presence, lambda p: p.user_id == "alice")
        assert (await rec_b.wait_for(Typing)).user_id == "alice"
        assert bob.online_users["alice"].status == "away"
        # A late joiner starts from the history window and sees new messages once.
        carol, rec_c = clients.add(client(stack, stack.edge_url, cid, "carol"))
        await carol.connect()
        await alice.send("welcome")
        assert await rec_c.wait_seqs(41) == list(range(1, 42))


async def test_channel_shard_sigkill_while_publishing(tmp_path: Path, clients: Clients) -> None:
    async with start_stack(tmp_path) as stack:
        cid = channel("shard-kill")
        sender, rec_s = clients.add(client(stack, stack.edge_url, cid, "sender"))
        reader, rec_r = clients.add(client(stack, stack.edge_url, cid, "reader"))
        await sender.connect()
        await reader.connect()
        ids = await publish_through_fault(sender, rec_s, rec_r, lambda: stack.restart_channel(0))
        rows = await stored(stack, cid)
        assert [m.seq for m in rows] == list(range(1, len(ids) + 1))
        assert sorted(m.content for m in rows) == sorted(f"m{i}" for i in range(len(ids)))
        assert sender.state is State.OPEN and reader.state is State.OPEN


async def test_store_sigkill_while_publishing(tmp_path: Path, clients: Clients) -> None:
    async with start_stack(tmp_path) as stack:
        cid = channel("store-kill")
        sender, rec_s = clients.add(client(stack, stack.edge_url, cid, "sender"))
        reader, rec_r = clients.add(client(stack, stack.edge_url, cid, "reader"))
        await sender.connect()
        await reader.connect()
        ids = await publish_through_fault(sender, rec_s, rec_r, lambda: stack.restart_store())
        rows = await stored(stack, cid)
        assert [m.seq for m in rows] == list(range(1, len(ids) + 1))
        assert sorted(m.content for m in rows) == sorted(f"m{i}" for i in range(len(ids)))


async def test_edge_sigkill_client_moves_to_other_edge_and_syncs(
    tmp_path: Path, clients: Clients
) -> None:
    async with start_stack(tmp_path, edges=2) as stack:
        cid = channel("edge-kill")
        edges = [edge_base(stack, 0), edge_base(stack, 1)]
        mover, rec_m = clients.add(client(stack, edges, cid, "mover"))
        sender, rec_s = clients.add(client(stack, edges[1], cid, "sender"))
        await mover.connect()
        await sender.connect()
        await rec_m.wait_state(State.OPEN)
        opened = rec_m.states()[-1]
        assert opened.state is State.OPEN and opened.url is not None
        assert f":{stack.edge_port(0)}/" in opened.url

        async def kill_edge0() -> None:
            await stack.edges[0].kill()

        # The mover publishes too: its unacked messages follow it to edge 1.
        mover_ids: list[str] = []

        async def mover_publishes() -> None:
            for i in range(10):
                mover_ids.append(mover.send_nowait(f"mover{i}"))
                await asyncio.sleep(0.05)

        mover_task = asyncio.create_task(mover_publishes())
        await publish_through_fault(
            sender, rec_s, rec_m, kill_edge0, count=50, fault_at=15, total=60
        )
        await mover_task
        async with asyncio.timeout(SETTLE):
            await mover.flush()
        assert_no_failed_sends(rec_m)
        mover_acks = await rec_m.wait_count(Ack, len(mover_ids))
        assert sorted(a.client_msg_id for a in mover_acks) == sorted(mover_ids)
        total = 60
        assert await rec_m.wait_seqs(total, timeout=SETTLE) == list(range(1, total + 1))
        assert await rec_s.wait_seqs(total, timeout=SETTLE) == list(range(1, total + 1))
        last_open = [s for s in rec_m.states() if s.state is State.OPEN][-1]
        assert last_open.url is not None and f":{stack.edge_port(1)}/" in last_open.url
        rows = await stored(stack, cid)
        assert [m.seq for m in rows] == list(range(1, total + 1))
        contents = sorted(m.content for m in rows)
        assert contents == sorted([f"m{i}" for i in range(50)] + [f"mover{i}" for i in range(10)])


async def test_backlog_is_fed_at_the_server_rate(tmp_path: Path, clients: Clients) -> None:
    """More queued messages than the edge's burst allowance (30 a connection, then
    10 a second, 1008 after 20 refusals in a row) all arrive, none twice."""
    async with start_stack(tmp_path) as stack:
        cid = channel("backlog")
        sender, rec_s = clients.add(client(stack, stack.edge_url, cid, "sender"))
        ids = [sender.send_nowait(f"queued {i}") for i in range(80)]
        await sender.connect()
        async with asyncio.timeout(SETTLE):
            await sender.flush()
        assert sender.state is State.OPEN
        assert_no_failed_sends(rec_s)
        acks = await rec_s.wait_count(Ack, len(ids))
        assert sorted(a.client_msg_id for a in acks) == sorted(ids)
        assert any(e.code == "rate_limited" for e in rec_s.of(ErrorEvent))
        rows = await stored(stack, cid)
        assert [m.seq for m in rows] == list(range(1, 81))
        # Each exactly once (a refused message may land after later ones).
        assert sorted(m.content for m in rows) == sorted(f"queued {i}" for i in range(80))
