"""Hostile clients against the real services: frames that must not start
unbounded work, sockets that never read, replay floods, a poisoned group
commit, one user in many channels and a burst that ends in a 1008.

Each test counts what would go wrong: error frames, store calls, edge
memory, other users' acknowledgements."""

from __future__ import annotations

import asyncio
import contextlib
import os
import uuid
from collections.abc import AsyncIterator

import aiohttp
import pytest
import pytest_asyncio
from prometheus_client.parser import text_string_to_metric_families

from tests.e2e.test_limits import _raw_upgrade
from tests.support.client import WsClient
from tests.support.stack import Stack, start_stack

pytestmark = [pytest.mark.e2e, pytest.mark.asyncio(loop_scope="module")]

GENEROUS = {
    "WADDLE_MESSAGE_RATE": "5000",
    "WADDLE_MESSAGE_BURST": "5000",
    "WADDLE_FRAME_RATE": "5000",
    "WADDLE_FRAME_BURST": "5000",
    "WADDLE_SEND_STALL_SECONDS": "3",
}
# Small replay budgets, default frame budgets.
BUDGETS = {
    "WADDLE_MESSAGE_RATE": "5000",
    "WADDLE_MESSAGE_BURST": "5000",
    "WADDLE_REPLAY_RATE": "5",
    "WADDLE_REPLAY_BURST": "100",
    "WADDLE_EDGE_REPLAY_RATE": "5",
    "WADDLE_EDGE_REPLAY_BURST": "150",
    "WADDLE_USER_MAX_EDGE_CONNECTIONS": "5",
}


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def stack(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Stack]:
    async with start_stack(tmp_path_factory.mktemp("hostile"), env=GENEROUS) as s:
        yield s


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def tight(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Stack]:
    async with start_stack(tmp_path_factory.mktemp("hostile-tight"), env=BUDGETS) as s:
        yield s


@pytest_asyncio.fixture(loop_scope="module")
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


def cid() -> str:
    return f"hos-{uuid.uuid4().hex[:8]}"


async def connect(
    http: aiohttp.ClientSession, stack: Stack, channel_id: str, user: str
) -> WsClient:
    client = await WsClient.connect(http, stack.ws_url(channel_id), token=stack.token(user))
    assert (await client.recv())["type"] == "initial_state"
    return client


async def metric(http: aiohttp.ClientSession, url: str, name: str, **labels: str) -> float:
    """The sum of the samples called ``name`` whose labels include ``labels``."""
    async with http.get(url) as resp:
        text = await resp.text()
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == name and labels.items() <= sample.labels.items()
    )


def store_calls(http: aiohttp.ClientSession, stack: Stack, method: str) -> asyncio.Future[float]:
    return asyncio.ensure_future(
        metric(
            http,
            stack.metrics_urls()["store"],
            "waddle_grpc_server_seconds_count",
            method=f"/waddle.store.v1.StoreService/{method}",
        )
    )


async def post(client: WsClient, n: int, content: str = "m") -> list[int]:
    """Send ``n`` messages and wait for their acks; return their seqs."""
    keys = [f"k{uuid.uuid4().hex[:10]}" for _ in range(n)]
    for key in keys:
        await client.send({"type": "message", "content": content, "clientMsgId": key})
    acked: dict[str, int] = {}
    async with asyncio.timeout(60):
        while len(acked) < n:
            frame = await client.recv()
            if frame["type"] == "ack":
                acked[frame["clientMsgId"]] = frame["seq"]
            assert frame["type"] != "error", frame
    return [acked[k] for k in keys]


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


# -- sync ------------------------------------------------------------------------


async def test_sync_with_an_unknown_message_id_is_answered_once(
    stack: Stack, http: aiohttp.ClientSession
) -> None:
    channel_id = cid()
    poster = await connect(http, stack, channel_id, "poster")
    await post(poster, 3)
    client = await connect(http, stack, channel_id, "prober")
    method = "MessagesAfter"
    before = await store_calls(http, stack, method)
    await client.send({"type": "sync", "afterMessageId": "does-not-exist"})
    error = await client.recv_type("error")
    assert error["code"] == "unknown_message_id"
    # The connection stays live: a message posted now arrives at once...
    [seq] = await post(poster, 1, "after the bad sync")
    assert (await client.recv_message())["seq"] == seq
    await client.send({"type": "ping"})
    await client.recv_type("pong")
    # ...and nothing else was sent or asked of the store meanwhile.
    errors = [f for f in client.received if f["type"] == "error"]
    assert len(errors) == 1, f"{len(errors)} error frames for one sync"
    calls = await store_calls(http, stack, method) - before
    assert calls <= 3, f"{calls} replay queries for one sync"
    await client.close()
    await poster.close()


