"""The connection loop shared by both clients: connect, serve, reconnect with backoff.

``ReconnectingSocket`` owns one background task that connects (``Authorization:
Bearer``), hands the open socket to the subclass's ``_serve`` until it
closes, then either stops — ``close()``, close code 1000 or 1008, an upgrade
refused with 400/401/403 — or reconnects after a full-jitter exponential
backoff (any other close: 1006, 1011, 1012, 1013, 4001, ...; any other
refusal). Before each attempt it picks the next base URL (a list rotates, a
``url_provider`` decides) and, from the second attempt on, asks the
``token_provider`` for a fresh token. Its state changes are
``ConnectionState`` events on the subclass's ``Emitter``.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Final, Self
from urllib.parse import quote, urlsplit, urlunsplit

import aiohttp

from waddle_client.backoff import Backoff
from waddle_client.emitter import Emitter
from waddle_client.errors import ClientClosedError
from waddle_client.events import ConnectionState, ErrorEvent, State
from waddle_client.outbox import consume

__all__ = [
    "CLOSE_NORMAL",
    "CLOSE_POLICY",
    "Ended",
    "ReconnectingSocket",
    "TokenSource",
    "UrlSource",
    "channel_socket_url",
    "multiplexed_socket_url",
]

log = logging.getLogger("waddle_client")

CLOSE_NORMAL: Final = 1000
CLOSE_POLICY: Final = 1008

# Upgrade refusals that retrying cannot fix: invalid channel id, bad or
# expired token (a token_provider gets its chance before every reconnect,
# so a 401 after it is final), no right to join.
TERMINAL_STATUSES: Final = frozenset({400, 401, 403})

TokenSource = Callable[[], Awaitable[str] | str]
UrlSource = Callable[[], Awaitable[str] | str]

_SCHEMES: Final = {"http": "ws", "https": "wss", "ws": "ws", "wss": "wss"}


def _socket_url(base: str, path: str) -> str:
    parts = urlsplit(base)
    scheme = _SCHEMES.get(parts.scheme.lower())
    if scheme is None or not parts.netloc:
        raise ValueError(f"not an http(s):// or ws(s):// URL: {base!r}")
    return urlunsplit((scheme, parts.netloc, f"{parts.path.rstrip('/')}{path}", parts.query, ""))


def channel_socket_url(base: str, channel_id: str) -> str:
    """The v1 WebSocket URL of ``channel_id`` on the edge at ``base`` (http(s) or ws(s))."""
    return _socket_url(base, f"/channel/{quote(channel_id, safe='')}/websocket")


def multiplexed_socket_url(base: str) -> str:
    """The v1.1 WebSocket URL (one socket, many channels) of the edge at ``base``."""
    return _socket_url(base, "/websocket")


async def resolve(source: Callable[[], Awaitable[str] | str]) -> str:
    value = source()
    if inspect.isawaitable(value):
        value = await value
    if not isinstance(value, str) or not value:
        raise TypeError("provider must return a non-empty string")
    return value


@dataclass(slots=True)
class Ended:
    """How one connection attempt ended."""

    reason: str
    close_code: int | None = None
    http_status: int | None = None
    terminal: bool = False
    opened_for: float | None = None


class ReconnectingSocket:
    """A WebSocket that survives network drops; subclasses say what to do with it.

    Subclasses implement ``_socket_url`` (the URL for a base URL) and
    ``_serve`` (read the socket until it closes; call ``_opened_now`` once it
    counts as open), and may extend ``_disconnected`` (a socket is gone) and
    ``_ending`` (the terminal state is being entered: fail what is pending).
    """

    def __init__(
        self,
        url: str | Sequence[str],
        token: str | None,
        *,
        token_provider: TokenSource | None,
        url_provider: UrlSource | None,
        backoff_base: float,
        backoff_cap: float,
        stable_after: float,
        random: Callable[[], float],
        clock: Callable[[], float],
        heartbeat: float | None,
        open_timeout: float,
        event_backlog: int,
        session: aiohttp.ClientSession | None,
        name: str,
    ) -> None:
        if token is None and token_provider is None:
            raise ValueError("give a token or a token_provider")
        bases = [url] if isinstance(url, str) else list(url)
        if not bases and url_provider is None:
            raise ValueError("give at least one url (or a url_provider)")
        for base in bases:
            self._socket_url(base)  # validate early
        self._name = name
        self._bases = bases
        self._url_index = -1
        self._url_provider = url_provider
        self._token = token
        self._token_provider = token_provider
        self._random = random
        self._clock = clock
        self._backoff = Backoff(
            base=backoff_base, cap=backoff_cap, stable_after=stable_after, random=random
        )
        self._heartbeat = heartbeat
        self._open_timeout = open_timeout
        self._session = session
        self._owns_session = session is None
        self._events = Emitter(backlog=event_backlog, name=f"{name}:callbacks")

        self._state = State.CLOSED
        self._started = False
        self._finished = False
        self._closed_event = asyncio.Event()
        self._terminal: ClientClosedError | None = None
        self._opened: asyncio.Future[None] | None = None
        self._run_task: asyncio.Task[None] | None = None
        self._socket: aiohttp.ClientWebSocketResponse | None = None  # any, for close()
        self._conn_no = 0
        self._aborted = 0  # a connection this client ended itself (not the server)
        self._attempted = False
        self._write_lock = asyncio.Lock()

    # -- to implement -----------------------------------------------------------

    def _socket_url(self, base: str) -> str:
        raise NotImplementedError

    async def _serve(self, ws: aiohttp.ClientWebSocketResponse, conn_no: int, url: str) -> Ended:
        raise NotImplementedError

    async def _disconnected(self) -> None:
        """The current socket is gone (or going): stop using it."""

    def _ending(self, error: Callable[[], ClientClosedError]) -> None:
        """The terminal state is being entered: fail what is pending."""

    # -- state ------------------------------------------------------------------

    @property
    def state(self) -> State:
        """The connection state (``closed`` also before ``connect()``)."""
        return self._state

    @property
    def closed_reason(self) -> ClientClosedError | None:
        """Why the client reached its terminal state, once it has."""
        return self._terminal

    def _set_state(self, state: State, **detail: Any) -> None:
        self._state = state
        self._emit(ConnectionState(state, **detail))

    def _emit(self, event: Any) -> None:
        self._events.emit(event)

    def _closed_error(self) -> ClientClosedError:
        t = self._terminal
        assert t is not None
        return ClientClosedError(t.reason, close_code=t.close_code, http_status=t.http_status)

    # -- lifecycle ----------------------------------------------------------------

    async def __aenter__(self) -> Self:
        try:
            await self.connect()
        except BaseException:
            await self.close()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def _start(self) -> None:
        """Start the connection loop (once); raise once the client has ended."""
        if self._terminal is not None:
            raise self._closed_error()
        if not self._started:
            self._started = True
            loop = asyncio.get_running_loop()
            self._opened = loop.create_future()
            self._opened.add_done_callback(consume)
            self._set_state(State.CONNECTING)
            self._run_task = loop.create_task(self._run(), name=self._name)

    async def connect(self) -> None:
        """Start the connection and wait until it is open.

        Transient failures are retried in the background while this waits
        (bound it with ``asyncio.timeout``); raises ``ClientClosedError``
        when the client reaches its terminal state first (401/403 refusal,
        close code 1008 or 1000, ``close()``).
        """
        self._start()
        assert self._opened is not None
        await asyncio.shield(self._opened)

    async def close(self) -> None:
        """Close for good: no reconnect; unacknowledged sends fail with ``ClientClosedError``."""
        if self._terminal is None:
            self._terminal = ClientClosedError("closed by the application")
        task = self._run_task
        if task is not None and not task.done() and task is not asyncio.current_task():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        await self._finish()

    async def wait_closed(self) -> ClientClosedError:
        """Wait until the client reached its terminal state; return why.

        When this returns, the connection loop has ended: nothing reconnects.
        """
        await self._closed_event.wait()
        task = self._run_task
        current = asyncio.current_task()
        if task is not None and current not in (task, self._events.dispatch_task):
            await asyncio.gather(asyncio.shield(task), return_exceptions=True)
        return self._closed_error()

    def _opened_now(self, url: str) -> None:
        self._set_state(State.OPEN, url=url)
        if self._opened is not None and not self._opened.done():
            self._opened.set_result(None)

    def _parse(self, data: Any) -> dict[str, Any] | None:
        """A frame from the server as a dict; None (reported) when unreadable."""
        try:
            frame = json.loads(data)
        except (TypeError, ValueError):
            self._emit(ErrorEvent("bad_frame", "unreadable frame from the server"))
            return None
        if not isinstance(frame, dict):
            self._emit(ErrorEvent("bad_frame", "frame from the server is not an object"))
            return None
        return frame

    # -- writing ---------------------------------------------------------------------

    async def _write(self, ws: aiohttp.ClientWebSocketResponse, text: str) -> None:
        async with self._write_lock:
            await ws.send_str(text)

    # -- the loop ----------------------------------------------------------------------

    async def _run(self) -> None:
        try:
            while True:
                try:
                    ended = await self._connect_once()
                except Exception as exc:  # a bug must not end the connection loop
                    log.exception("connection failed", extra={"client": self._name})
                    ended = Ended(reason=f"internal error: {type(exc).__name__}: {exc}")
                if ended.terminal:
                    self._terminal = ClientClosedError(
                        ended.reason, close_code=ended.close_code, http_status=ended.http_status
                    )
                    await self._finish()
                    return
                if ended.opened_for is not None:
                    self._backoff.connection_lasted(ended.opened_for)
                attempt, delay = self._backoff.next_delay()
                log.info(
                    "reconnecting",
                    extra={"client": self._name, "attempt": attempt, "delay": delay},
                )
                self._set_state(
                    State.RECONNECTING,
                    reason=ended.reason,
                    close_code=ended.close_code,
                    http_status=ended.http_status,
                    attempt=attempt,
                    delay=delay,
                )
                await asyncio.sleep(delay)
        finally:
            await self._drop_connection()

    async def _next_url(self) -> str:
        if self._url_provider is not None:
            base = await resolve(self._url_provider)
        else:
            self._url_index = (self._url_index + 1) % len(self._bases)
            base = self._bases[self._url_index]
        return self._socket_url(base)

    async def _next_token(self) -> str:
        if self._token_provider is not None and (self._attempted or self._token is None):
            self._token = await resolve(self._token_provider)
            return self._token
        assert self._token is not None
        return self._token

    async def _connect_once(self) -> Ended:
        try:
            url = await self._next_url()
        except Exception as exc:
            self._emit(ErrorEvent("url_provider", f"{type(exc).__name__}: {exc}"))
            return Ended(reason=f"url provider failed: {exc}")
        try:
            token = await self._next_token()
        except Exception as exc:
            self._emit(ErrorEvent("token_provider", f"{type(exc).__name__}: {exc}"))
            return Ended(reason=f"token provider failed: {exc}")
        finally:
            self._attempted = True
        if self._session is None:
            self._session = aiohttp.ClientSession()
        try:
            async with asyncio.timeout(self._open_timeout):
                ws = await self._session.ws_connect(
                    url,
                    headers={"Authorization": f"Bearer {token}"},
                    heartbeat=self._heartbeat,
                    timeout=aiohttp.ClientWSTimeout(ws_receive=None, ws_close=5.0),
                )
        except aiohttp.WSServerHandshakeError as exc:
            reason = f"HTTP {exc.status}: {exc.message}"
            terminal = exc.status in TERMINAL_STATUSES
            return Ended(reason=reason, http_status=exc.status, terminal=terminal)
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            return Ended(reason=f"{type(exc).__name__}: {exc}".rstrip(": "))
        self._socket = ws
        self._conn_no += 1
        try:
            return await self._serve(ws, self._conn_no, url)
        finally:
            await self._drop_connection()

    def _ended(
        self,
        ws: aiohttp.ClientWebSocketResponse,
        conn_no: int,
        reason: str,
        opened_at: float | None,
        last: aiohttp.WSMessage | None,
    ) -> Ended:
        """How a served socket ended, from its close code and last message."""
        if last is not None:
            if last.type is aiohttp.WSMsgType.CLOSE and isinstance(last.extra, str):
                reason = last.extra or reason
            elif last.type is aiohttp.WSMsgType.ERROR:
                reason = f"{type(last.data).__name__}: {last.data}"
        code = None if ws.close_code is None else int(ws.close_code)
        opened_for = None if opened_at is None else self._clock() - opened_at
        if code in (CLOSE_POLICY, CLOSE_NORMAL) and self._aborted != conn_no:
            return Ended(reason=reason, close_code=code, terminal=True, opened_for=opened_for)
        return Ended(reason=reason, close_code=code, opened_for=opened_for)

    async def _drop_connection(self) -> None:
        """Forget the current socket (closing it if still open)."""
        await self._disconnected()
        ws, self._socket = self._socket, None
        if ws is not None and not ws.closed:
            with contextlib.suppress(Exception):
                async with asyncio.timeout(5):
                    await ws.close(code=CLOSE_NORMAL, message=b"client closed")

    # -- the end ---------------------------------------------------------------------------

    async def _finish(self) -> None:
        """Enter the terminal state (once): fail what is pending, end the streams."""
        if self._terminal is None:
            self._terminal = ClientClosedError("closed by the application")
        if not self._finished:
            self._finished = True
            self._started = True
            self._ending(self._closed_error)
            if self._opened is not None and not self._opened.done():
                self._opened.set_exception(self._closed_error())
            t = self._terminal
            self._set_state(
                State.CLOSED, reason=t.reason, close_code=t.close_code, http_status=t.http_status
            )
            self._events.end()
            self._closed_event.set()
        await self._events.drained()
        if self._owns_session and self._session is not None:
            session, self._session = self._session, None
            await session.close()
