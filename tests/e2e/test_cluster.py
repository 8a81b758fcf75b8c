"""The cluster under load: shard failover, move back, drain and scale-up.

Two edges, three channel shards found through DNS (SRV records served on
127.0.0.1 by ``tests.support.dns``), the store on PostgreSQL. Users hold
one v1.1 socket each (two per edge), subscribed to every channel; a
publisher sends steadily, round robin over channels and sockets, and sends
a publish again, with the same ``clientMsgId``, when it is refused as
retryable. In turn:

1. SIGKILL one shard and leave it dead: its channels must accept publishes
   again (measured from the kill to the last of them acking a publish sent
   after it);
2. start it again: its channels move back to it;
3. SIGTERM another shard (drain), then start it again;
4. add a fourth shard to the SRV records: about a quarter of the channels
   move to it.

After each step, with publishing paused: every acknowledged message is
stored exactly once, every member got every seq of every channel exactly
once and in order, no socket was closed, and the counts and timings are
printed.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

from tests.e2e.conftest import GENEROUS_LIMITS
from tests.e2e.test_faults import store_messages
from tests.support.dns import SrvServer
from tests.support.postgres import postgres_schema
from tests.support.stack import Stack, start_stack
from waddle_common.routing import owner_of
from waddle_common.supervise import Service

pytestmark = [pytest.mark.e2e, pytest.mark.postgres, pytest.mark.timeout(240)]

CHANNELS = [f"cluster-{i}" for i in range(32)]
SRV_NAME = "_grpc._tcp.shards.waddle.test"
SHARD_ENV = {
    **GENEROUS_LIMITS,
    # Departures announced at once: any leave a member sees is a storm.
    "WADDLE_PRESENCE_LINGER_SECONDS": "0",
    "WADDLE_SHUTDOWN_GRACE_SECONDS": "10",
}
EDGE_ENV = {
    "WADDLE_CHANNEL_SHARDS_DNS_SECONDS": "1",
    "WADDLE_SHARD_DOWN_SECONDS": "3",
    "WADDLE_SHARD_UP_SECONDS": "4",
}
PUBLISH_EVERY = 0.02  # 50 publishes/s over the whole cluster


@dataclass(eq=False)
class Member:
    """One v1.1 socket, subscribed to every channel."""

    name: str
    edge: int
    ws: aiohttp.ClientWebSocketResponse
    seqs: dict[str, list[int]] = field(default_factory=lambda: defaultdict(list))
    presence_leaves: int = 0
    closed: int | None = None
    reader: asyncio.Task[None] | None = None


@dataclass(eq=False)
class Load:
    members: list[Member]
    sent_at: dict[str, float] = field(default_factory=dict)  # clientMsgId -> first send
    channel_of: dict[str, str] = field(default_factory=dict)
    sender_of: dict[str, Member] = field(default_factory=dict)
    acks: dict[str, list[tuple[int, float]]] = field(default_factory=lambda: defaultdict(list))
    retries: int = 0
    errors: list[dict[str, Any]] = field(default_factory=list)
    publishing: asyncio.Event = field(default_factory=asyncio.Event)
    ids: itertools.count[int] = field(default_factory=itertools.count)

    def unacked(self) -> list[str]:
        return [k for k in self.sent_at if k not in self.acks]


async def _read(load: Load, m: Member) -> None:
    async for msg in m.ws:
        if msg.type is not aiohttp.WSMsgType.TEXT:
            break
        frame = orjson.loads(msg.data)
        kind = frame.get("type")
        if kind == "message":
            m.seqs[frame["channelId"]].append(frame["message"]["seq"])
        elif kind == "ack":
            load.acks[frame["clientMsgId"]].append((frame["seq"], time.monotonic()))
        elif kind == "error" and frame.get("clientMsgId"):
            if frame.get("code") in ("unavailable", "rate_limited"):
                # Retryable: send it again, with the same idempotency key.
                load.retries += 1
                cmid = frame["clientMsgId"]
                await m.ws.send_str(_publish(load.channel_of[cmid], cmid))
            else:
                load.errors.append(frame)
        elif kind == "error":
            load.errors.append(frame)
        elif kind == "presence_diff" and frame.get("leaves"):
            m.presence_leaves += len(frame["leaves"])
    m.closed = m.ws.close_code or -1


def _publish(channel_id: str, cmid: str) -> str:
    return orjson.dumps(
        {"type": "message", "channelId": channel_id, "content": cmid, "clientMsgId": cmid}
    ).decode()


async def _publisher(load: Load) -> None:
    senders = itertools.cycle(load.members)
    channels = itertools.cycle(CHANNELS)
    while True:
        await load.publishing.wait()
        sender, channel_id = next(senders), next(channels)
        cmid = f"m{next(load.ids)}"
        load.sent_at[cmid] = time.monotonic()
        load.channel_of[cmid] = channel_id
        load.sender_of[cmid] = sender
        await sender.ws.send_str(_publish(channel_id, cmid))
        await asyncio.sleep(PUBLISH_EVERY)


async def _connect(stack: Stack, http: aiohttp.ClientSession, name: str, edge: int) -> Member:
    ws = await http.ws_connect(
        stack.http_url("/websocket", edge=edge).replace("http", "ws", 1),
        headers={"Authorization": f"Bearer {stack.token(name)}"},
        timeout=aiohttp.ClientWSTimeout(ws_close=5),
    )
    member = Member(name, edge, ws)
    for channel_id in CHANNELS:
        await ws.send_str(orjson.dumps({"type": "subscribe", "channelId": channel_id}).decode())
    joined: set[str] = set()
    async with asyncio.timeout(30):
        while len(joined) < len(CHANNELS):
            frame = orjson.loads((await ws.receive()).data)
            if frame["type"] == "initial_state":
                joined.add(frame["channelId"])
            elif frame["type"] == "error":
                raise AssertionError(f"{name}: {frame}")
    return member


async def _settle(load: Load, stack: Stack, step: str) -> dict[str, int]:
    """Pause publishing, wait until everything sent is acked and delivered,
    and check the invariants; return the store's head of each channel."""
    load.publishing.clear()
    async with asyncio.timeout(40):
        while load.unacked():  # noqa: ASYNC110 - acks arrive on the reader tasks
            await asyncio.sleep(0.05)
    heads: dict[str, int] = {}
    acked_seq = {cmid: acks[0][0] for cmid, acks in load.acks.items()}
    for channel_id in CHANNELS:
        stored = await store_messages(stack, channel_id)
        seqs = [m.seq for m in stored]
        assert seqs == list(range(1, len(seqs) + 1)), f"{step}: {channel_id} seqs {seqs}"
        ids = [m.client_msg_id for m in stored]
        assert len(ids) == len(set(ids)), f"{step}: {channel_id} stores a message twice"
        by_id = {m.client_msg_id: m.seq for m in stored}
        for cmid, seq in acked_seq.items():
            if load.channel_of[cmid] == channel_id:
                assert by_id.get(cmid) == seq, (
                    f"{step}: {cmid} acked as {seq}, stored as {by_id.get(cmid)}"
                )
        heads[channel_id] = len(seqs)
    for cmid, acks in load.acks.items():
        assert len({seq for seq, _ in acks}) == 1, f"{step}: {cmid} acked with two seqs {acks}"
    async with asyncio.timeout(30):
        for m in load.members:
            for channel_id, head in heads.items():
                while len(m.seqs[channel_id]) < head and m.closed is None:  # noqa: ASYNC110
                    await asyncio.sleep(0.05)
    for m in load.members:
        assert m.closed is None, f"{step}: {m.name}'s socket was closed ({m.closed})"
        for channel_id, head in heads.items():
            assert m.seqs[channel_id] == list(range(1, head + 1)), (
                f"{step}: {m.name} got {channel_id} seqs {m.seqs[channel_id]}, store head {head}"
            )
    assert not load.errors, f"{step}: errors {load.errors[:5]}"
    leaves = sum(m.presence_leaves for m in load.members)
    assert not leaves, f"{step}: members saw {leaves} departures, yet nobody left"
    return heads


