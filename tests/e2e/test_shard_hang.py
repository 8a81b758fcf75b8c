"""A shard that stops answering without closing its connections.

A machine that dies, or a process frozen by the kernel, sends no FIN and
no RST: its TCP connections look open until a keepalive goes unanswered.
Here the shard is frozen with SIGSTOP, and the edge must still take its
channels elsewhere within a few seconds (the shard link's gRPC keepalive,
then ``WADDLE_SHARD_DOWN_SECONDS``), not after the half minute the general
keepalive would take. The publish sent while it hangs is acknowledged once,
by the next owner, and the socket stays open.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import aiohttp
import pytest

from tests.e2e.test_topology import channels_on_each_shard
from tests.support.client import WsClient
from tests.support.stack import start_stack
from waddle_common.grpc_util import SHARD_KEEPALIVE_TIME_MS, SHARD_KEEPALIVE_TIMEOUT_MS

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(90)]

DOWN_SECONDS = 2.0
# The general keepalive (a ping 20 s after the last, 10 s to answer) finds
# a hang after 10 to 30 s, and the channel moves DOWN_SECONDS later; the
# shard link's keepalive (2 s + 2 s) must find it well within this bound.
BOUND = 10.0


async def test_a_frozen_shard_loses_its_channels_within_seconds(tmp_path: Path) -> None:
    assert (SHARD_KEEPALIVE_TIME_MS + SHARD_KEEPALIVE_TIMEOUT_MS) / 1000 + DOWN_SECONDS < BOUND
    env = {"WADDLE_SHARD_DOWN_SECONDS": str(DOWN_SECONDS), "WADDLE_SHARD_UP_SECONDS": "3"}
    async with (
        start_stack(tmp_path, shards=2, env=env) as stack,
        aiohttp.ClientSession() as http,
    ):
        by_shard = channels_on_each_shard(stack.shard_addresses)
        frozen = stack.channels[0]
        channel = by_shard[stack.shard_addresses[0]]
        ann = await WsClient.connect(http, stack.ws_url(channel), token=stack.token("ann"))
        assert (await ann.recv_type("initial_state"))["type"] == "initial_state"
        await ann.send({"type": "message", "content": "before", "clientMsgId": "m-before"})
        assert (await ann.recv_match(type="ack", clientMsgId="m-before"))["seq"] == 1

        os.kill(frozen.pid, signal.SIGSTOP)
        try:
            frozen_at = time.monotonic()
            await ann.send({"type": "message", "content": "during", "clientMsgId": "m-during"})
            ack = await ann.recv_match(timeout=BOUND, type="ack", clientMsgId="m-during")
            took = time.monotonic() - frozen_at
            print(f"frozen shard: its channel acked again after {took:.2f} s")
            assert ack["seq"] == 2, "the next owner continues the channel's seq"
            bodies = [(await ann.recv_match(type="message"))["message"] for _ in range(2)]
            assert [(b["content"], b["seq"]) for b in bodies] == [("before", 1), ("during", 2)]
            assert not ann.ws.closed, "the client's socket stayed open"
        finally:
            os.kill(frozen.pid, signal.SIGCONT)
        await ann.close()
