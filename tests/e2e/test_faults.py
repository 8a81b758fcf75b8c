"""Fault tests: services die while clients publish, and nothing acknowledged is lost.

Three clients publish steadily on two channels (through edge 0, able to move
to edge 1) while an observer per channel listens on edge 1. In turn: the
channel shard is SIGKILLed and restarted, the store is SIGKILLed and
restarted, PostgreSQL is restarted (PostgreSQL run only), and edge 0 is
SIGKILLed. After each, every acknowledged message is in the store exactly
once; every client received every seq of its channel exactly once, in
order, with no gap; and the shard restart dropped no client socket.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import subprocess
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest

from tests.e2e.conftest import GENEROUS_LIMITS, database
from tests.support.stack import Stack, start_stack
from waddle_client import Ack, ConnectionState, Message, State, WaddleClient
from waddle_pb import store_pb2, store_pb2_grpc

pytestmark = [pytest.mark.e2e]

CHANNELS = ("faults-a", "faults-b")


@dataclass(eq=False)
class Member:
    name: str
    channel: str
    client: WaddleClient
    seqs: list[int] = field(default_factory=list)
    acked: set[str] = field(default_factory=set)
    drops: int = 0  # times the connection went down
    task: asyncio.Task[None] | None = None
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    async def consume(self) -> None:
        async for event in self.client.events():
            self.changed.set()
            match event:
                case Message(seq=seq):
                    self.seqs.append(seq)
                case Ack(client_msg_id=cmid):
                    self.acked.add(cmid)
                case ConnectionState(state=State.RECONNECTING):
                    self.drops += 1
                case _:
                    pass


async def store_messages(stack: Stack, channel: str) -> list[store_pb2.StoredMessage]:
    out: list[store_pb2.StoredMessage] = []
    async with grpc.aio.insecure_channel(stack.store_address) as ch:
        stub = store_pb2_grpc.StoreServiceStub(ch)
        after = 0
        while True:
            page = await stub.MessagesAfter(
                store_pb2.MessagesAfterRequest(channel_id=channel, after_seq=after, limit=1000),
                timeout=5,
            )
            out.extend(page.messages)
            if not page.has_more or not page.messages:
                return out
            after = page.messages[-1].seq


async def until(m: Member, condition: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
    """Wait until ``condition`` holds, re-checking after each of ``m``'s events."""
    try:
        async with asyncio.timeout(timeout):
            while not condition():
                m.changed.clear()
                await m.changed.wait()
    except TimeoutError:
        raise AssertionError(f"timed out waiting for {what}") from None


class Scenario:
    def __init__(self, stack: Stack) -> None:
        self.stack = stack
        self.publishers: list[Member] = []
        self.observers: list[Member] = []
        self.sent: dict[str, list[str]] = {}
        self._publishing = asyncio.Event()
        self._loops: list[asyncio.Task[None]] = []

    def _client(self, user: str, channel: str, urls: list[str]) -> WaddleClient:
        return WaddleClient(
            urls,
            channel,
            self.stack.token(user),
            backoff_base=0.05,
            backoff_cap=0.5,
            ack_timeout=5.0,
            max_queue=5000,
        )

    async def start(self) -> None:
        edge0 = self.stack.edge_url
        edge1 = self.stack.http_url("", edge=1)
        plan = [("pub0", CHANNELS[0]), ("pub1", CHANNELS[0]), ("pub2", CHANNELS[1])]
        for user, channel in plan:
            self.publishers.append(
                Member(user, channel, self._client(user, channel, [edge0, edge1]))
            )
        for i, channel in enumerate(CHANNELS):
            self.observers.append(
                Member(f"obs{i}", channel, self._client(f"obs{i}", channel, [edge1]))
            )
        for m in self.members:
            m.task = asyncio.create_task(m.consume())
            async with asyncio.timeout(15):
                await m.client.connect()
        self._publishing.set()
        for p in self.publishers:
            self.sent[p.name] = []
            self._loops.append(asyncio.create_task(self._publish(p)))

    @property
    def members(self) -> list[Member]:
        return [*self.publishers, *self.observers]

    async def _publish(self, p: Member) -> None:
        n = 0
        while True:
            await self._publishing.wait()
            cmid = p.client.send_nowait(f"{p.name} #{n}")
            self.sent[p.name].append(cmid)
            n += 1
            await asyncio.sleep(0.02)  # a steady 50 messages/s per publisher

    def pause(self) -> None:
        self._publishing.clear()

    def resume(self) -> None:
        self._publishing.set()

    async def settle(self) -> dict[str, int]:
        """Stop publishing, wait for every ack and delivery, check everything."""
        self.pause()
        await asyncio.sleep(0.05)  # let the publish loops reach their wait
        for p in self.publishers:
            client = p.client
            await until(p, lambda: not client.pending, f"{p.name}'s acks", timeout=60)  # noqa: B023
        heads: dict[str, int] = {}
        for channel in CHANNELS:
            stored = await store_messages(self.stack, channel)
            heads[channel] = len(stored)
            assert [m.seq for m in stored] == list(range(1, len(stored) + 1)), "store has gaps"
            by_key = Counter(m.client_msg_id for m in stored)
            dupes = [k for k, c in by_key.items() if c > 1]
            assert not dupes, f"stored twice: {dupes[:5]}"
            for p in self.publishers:
                if p.channel == channel:
                    assert set(self.sent[p.name]) == p.acked, f"{p.name}: sent but not acked"
                    missing = p.acked - set(by_key)
                    assert not missing, f"acked but not stored: {sorted(missing)[:5]}"
        for m in self.members:
            head = heads[m.channel]
            seqs = m.seqs
            await until(m, lambda: len(seqs) >= head, f"{m.name} to receive {head}")  # noqa: B023
            assert m.seqs == list(range(1, head + 1)), f"{m.name}: not exactly once in order"
        return heads

    async def stop(self) -> None:
        for task in self._loops:
            task.cancel()
        for m in self.members:
            await m.client.close()
            if m.task is not None:
                m.task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await m.task


