"""Test helpers: an event recorder that tests wait on, with bounded waits."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, Protocol, TypeVar

from waddle_client import ConnectionState, Event, Message, State

WAIT = 5.0
# Tasks that follow an event iterator, kept alive until the iterator ends (the
# event loop holds tasks only weakly).
_PUMPS: set[asyncio.Task[None]] = set()
E = TypeVar("E", bound=Event)


class Source(Protocol):
    """Anything with ``on()``: a ``WaddleClient``, ``WaddleConnection`` or ``ChannelHandle``."""

    def on(
        self, event_type: type[Any], callback: Callable[[Any], Awaitable[None] | None]
    ) -> Callable[[], None]: ...


class Recorder:
    """Every event of a client (or channel), in order, as its callbacks saw them."""

    def __init__(self, client: Source | None = None) -> None:
        self.events: list[Event] = []
        self._changed = asyncio.Condition()
        if client is not None:
            client.on(Event, self._add)

    @classmethod
    def following(cls, stream: AsyncIterator[Event]) -> Recorder:
        """Record what an event iterator yields (the first one also yields the
        events from before it was made); it stops when the iterator ends."""
        recorder = cls()

        async def pump() -> None:
            async for event in stream:
                await recorder._add(event)

        task = asyncio.get_running_loop().create_task(pump())
        _PUMPS.add(task)
        task.add_done_callback(_PUMPS.discard)
        return recorder

    async def _add(self, event: Event) -> None:
        async with self._changed:
            self.events.append(event)
            self._changed.notify_all()

    def of(self, kind: type[E]) -> list[E]:
        return [e for e in self.events if isinstance(e, kind)]

    def seqs(self) -> list[int]:
        return [m.seq for m in self.of(Message)]

    def states(self) -> list[ConnectionState]:
        return self.of(ConnectionState)

    async def wait_for(
        self,
        kind: type[E],
        predicate: Callable[[E], bool] = lambda e: True,
        *,
        start: int = 0,
        timeout: float = WAIT,
    ) -> E:
        """The first event of ``kind`` at index >= ``start`` matching ``predicate``."""

        def find() -> E | None:
            for event in self.events[start:]:
                if isinstance(event, kind) and predicate(event):
                    return event
            return None

        async with asyncio.timeout(timeout), self._changed:
            await self._changed.wait_for(lambda: find() is not None)
            found = find()
            assert found is not None
            return found

    async def wait_state(self, state: State, *, start: int = 0, timeout: float = WAIT) -> int:
        """Wait for a ConnectionState ``state``; return the index after it."""
        event = await self.wait_for(
            ConnectionState, lambda e: e.state is state, start=start, timeout=timeout
        )
        return self.events.index(event, start) + 1

    async def wait_count(self, kind: type[E], count: int, timeout: float = WAIT) -> list[E]:
        """Wait until ``count`` events of ``kind`` were seen; return them."""
        async with asyncio.timeout(timeout), self._changed:
            await self._changed.wait_for(lambda: len(self.of(kind)) >= count)
        return self.of(kind)

    async def wait_seqs(self, count: int, timeout: float = WAIT) -> list[int]:
        async with asyncio.timeout(timeout), self._changed:
            await self._changed.wait_for(lambda: len(self.seqs()) >= count)
        return self.seqs()
