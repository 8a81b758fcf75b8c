"""A small WebSocket test client: real aiohttp WebSocket, JSON frames, bounded waits."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from typing import Any

import aiohttp
import orjson

DEFAULT_TIMEOUT = 10.0


class Closed(Exception):
    def __init__(self, code: int | None) -> None:
        super().__init__(f"socket closed with {code}")
        self.code = code


class WsClient:
    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.ws = ws
        self.received: list[dict[str, Any]] = []
        self._skipped: list[dict[str, Any]] = []  # passed over by recv_match

    @classmethod
    async def connect(
        cls,
        session: aiohttp.ClientSession,
        url: str,
        *,
        token: str | None = None,
        protocols: Sequence[str] = (),
        headers: Mapping[str, str] | None = None,
    ) -> WsClient:
        hdrs = dict(headers or {})
        if token is not None:
            hdrs["Authorization"] = f"Bearer {token}"
        ws = await session.ws_connect(
            url,
            headers=hdrs,
            protocols=tuple(protocols),
            timeout=aiohttp.ClientWSTimeout(ws_close=5),
        )
        return cls(ws)

    async def send(self, frame: Mapping[str, Any]) -> None:
        await self.ws.send_str(orjson.dumps(frame).decode())

    async def recv(self, timeout: float = DEFAULT_TIMEOUT) -> dict[str, Any]:
        msg = await self.ws.receive(timeout=timeout)
        if msg.type in (
            aiohttp.WSMsgType.CLOSE,
            aiohttp.WSMsgType.CLOSED,
            aiohttp.WSMsgType.CLOSING,
        ):
            raise Closed(self.ws.close_code)
        if msg.type is not aiohttp.WSMsgType.TEXT:
            raise AssertionError(f"unexpected frame {msg.type}: {msg.data!r}")
        frame = orjson.loads(msg.data)
        assert isinstance(frame, dict)
        self.received.append(frame)
        return frame

    async def recv_type(self, kind: str, timeout: float = DEFAULT_TIMEOUT) -> dict[str, Any]:
        """The next frame of type ``kind``; frames of other types are skipped (and kept)."""
        async with asyncio.timeout(timeout):
            while True:
                frame = await self.recv(timeout)
                if frame["type"] == kind:
                    return frame

    async def recv_match(self, timeout: float = DEFAULT_TIMEOUT, **fields: Any) -> dict[str, Any]:
        """The oldest frame not yet matched whose top-level fields equal
        ``fields``. Frames skipped on the way wait for a later call, so frames
        of several channels can be taken in any order, each in its own."""

        def matches(frame: dict[str, Any]) -> bool:
            return all(frame.get(k) == v for k, v in fields.items())

        for i, frame in enumerate(self._skipped):
            if matches(frame):
                del self._skipped[i]
                return frame
        async with asyncio.timeout(timeout):
            while True:
                frame = await self.recv(timeout)
                if matches(frame):
                    return frame
                self._skipped.append(frame)

    async def recv_message(self, timeout: float = DEFAULT_TIMEOUT) -> dict[str, Any]:
        frame = await self.recv_type("message", timeout)
        body = frame["message"]
        assert isinstance(body, dict)
        return body

    async def wait_closed(self, timeout: float = DEFAULT_TIMEOUT) -> int | None:
        async with asyncio.timeout(timeout):
            while True:
                msg = await self.ws.receive()
                if msg.type in (
                    aiohttp.WSMsgType.CLOSE,
                    aiohttp.WSMsgType.CLOSED,
                    aiohttp.WSMsgType.CLOSING,
                ):
                    return self.ws.close_code

    async def close(self) -> None:
        await self.ws.close()

    def seqs(self, channel_id: str | None = None) -> list[int]:
        return [
            int(f["message"]["seq"])
            for f in self.received
            if f["type"] == "message"
            and (channel_id is None or f["message"]["channelId"] == channel_id)
        ]
