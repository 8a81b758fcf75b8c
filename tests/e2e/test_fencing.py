"""Split brain: two channel shards both believe they own one channel (edges
with different shard lists, as during a botched scale-up). The store's
fence keeps one history: every message stored once, seqs without gaps or
duplicates, and every member sees every seq exactly once, in order, up to
its owner's latest commit."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from pathlib import Path

import aiohttp
import pytest

from tests.e2e.conftest import GENEROUS_LIMITS
from tests.e2e.test_faults import store_messages
from tests.support.client import WsClient
from tests.support.stack import start_stack
from waddle_common.routing import owner_of

pytestmark = [pytest.mark.e2e]


async def test_two_owners_cannot_fork_a_channel(tmp_path: Path) -> None:
    async with start_stack(tmp_path, shards=2, edges=0, env=GENEROUS_LIMITS) as stack:
        for i, shard in enumerate(stack.shard_addresses):
            stack.edges.append(
                await stack.start_edge(
                    i,
                    # Each edge sees a different owner.
                    {"WADDLE_EDGE_ID": f"split-{i}", "WADDLE_CHANNEL_SHARDS": shard},
                )
            )
        async with aiohttp.ClientSession() as http:
            a = await WsClient.connect(http, stack.ws_url("forked", edge=0), token=stack.token("a"))
            b = await WsClient.connect(http, stack.ws_url("forked", edge=1), token=stack.token("b"))
            assert (await a.recv())["type"] == "initial_state"
            assert (await b.recv())["type"] == "initial_state"
            for i in range(40):
                await a.send({"type": "message", "content": f"a{i}", "clientMsgId": f"a{i}"})
                await b.send({"type": "message", "content": f"b{i}", "clientMsgId": f"b{i}"})
            acks: dict[str, set[str]] = {"a": set(), "b": set()}
            seen: dict[str, list[int]] = {"a": [], "b": []}
            async with asyncio.timeout(30):
                for name, client in (("a", a), ("b", b)):
                    while len(acks[name]) < 40:
                        frame = await client.recv()
                        if frame["type"] == "ack":
                            acks[name].add(frame["clientMsgId"])
                        elif frame["type"] == "message":
                            seen[name].append(frame["message"]["seq"])
            stored = await store_messages(stack, "forked")
            assert [m.seq for m in stored] == list(range(1, 81))
            assert sorted(m.client_msg_id for m in stored) == sorted(acks["a"] | acks["b"])
            # A member learns of the other owner's messages through its own
            # owner: on its next commit the fence makes that owner catch up
            # (broadcasting what it missed) and the edge fills any gap.
            await a.send({"type": "message", "content": "a-final", "clientMsgId": "a-final"})
            await b.send({"type": "message", "content": "b-final", "clientMsgId": "b-final"})
            async with asyncio.timeout(30):
                for name, client in (("a", a), ("b", b)):
                    while f"{name}-final" not in acks[name]:
                        frame = await client.recv()
                        if frame["type"] == "ack":
                            acks[name].add(frame["clientMsgId"])
                        elif frame["type"] == "message":
                            seen[name].append(frame["message"]["seq"])
            final = await store_messages(stack, "forked")
            assert [m.seq for m in final] == list(range(1, 83))
            last_a = next(m.seq for m in final if m.client_msg_id == "a-final")
            last_b = next(m.seq for m in final if m.client_msg_id == "b-final")
            async with asyncio.timeout(30):
                for name, client, last in (("a", a, last_a), ("b", b, last_b)):
                    while len(seen[name]) < last:
                        frame = await client.recv()
                        if frame["type"] == "message":
                            seen[name].append(frame["message"]["seq"])
            assert seen["a"] == list(range(1, last_a + 1)), "a: exactly once, in order, no gap"
            assert seen["b"] == list(range(1, last_b + 1)), "b: exactly once, in order, no gap"
            await a.close()
            await b.close()


class _Proxy:
    """A TCP relay on a fixed port that can be cut (every connection closed,
    the port refusing) and restored: one edge's path to one shard."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = 0
        self.server: asyncio.Server | None = None
        self.pipes: set[asyncio.StreamWriter] = set()

    async def open(self) -> None:
        self.server = await asyncio.start_server(self._relay, "127.0.0.1", self.port)
        self.port = self.server.sockets[0].getsockname()[1]

    async def cut(self) -> None:
        assert self.server is not None
        self.server.close()
        for writer in list(self.pipes):
            writer.transport.abort()
        await self.server.wait_closed()

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            writer.transport.abort()
            return
        self.pipes |= {writer, up_writer}

        async def pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            try:
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            except (OSError, asyncio.CancelledError):
                pass
            finally:
                dst.transport.abort()
                self.pipes.discard(dst)

        await asyncio.gather(pump(reader, up_writer), pump(up_reader, writer))


