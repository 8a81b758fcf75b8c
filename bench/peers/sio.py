"""The python-socketio peer: ``python -m bench.peers.sio``.

``socketio.AsyncServer`` on aiohttp with ``AsyncRedisManager``, the way
python-socketio is deployed when more than one process must share rooms:
every emit is published to Redis and delivered by each server's listener.
A client connects with ``auth = {"channel": id}``; the server puts it in
that room and emits ``initial_state`` to it. ``message`` events are
broadcast to the room (sender included) as Waddle-shaped ``message``
objects, and acknowledged to the sender with an ``ack`` event.

Environment: ``BENCH_PORT`` (default 0), ``BENCH_REDIS_URL`` (default
``redis://127.0.0.1:6379/0``), ``BENCH_REDIS_CHANNEL`` (pub/sub channel name).
"""

from __future__ import annotations

import os
import time
from typing import Any

import socketio  # type: ignore[import-untyped]
from aiohttp import web

from bench.peers import message_body, run

mgr = socketio.AsyncRedisManager(
    os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/0"),
    channel=os.environ.get("BENCH_REDIS_CHANNEL", f"bench-sio-{os.getpid()}"),
)
sio = socketio.AsyncServer(
    async_mode="aiohttp",
    client_manager=mgr,
    cors_allowed_origins="*",
    transports=["websocket"],
    http_compression=False,
    compression_threshold=1 << 30,
)
rooms: dict[str, str] = {}  # sid -> channel id
seqs: dict[str, int] = {}


async def connect(sid: str, environ: dict[str, Any], auth: Any) -> bool:
    channel_id = auth.get("channel") if isinstance(auth, dict) else None
    if not isinstance(channel_id, str) or not channel_id:
        return False
    rooms[sid] = channel_id
    await sio.enter_room(sid, channel_id)
    await sio.emit(
        "initial_state",
        {
            "channelId": channel_id,
            "messages": [],
            "onlineUsers": [],
            "lastSeq": seqs.get(channel_id, 0),
        },
        to=sid,
    )
    return True


async def disconnect(sid: str, *args: Any) -> None:
    rooms.pop(sid, None)


async def message(sid: str, data: Any) -> None:
    channel_id = rooms.get(sid)
    if channel_id is None or not isinstance(data, dict):
        return
    seq = seqs[channel_id] = seqs.get(channel_id, 0) + 1
    now_ms = time.time_ns() // 1_000_000
    body = message_body(
        seq=seq,
        channel_id=channel_id,
        user_id=sid,
        content=str(data.get("content", "")),
        now_ms=now_ms,
    )
    await sio.emit("message", {"message": body}, room=channel_id)
    await sio.emit("ack", {"id": body["id"], "seq": seq, "timestamp": now_ms}, to=sid)


sio.on("connect", connect)
sio.on("disconnect", disconnect)
sio.on("message", message)


def main() -> None:
    app = web.Application()
    sio.attach(app)
    run(app)


if __name__ == "__main__":
    main()
