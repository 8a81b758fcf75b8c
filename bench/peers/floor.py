"""The prepared floor: ``python -m bench.peers.floor``.

A single-process aiohttp broadcast server speaking Waddle's v1 JSON frames
(``initial_state`` on connect, ``message`` to every member of the channel,
sender included, ``ack`` to the sender, ``pong``) with no authentication,
no gRPC hop and no persistence. It does the two things a fast fan-out does:
it frames each message once (the same WebSocket frame bytes for every
member) and it coalesces writes, so every socket gets one
``transport.write`` per loop tick with all the frames of that tick. The
difference between it and Waddle is what Waddle adds: auth, the channel
owner, durability.

``bench.peers.plain`` is the other floor: the naive broadcast.

Environment: ``BENCH_PORT`` (default 0: any free port).
"""

from __future__ import annotations

import asyncio
import itertools

from aiohttp import web

from bench.peers import client_frames, initial_state, publish, run, text_frame

members: dict[str, dict[int, asyncio.Transport]] = {}
seqs: dict[str, int] = {}
ids = itertools.count(1)
PONG = b'{"type":"pong"}'


class Coalescer:
    """Frames queued per transport during one loop tick, written once after it."""

    def __init__(self) -> None:
        self.pending: dict[asyncio.Transport, list[bytes]] = {}
        self.scheduled = False

    def write(self, transport: asyncio.Transport, frame: bytes) -> None:
        queued = self.pending.get(transport)
        if queued is None:
            self.pending[transport] = [frame]
            if not self.scheduled:
                self.scheduled = True
                asyncio.get_running_loop().call_soon(self.flush)
        else:
            queued.append(frame)

    def flush(self) -> None:
        self.scheduled = False
        pending, self.pending = self.pending, {}
        for transport, frames in pending.items():
            if not transport.is_closing():
                transport.write(frames[0] if len(frames) == 1 else b"".join(frames))


out = Coalescer()


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
    out.write(transport, text_frame(initial_state(channel_id, seqs.get(channel_id, 0))))
    try:
        async for frame in client_frames(ws):
            kind = frame.get("type")
            if kind == "message":
                message, ack = publish(seqs, channel_id, user_id, frame)
                prepared = text_frame(message)
                for t in room.values():
                    out.write(t, prepared)
                out.write(transport, text_frame(ack))
            elif kind == "ping":
                out.write(transport, text_frame(PONG))
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
