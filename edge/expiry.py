"""Closes connections whose token expires while they are open.

One heap and one task per edge, not a timer per connection: idle
connections cost only their socket and attachment. The close code is 4001;
clients fetch a fresh token and reconnect (then ``sync``).
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import time
from collections.abc import Callable
from typing import Protocol

from edge.auth import Identity
from edge.connection import State
from edge.metrics import EdgeMetrics
from waddle_common import wire


class Expiring(Protocol):
    """A connection or multiplexed socket: closed when its token expires."""

    @property
    def id(self) -> int: ...
    @property
    def identity(self) -> Identity: ...
    @property
    def state(self) -> State: ...
    def close(self, code: int, reason: str) -> None: ...


class ExpiryWatch:
    def __init__(
        self, metrics: EdgeMetrics, live: Callable[[], int], *, granularity: float = 1.0
    ) -> None:
        self.metrics = metrics
        self.live = live
        self.granularity = granularity
        self._heap: list[tuple[float, int, Expiring]] = []
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def watch(self, conn: Expiring) -> None:
        if len(self._heap) > 2 * self.live() + 1024:
            # Closed connections linger until their expiry; compact now and
            # then so churn cannot grow the heap without bound.
            self._heap = [e for e in self._heap if e[2].state is not State.CLOSED]
            heapq.heapify(self._heap)
        heapq.heappush(self._heap, (conn.identity.expires_at, conn.id, conn))
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="token-expiry")
        if self._heap[0][2] is conn:
            self._wake.set()

    async def _run(self) -> None:
        while True:
            now = time.time()
            while self._heap and self._heap[0][0] <= now:
                _, _, conn = heapq.heappop(self._heap)
                if conn.state is not State.CLOSED:
                    self.metrics.refusals.labels("token_expired").inc()
                    conn.close(wire.CLOSE_TOKEN_EXPIRED, "token expired")
            # Drop closed connections from the top so the heap does not hold them.
            while self._heap and self._heap[0][2].state is State.CLOSED:
                heapq.heappop(self._heap)
            delay = self._heap[0][0] - now if self._heap else 3600.0
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), max(self.granularity, delay))

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
