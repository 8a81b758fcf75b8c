"""The floor: a single-process aiohttp broadcast server, ``python -m bench.peers.floor``.

It speaks Waddle's v1 JSON frames (``initial_state`` on connect, ``message``
to every member of the channel, sender included, ``ack`` to the sender,
``pong``) with no authentication, no gRPC hop and no persistence. Like
Waddle's edge it encodes a message once and writes the same pre-built
WebSocket frame bytes to every member's transport, so the difference
between the two is what Waddle adds: auth, the channel owner, durability.

Environment: ``BENCH_PORT`` (default 0: any free port).
"""

from __future__ import annotations

import asyncio
import itertools
import struct
import time

import orjson
from aiohttp import WSMsgType, web

from bench.peers import message_body, run

members: dict[str, dict[int, asyncio.Transport]] = {}
seqs: dict[str, int] = {}
ids = itertools.count(1)
PONG = b'{"type":"pong"}'


def text_frame(payload: bytes) -> bytes:
    n = len(payload)
    if n < 126:
        return bytes((0x81, n)) + payload
    if n < 1 << 16:
        return struct.pack("!BBH", 0x81, 126, n) + payload
    return struct.pack("!BBQ", 0x81, 127, n) + payload


async def websocket(request: web.Request) -> web.WebSocketResponse:
    channel_id = request.match_info["channel_id"]
    ws = web.WebSocketResponse(compress=False, heartbeat=30)
    await ws.prepare(request)
    transport = request.transport
    assert transport is not None
    conn_id = next(ids)
    user_id = f"anon-{conn_id}"
    room = members.setdefault(channel_id, {})
    room[conn_id] = transport
    initial = {
        "type": "initial_state",
        "channelId": channel_id,
        "messages": [],
        "onlineUsers": [],
        "lastSeq": seqs.get(channel_id, 0),
    }
    transport.write(text_frame(orjson.dumps(initial)))
    try:
        async for msg in ws:
            if msg.type is not WSMsgType.TEXT:
                continue
            try:
                frame = orjson.loads(msg.data)
            except orjson.JSONDecodeError:
                continue
            kind = frame.get("type") if isinstance(frame, dict) else None
            if kind == "message":
                seq = seqs[channel_id] = seqs.get(channel_id, 0) + 1
                now_ms = time.time_ns() // 1_000_000
                body = message_body(
                    seq=seq,
                    channel_id=channel_id,
                    user_id=user_id,
                    content=str(frame.get("content", "")),
                    now_ms=now_ms,
                )
                out = text_frame(orjson.dumps({"type": "message", "message": body}))
                for t in room.values():
                    if not t.is_closing():
                        t.write(out)
                ack = {"type": "ack", "clientMsgId": frame.get("clientMsgId"), "id": body["id"]}
                transport.write(text_frame(orjson.dumps({**ack, "seq": seq, "timestamp": now_ms})))
            elif kind == "ping":
                transport.write(text_frame(PONG))
    finally:
        room.pop(conn_id, None)
        if not room:
            members.pop(channel_id, None)
    return ws


def main() -> None:
    app = web.Application()
    app.router.add_get("/channel/{channel_id}/websocket", websocket)
    run(app)


if __name__ == "__main__":
    main()
