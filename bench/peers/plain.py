"""The plain floor: ``python -m bench.peers.plain``.

The broadcast most aiohttp chat servers start with: one process, the
message encoded to JSON once, then ``await ws.send_str(text)`` for every
member, so aiohttp frames the message again for each socket and makes one
write per socket per message. Same frames as the prepared floor
(``bench.peers.floor``), no authentication, no gRPC hop and no persistence.

Environment: ``BENCH_PORT`` (default 0: any free port).
"""

from __future__ import annotations

import contextlib
import itertools
import time

import orjson
from aiohttp import WSMsgType, web

from bench.peers import message_body, run

members: dict[str, dict[int, web.WebSocketResponse]] = {}
seqs: dict[str, int] = {}
ids = itertools.count(1)


async def _send(ws: web.WebSocketResponse, text: str) -> None:
    if ws.closed:
        return
    with contextlib.suppress(ConnectionError, RuntimeError):  # a member going away
        await ws.send_str(text)


async def websocket(request: web.Request) -> web.WebSocketResponse:
    channel_id = request.match_info["channel_id"]
    ws = web.WebSocketResponse(compress=False, heartbeat=30)
    await ws.prepare(request)
    conn_id = next(ids)
    user_id = f"anon-{conn_id}"
    room = members.setdefault(channel_id, {})
    room[conn_id] = ws
    initial = {
        "type": "initial_state",
        "channelId": channel_id,
        "messages": [],
        "onlineUsers": [],
        "lastSeq": seqs.get(channel_id, 0),
    }
    await _send(ws, orjson.dumps(initial).decode())
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
                text = orjson.dumps({"type": "message", "message": body}).decode()
                for member in list(room.values()):
                    await _send(member, text)
                ack = {"type": "ack", "clientMsgId": frame.get("clientMsgId"), "id": body["id"]}
                await _send(ws, orjson.dumps({**ack, "seq": seq, "timestamp": now_ms}).decode())
            elif kind == "ping":
                await _send(ws, '{"type":"pong"}')
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
