"""Edge SIGTERM: stop accepting, settle publishes in flight, close every
socket with 1012, exit 0 within the grace period."""

from __future__ import annotations

import asyncio
import signal
import time

import aiohttp
import pytest

from tests.support.client import WsClient
from tests.support.stack import start_stack

pytestmark = [pytest.mark.e2e]


async def test_sigterm_drains_edge(tmp_path: object) -> None:
    from pathlib import Path

    assert isinstance(tmp_path, Path)
    async with (
        start_stack(tmp_path, edges=2, env={"WADDLE_SHUTDOWN_GRACE_SECONDS": "5"}) as stack,
        aiohttp.ClientSession() as http,
    ):
        leaving = await WsClient.connect(
            http, stack.ws_url("drain", edge=0), token=stack.token("a")
        )
        staying = await WsClient.connect(
            http, stack.ws_url("drain", edge=1), token=stack.token("b")
        )
        assert (await leaving.recv())["type"] == "initial_state"
        assert (await staying.recv())["type"] == "initial_state"
        # Publishes sent right before the signal are still made durable and acked.
        for i in range(20):
            await leaving.send(
                {"type": "message", "content": f"last words {i}", "clientMsgId": f"k{i}"}
            )
        edge = stack.edges[0]
        started = time.monotonic()
        edge.proc.send_signal(signal.SIGTERM)
        acks = 0
        code = None
        async with asyncio.timeout(15):
            while True:
                msg = await leaving.ws.receive()
                if msg.type is aiohttp.WSMsgType.TEXT and '"type":"ack"' in msg.data:
                    acks += 1
                elif msg.type in (
                    aiohttp.WSMsgType.CLOSE,
                    aiohttp.WSMsgType.CLOSED,
                    aiohttp.WSMsgType.CLOSING,
                ):
                    code = leaving.ws.close_code
                    break
        assert code == 1012
        assert acks == 20, "every publish accepted before the drain was acknowledged"
        rc = await asyncio.wait_for(edge.proc.wait(), 15)
        assert rc == 0 and time.monotonic() - started < 10
        # The member on the other edge saw all of them, in order.
        seqs = [(await staying.recv_message())["seq"] for _ in range(20)]
        assert seqs == list(range(1, 21))
        await staying.close()
