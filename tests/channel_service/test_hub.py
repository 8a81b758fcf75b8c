"""The hub with a scripted store: a refused batch settles its senders and the
committer keeps serving; a transient store failure is retried. Read cursors
are written in batches and retried; receipts are coalesced; the presence
linger announces a departure once."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Sequence
from typing import Any

import grpc
import orjson
import pytest

from channel_service.channel import ChannelPolicy
from channel_service.hub import Hub, HubConfig, Session
from channel_service.metrics import ChannelMetrics
from waddle_common.store_client import StoreUnavailable
from waddle_pb import channel_pb2, store_pb2


class ScriptedStore:
    """Answers like the store service; ``failures`` are raised first, in order."""

    def __init__(self, failures: list[Exception]) -> None:
        self.failures = failures
        self.heads: dict[str, int] = {}

    async def load_channel(self, channel_id: str, recent_limit: int) -> store_pb2.ChannelState:
        return store_pb2.ChannelState(channel_id=channel_id, last_seq=self.heads.get(channel_id, 0))

    async def append_batch(
        self, req: store_pb2.AppendBatchRequest
    ) -> store_pb2.AppendBatchResponse:
        if self.failures:
            raise self.failures.pop(0)
        out = []
        for group in req.channels:
            head = self.heads.get(group.channel_id, 0)
            results = [
                store_pb2.AppendResult(id=m.id, seq=head + i + 1, timestamp_ms=1)
                for i, m in enumerate(group.messages)
            ]
            self.heads[group.channel_id] = head + len(results)
            out.append(
                store_pb2.ChannelAppendResult(
                    channel_id=group.channel_id,
                    last_seq=self.heads[group.channel_id],
                    results=results,
                )
            )
        return store_pb2.AppendBatchResponse(channels=out)


def event(**kw: Any) -> channel_pb2.EdgeEvent:
    return channel_pb2.EdgeEvent(**kw)


async def replies(session: Session, n: int) -> list[dict[str, Any]]:
    got: list[dict[str, Any]] = []
    async with asyncio.timeout(10):
        async for batch in session.batches():
            got.extend(orjson.loads(e.reply.payload) for e in batch.events if e.HasField("reply"))
            if len(got) >= n:
                return got
    raise AssertionError("session closed")


async def joined(session: Session, n: int) -> None:
    got = 0
    async with asyncio.timeout(10):
        async for batch in session.batches():
            for e in batch.events:
                if e.HasField("join_result"):
                    assert e.join_result.ok
                    got += 1
            if got >= n:
                return


def publish(content: str, key: str) -> channel_pb2.EdgeEvent:
    return event(
        publish=channel_pb2.Publish(
            conn_id=1, channel_id="c", content=content, client_msg_id=key, client_supplied_id=True
        )
    )


@pytest.mark.parametrize(
    ("failure", "first_code"),
    [
        (
            grpc.aio.AioRpcError(
                grpc.StatusCode.INVALID_ARGUMENT, grpc.aio.Metadata(), grpc.aio.Metadata(), "bad"
            ),
            "rejected",
        ),
        (StoreUnavailable("down for a moment"), None),
    ],
    ids=["refused", "transient"],
)
async def test_committer_survives_store_failures(
    failure: Exception, first_code: str | None
) -> None:
    store = ScriptedStore([failure])
    hub = Hub(
        HubConfig(
            default_max_connections=10,
            max_message_length=100,
            policy=ChannelPolicy(),
            retry_initial=0.01,
        ),
        store,  # type: ignore[arg-type]
        ChannelMetrics(),
    )
    hub.start()
    try:
        session = hub.open_session("edge-1")
        member = channel_pb2.Member(user_id="u", username="U", permissions=["read", "write"])
        hub.handle(session, event(join=channel_pb2.Join(conn_id=1, channel_id="c", member=member)))
        hub.handle(session, publish("first", "k1"))
        got = await replies(session, 1)
        if first_code is None:  # retried until the store answered
            assert got[0]["type"] == "ack" and got[0]["clientMsgId"] == "k1"
        else:
            assert got[0]["code"] == first_code and got[0]["clientMsgId"] == "k1"
        hub.handle(session, publish("second", "k2"))
        got = await replies(session, 1)
        assert got[0]["type"] == "ack" and got[0]["clientMsgId"] == "k2", "the committer still runs"
    finally:
        await hub.stop()


class PoisonStore(ScriptedStore):
    """Refuses, as a whole, every request that holds a message saying "poison"."""

    def __init__(self) -> None:
        super().__init__([])
        self.requests = 0

    async def append_batch(
        self, req: store_pb2.AppendBatchRequest
    ) -> store_pb2.AppendBatchResponse:
        self.requests += 1
        if any(m.content == "poison" for g in req.channels for m in g.messages):
            raise grpc.aio.AioRpcError(
                grpc.StatusCode.INVALID_ARGUMENT, grpc.aio.Metadata(), grpc.aio.Metadata(), "bad"
            )
        return await super().append_batch(req)


async def test_a_refused_message_fails_alone_in_a_group_commit() -> None:
    store = PoisonStore()
    hub = Hub(
        HubConfig(default_max_connections=10, max_message_length=100, policy=ChannelPolicy()),
        store,  # type: ignore[arg-type]
        ChannelMetrics(),
    )
    hub.start()
    try:
        session = hub.open_session("edge-1")
        member = channel_pb2.Member(user_id="u", username="U", permissions=["read", "write"])
        channels = ["a", "b", "c"]
        for conn_id, ch in enumerate(channels, 1):
            hub.handle(
                session,
                event(join=channel_pb2.Join(conn_id=conn_id, channel_id=ch, member=member)),
            )
        await joined(session, len(channels))
        # One round: every publish below is queued before the committer runs.
        keys: dict[str, list[str]] = {}
        for conn_id, ch in enumerate(channels, 1):
            for i in range(5):
                content = "poison" if (ch, i) == ("b", 2) else f"{ch}{i}"
                key = f"{ch}-{i}"
                keys.setdefault(ch, []).append(key)
                hub.handle(
                    session,
                    event(
                        publish=channel_pb2.Publish(
                            conn_id=conn_id,
                            channel_id=ch,
                            content=content,
                            client_msg_id=key,
                            client_supplied_id=True,
                        )
                    ),
                )
        got = await replies(session, 15)
        by_key = {r["clientMsgId"]: r for r in got}
        assert by_key["b-2"]["type"] == "error" and by_key["b-2"]["code"] == "rejected"
        for ch in channels:
            acked = [by_key[k] for k in keys[ch] if k != "b-2"]
            assert all(r["type"] == "ack" for r in acked), acked
            # Each channel's messages keep their order and get gap-free seqs.
            assert [r["seq"] for r in acked] == list(range(1, len(acked) + 1))
        assert store.requests <= 1 + 2 * 5, "split by halves, not one call per message"
    finally:
        await hub.stop()


# -- read cursors, receipts and the presence linger ----------------------------


class CursorScriptedStore(ScriptedStore):
    """Also keeps read cursors like the store does (never moving back);
    ``cursor_failures`` are raised first, in order."""

    def __init__(self, cursor_failures: list[Exception] | None = None) -> None:
        super().__init__([])
        self.cursor_failures = cursor_failures or []
        self.cursor_calls: list[list[tuple[str, str, int]]] = []
        self.cursors: dict[tuple[str, str], int] = {}
        self.cursor_written = asyncio.Event()
        self.cursor_called = asyncio.Event()

    async def set_read_cursors(
        self, cursors: Sequence[tuple[str, str, int]]
    ) -> list[store_pb2.ReadCursor]:
        self.cursor_calls.append(list(cursors))
        self.cursor_called.set()
        if self.cursor_failures:
            raise self.cursor_failures.pop(0)
        out = []
        for user_id, channel_id, seq in cursors:
            key = (user_id, channel_id)
            self.cursors[key] = max(self.cursors.get(key, 0), seq)
            out.append(
                store_pb2.ReadCursor(user_id=user_id, channel_id=channel_id, seq=self.cursors[key])
            )
        self.cursor_written.set()
        return out


class Tap:
    """Collects every event a session sends, for bounded waits on them."""

    def __init__(self, session: Session) -> None:
        self.events: list[channel_pb2.ShardEvent] = []
        self._changed = asyncio.Event()
        self._task = asyncio.create_task(self._drain(session))

    async def _drain(self, session: Session) -> None:
        async for batch in session.batches():
            self.events.extend(batch.events)
            self._changed.set()

    async def until(
        self, check: Callable[[list[channel_pb2.ShardEvent]], bool], timeout: float = 5.0
    ) -> None:
        async with asyncio.timeout(timeout):
            while not check(self.events):
                self._changed.clear()
                await self._changed.wait()

    def frames(self, kind: str) -> list[tuple[channel_pb2.ShardEvent, dict[str, Any]]]:
        out = []
        for e in self.events:
            payload = e.deliver.payload if e.HasField("deliver") else e.reply.payload
            if e.HasField("deliver") or e.HasField("reply"):
                frame = orjson.loads(payload)
                if frame["type"] == kind:
                    out.append((e, frame))
        return out

    def joined(self) -> int:
        return sum(1 for e in self.events if e.HasField("join_result") and e.join_result.ok)

    async def close(self) -> None:
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task


def make_hub(store: ScriptedStore, **config: Any) -> Hub:
    policy = ChannelPolicy(presence_linger=config.pop("linger", 0.0))
    return Hub(
        HubConfig(
            default_max_connections=100,
            max_message_length=100,
            policy=policy,
            retry_initial=0.01,
            retry_max=0.05,
            **config,
        ),
        store,  # type: ignore[arg-type]
        ChannelMetrics(),
    )


def join(conn_id: int, channel_id: str, user_id: str) -> channel_pb2.EdgeEvent:
    member = channel_pb2.Member(user_id=user_id, username=user_id, permissions=["read", "write"])
    return event(join=channel_pb2.Join(conn_id=conn_id, channel_id=channel_id, member=member))


def read(conn_id: int, channel_id: str, seq: int) -> channel_pb2.EdgeEvent:
    return event(read=channel_pb2.Read(conn_id=conn_id, channel_id=channel_id, seq=seq))


def sample(hub: Hub, name: str) -> float:
    value = hub.metrics.registry.get_sample_value(name)
    return value or 0.0


async def test_cursor_writes_of_every_channel_share_one_store_call() -> None:
    store = CursorScriptedStore()
    store.heads = {"a": 10, "b": 10, "c": 10}
    hub = make_hub(store)
    hub.start()
    session = hub.open_session("edge-1")
    tap = Tap(session)
    try:
        for conn_id, ch in enumerate(["a", "b", "c"], 1):
            hub.handle(session, join(conn_id, ch, "u"))
        await tap.until(lambda _: tap.joined() == 3)
        # One round: every read below is applied before the writer runs.
        for conn_id, ch in enumerate(["a", "b", "c"], 1):
            hub.handle(session, read(conn_id, ch, 3))
            hub.handle(session, read(conn_id, ch, 4 + conn_id))
        async with asyncio.timeout(5):
            await store.cursor_written.wait()
        assert store.cursor_calls == [[("u", "a", 5), ("u", "b", 6), ("u", "c", 7)]]
        assert sample(hub, "waddle_channel_reads_persisted_total") == 3
    finally:
        await tap.close()
        await hub.stop()


async def test_a_failed_cursor_write_is_retried_with_the_newest_cursor() -> None:
    store = CursorScriptedStore([StoreUnavailable("down"), StoreUnavailable("still down")])
    store.heads = {"a": 10}
    hub = make_hub(store)
    hub.start()
    session = hub.open_session("edge-1")
    tap = Tap(session)
    try:
        hub.handle(session, join(1, "a", "u"))
        await tap.until(lambda _: tap.joined() == 1)
        hub.handle(session, read(1, "a", 2))
        async with asyncio.timeout(5):
            await store.cursor_called.wait()
        hub.handle(session, read(1, "a", 6))  # moves on while the store is down
        async with asyncio.timeout(5):
            await store.cursor_written.wait()
        assert store.cursors == {("u", "a"): 6}
        assert store.cursor_calls[0] == [("u", "a", 2)]
        assert store.cursor_calls[-1] == [("u", "a", 6)], "the newest cursor, once"
        assert sample(hub, "waddle_channel_cursor_write_failures_total") == 2
        # The writer still serves after the failures.
        store.cursor_written.clear()
        hub.handle(session, read(1, "a", 8))
        async with asyncio.timeout(5):
            await store.cursor_written.wait()
        assert store.cursors == {("u", "a"): 8}
    finally:
        await tap.close()
        await hub.stop()


async def test_the_stored_cursor_wins_over_an_older_read() -> None:
    store = CursorScriptedStore()
    store.heads = {"a": 10}
    store.cursors = {("u", "a"): 9}  # written before this shard held the channel
    hub = make_hub(store)
    hub.start()
    session = hub.open_session("edge-1")
    tap = Tap(session)
    try:
        hub.handle(session, join(1, "a", "u"))
        await tap.until(lambda _: tap.joined() == 1)
        hub.handle(session, read(1, "a", 4))
        async with asyncio.timeout(5):
            await store.cursor_written.wait()
        assert hub.channels["a"].cursors == {"u": 9}
        hub.handle(session, read(1, "a", 7))  # behind the stored cursor: no move
        assert hub.reads.writer.pending == 0
    finally:
        await tap.close()
        await hub.stop()


async def test_read_reaches_other_devices_at_once_and_others_as_coalesced_receipts() -> None:
    store = CursorScriptedStore()
    store.heads = {"a": 50}
    hub = make_hub(store, receipt_interval=0.3)
    hub.start()
    e1, e2 = hub.open_session("edge-1"), hub.open_session("edge-2")
    t1, t2 = Tap(e1), Tap(e2)
    try:
        hub.handle(e1, join(1, "a", "ann"))
        await t1.until(lambda _: t1.joined() == 1)
        hub.handle(e2, join(2, "a", "ann"))  # ann's second device, on another edge
        hub.handle(e2, join(3, "a", "bob"))
        await t2.until(lambda _: t2.joined() == 2)
        for seq in range(1, 11):
            hub.handle(e1, read(1, "a", seq))
        # Every move reaches ann's other device at once, as a reply to it.
        await t2.until(lambda _: len(t2.frames("read")) >= 10 + 1)
        to_device = [(e, f) for e, f in t2.frames("read") if e.HasField("reply")]
        assert [f["seq"] for _, f in to_device] == list(range(1, 11))
        assert all(e.reply.conn_id == 2 and e.reply.type == "read" for e, _ in to_device)
        assert not any(e.reply.final for e, _ in to_device)
        assert not [e for e, _ in t1.frames("read") if e.HasField("reply")], "not the reader"
        # Others get receipts: the first at once, the rest as one, newest seq.
        await t2.until(
            lambda _: any(f["seq"] == 10 for e, f in t2.frames("read") if e.HasField("deliver"))
        )
        receipts = [(e, f) for e, f in t2.frames("read") if e.HasField("deliver")]
        assert [f["seq"] for _, f in receipts] == [1, 10]
        assert all(e.deliver.exclude_user_id == "ann" and e.deliver.ephemeral for e, _ in receipts)
        assert receipts[0][1] == {"type": "read", "channelId": "a", "userId": "ann", "seq": 1}
        assert sample(hub, "waddle_channel_read_receipts_total") == 2
    finally:
        await t1.close()
        await t2.close()
        await hub.stop()


async def test_no_receipts_above_the_presence_fanout_limit() -> None:
    store = CursorScriptedStore()
    store.heads = {"a": 5}
    hub = Hub(
        HubConfig(
            default_max_connections=100,
            max_message_length=100,
            policy=ChannelPolicy(presence_fanout_limit=2),
        ),
        store,  # type: ignore[arg-type]
        ChannelMetrics(),
    )
    hub.start()
    session = hub.open_session("edge-1")
    tap = Tap(session)
    try:
        for conn_id, user in enumerate(["ann", "bob", "cat"], 1):
            hub.handle(session, join(conn_id, "a", user))
        await tap.until(lambda _: tap.joined() == 3)
        hub.handle(session, read(1, "a", 5))
        async with asyncio.timeout(5):
            await store.cursor_written.wait()  # persisted all the same
        assert store.cursors == {("ann", "a"): 5}
        assert not tap.frames("read") and sample(hub, "waddle_channel_read_receipts_total") == 0
    finally:
        await tap.close()
        await hub.stop()


async def test_sending_moves_the_cursor_through_the_hub() -> None:
    store = CursorScriptedStore()
    hub = make_hub(store)
    hub.start()
    session = hub.open_session("edge-1")
    tap = Tap(session)
    try:
        hub.handle(session, join(1, "c", "u"))
        hub.handle(session, join(2, "c", "u"))
        hub.handle(session, join(3, "c", "bob"))
        await tap.until(lambda _: tap.joined() == 3)
        hub.handle(session, publish("hello", "k1"))
        async with asyncio.timeout(5):
            await store.cursor_written.wait()
        assert store.cursors == {("u", "c"): 1}
        await tap.until(lambda _: len(tap.frames("read")) == 2)
        (to_device, device_frame), (receipt, _) = sorted(
            tap.frames("read"), key=lambda ef: ef[0].HasField("deliver")
        )
        assert to_device.reply.conn_id == 2 and device_frame["seq"] == 1
        assert receipt.deliver.exclude_user_id == "u"
    finally:
        await tap.close()
        await hub.stop()


def settled(hub: Hub) -> bool:
    """Nothing more can be announced: no departure lingers, no edge's grace runs."""
    return not hub.departures.queue and not hub._grace


