"""Fan-out of typed events to async iterators and callbacks.

An ``Emitter`` hands every event it is given to each open ``EventStream``
(async iterators, created by ``stream()``) and to the callbacks registered
with ``on()``. The first stream also receives the events emitted before any
stream existed (a bounded backlog), so an application that starts iterating
right after connecting misses nothing. Callbacks run one at a time, in event
order, on a task of the emitter; a coroutine callback is awaited before the
next event is dispatched, and one that raises is logged and reported as an
``ErrorEvent(code="callback")``. ``end()`` ends every stream and the
dispatch task. ``WaddleClient``, ``WaddleConnection`` and each
``ChannelHandle`` own one emitter each.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import weakref
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Final, TypeVar

from waddle_client.events import ErrorEvent, Event

__all__ = ["Callback", "Emitter", "EventStream"]

log = logging.getLogger("waddle_client")

E = TypeVar("E", bound=Event)
Callback = Callable[[Any], Awaitable[None] | None]

_END: Final = object()


class EventStream:
    """An async iterator over events, from its creation on.

    It ends after its source's last event (the client's terminal
    ``ConnectionState(closed)``, a channel's ``ChannelClosed``). ``aclose()``
    (or leaving an ``async with`` block) unsubscribes early; so does dropping
    it.
    """

    def __init__(self, emitter: Emitter, backlog: Sequence[Event]) -> None:
        self._queue: asyncio.Queue[object] = asyncio.Queue()
        self._emitter: Emitter | None = emitter
        for event in backlog:
            self._queue.put_nowait(event)

    def _put(self, item: object) -> None:
        self._queue.put_nowait(item)

    def __aiter__(self) -> EventStream:
        return self

    async def __anext__(self) -> Event:
        if self._emitter is None and self._queue.empty():
            raise StopAsyncIteration
        item = await self._queue.get()
        if item is _END:
            self._detach()
            raise StopAsyncIteration
        assert isinstance(item, Event)
        return item

    def _detach(self) -> None:
        if self._emitter is not None:
            self._emitter._streams.discard(self)
            self._emitter = None

    async def aclose(self) -> None:
        self._detach()

    async def __aenter__(self) -> EventStream:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._detach()


class Emitter:
    """Streams, backlog and callbacks of one event source."""

    def __init__(self, *, backlog: int, name: str = "waddle:callbacks") -> None:
        self._streams: weakref.WeakSet[EventStream] = weakref.WeakSet()
        self._backlog: deque[Event] | None = deque(maxlen=backlog)
        self._callbacks: list[tuple[type[Event], Callback]] = []
        self._queue: asyncio.Queue[object] | None = None
        self.dispatch_task: asyncio.Task[None] | None = None
        self.ended = False
        self._name = name

    def stream(self) -> EventStream:
        """A new iterator; the first one made also gets the backlog."""
        backlog: Sequence[Event] = ()
        if self._backlog is not None:
            backlog = list(self._backlog)
            self._backlog = None
        stream = EventStream(self, backlog)
        if self.ended:
            stream._put(_END)
        else:
            self._streams.add(stream)
        return stream

    def on(
        self, event_type: type[E], callback: Callable[[E], Awaitable[None] | None]
    ) -> Callable[[], None]:
        """Call ``callback`` for every event of ``event_type``; return the unsubscriber."""
        entry: tuple[type[Event], Callback] = (event_type, callback)
        self._callbacks.append(entry)

        def off() -> None:
            with contextlib.suppress(ValueError):
                self._callbacks.remove(entry)

        return off

    def emit(self, event: Event) -> None:
        if self.ended:
            return
        for stream in list(self._streams):
            stream._put(event)
        if self._backlog is not None:
            self._backlog.append(event)
        if self._callbacks:
            if self._queue is None:
                self._queue = asyncio.Queue()
            self._queue.put_nowait(event)
            if self.dispatch_task is None or self.dispatch_task.done():
                self.dispatch_task = asyncio.get_running_loop().create_task(
                    self._dispatch(self._queue), name=self._name
                )

    def end(self) -> None:
        """No more events: end every stream (after what they hold) and the dispatcher."""
        if self.ended:
            return
        self.ended = True
        for stream in list(self._streams):
            stream._put(_END)
        self._streams.clear()
        if self._queue is not None:
            self._queue.put_nowait(_END)

    async def drained(self) -> None:
        """Wait until the callbacks saw every event (after ``end()``)."""
        dispatcher = self.dispatch_task
        if dispatcher is not None and dispatcher is not asyncio.current_task():
            with contextlib.suppress(Exception):
                await dispatcher

    async def _dispatch(self, queue: asyncio.Queue[object]) -> None:
        while True:
            event = await queue.get()
            if event is _END:
                return
            assert isinstance(event, Event)
            for event_type, callback in list(self._callbacks):
                if not isinstance(event, event_type):
                    continue
                try:
                    result = callback(event)
                    if inspect.isawaitable(result):
                        await result
                except Exception as exc:
                    log.exception("event callback failed")
                    if not isinstance(event, ErrorEvent) or event.code != "callback":
                        self._report(ErrorEvent("callback", f"{type(exc).__name__}: {exc}"))

    def _report(self, event: ErrorEvent) -> None:
        # Queued after the current event; the dispatcher is running.
        for stream in list(self._streams):
            stream._put(event)
        if self._backlog is not None:
            self._backlog.append(event)
        if self._queue is not None and not self.ended:
            self._queue.put_nowait(event)