async def test_edges_that_disagree_on_a_down_shard_cannot_fork(tmp_path: Path) -> None:
    """One edge loses its path to a channel's owner and fails over to the next
    rendezvous choice while the other edge still reaches the owner: two owners
    at once, as while edges disagree in a real failover. The fence keeps one
    history; when the path comes back the channel moves back, and every
    member sees every seq exactly once, in order."""
    env = {**GENEROUS_LIMITS, "WADDLE_SHARD_DOWN_SECONDS": "1", "WADDLE_SHARD_UP_SECONDS": "1"}
    async with start_stack(tmp_path, shards=2, edges=0, env=env) as stack:
        a_port = stack.channels[0].port("grpc_port")
        direct = stack.shard_addresses
        proxy = _Proxy(a_port)
        await proxy.open()
        via_proxy = [f"127.0.0.1:{proxy.port}", direct[1]]
        # A channel both edges route to shard A (one directly, one through the
        # relay), and that edge 0 moves to shard B when the relay is cut.
        channel = next(
            c
            for c in (f"disagree-{i}" for i in range(1000))
            if owner_of(c, direct) == direct[0] and owner_of(c, via_proxy) == via_proxy[0]
        )
        for i, shards in enumerate((via_proxy, direct)):
            stack.edges.append(
                await stack.start_edge(
                    i,
                    {"WADDLE_EDGE_ID": f"disagree-{i}", "WADDLE_CHANNEL_SHARDS": ",".join(shards)},
                )
            )
        acks: dict[str, dict[str, int]] = {"a": {}, "b": {}}
        seen: dict[str, list[int]] = {"a": [], "b": []}

        async def until(name: str, client: WsClient, done: Callable[[], bool]) -> None:
            async with asyncio.timeout(30):
                while not done():
                    frame = await client.recv()
                    if frame["type"] == "ack":
                        acks[name][frame["clientMsgId"]] = frame["seq"]
                    elif frame["type"] == "message":
                        seen[name].append(frame["message"]["seq"])
                    elif frame["type"] == "error":
                        raise AssertionError(frame)

        async def burst(tag: str, n: int) -> None:
            for i in range(n):
                await a.send({"type": "message", "content": "x", "clientMsgId": f"a-{tag}{i}"})
                await b.send({"type": "message", "content": "x", "clientMsgId": f"b-{tag}{i}"})
            await until("a", a, lambda: all(f"a-{tag}{i}" in acks["a"] for i in range(n)))
            await until("b", b, lambda: all(f"b-{tag}{i}" in acks["b"] for i in range(n)))

        async with aiohttp.ClientSession() as http:
            a = await WsClient.connect(http, stack.ws_url(channel, edge=0), token=stack.token("a"))
            b = await WsClient.connect(http, stack.ws_url(channel, edge=1), token=stack.token("b"))
            assert (await a.recv())["type"] == "initial_state"
            assert (await b.recv())["type"] == "initial_state"
            await burst("before", 10)
            await proxy.cut()  # edge 0 fails over to shard B; edge 1 stays with A
            await burst("split", 30)
            await proxy.open()  # same port: edge 0 moves the channel back to A
            await burst("after", 10)
            stored = await store_messages(stack, channel)
            assert [m.seq for m in stored] == list(range(1, len(stored) + 1))
            by_id = {m.client_msg_id: m.seq for m in stored}
            assert len(by_id) == len(stored) == 100, "every message stored exactly once"
            assert {**acks["a"], **acks["b"]} == by_id, "each ack names the stored seq"
            # A final message from each side makes both owners catch up.
            await a.send({"type": "message", "content": "x", "clientMsgId": "a-final"})
            await b.send({"type": "message", "content": "x", "clientMsgId": "b-final"})
            await until("a", a, lambda: "a-final" in acks["a"])
            await until("b", b, lambda: "b-final" in acks["b"])
            head = max(acks["a"]["a-final"], acks["b"]["b-final"])
            for name, client in (("a", a), ("b", b)):
                with contextlib.suppress(TimeoutError):  # the assertions below tell what is missing
                    await until(name, client, lambda: len(seen[name]) >= head)  # noqa: B023
            assert seen["a"] == list(range(1, head + 1)), "a: exactly once, in order, no gap"
            assert seen["b"] == list(range(1, head + 1)), "b: exactly once, in order, no gap"
            moved = (stack.tmp / "edge0.log").read_text()
            assert '"reason":"down"' in moved and '"reason":"up"' in moved, (
                "edge 0 failed over and back"
            )
            await a.close()
            await b.close()
            await proxy.cut()