async def _edge_metric(http: aiohttp.ClientSession, stack: Stack, edge: int, name: str) -> float:
    """The sum of the samples of ``name`` (with its labels, when it names them)."""
    async with http.get(stack.http_url("/metrics", edge=edge)) as resp:
        text = await resp.text()
    prefixes = (name + " ",) if "{" in name else (name + " ", name + "{")
    return sum(
        float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(prefixes)
    )


async def _wait_ring(http: aiohttp.ClientSession, stack: Stack, size: int) -> None:
    async with asyncio.timeout(30):
        while True:
            sizes = [await _edge_metric(http, stack, e, "waddle_edge_ring_shards") for e in (0, 1)]
            if sizes == [size, size]:
                return
            await asyncio.sleep(0.1)


def _slowest_ack(load: Load, channels: list[str], start: float, end: float) -> float:
    """The longest a publish sent to ``channels`` within [start, end] waited for its ack."""
    waits = [
        acks[0][1] - load.sent_at[cmid]
        for cmid, acks in load.acks.items()
        if load.channel_of[cmid] in channels and start <= load.sent_at[cmid] <= end
    ]
    assert waits, "no publish to those channels in that window"
    return max(waits)


async def _start_shard(stack: Stack, i: int, port: int = 0) -> Service:
    return await stack.start_shard(i, port=port, log_name=f"channel{i}-{time.monotonic_ns()}.log")