def disconnected(tap: Tap) -> list[str]:
    return [f["userId"] for _, f in tap.frames("user_disconnected")]


async def test_linger_announces_a_departure_once_and_a_quick_return_not_at_all() -> None:
    store = CursorScriptedStore()
    hub = make_hub(store, linger=0.3)
    hub.start()
    session = hub.open_session("edge-1")
    tap = Tap(session)
    try:
        hub.handle(session, join(1, "c", "watcher"))
        hub.handle(session, join(2, "c", "ann"))
        hub.handle(session, join(3, "c", "bob"))
        await tap.until(lambda _: tap.joined() == 3)
        hub.handle(session, event(leave=channel_pb2.Leave(conn_id=2, channel_id="c")))
        hub.handle(session, join(4, "c", "ann"))  # back within the linger
        hub.handle(session, event(leave=channel_pb2.Leave(conn_id=3, channel_id="c")))
        await tap.until(lambda _: disconnected(tap) == ["bob"])
        # ann left first: her departure came due before bob's, and was void.
        assert settled(hub)
        assert disconnected(tap) == ["bob"]
        # (The edge, not the hub, leaves out the joiner's own connections.)
        assert [f["userId"] for _, f in tap.frames("user_connected")] == ["watcher", "ann", "bob"]
        assert sample(hub, "waddle_channel_linger_expirations_total") == 1
    finally:
        await tap.close()
        await hub.stop()


