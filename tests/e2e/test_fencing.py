"""Split brain: two channel shards both believe they own one channel (edges
with different shard lists, as during a botched scale-up). The store's
fence keeps one history: every message stored once, seqs without gaps or
duplicates, and every member sees every seq exactly once, in order, up to
its owner's latest commit."""

from __future__ import annotations

import asyncio
from pathlib import Path

import aiohttp
import pytest

from tests.e2e.conftest import GENEROUS_LIMITS
from tests.e2e.test_faults import store_messages
from tests.support.client import WsClient
from tests.support.stack import start_stack
from waddle_common.supervise import start_service

pytestmark = [pytest.mark.e2e]


async def test_two_owners_cannot_fork_a_channel(tmp_path: Path) -> None:
    async with start_stack(tmp_path, shards=2, edges=0, env=GENEROUS_LIMITS) as stack:
        for i, shard in enumerate(stack.shard_addresses):
            stack.edges.append(
                await start_service(
                    f"edge{i}",
                    "edge",
                    {
                        **stack.base_env,
                        "WADDLE_EDGE_PORT": "0",
                        "WADDLE_EDGE_ID": f"split-{i}",
                        "WADDLE_CHANNEL_SHARDS": shard,  # each edge sees a different owner
                        "WADDLE_STORE_ADDRESS": stack.store_address,
                    },
                    log_path=tmp_path / f"edge{i}.log",
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