async def test_failover_drain_and_scale_up_under_load(tmp_path: Path) -> None:
    timings: dict[str, float] = {}
    async with (
        postgres_schema() as url,
        start_stack(tmp_path, database_url=url, shards=3, edges=0, env=SHARD_ENV) as stack,
    ):
        with SrvServer(SRV_NAME) as dns:
            dns.set(stack.shard_addresses)
            for i in range(2):
                stack.edges.append(
                    await stack.start_edge(
                        i,
                        {
                            **EDGE_ENV,
                            # Only until the first DNS answer.
                            "WADDLE_CHANNEL_SHARDS": stack.shard_addresses[0],
                            "WADDLE_CHANNEL_SHARDS_DNS": SRV_NAME,
                            "WADDLE_DNS_SERVER": dns.address,
                        },
                    )
                )
            async with aiohttp.ClientSession() as http:
                await _wait_ring(http, stack, 3)
                members = [await _connect(stack, http, f"user{n}", edge=n % 2) for n in range(4)]
                load = Load(members)
                for m in members:
                    m.reader = asyncio.create_task(_read(load, m))
                publisher = asyncio.create_task(_publisher(load))
                try:
                    await _run_steps(stack, http, dns, load, timings)
                finally:
                    publisher.cancel()
                    for m in members:
                        await m.ws.close()
                        if m.reader is not None:
                            m.reader.cancel()
                print(
                    "\ncluster:",
                    f"{len(CHANNELS)} channels, {len(members)} members on 2 edges,",
                    f"{len(load.acks)} messages acked, {load.retries} re-sent after 'unavailable',",
                    f"{sum(len(a) - 1 for a in load.acks.values())} duplicate acks,",
                    f"{sum(m.presence_leaves for m in members)} presence leaves seen;",
                    ", ".join(f"{k} {v:.2f} s" for k, v in timings.items()),
                )


