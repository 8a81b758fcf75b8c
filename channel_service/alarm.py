"""One event-loop timer for a whole queue of deadlines.

Linger expirations and coalesced read receipts each keep their deadlines in
a queue and share one ``Alarm``: it is armed for the earliest deadline only,
so a shard with a hundred thousand departed users still holds one timer.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

log = logging.getLogger("channel.alarm")


class Alarm:
    """Calls ``fire(now)`` once the earliest armed deadline (``time.monotonic``) is reached.

    ``fire`` does the queue's due work and returns the next deadline (or
    ``None`` when the queue is empty); the alarm re-arms itself for it.
    """

    def __init__(self, name: str, fire: Callable[[float], float | None]) -> None:
        self._name = name
        self._fire = fire
        self._handle: asyncio.TimerHandle | None = None
        self._when: float | None = None

    def arm(self, when: float | None) -> None:
        """Make sure the alarm goes off no later than ``when``."""
        if when is None or (self._when is not None and self._when <= when):
            return
        if self._handle is not None:
            self._handle.cancel()
        loop = asyncio.get_running_loop()
        self._when = when
        # The loop's clock and time.monotonic() may differ in origin.
        self._handle = loop.call_later(max(0.0, when - time.monotonic()), self._run)

    def cancel(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
        self._handle = None
        self._when = None

    def _run(self) -> None:
        self._handle = None
        self._when = None
        now = time.monotonic()
        try:
            following = self._fire(now)
        except Exception:
            # What is still queued is tried again shortly; never fatal.
            log.exception("timer callback failed", extra={"timer": self._name})
            following = now + 1.0
        self.arm(following)