async def test_a_departed_edge_is_announced_once_after_grace_and_linger() -> None:
    store = CursorScriptedStore()
    hub = make_hub(store, linger=0.2, rejoin_grace=0.2)
    hub.start()
    watcher_edge, dying = hub.open_session("edge-w"), hub.open_session("edge-d")
    tap, dying_tap = Tap(watcher_edge), Tap(dying)
    try:
        hub.handle(watcher_edge, join(1, "c", "watcher"))
        await tap.until(lambda _: tap.joined() == 1)
        hub.handle(dying, join(1, "c", "ann"))
        hub.handle(dying, join(2, "c", "ann"))
        await dying_tap.until(lambda _: dying_tap.joined() == 2)
        started = asyncio.get_running_loop().time()
        hub.close_session(dying)
        await tap.until(lambda _: disconnected(tap) == ["ann"])
        assert asyncio.get_running_loop().time() - started >= 0.4 - 0.02
        assert settled(hub)
        assert disconnected(tap) == ["ann"], "exactly once"
        assert sample(hub, "waddle_channel_linger_expirations_total") == 1
    finally:
        await tap.close()
        await dying_tap.close()
        await hub.stop()


class PoisonCursorStore(CursorScriptedStore):
    """Refuses, as a whole, every cursor request that names user "evil"."""

    async def set_read_cursors(
        self, cursors: Sequence[tuple[str, str, int]]
    ) -> list[store_pb2.ReadCursor]:
        if any(user_id == "evil" for user_id, _, _ in cursors):
            self.cursor_calls.append(list(cursors))
            raise grpc.aio.AioRpcError(
                grpc.StatusCode.INVALID_ARGUMENT, grpc.aio.Metadata(), grpc.aio.Metadata(), "bad"
            )
        return await super().set_read_cursors(cursors)


async def test_a_refused_cursor_is_dropped_alone() -> None:
    store = PoisonCursorStore()
    users = ["u0", "u1", "evil", "u3", "u4"]
    store.heads = {"a": 10}
    hub = make_hub(store)
    hub.start()
    session = hub.open_session("edge-1")
    tap = Tap(session)
    try:
        for conn_id, user in enumerate(users, 1):
            hub.handle(session, join(conn_id, "a", user))
        await tap.until(lambda _: tap.joined() == len(users))
        for conn_id in range(1, len(users) + 1):
            hub.handle(session, read(conn_id, "a", conn_id))
        async with asyncio.timeout(5):
            while len(store.cursors) < len(users) - 1:
                store.cursor_written.clear()
                await store.cursor_written.wait()
        assert store.cursors == {("u0", "a"): 1, ("u1", "a"): 2, ("u3", "a"): 4, ("u4", "a"): 5}
        assert len(store.cursor_calls) <= 1 + 2 * 3, "split by halves"
        assert hub.reads.writer.pending == 0, "the refused cursor is not retried"
    finally:
        await tap.close()
        await hub.stop()