async def _run_steps(
    stack: Stack,
    http: aiohttp.ClientSession,
    dns: SrvServer,
    load: Load,
    timings: dict[str, float],
) -> None:
    load.publishing.set()
    await asyncio.sleep(1.0)  # steady state before the first fault
    await _settle(load, stack, "warm-up")

    # (1) SIGKILL shard 0 and leave it dead.
    ring = list(stack.shard_addresses)
    victim = stack.shard_addresses[0]
    owned = [c for c in CHANNELS if owner_of(c, ring) == victim]
    assert owned, "the victim owns no channel: pick more channels"
    load.publishing.set()
    await asyncio.sleep(0.5)
    killed_at = time.monotonic()
    await stack.channels[0].kill()
    first_ack: dict[str, float] = {}
    async with asyncio.timeout(30):
        while len(first_ack) < len(owned):
            for cmid, acks in list(load.acks.items()):
                channel_id = load.channel_of[cmid]
                if (
                    channel_id in owned
                    and channel_id not in first_ack
                    and load.sent_at[cmid] > killed_at
                ):
                    first_ack[channel_id] = acks[0][1]
            await asyncio.sleep(0.02)
    timings["failover (kill -> every channel of it acks)"] = max(first_ack.values()) - killed_at
    timings["failover (kill -> first channel of it acks)"] = min(first_ack.values()) - killed_at
    await _wait_ring(http, stack, 2)
    await _settle(load, stack, "after SIGKILL")

    # (2) Start it again: its channels move back once it has been up a while.
    load.publishing.set()
    back_at = time.monotonic()
    port = int(victim.rsplit(":", 1)[1])
    stack.channels[0] = await _start_shard(stack, 0, port)
    await _wait_ring(http, stack, 3)
    timings["move back (restart -> ring of 3)"] = time.monotonic() - back_at
    await asyncio.sleep(1.0)
    await _settle(load, stack, "after the restart")
    assert await _channel_members(http, stack.channels[0]) > 0, "no channel moved back"

    # (3) SIGTERM shard 1: drain. Then start it again (a rolling restart).
    load.publishing.set()
    await asyncio.sleep(0.5)
    drained = stack.shard_addresses[1]
    drained_channels = [c for c in CHANNELS if owner_of(c, stack.shard_addresses) == drained]
    drain_start = time.monotonic()
    code = await stack.channels[1].stop()
    drain_end = time.monotonic()
    timings["drain (SIGTERM -> exit)"] = drain_end - drain_start
    assert code == 0, f"the drained shard exited with {code}"
    await asyncio.sleep(1.0)
    await _settle(load, stack, "after the drain")
    pause = _slowest_ack(load, drained_channels, drain_start - 0.5, drain_end + 1.0)
    timings["drain: slowest ack on its channels"] = pause
    # The goal (<= 1 s) is shown, not asserted: this box may be busy. What is
    # asserted is that the drain path moved the channels, not the failover
    # path (which would have made them wait WADDLE_SHARD_DOWN_SECONDS).
    for edge in (0, 1):
        drain_moved = await _edge_metric(
            http, stack, edge, 'waddle_edge_channels_moved_total{reason="drain"}'
        )
        assert drain_moved == len(drained_channels), f"edge {edge} moved {drain_moved} on the drain"
    assert pause < float(EDGE_ENV["WADDLE_SHARD_DOWN_SECONDS"]), (
        f"a drained channel's publish waited {pause:.2f} s"
    )
    load.publishing.set()
    stack.channels[1] = await _start_shard(stack, 1, int(drained.rsplit(":", 1)[1]))
    await _wait_ring(http, stack, 3)
    await asyncio.sleep(0.5)

    # (4) A fourth shard, through DNS.
    before = list(stack.shard_addresses)
    stack.channels.append(await _start_shard(stack, 3))
    after = stack.shard_addresses
    moved = [c for c in CHANNELS if owner_of(c, before) != owner_of(c, after)]
    up_moves = 'waddle_edge_channels_moved_total{reason="up"}'
    moves_before = [await _edge_metric(http, stack, e, up_moves) for e in (0, 1)]
    added_at = time.monotonic()
    dns.set(after)
    await _wait_ring(http, stack, 4)
    for e in (0, 1):
        # A new shard joins the ring once it serves: "up", not "membership".
        delta = await _edge_metric(http, stack, e, up_moves) - moves_before[e]
        assert delta == len(moved), f"edge {e} moved {delta} channels, expected {len(moved)}"
    timings["scale-up (SRV change -> ring of 4)"] = time.monotonic() - added_at
    await asyncio.sleep(1.0)
    await _settle(load, stack, "after the scale-up")
    print(f"\nscale-up: {len(moved)} of {len(CHANNELS)} channels moved to the new shard")
    assert 0 < len(moved) < len(CHANNELS) / 2
    assert await _channel_members(http, stack.channels[3]) > 0, "nothing moved to the new shard"


async def _channel_members(http: aiohttp.ClientSession, shard: Service) -> float:
    async with http.get(f"http://127.0.0.1:{shard.port('metrics_port')}/metrics") as resp:
        text = await resp.text()
    for line in text.splitlines():
        if line.startswith("waddle_channel_members "):
            return float(line.split()[1])
    raise AssertionError("no waddle_channel_members metric")