async def test_replay_streams_within_the_send_buffer_and_drops_stalled_sockets(
    stack: Stack, http: aiohttp.ClientSession
) -> None:
    """Sockets that ask for a long replay and never read cost the edge a
    bounded amount of memory, and are closed with 1013 after the stall bound."""
    channel_id = cid()
    poster = await connect(http, stack, channel_id, "big-poster")
    # Each escapes to about 24 KB of JSON: 300 of them are 7 MB per replay.
    await post(poster, 300, "\u0001" * 3990)
    # Small last ones keep initial_state (the recent window) small.
    await post(poster, 50, "small")
    edge = stack.edges[0]
    url = stack.http_url("/metrics")
    closes_before = await metric(http, url, "waddle_edge_slow_consumer_closes_total")
    baseline = rss_bytes(edge.pid)
    stalled = 10
    socks = []
    for i in range(stalled):
        reader, writer = await _raw_upgrade(
            stack.edge_port(), f"/channel/{channel_id}/websocket", stack.token(f"stall{i}")
        )
        writer.write(_masked_text(b'{"type":"sync","afterSeq":0}'))
        await writer.drain()
        socks.append((reader, writer))
    peak = rss_bytes(edge.pid)
    async with asyncio.timeout(30):
        while (
            await metric(http, url, "waddle_edge_slow_consumer_closes_total") - closes_before
            < stalled
        ):
            peak = max(peak, rss_bytes(edge.pid))
            await asyncio.sleep(0.1)
    grown = peak - baseline
    assert grown < stalled * 2 * 2**20, f"edge grew {grown / 2**20:.1f} MiB for {stalled} sockets"
    # Closed for real: each stalled socket reaches its end, not only the metric.
    async with asyncio.timeout(30):
        for reader, writer in socks:
            with contextlib.suppress(ConnectionResetError):
                while await reader.read(1 << 20):
                    pass
            writer.close()
    # The channel still serves its honest members.
    [seq] = await post(poster, 1, "still here")
    assert seq == 351
    await poster.close()


def _masked_text(payload: bytes) -> bytes:
    """One client text frame (FIN, masked), for a raw socket."""
    mask = os.urandom(4)
    body = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    assert len(payload) < 126
    return bytes([0x81, 0x80 | len(payload)]) + mask + body


async def test_replay_budget_per_user_and_per_edge(
    tight: Stack, http: aiohttp.ClientSession
) -> None:
    channel_id = cid()
    poster = await connect(http, tight, channel_id, "budget-poster")
    for _ in range(3):  # 60 messages, within the message burst
        await post(poster, 20)

    clients: list[WsClient] = []

    async def reconnect_and_sync(user: str) -> dict[str, object]:
        """What a replay flood does: a new socket, then everything from seq 0."""
        client = await connect(http, tight, channel_id, user)
        clients.append(client)
        await client.send({"type": "sync", "afterSeq": 0})
        async with asyncio.timeout(20):
            while True:
                frame = await client.recv()
                if frame["type"] in ("sync_complete", "error"):
                    return frame

    # User budget 100: the first two replays of 60 go through (the second
    # one into debt), the third is refused until the debt is paid back.
    assert (await reconnect_and_sync("alice"))["count"] == 60
    assert (await reconnect_and_sync("alice"))["count"] == 60
    refused = await reconnect_and_sync("alice")
    assert refused["code"] == "rate_limited", refused
    assert 1000 <= int(refused["retryAfterMs"]) <= 30_000  # type: ignore[call-overload]
    # Bob has his own budget, and takes the edge's (150) into debt...
    assert (await reconnect_and_sync("bob"))["count"] == 60
    # ...so carol, with a full budget of her own, is refused by the edge's.
    assert (await reconnect_and_sync("carol"))["code"] == "rate_limited"
    # Refused syncs leave the connections live.
    [seq] = await post(poster, 1)
    for client in clients:
        assert (await client.recv_message())["seq"] == seq
        await client.close()
    await poster.close()


# -- the group commit ------------------------------------------------------------


