"""The peers Waddle is measured against, each a small server process.

* ``floor``: the prepared floor, a single-process aiohttp broadcast server
  speaking Waddle's JSON frames, with no authentication, no gRPC hop and no
  persistence, that frames each message once and coalesces each socket's
  writes per loop tick.
* ``plain``: the plain floor, the same server broadcasting the naive way
  (``await ws.send_str`` per member per message).
* ``sio``: python-socketio's ``AsyncServer`` on aiohttp with
  ``AsyncRedisManager`` (every emit goes through Redis pub/sub).
* ``django_channels``: a Django Channels consumer with ``channels_redis`` on
  daphne.

Every peer prints one JSON line with ``"ready": true`` and its ``http_port``
once it listens, like Waddle's services, so ``waddle_common.supervise``
starts them all the same way.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import AsyncIterator
from typing import Any

import orjson
from aiohttp import WSMsgType, web

from edge.wsframe import text_frame

__all__ = [
    "announce_ready",
    "client_frames",
    "initial_state",
    "message_body",
    "publish",
    "run",
    "serve_app",
    "text_frame",
]


async def serve_app(app: web.Application) -> None:
    """Serve ``app`` on ``BENCH_PORT`` (0: any), announce the port, stop on SIGTERM/SIGINT."""
    runner = web.AppRunner(app, handle_signals=False, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", int(os.environ.get("BENCH_PORT", "0")), backlog=4096)
    await site.start()
    announce_ready(int(runner.addresses[0][1]))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await runner.cleanup()


def run(app: web.Application) -> None:
    """A peer's process entry: ``app`` on uvloop, like Waddle's services."""
    import uvloop

    uvloop.run(serve_app(app))


def announce_ready(port: int) -> None:
    """The line ``waddle_common.supervise.start_service`` waits for."""
    print(orjson.dumps({"ready": True, "http_port": port}).decode(), flush=True)


def message_body(
    *, seq: int, channel_id: str, user_id: str, content: str, now_ms: int
) -> dict[str, object]:
    """The ``message`` object of Waddle's protocol, as the peers build it."""
    return {
        "id": f"{channel_id}-{seq}",
        "seq": seq,
        "channelId": channel_id,
        "userId": user_id,
        "username": user_id,
        "avatarUrl": None,
        "content": content,
        "timestamp": now_ms,
        "threadId": None,
    }


def initial_state(channel_id: str, last_seq: int) -> bytes:
    """The floors' ``initial_state``: nobody listed, no recent messages."""
    return orjson.dumps(
        {
            "type": "initial_state",
            "channelId": channel_id,
            "messages": [],
            "onlineUsers": [],
            "lastSeq": last_seq,
        }
    )


async def client_frames(ws: web.WebSocketResponse) -> AsyncIterator[dict[str, Any]]:
    """The JSON objects a client sends; anything else is ignored."""
    async for msg in ws:
        if msg.type is not WSMsgType.TEXT:
            continue
        try:
            frame = orjson.loads(msg.data)
        except orjson.JSONDecodeError:
            continue
        if isinstance(frame, dict):
            yield frame


def publish(
    seqs: dict[str, int], channel_id: str, user_id: str, frame: dict[str, Any]
) -> tuple[bytes, bytes]:
    """A floor's answer to a ``message`` frame: the next ``seq`` of the
    channel, the ``message`` frame for every member and the sender's ``ack``."""
    seq = seqs[channel_id] = seqs.get(channel_id, 0) + 1
    now_ms = time.time_ns() // 1_000_000
    body = message_body(
        seq=seq,
        channel_id=channel_id,
        user_id=user_id,
        content=str(frame.get("content", "")),
        now_ms=now_ms,
    )
    ack = {"type": "ack", "clientMsgId": frame.get("clientMsgId"), "id": body["id"]}
    return (
        orjson.dumps({"type": "message", "message": body}),
        orjson.dumps({**ack, "seq": seq, "timestamp": now_ms}),
    )
