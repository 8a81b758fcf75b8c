"""Joiners' stored read cursors, read from the store many at a time.

Every join reads the joiner's cursor (``edge.joining``). A join storm on one
edge - a thousand users joining a channel within seconds - made that one
``GetReadCursor`` call and one query per join. ``CursorReads`` gathers the
keys asked for while a call is in flight (and those asked in the same loop
tick) into the next ``GetReadCursors`` call, so that the batch grows with
the store's latency: one call per join when joins are rare, a few calls a
second however many join.

The store costs a join nothing it did not cost before: each ``get`` answers
None when the store is unavailable or has not answered within ``timeout``
of the ``get`` (the call itself has the same deadline, so a hung call holds
later batches up for at most that long). Any other error of a call (a
malformed key) is raised to the ``get`` of the key at fault, as the
single call raised it: the keys of a batch that failed so are read again
one by one.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

from waddle_common.store_client import StoreUnavailable

log = logging.getLogger(__name__)

CursorKey = tuple[str, str]
"""(user_id, channel_id)."""

Fetch = Callable[[Sequence[CursorKey], float], Awaitable[Sequence[int]]]
"""Read the cursors of the keys, in order, within the timeout (seconds)."""

CURSOR_TIMEOUT = 1.0
"""Seconds a join waits for its cursor before going on without it."""

MAX_BATCH = 1000
"""Most keys in one call (the store takes up to 10000)."""


@dataclass(frozen=True, slots=True)
class _Failed:
    """A batch's error, kept as a future's result so that a ``get`` that
    timed out meanwhile leaves no unretrieved exception behind."""

    error: Exception


class CursorReads:
    """Read cursors by (user_id, channel_id), batched into calls of ``fetch``.

    At most ``max_in_flight`` calls at a time, each of at most ``max_batch``
    distinct keys; a key asked for again before its call is sent shares it.
    """

    def __init__(
        self,
        fetch: Fetch,
        *,
        timeout: float,
        max_batch: int = MAX_BATCH,
        max_in_flight: int = 1,
    ) -> None:
        if timeout <= 0 or max_batch < 1 or max_in_flight < 1:
            raise ValueError("timeout, max_batch and max_in_flight must be positive")
        self._fetch = fetch
        self.timeout = timeout
        self.max_batch = max_batch
        self.max_in_flight = max_in_flight
        self._queued: dict[CursorKey, asyncio.Future[int | _Failed | None]] = {}
        self._calls: set[asyncio.Task[None]] = set()
        self._scheduled = False
        self._closed = False
        self.batches = 0  # calls made, for tests and metrics

    async def get(self, user_id: str, channel_id: str) -> int | None:
        """The stored cursor (0: none), or None when the store could not say in time."""
        if self._closed:
            return None
        key = (user_id, channel_id)
        future = self._queued.get(key)
        if future is None:
            future = asyncio.get_running_loop().create_future()
            self._queued[key] = future
            self._schedule()
        try:
            async with asyncio.timeout(self.timeout):
                # Shielded: a join that gives up does not cancel its batch.
                result = await asyncio.shield(future)
        except TimeoutError:
            return None
        if isinstance(result, _Failed):
            raise result.error
        return result

    async def close(self) -> None:
        """Cancel the calls in flight; their ``get``s, the waiting ones and
        any later one answer None."""
        self._closed = True
        while self._calls:
            calls = list(self._calls)
            for call in calls:
                call.cancel()
            await asyncio.gather(*calls, return_exceptions=True)
        for future in self._queued.values():
            if not future.done():
                future.set_result(None)
        self._queued.clear()

    def _schedule(self) -> None:
        if not (self._scheduled or self._closed) and len(self._calls) < self.max_in_flight:
            self._scheduled = True
            # Next tick: the joins that arrive in this one share the call.
            asyncio.get_running_loop().call_soon(self._send)

    def _send(self) -> None:
        self._scheduled = False
        while not self._closed and self._queued and len(self._calls) < self.max_in_flight:
            batch: dict[CursorKey, asyncio.Future[int | _Failed | None]] = {}
            for key in list(self._queued)[: self.max_batch]:
                batch[key] = self._queued.pop(key)
            call = asyncio.create_task(self._call(batch), name="cursor-reads")
            self._calls.add(call)
            call.add_done_callback(self._called)
            self.batches += 1

    def _called(self, call: asyncio.Task[None]) -> None:
        self._calls.discard(call)
        if self._queued:
            self._schedule()

    async def _call(self, batch: dict[CursorKey, asyncio.Future[int | _Failed | None]]) -> None:
        results: Sequence[int | _Failed | None] = [None] * len(batch)
        try:
            seqs = await self._fetch(list(batch), self.timeout)
            if len(seqs) != len(batch):
                raise StoreUnavailable(f"{len(seqs)} cursors for {len(batch)} keys")
            results = seqs
        except (StoreUnavailable, TimeoutError) as exc:
            log.debug("cursor reads unavailable", extra={"keys": len(batch)}, exc_info=exc)
        except Exception as exc:
            log.warning("cursor reads failed", extra={"keys": len(batch)}, exc_info=exc)
            results = [_Failed(exc)] if len(batch) == 1 else await self._one_by_one(list(batch))
        finally:
            for future, result in zip(batch.values(), results, strict=True):
                if not future.done():
                    future.set_result(result)

    async def _one_by_one(self, keys: list[CursorKey]) -> list[int | _Failed | None]:
        """Each key in a call of its own, after its batch failed for a reason
        other than the store's state (a malformed key): only the joins of
        the keys at fault see the error."""
        answers = await asyncio.gather(
            *(self._fetch([key], self.timeout) for key in keys), return_exceptions=True
        )
        results: list[int | _Failed | None] = []
        for answer in answers:
            if isinstance(answer, StoreUnavailable | TimeoutError):
                results.append(None)
            elif isinstance(answer, Exception):
                results.append(_Failed(answer))
            elif isinstance(answer, BaseException):
                raise answer
            else:
                results.append(answer[0] if len(answer) == 1 else None)
        return results