async def test_bad_identity_cannot_poison_other_users_messages(
    stack: Stack, http: aiohttp.ClientSession
) -> None:
    """Tokens carrying NUL are refused at the door; an honest user posting
    meanwhile, in another channel on the same shard, gets every ack."""
    honest = await connect(http, stack, cid(), "honest")
    bad_channel = cid()

    async def attacker(i: int) -> int:
        claims = [
            {"username": f"evil\x00{i}"},
            {"avatar_url": "https://x/\x00"},
        ][i % 2]
        try:
            ws = await http.ws_connect(
                stack.ws_url(bad_channel),
                headers={
                    "Authorization": f"Bearer {stack.token(f'evil{i}', **claims)}"  # type: ignore[arg-type]
                },
            )
        except aiohttp.WSServerHandshakeError as exc:
            return exc.status
        await ws.close()
        return 101

    statuses, seqs = await asyncio.gather(
        asyncio.gather(*(attacker(i) for i in range(30))), post(honest, 20)
    )
    assert set(statuses) == {401}, statuses
    assert seqs == list(range(1, 21))
    await honest.close()


# -- caps and closes -------------------------------------------------------------


async def test_one_user_has_a_cap_across_channels(
    tight: Stack, http: aiohttp.ClientSession
) -> None:
    token = tight.token("collector")
    open_ = [await WsClient.connect(http, tight.ws_url(cid()), token=token) for _ in range(5)]
    with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
        await WsClient.connect(http, tight.ws_url(cid()), token=token)
    assert refused.value.status == 429
    # Another user is not affected.
    other = await connect(http, tight, cid(), "not-collector")
    await other.close()
    # A closed socket frees its place (once the edge has seen it go).
    await open_.pop().close()
    async with asyncio.timeout(10):
        while True:
            try:
                open_.append(await WsClient.connect(http, tight.ws_url(cid()), token=token))
                break
            except aiohttp.WSServerHandshakeError as exc:
                assert exc.status == 429
                await asyncio.sleep(0.05)
    for client in open_:
        await client.close()


async def test_errors_go_out_before_a_policy_close(
    tight: Stack, http: aiohttp.ClientSession
) -> None:
    """150 pings in one write: the frame budget (burst 100) answers the rest
    with errors until the abuse budget (20) is spent; the client sees them
    all before the 1008 close."""
    reader, writer = await _raw_upgrade(
        tight.edge_port(), f"/channel/{cid()}/websocket", tight.token("pinger")
    )
    writer.write(b"".join(_masked_text(b'{"type":"ping"}') for _ in range(150)))
    await writer.drain()
    frames = await _read_server_frames(reader)
    writer.close()
    texts = [payload for opcode, payload in frames if opcode == 0x1]
    close = [payload for opcode, payload in frames if opcode == 0x8]
    assert close and int.from_bytes(close[0][:2], "big") == 1008
    errors = [t for t in texts if b'"type":"error"' in t]
    pongs = [t for t in texts if b'"type":"pong"' in t]
    # A few tokens may refill while the burst is read.
    assert 100 <= len(pongs) <= 110 and len(errors) >= 20, (len(pongs), len(errors))
    assert frames[-1][0] == 0x8, "the close comes last"


async def _read_server_frames(reader: asyncio.StreamReader) -> list[tuple[int, bytes]]:
    """Unmasked server frames until a close frame (or the end of the stream)."""
    frames: list[tuple[int, bytes]] = []
    async with asyncio.timeout(15):
        while True:
            try:
                head = await reader.readexactly(2)
            except asyncio.IncompleteReadError:
                return frames
            opcode, length = head[0] & 0x0F, head[1] & 0x7F
            if length == 126:
                length = int.from_bytes(await reader.readexactly(2), "big")
            elif length == 127:
                length = int.from_bytes(await reader.readexactly(8), "big")
            frames.append((opcode, await reader.readexactly(length)))
            if opcode == 0x8:
                return frames


async def test_sockets_stay_usable_after_refused_syncs(
    stack: Stack, http: aiohttp.ClientSession
) -> None:
    """Many bad syncs in a row: each answered once, none piles up work."""
    channel_id = cid()
    client = await connect(http, stack, channel_id, "repeat-prober")
    await post(client, 1)  # the store knows the channel, not the ids below
    for i in range(20):
        await client.send({"type": "sync", "afterMessageId": f"missing-{i}"})
    codes: list[str] = []
    async with asyncio.timeout(20):
        while len(codes) < 20:
            frame = await client.recv_type("error")
            codes.append(frame["code"])
    # One queued sync at a time: the rest are refused as in progress.
    assert set(codes) <= {"unknown_message_id", "sync_in_progress"}
    # Still live: a message from another member arrives, and no error more.
    other = await connect(http, stack, channel_id, "repeat-poster")
    [seq] = await post(other, 1)
    assert (await client.recv_message())["seq"] == seq
    assert len([f for f in client.received if f["type"] == "error"]) == 20
    await other.close()
    await client.close()
