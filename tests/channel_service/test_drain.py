"""The shard's side of moving channels, with a scripted store: the SIGTERM
drain (publishes taken are settled and acked before every edge is told,
nothing more is taken, the shard waits for the edges to go); a connection
moved elsewhere leaves without a word; and a re-registered connection that
has seen more than its new owner makes the owner catch up at once."""

from __future__ import annotations

import asyncio

import orjson

from channel_service.drain import drain
from channel_service.hub import Hub
from tests.channel_service.test_hub import ScriptedStore, Tap, event, join, make_hub
from waddle_pb import channel_pb2, store_pb2


def publish(conn_id: int, key: str) -> channel_pb2.EdgeEvent:
    return event(
        publish=channel_pb2.Publish(
            conn_id=conn_id, channel_id="c", content=key, client_msg_id=key, client_supplied_id=True
        )
    )


def kinds(tap: Tap) -> list[str]:
    out = []
    for e in tap.events:
        kind = e.WhichOneof("kind")
        if kind == "reply":
            kind = orjson.loads(e.reply.payload)["type"] + ":" + e.reply.client_msg_id
        out.append(str(kind))
    return out


async def test_drain_settles_what_it_took_then_tells_every_edge_and_takes_nothing_more() -> None:
    hub = make_hub(ScriptedStore([]))
    hub.start()
    one, two = hub.open_session("edge-1"), hub.open_session("edge-2")
    taps = [Tap(one), Tap(two)]
    try:
        hub.handle(one, join(1, "c", "ann"))
        await taps[0].until(lambda _: taps[0].joined() == 1)
        hub.handle(one, publish(1, "taken"))  # queued, not yet committed
        draining = asyncio.create_task(drain(hub, budget=10))
        await asyncio.sleep(0)
        hub.handle(one, publish(1, "late"))  # after the drain began: left for the next owner
        hub.handle(two, join(2, "c", "bob"))
        stray = publish(2, "stray")  # a channel this shard holds nothing of
        stray.publish.channel_id = "elsewhere"
        hub.handle(two, stray)
        for tap in taps:
            await tap.until(lambda events: any(e.HasField("draining") for e in events))
        seen = kinds(taps[0])
        assert seen.index("ack:taken") < seen.index("draining"), "acks go out before the news"
        assert not any("late" in k for k in seen), "nothing more is taken, nor answered"
        assert not any(e.HasField("join_result") or e.HasField("reply") for e in taps[1].events)
        assert not draining.done(), "the shard waits for the edges to re-route"
        hub.close_session(one)
        hub.close_session(two)
        report = await asyncio.wait_for(draining, 5)
        assert report.edges_left == 0
        assert hub.channels["c"].last_seq == 1
        # An edge that attaches now is told at once (the servicer's Welcome).
        assert hub.draining
    finally:
        for tap in taps:
            await tap.close()
        await hub.stop()


async def test_a_drain_that_no_edge_answers_ends_with_its_budget() -> None:
    hub = make_hub(ScriptedStore([]))
    hub.start()
    session = hub.open_session("edge-1")
    tap = Tap(session)
    try:
        report = await asyncio.wait_for(drain(hub, budget=0.2), 5)
        assert report.edges_left == 1
        assert any(e.HasField("draining") for e in tap.events)
    finally:
        await tap.close()
        await hub.stop()


def frames(tap: Tap, kind: str) -> list[dict[str, object]]:
    return [f for _, f in tap.frames(kind)]