def restart_postgres() -> None:
    ctl = shutil.which("pg_ctlcluster")
    if ctl is None or os.geteuid() != 0:
        pytest.fail("restarting PostgreSQL needs pg_ctlcluster and root", pytrace=False)
    version = sorted(os.listdir("/etc/postgresql"))[-1]
    subprocess.run(
        [ctl, "--skip-systemctl-redirect", version, "main", "restart", "--", "-m", "fast"],
        check=True,
        timeout=60,
    )


@contextlib.asynccontextmanager
async def running(tmp: Path, kind: str) -> AsyncIterator[Scenario]:
    async with (
        database(kind) as url,
        start_stack(tmp, database_url=url, edges=2, env=GENEROUS_LIMITS) as stack,
    ):
        scenario = Scenario(stack)
        try:
            await scenario.start()
            yield scenario
        finally:
            await scenario.stop()


@pytest.mark.timeout(300)
@pytest.mark.parametrize("kind", ["sqlite", "postgres"])
async def test_no_acknowledged_message_is_lost_across_restarts(
    tmp_path: Path, kind: str, record_property: Callable[[str, object], None]
) -> None:
    async with running(tmp_path, kind) as sc:
        stack = sc.stack

        async def fault(name: str, action: Callable[[], Awaitable[None]]) -> None:
            sc.resume()
            await asyncio.sleep(1.0)  # publishing steadily
            drops_before = {m.name: m.drops for m in sc.members}
            await action()
            await asyncio.sleep(1.0)  # and on, through the recovery
            heads = await sc.settle()
            total_acked = sum(len(p.acked) for p in sc.publishers)
            reconnects = {m.name: m.drops - drops_before[m.name] for m in sc.members}
            record_property(
                "checked",
                f"after {name}: store heads {heads}, acked {total_acked}, "
                f"deliveries checked {sum(len(m.seqs) for m in sc.members)}, "
                f"reconnects {reconnects}",
            )
            if name == "channel shard SIGKILL":
                assert all(m.drops == drops_before[m.name] for m in sc.members), (
                    "a channel-service restart dropped a client socket"
                )

        await fault("channel shard SIGKILL", lambda: stack.restart_channel(0, kill=True))
        await fault("store SIGKILL", lambda: stack.restart_store(kill=True))
        if kind == "postgres":
            await fault("PostgreSQL restart", lambda: asyncio.to_thread(restart_postgres))

        async def kill_edge0() -> None:
            await stack.edges[0].kill()

        await fault("edge 0 SIGKILL", kill_edge0)
        assert all(p.drops >= 1 for p in sc.publishers), "publishers moved to edge 1"
