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

from aiohttp import web

from bench.peers import client_frames, initial_state, publish, run

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
    await _send(ws, initial_state(channel_id, seqs.get(channel_id, 0)).decode())
    try:
        async for frame in client_frames(ws):
            kind = frame.get("type")
            if kind == "message":
                message, ack = publish(seqs, channel_id, user_id, frame)
                text = message.decode()
                for member in list(room.values()):
                    await _send(member, text)
                await _send(ws, ack.decode())
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