async def test_a_moved_connection_leaves_without_a_word() -> None:
    hub = make_hub(ScriptedStore([]))  # no presence linger: a leave is announced at once
    hub.start()
    mover, stayer = hub.open_session("edge-1"), hub.open_session("edge-2")
    tap = Tap(stayer)
    try:
        hub.handle(stayer, join(1, "c", "watcher"))
        hub.handle(mover, join(2, "c", "ann"))
        hub.handle(mover, join(3, "c", "bob"))
        await tap.until(lambda _: len(frames(tap, "user_connected")) == 3)
        moved = channel_pb2.Leave(conn_id=2, channel_id="c", moved=True)
        hub.handle(mover, event(leave=moved))
        hub.handle(mover, event(leave=channel_pb2.Leave(conn_id=3, channel_id="c")))
        await tap.until(lambda _: len(frames(tap, "user_disconnected")) == 1)
        assert [f["userId"] for f in frames(tap, "user_disconnected")] == ["bob"]
        assert set(hub.channels["c"].users) == {"watcher"}, "ann is not kept as a ghost either"
    finally:
        await tap.close()
        await hub.stop()


class HistoryStore(ScriptedStore):
    """Also replays stored messages (what another owner committed)."""

    async def messages_after(
        self, channel_id: str, *, after_seq: int | None = None, limit: int = 500
    ) -> store_pb2.MessagePage:
        head = self.heads.get(channel_id, 0)
        first = (after_seq or 0) + 1
        return store_pb2.MessagePage(
            messages=[
                store_pb2.StoredMessage(
                    id=f"m{seq}", channel_id=channel_id, seq=seq, user_id="x", content="elsewhere"
                )
                for seq in range(first, head + 1)
            ]
        )


async def catch_up_frames(hub: Hub, seen_seq: int) -> list[int]:
    session = hub.open_session("edge-1")
    tap = Tap(session)
    try:
        hub.handle(session, join(1, "c", "ann"))
        await tap.until(lambda _: tap.joined() == 1)
        assert hub.channels["c"].last_seq == 0
        hub.store.heads["c"] = 3  # type: ignore[attr-defined]  # another owner committed 1..3
        rejoin = join(2, "c", "bob")
        rejoin.join.rejoin = True
        rejoin.join.seen_seq = seen_seq
        hub.handle(session, rejoin)
        if not seen_seq:
            assert not hub._head_checks, "no store read was started"
            return []
        await tap.until(lambda _: len(frames(tap, "message")) == 3)
        return [e.deliver.seq for e, _ in tap.frames("message")]
    finally:
        await tap.close()


async def test_a_connection_ahead_of_its_new_owner_makes_it_catch_up() -> None:
    hub = make_hub(HistoryStore([]))
    hub.start()
    try:
        assert await catch_up_frames(hub, seen_seq=3) == [1, 2, 3]
        assert hub.channels["c"].last_seq == 3
    finally:
        await hub.stop()
    quiet = make_hub(HistoryStore([]))
    quiet.start()
    try:
        # A plain re-registration (nothing seen beyond the owner) costs no store read.
        assert await catch_up_frames(quiet, seen_seq=0) == []
    finally:
        await quiet.stop()


async def test_a_moved_connection_of_a_sleeping_channel_leaves_its_record_without_a_wake() -> None:
    store = ScriptedStore([])
    hub = make_hub(store, idle_seconds=3600)
    hub.start()
    mover, stayer = hub.open_session("edge-1"), hub.open_session("edge-2")
    taps = [Tap(mover), Tap(stayer)]
    try:
        hub.handle(stayer, join(1, "c", "watcher"))
        hub.handle(mover, join(2, "c", "ann"))
        hub.handle(mover, join(3, "c", "ann"))
        await taps[0].until(lambda _: taps[0].joined() == 2)
        hub.life.hibernate(hub.channels["c"])
        assert "c" in hub.life.sleeping
        for conn_id in (2, 3):
            hub.handle(
                mover, event(leave=channel_pb2.Leave(conn_id=conn_id, channel_id="c", moved=True))
            )
        assert "c" not in hub.life.waking and "c" not in hub.channels, "still asleep"
        record = hub.life.sleeping.get("c")
        assert record is not None and [s.edge_id for s in record] == ["edge-2"]
        hub.handle(stayer, event(leave=channel_pb2.Leave(conn_id=1, channel_id="c", moved=True)))
        assert "c" not in hub.life.sleeping, "nobody left: forgotten"
    finally:
        for tap in taps:
            await tap.close()
        await hub.stop()
