"""A small server speaking client protocol v1, for testing ``waddle_client``.

``Peer`` is a real aiohttp WebSocket server on 127.0.0.1 (port 0) with one
channel's worth of state. By default it behaves like the real stack: it
answers each connection with ``initial_state``, assigns sequence numbers,
broadcasts, acknowledges (deduplicating by ``clientMsgId`` and answering a
repeat with the original ack) and replays after ``sync``. Each behaviour can
be switched off so a test plays the server's part frame by frame: every
frame a client sends is recorded on its ``PeerConn`` and can be awaited.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections import deque
from collections.abc import Callable
from typing import Any

import aiohttp
from aiohttp import web

WAIT = 5.0


class PeerConn:
    """The server side of one client connection."""

    def __init__(self, peer: Peer, ws: web.WebSocketResponse, authorization: str | None) -> None:
        self.peer = peer
        self.ws = ws
        self.authorization = authorization
        self.received: list[dict[str, Any]] = []
        self._inbox: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self.closed = asyncio.Event()
        self.close_code: int | None = None

    async def send(self, frame: dict[str, Any]) -> None:
        await self.ws.send_json(frame)

    async def send_message(self, body: dict[str, Any]) -> None:
        await self.send({"type": "message", "message": body})

    async def close(self, code: int, reason: str = "") -> None:
        await self.ws.close(code=code, message=reason.encode())

    def drop(self) -> None:
        """Cut the TCP connection without a close frame (an abnormal close)."""
        transport = self.ws._req.transport if self.ws._req is not None else None
        assert transport is not None
        transport.abort()

    async def recv(self, kind: str | None = None, timeout: float = WAIT) -> dict[str, Any]:
        """The next frame the client sent (of type ``kind``; others are skipped)."""
        async with asyncio.timeout(timeout):
            while True:
                frame = await self._inbox.get()
                if kind is None or frame.get("type") == kind:
                    return frame

    def _got(self, frame: dict[str, Any]) -> None:
        self.received.append(frame)
        self._inbox.put_nowait(frame)


class Peer:
    """One channel served over WebSocket, scriptable by the test."""

    def __init__(self, channel_id: str = "room") -> None:
        self.channel_id = channel_id
        self.messages: list[dict[str, Any]] = []  # the channel's log; seq = index + 1
        self.acks: dict[str, dict[str, Any]] = {}  # clientMsgId -> ack frame
        self.online_users: list[dict[str, Any]] = []
        self.history_window = 50
        self.auto_initial_state = True
        self.auto_publish = True
        self.auto_sync = True
        self.refuse: deque[int] = deque()  # statuses for the next upgrades, one each
        self.refuse_always: int | None = None
        self.handshakes: list[str | None] = []  # Authorization header of every attempt
        self.conns: list[PeerConn] = []
        self._new: asyncio.Queue[PeerConn] = asyncio.Queue()
        self._runner: web.AppRunner | None = None
        self.port = 0
        self.on_frame: Callable[[PeerConn, dict[str, Any]], bool] | None = None

    # -- server --------------------------------------------------------------

    async def start(self) -> str:
        app = web.Application()
        app.router.add_get("/channel/{channel_id}/websocket", self._handler)
        self._runner = web.AppRunner(app, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = int(self._runner.addresses[0][1])
        return self.url

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def stop(self) -> None:
        """Die like a killed process: connections are cut, no close frames."""
        for conn in list(self.conns):
            with contextlib.suppress(Exception):
                conn.drop()
        if self._runner is not None:
            await self._runner.cleanup()

    async def next_connection(self, timeout: float = WAIT) -> PeerConn:
        async with asyncio.timeout(timeout):
            return await self._new.get()

    # -- channel state --------------------------------------------------------

    def add_message(self, content: str, user_id: str = "zed", **extra: Any) -> dict[str, Any]:
        """Append a message to the log (not broadcast) and return its body."""
        seq = len(self.messages) + 1
        body = {
            "id": f"id-{seq}",
            "seq": seq,
            "channelId": self.channel_id,
            "userId": user_id,
            "username": user_id,
            "avatarUrl": None,
            "content": content,
            "timestamp": int(time.time() * 1000),
            "threadId": None,
            **extra,
        }
        self.messages.append(body)
        return body

    def initial_state(self) -> dict[str, Any]:
        window = self.messages[-self.history_window :] if self.history_window else []
        return {
            "type": "initial_state",
            "channelId": self.channel_id,
            "messages": window,
            "onlineUsers": self.online_users,
            "lastSeq": len(self.messages),
        }

    async def broadcast(self, body: dict[str, Any]) -> None:
        for conn in list(self.conns):
            if not conn.ws.closed:
                with contextlib.suppress(Exception):
                    await conn.send_message(body)

    async def publish(self, content: str, user_id: str = "zed") -> dict[str, Any]:
        body = self.add_message(content, user_id)
        await self.broadcast(body)
        return body

    # -- connection handling ---------------------------------------------------

    async def _handler(self, request: web.Request) -> web.StreamResponse:
        self.handshakes.append(request.headers.get("Authorization"))
        status = self.refuse.popleft() if self.refuse else self.refuse_always
        if status is not None:
            return web.Response(status=status, text="refused by the test peer\n")
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        conn = PeerConn(self, ws, request.headers.get("Authorization"))
        self.conns.append(conn)
        if self.auto_initial_state:
            await ws.send_json(self.initial_state())
        self._new.put_nowait(conn)
        try:
            async for msg in ws:
                if msg.type is not aiohttp.WSMsgType.TEXT:
                    continue
                frame = msg.json()
                conn._got(frame)
                if self.on_frame is not None and self.on_frame(conn, frame):
                    continue
                await self._auto(conn, frame)
        finally:
            conn.close_code = ws.close_code
            conn.closed.set()
            self.conns.remove(conn)
        return ws

    async def _auto(self, conn: PeerConn, frame: dict[str, Any]) -> None:
        kind = frame.get("type")
        if kind == "message" and self.auto_publish:
            cmid = frame.get("clientMsgId")
            if isinstance(cmid, str) and cmid in self.acks:
                await conn.send(self.acks[cmid])
                return
            body = self.add_message(frame["content"], "me", threadId=frame.get("threadId"))
            body["id"] = str(uuid.uuid4())
            await self.broadcast(body)
            ack = {
                "type": "ack",
                "clientMsgId": cmid,
                "id": body["id"],
                "seq": body["seq"],
                "timestamp": body["timestamp"],
            }
            if isinstance(cmid, str):
                self.acks[cmid] = ack
            await conn.send(ack)
        elif kind == "sync" and self.auto_sync:
            after = int(frame.get("afterSeq", 0))
            replay = self.messages[after:]
            for body in replay:
                await conn.send_message(body)
            await conn.send(
                {"type": "sync_complete", "lastSeq": len(self.messages), "count": len(replay)}
            )
