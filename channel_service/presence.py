"""Presence linger: who left a channel and when their departure is announced.

When a user's last connection leaves a channel, ``user_disconnected`` is not
sent at once: the user lingers (still listed in ``onlineUsers``) for
``WADDLE_PRESENCE_LINGER_SECONDS``. Coming back within it is silent. Only a
departure that lasts the whole linger is announced, once.

``LingerQueue`` holds the pending departures of every channel of a shard in
deadline order; it does no I/O and takes the time as an argument, so one
timer (``channel_service.alarm.Alarm``) serves the whole shard. A user who
comes back is not removed from the queue: whether a due departure is still
one is the channel's call (``Channel.linger_expired``), and a user who
leaves again gets a fresh deadline in place of the old one.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Callable

from channel_service.alarm import Alarm

log = logging.getLogger("channel.presence")

LingerKey = tuple[str, str]  # (channel id, user id)


class LingerQueue:
    """Departures waiting out the linger, oldest first."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        # With one linger for all, insertion order is deadline order: a user
        # leaving again is moved to the end with a fresh deadline.
        self._deadlines: OrderedDict[LingerKey, float] = OrderedDict()

    def __len__(self) -> int:
        return len(self._deadlines)

    def __contains__(self, key: object) -> bool:
        return key in self._deadlines

    def depart(self, channel_id: str, user_id: str, now: float) -> float:
        """Start (or restart) the linger of a departed user; returns its deadline."""
        key = (channel_id, user_id)
        deadline = now + self.seconds
        self._deadlines.pop(key, None)
        self._deadlines[key] = deadline
        return deadline

    def due(self, now: float) -> list[LingerKey]:
        """Remove and return the departures whose linger is over."""
        out: list[LingerKey] = []
        while self._deadlines:
            key, deadline = next(iter(self._deadlines.items()))
            if deadline > now:
                break
            del self._deadlines[key]
            out.append(key)
        return out

    def next_deadline(self) -> float | None:
        if not self._deadlines:
            return None
        return next(iter(self._deadlines.values()))

    def clear(self) -> None:
        self._deadlines.clear()


class Linger:
    """The shard's linger: a ``LingerQueue`` driven by one ``Alarm``.

    ``expire(channel_id, user_id)`` is called for each departure whose
    linger is over; it announces the departure if it still is one.
    """

    def __init__(self, seconds: float, expire: Callable[[str, str], None]) -> None:
        self.queue = LingerQueue(seconds)
        self._expire = expire
        self._alarm = Alarm("presence-linger", self._due)

    def depart(self, channel_id: str, user_id: str) -> None:
        self._alarm.arm(self.queue.depart(channel_id, user_id, time.monotonic()))

    def _due(self, now: float) -> float | None:
        for channel_id, user_id in self.queue.due(now):
            try:
                self._expire(channel_id, user_id)
            except Exception:  # one bad departure must not keep the others unannounced
                log.exception("linger expiry failed", extra={"channel_id": channel_id})
        return self.queue.next_deadline()

    def stop(self) -> None:
        self._alarm.cancel()
        self.queue.clear()
