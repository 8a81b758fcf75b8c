"""The channel lifecycle with a scripted store and scripted edges: idle
channels fall asleep keeping a few hundred bytes and sending nothing; a wake
re-registers the members, then applies the waiting events in order, and
``seq`` continues from the store; presence status survives; re-registration
while asleep costs no store call; a shard takes re-registered channels over
asleep with paced head checks; departures missed while asleep are
announced; a store outage during a wake loses no member."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from typing import Any

import orjson
import pytest

from channel_service.channel import ChannelPolicy
from channel_service.dormant import DormantTable, EdgeShare
from channel_service.hub import Hub, HubConfig, Session
from channel_service.lifecycle import absorb, dormant_size, known_users
from channel_service.metrics import ChannelMetrics
from tests.channel_service.test_hub import CursorScriptedStore
from waddle_common.store_client import StoreUnavailable
from waddle_pb import channel_pb2, store_pb2

IDLE = 0.15


class Store(CursorScriptedStore):
    """Counts channel loads (by ``recent_limit``) and how many run at once."""

    def __init__(self) -> None:
        super().__init__()
        self.loads: list[tuple[str, int]] = []
        self.down = False
        self.running = 0
        self.most_at_once = 0

    async def load_channel(self, channel_id: str, recent_limit: int) -> store_pb2.ChannelState:
        self.loads.append((channel_id, recent_limit))
        if self.down:
            raise StoreUnavailable("down")
        self.running += 1
        self.most_at_once = max(self.most_at_once, self.running)
        try:
            await asyncio.sleep(0.002)  # a store round trip
            return await super().load_channel(channel_id, recent_limit)
        finally:
            self.running -= 1

    def full_loads(self) -> int:
        return sum(1 for _, limit in self.loads if limit)


def member(user_id: str, status: str = "online") -> channel_pb2.Member:
    return channel_pb2.Member(
        user_id=user_id, username=user_id.upper(), permissions=["read", "write"], status=status
    )


class FakeEdge:
    """An edge's Attach session as a shard sees it: it registers connections
    and answers ``Rehydrate`` with them, as ``edge.shards.ShardLink`` does."""

    def __init__(self, hub: Hub, edge_id: str, *, answers: bool = True) -> None:
        self.hub = hub
        self.edge_id = edge_id
        self.answers = answers
        self.conns: dict[int, tuple[str, channel_pb2.Member]] = {}
        self.joining: set[int] = set()  # joins not answered yet
        self.events: list[channel_pb2.ShardEvent] = []
        self.changed = asyncio.Event()
        self.session: Session = hub.open_session(edge_id)
        self._task = asyncio.create_task(self._pump(self.session))

    async def _pump(self, session: Session) -> None:
        async for batch in session.batches():
            for e in batch.events:
                self.events.append(e)
                if e.HasField("join_result"):
                    self.joining.discard(e.join_result.conn_id)
                if e.HasField("rehydrate") and self.answers:
                    channel_id = e.rehydrate.channel_id
                    joins = [
                        channel_pb2.Join(conn_id=c, channel_id=ch, member=m, rejoin=True)
                        for c, (ch, m) in self.conns.items()
                        if ch == channel_id and c not in self.joining
                    ]
                    self.handle(
                        rehydrated=channel_pb2.Rehydrated(channel_id=channel_id, members=joins)
                    )
            self.changed.set()

    def handle(self, **kw: Any) -> None:
        self.hub.handle(self.session, channel_pb2.EdgeEvent(**kw))

    def join(self, conn_id: int, channel_id: str, user_id: str, *, rejoin: bool = False) -> None:
        m = self.conns[conn_id][1] if rejoin else member(user_id)
        self.conns[conn_id] = (channel_id, m)
        if not rejoin:
            self.joining.add(conn_id)
        self.handle(
            join=channel_pb2.Join(conn_id=conn_id, channel_id=channel_id, member=m, rejoin=rejoin)
        )

    def leave(self, conn_id: int) -> None:
        channel_id, _ = self.conns.pop(conn_id)
        self.handle(leave=channel_pb2.Leave(conn_id=conn_id, channel_id=channel_id))

    def publish(self, conn_id: int, key: str) -> None:
        channel_id, _ = self.conns[conn_id]
        self.handle(
            publish=channel_pb2.Publish(
                conn_id=conn_id,
                channel_id=channel_id,
                content=key,
                client_msg_id=key,
                client_supplied_id=True,
            )
        )

    def presence(self, conn_id: int, status: str) -> None:
        channel_id, m = self.conns[conn_id]
        m.status = status  # the edge's attachment follows, as conn.status does
        self.handle(
            presence=channel_pb2.Presence(conn_id=conn_id, channel_id=channel_id, status=status)
        )

    def reattach(self, keep: list[int]) -> None:
        """The stream broke and re-opened: re-register ``keep`` only."""
        self.session.close()
        self.session = self.hub.open_session(self.edge_id)
        self._task = asyncio.create_task(self._pump(self.session))
        self.conns = {c: v for c, v in self.conns.items() if c in keep}
        for conn_id in keep:
            self.join(conn_id, self.conns[conn_id][0], "", rejoin=True)

    def frames(self, kind: str) -> list[dict[str, Any]]:
        """Client frames of ``kind`` this edge was given (deliveries and replies)."""
        out = []
        for e in self.events:
            payload = e.deliver.payload if e.HasField("deliver") else e.reply.payload
            if payload:
                frame = orjson.loads(payload)
                if frame.get("type") == kind:
                    out.append(frame)
        return out

    def count(self, kind: str) -> int:
        return sum(1 for e in self.events if e.WhichOneof("kind") == kind)

    async def until(self, check: Callable[[], bool], timeout: float = 5.0) -> None:
        async with asyncio.timeout(timeout):
            while not check():
                self.changed.clear()
                await self.changed.wait()

    async def close(self) -> None:
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task


def make_hub(store: Store, **config: Any) -> Hub:
    policy = ChannelPolicy(presence_linger=config.pop("linger", 0.0))
    return Hub(
        HubConfig(
            default_max_connections=100,
            max_message_length=100,
            policy=policy,
            retry_initial=0.01,
            retry_max=0.05,
            rejoin_grace=config.pop("grace", 0.2),
            idle_seconds=config.pop("idle", IDLE),
            **config,
        ),
        store,  # type: ignore[arg-type]
        ChannelMetrics(),
    )


async def until(check: Callable[[], bool], timeout: float = 5.0) -> None:
    """Wait for a state of the hub that no event announces (a short poll)."""
    async with asyncio.timeout(timeout):
        while not check():  # noqa: ASYNC110
            await asyncio.sleep(0.005)


def sample(hub: Hub, name: str, **labels: str) -> float:
    return hub.metrics.registry.get_sample_value(name, labels) or 0.0


async def chat(hub: Hub, a: FakeEdge, b: FakeEdge, channel_id: str, messages: int) -> None:
    """ann on edge ``a`` (conn 1), bob on edge ``b`` (conn 2), ``messages`` from ann."""
    a.join(1, channel_id, "ann")
    b.join(2, channel_id, "bob")
    for i in range(messages):
        a.publish(1, f"m{i}")
    await a.until(lambda: len(a.frames("ack")) == messages)


async def test_an_idle_channel_sleeps_keeping_a_few_hundred_bytes_and_saying_nothing() -> None:
    store = Store()
    hub = make_hub(store)
    hub.start()
    a, b = FakeEdge(hub, "edge-a"), FakeEdge(hub, "edge-b")
    try:
        await chat(hub, a, b, "room", 20)
        seen = (len(a.events), len(b.events))
        await until(lambda: "room" in hub.life.sleeping)
        assert hub.channels == {}
        record = hub.life.sleeping.get("room")
        assert record is not None
        size = dormant_size(hub.life.sleeping, "room")
        assert size <= 300, f"a sleeping channel keeps {size} bytes"
        assert {s.edge_id: s.count for s in record} == {"edge-a": 1, "edge-b": 1}
        assert known_users(record).keys() == {"ann", "bob"}
        assert (len(a.events), len(b.events)) == seen, "nothing is sent to anyone"
        assert sample(hub, "waddle_channel_hibernations_total") == 1
        assert sample(hub, "waddle_channel_hibernated_channels") == 1
        assert (
            sample(hub, "waddle_channel_hibernated_bytes") == hub.life.sleeping.nbytes >= size > 0
        )
        assert sample(hub, "waddle_channel_members") == 2
    finally:
        await a.close()
        await b.close()
        await hub.stop()


async def test_with_an_idle_period_of_zero_channels_never_sleep() -> None:
    store = Store()
    hub = make_hub(store, idle=0)
    hub.start()
    a, b = FakeEdge(hub, "edge-a"), FakeEdge(hub, "edge-b")
    try:
        await chat(hub, a, b, "room", 1)
        assert not hub.life.hibernates
        assert hub.life._sweeper._handle is None, "no hibernation timer at all"
        # A re-registration of a channel the shard does not hold loads it.
        a.handle(
            join=channel_pb2.Join(conn_id=9, channel_id="other", member=member("zed"), rejoin=True)
        )
        await until(lambda: "other" in hub.channels)
        assert store.full_loads() == 2 and not hub.life.sleeping
    finally:
        await a.close()
        await b.close()
        await hub.stop()


async def test_a_wake_reregisters_then_applies_waiting_events_in_order() -> None:
    store = Store()
    hub = make_hub(store)
    hub.start()
    a, b = FakeEdge(hub, "edge-a"), FakeEdge(hub, "edge-b")
    try:
        await chat(hub, a, b, "room", 3)
        await until(lambda: "room" in hub.life.sleeping)
        loads = store.full_loads()
        # Events while asleep, and more while it wakes: all in order.
        b.publish(2, "k1")
        b.presence(2, "away")
        b.publish(2, "k2")
        assert "room" in hub.life.waking
        await b.until(lambda: len(b.frames("ack")) == 2)
        acks = b.frames("ack")
        assert [(x["clientMsgId"], x["seq"]) for x in acks] == [("k1", 4), ("k2", 5)]
        assert store.full_loads() == loads + 1
        assert a.count("rehydrate") == 1 and b.count("rehydrate") == 1
        await a.until(lambda: len(a.frames("message")) >= 5)
        assert [m["message"]["seq"] for m in a.frames("message")] == [1, 2, 3, 4, 5]
        assert [p["status"] for p in a.frames("presence")] == ["away"]
        for edge in (a, b):
            woke = next(i for i, e in enumerate(edge.events) if e.HasField("rehydrate"))
            after = [e.deliver.type for e in edge.events[woke:] if e.HasField("deliver")]
            assert not {"user_connected", "user_disconnected"} & set(after), "silent"
        assert sample(hub, "waddle_channel_wakes_total", reason="event") == 1
        assert sample(hub, "waddle_channel_wake_seconds_count") == 1
    finally:
        await a.close()
        await b.close()
        await hub.stop()


async def test_a_newcomer_after_a_wake_sees_every_member_with_their_status() -> None:
    store = Store()
    hub = make_hub(store)
    hub.start()
    a, b = FakeEdge(hub, "edge-a"), FakeEdge(hub, "edge-b")
    try:
        await chat(hub, a, b, "room", 2)
        b.join(3, "room", "bob")  # bob's second device: its attachment says online
        a.presence(1, "dnd")
        b.handle(presence=channel_pb2.Presence(conn_id=2, channel_id="room", status="away"))
        await a.until(lambda: len(a.frames("presence")) == 2)
        await until(lambda: "room" in hub.life.sleeping)

        a.join(4, "room", "cat")
        await a.until(
            lambda: any(
                e.join_result.initial_state
                for e in a.events
                if e.HasField("join_result") and e.join_result.conn_id == 4
            )
        )
        result = next(
            e.join_result
            for e in a.events
            if e.HasField("join_result") and e.join_result.conn_id == 4
        )
        state = orjson.loads(result.initial_state)
        users = {u["userId"]: u["status"] for u in state["onlineUsers"]}
        assert users == {"cat": "online", "ann": "dnd", "bob": "away"}
        assert state["lastSeq"] == 2 and result.last_seq == 2
    finally:
        await a.close()
        await b.close()
        await hub.stop()


async def test_re_registration_while_asleep_costs_no_store_call() -> None:
    store = Store()
    hub = make_hub(store)
    hub.start()
    a, b = FakeEdge(hub, "edge-a"), FakeEdge(hub, "edge-b")
    try:
        for i in range(20):
            a.join(100 + i, f"room{i}", f"a{i}")
            b.join(200 + i, f"room{i}", f"b{i}")
        await until(lambda: len(hub.life.sleeping) == 20)
        loads = len(store.loads)
        a.reattach(keep=[100 + i for i in range(20)])
        # The grace ends with every connection back: nothing to wake for.
        await until(lambda: not hub.grace_pending("edge-a"))
        assert len(store.loads) == loads, "no store call for re-registrations"
        assert len(hub.life.sleeping) == 20 and not hub.channels
        record = hub.life.sleeping.get("room0")
        assert record is not None
        share = next(s for s in record if s.edge_id == "edge-a")
        assert share.generation == a.session.generation and share.count == share.expected == 1
        assert sample(hub, "waddle_channel_wakes_total", reason="departures") == 0
    finally:
        await a.close()
        await b.close()
        await hub.stop()


async def test_users_gone_while_their_channel_slept_are_announced_after_the_grace() -> None:
    store = Store()
    hub = make_hub(store, linger=0.05)
    hub.start()
    a, b = FakeEdge(hub, "edge-a"), FakeEdge(hub, "edge-b")
    try:
        await chat(hub, a, b, "room", 1)
        a.join(3, "room", "cid")
        await until(lambda: "room" in hub.life.sleeping)
        # edge-a's stream breaks; while it was down, cid's socket closed.
        a.reattach(keep=[1])
        await b.until(lambda: bool(b.frames("user_disconnected")))
        assert [f["userId"] for f in b.frames("user_disconnected")] == ["cid"]
        assert sample(hub, "waddle_channel_wakes_total", reason="departures") == 1
        # Then it sleeps again, with who is really there.
        await until(lambda: "room" in hub.life.sleeping)
        assert known_users(hub.life.sleeping.get("room") or ()).keys() == {"ann", "bob"}
    finally:
        await a.close()
        await b.close()
        await hub.stop()


async def test_an_edge_that_died_while_its_channels_slept_has_its_users_announced() -> None:
    store = Store()
    hub = make_hub(store)
    hub.start()
    a, b = FakeEdge(hub, "edge-a"), FakeEdge(hub, "edge-b")
    try:
        await chat(hub, a, b, "room", 1)
        a.join(4, "room", "dan")
        b.join(3, "room", "ann")  # ann is on both edges: she stays
        await until(lambda: "room" in hub.life.sleeping)
        hub.close_session(a.session)  # edge-a is gone and never comes back
        await b.until(lambda: bool(b.frames("user_disconnected")))
        assert [f["userId"] for f in b.frames("user_disconnected")] == ["dan"]
        assert sample(hub, "waddle_channel_wakes_total", reason="departures") == 1
        await until(lambda: "room" in hub.life.sleeping)
        (share,) = hub.life.sleeping.get("room") or ()
        assert share.edge_id == "edge-b" and share.count == 2
    finally:
        await a.close()
        await b.close()
        await hub.stop()


async def test_a_wake_storm_loads_a_bounded_number_of_channels_at_a_time() -> None:
    store = Store()
    hub = make_hub(store)
    hub.start()
    a, b = FakeEdge(hub, "edge-a"), FakeEdge(hub, "edge-b")
    n = 3 * hub.life.config.load_concurrency
    try:
        for i in range(n):
            a.join(100 + i, f"room{i}", f"a{i}")
            b.join(1000 + i, f"room{i}", f"b{i}")
        await until(lambda: len(hub.life.sleeping) == n)
        store.most_at_once = 0
        for i in range(n):
            a.publish(100 + i, f"k{i}")  # every channel wakes at once
        await a.until(lambda: len(a.frames("ack")) == n)
        assert store.full_loads() == 2 * n, "each channel loaded once, then woken once"
        assert store.most_at_once <= hub.life.config.load_concurrency
        await b.until(lambda: len(b.frames("message")) == n)
        assert sample(hub, "waddle_channel_wakes_total", reason="event") == n
    finally:
        await a.close()
        await b.close()
        await hub.stop()


async def test_a_shard_takes_re_registered_channels_over_asleep_with_paced_head_checks() -> None:
    store = Store()
    store.heads = {f"room{i}": i for i in range(40)}
    hub = make_hub(store, background_concurrency=4)
    hub.start()
    a = FakeEdge(hub, "edge-a")
    try:
        for i in range(40):
            a.conns[i] = (f"room{i}", member(f"u{i}", "away"))
            a.join(i, f"room{i}", "", rejoin=True)
        assert len(hub.life.sleeping) == 40 and not hub.life.waking and not hub.channels
        await a.until(lambda: a.count("head") == 39)  # room0 has no message: nothing to tell
        assert store.full_loads() == 0
        assert sorted(limit for _, limit in store.loads) == [0] * 40
        assert store.most_at_once <= 4
        heads = {e.head.channel_id: e.head.last_seq for e in a.events if e.HasField("head")}
        assert heads == {f"room{i}": i for i in range(1, 40)}
        assert sample(hub, "waddle_channel_takeovers_total") == 40
        assert sample(hub, "waddle_channel_loads_total", kind="head") == 40
        # The status came with the re-registration; a wake keeps it.
        a.join(100, "room7", "newcomer")
        await a.until(
            lambda: any(
                e.HasField("join_result") and e.join_result.conn_id == 100 for e in a.events
            )
        )
        result = next(
            e.join_result
            for e in a.events
            if e.HasField("join_result") and e.join_result.conn_id == 100
        )
        users = {
            u["userId"]: u["status"] for u in orjson.loads(result.initial_state)["onlineUsers"]
        }
        assert users == {"u7": "away", "newcomer": "online"}
        assert result.last_seq == 7
    finally:
        await a.close()
        await hub.stop()


async def test_a_wake_the_store_cannot_serve_refuses_the_join_and_keeps_the_members() -> None:
    store = Store()
    hub = make_hub(store)
    hub.start()
    a, b = FakeEdge(hub, "edge-a"), FakeEdge(hub, "edge-b")
    try:
        await chat(hub, a, b, "room", 1)
        await until(lambda: "room" in hub.life.sleeping)
        store.down = True
        a.join(5, "room", "cat")
        await a.until(
            lambda: any(e.HasField("join_result") and e.join_result.conn_id == 5 for e in a.events)
        )
        result = next(
            e.join_result
            for e in a.events
            if e.HasField("join_result") and e.join_result.conn_id == 5
        )
        assert not result.ok and result.refusal == "unavailable"
        del a.conns[5]
        await until(lambda: "room" in hub.life.sleeping)
        assert known_users(hub.life.sleeping.get("room") or ()).keys() == {"ann", "bob"}
        store.down = False
        b.publish(2, "back")
        await b.until(lambda: len(b.frames("ack")) == 1)
        assert b.frames("ack")[0]["seq"] == 2
        await a.until(lambda: len(a.frames("message")) == 2)
    finally:
        await a.close()
        await b.close()
        await hub.stop()


async def test_a_wake_does_not_wait_for_an_edge_that_never_answers() -> None:
    store = Store()
    hub = make_hub(store, rehydrate_timeout=0.2)
    hub.start()
    a, b = FakeEdge(hub, "edge-a", answers=False), FakeEdge(hub, "edge-b")
    try:
        await chat(hub, a, b, "room", 1)
        await until(lambda: "room" in hub.life.sleeping)
        b.publish(2, "k")
        await b.until(lambda: len(b.frames("ack")) == 1, timeout=3)
        assert b.frames("ack")[0]["seq"] == 2
        # Nobody re-registered ann: she is announced gone.
        assert [f["userId"] for f in b.frames("user_disconnected")] == ["ann"]
    finally:
        await a.close()
        await b.close()
        await hub.stop()


async def test_a_member_within_the_linger_keeps_the_channel_awake() -> None:
    store = Store()
    hub = make_hub(store, linger=0.3)
    hub.start()
    a, b = FakeEdge(hub, "edge-a"), FakeEdge(hub, "edge-b")
    try:
        await chat(hub, a, b, "room", 1)
        b.leave(2)
        # The departure is announced after the linger; only then may it sleep.
        await a.until(lambda: bool(a.frames("user_disconnected")))
        assert "room" in hub.channels or "room" in hub.life.sleeping
        await until(lambda: "room" in hub.life.sleeping)
        assert sample(hub, "waddle_channel_hibernations_total") == 1
    finally:
        await a.close()
        await b.close()
        await hub.stop()


async def test_a_receipt_coalesced_before_sleep_reaches_the_members_after() -> None:
    store = Store()
    hub = make_hub(store, receipt_interval=0.3)
    hub.start()
    a, b = FakeEdge(hub, "edge-a"), FakeEdge(hub, "edge-b")
    try:
        await chat(hub, a, b, "room", 2)
        # bob reads twice: the first receipt goes at once, the second waits
        # out the interval - longer than the channel stays awake.
        b.handle(read=channel_pb2.Read(conn_id=2, channel_id="room", seq=1))
        b.handle(read=channel_pb2.Read(conn_id=2, channel_id="room", seq=2))

        def bobs() -> list[int]:
            return [f["seq"] for f in a.frames("read") if f["userId"] == "bob"]

        await a.until(lambda: bobs() == [1])
        await until(lambda: "room" in hub.life.sleeping)
        await a.until(lambda: bobs() == [1, 2])
        assert "room" in hub.life.sleeping, "a receipt does not wake the channel"
    finally:
        await a.close()
        await b.close()
        await hub.stop()


def test_the_dormant_record_grows_only_with_connections_it_did_not_know() -> None:
    class S:
        edge_id = "e"
        generation = 1

    join = channel_pb2.Join(conn_id=1, channel_id="c", member=member("u1"), rejoin=True)
    record = absorb((), S(), join)  # type: ignore[arg-type]
    other = channel_pb2.Join(conn_id=2, channel_id="c", member=member("u2"))
    record = absorb(record, S(), other)  # type: ignore[arg-type]
    (share,) = record
    assert share.count == share.expected == 2
    assert share.users == [["u1", "U1", "online", 0], ["u2", "U2", "online", 0]]
    S.generation = 2  # the stream re-opened: re-registrations of known connections
    for _ in range(2):
        record = absorb(record, S(), join)  # type: ignore[arg-type]
    assert share.count == 2 and share.expected == 2 and share.generation == 2
    assert len(share.users) == 2, "nothing appended"


def test_the_dormant_table_packs_records_without_an_object_per_channel() -> None:
    table = DormantTable()
    records = {
        f"room-{i}": (
            EdgeShare("edge-a", 1, 2, 2, [[f"u{i}", "U", "away", i], ["v", "V", "dnd", 1]]),
        )
        for i in range(3000)
    }
    for channel_id, record in records.items():
        table.put(channel_id, record)
    assert len(table) == 3000 and table.members == 6000
    assert table.get("room-1234") == records["room-1234"]
    assert "room-99" in table and "room-x" not in table and table.get("room-x") is None
    # Updates and removals keep it consistent, and dead space is reclaimed.
    for i in range(0, 3000, 2):
        assert table.pop(f"room-{i}") == records[f"room-{i}"]
    table.put("room-1", (EdgeShare("edge-b", 3, 1, 2, []),))
    assert len(table) == 1500 and table.members == 1499 * 2 + 1
    assert table.get("room-1") == (EdgeShare("edge-b", 3, 1, 2, []),)
    assert [c for c, _ in table.with_edge("edge-b")] == ["room-1"]
    assert table.buffer_bytes < 1500 * 200, "dead entries were compacted away"
    per_channel = table.nbytes / len(table)
    assert per_channel < 300, per_channel
    for i in range(1, 3000, 2):
        table.pop(f"room-{i}")
    assert len(table) == 0 and table.members == 0 and table.get("room-1") is None
    assert table.nbytes < 4096, "an empty table shrinks back"


@pytest.mark.parametrize("text", ["a", "room-1", "\u00fc" * 10, "new\nline"])
def test_a_record_round_trips_any_text(text: str) -> None:
    table = DormantTable()
    record = (EdgeShare(text, 1, 1, 1, [[text, text, "online", 5]]),)
    table.put(text, record)
    assert table.get(text) == record
    assert known_users(record)[text].joined_at_ms == 5


async def test_connections_moved_away_while_their_channel_wakes_do_not_depart() -> None:
    """An edge re-routes a channel (failover, drain) while its old owner is
    waking it: the users it moved live on at the new owner, so the old one
    neither waits for that edge nor announces them as gone."""
    store = Store()
    hub = make_hub(store, rehydrate_timeout=30.0)
    hub.start()
    a, b = FakeEdge(hub, "edge-a"), FakeEdge(hub, "edge-b")
    try:
        await chat(hub, a, b, "room", 1)
        await until(lambda: "room" in hub.life.sleeping)
        b.presence(2, "away")  # wakes it: both edges are asked to re-register
        assert "room" in hub.life.waking
        channel_id, _ = a.conns.pop(1)  # edge-a moves ann's connection to another shard
        a.handle(leave=channel_pb2.Leave(conn_id=1, channel_id=channel_id, moved=True))
        await until(lambda: "room" in hub.channels)
        assert set(hub.channels["room"].users) == {"bob"}
        await b.until(lambda: len(b.frames("presence")) == 1)
        assert not b.frames("user_disconnected"), "ann did not leave: she moved"
    finally:
        await a.close()
        await b.close()
        await hub.stop()
