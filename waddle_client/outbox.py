"""The send queue: durable sends, resent with the same ``clientMsgId`` until acknowledged.

Every message gets a ``clientMsgId`` (a uuid4) and stays in the ``Outbox``
until its ``ack`` arrives or it fails for good. The connection's writer asks
``take()`` for the next message to write; after a reconnect ``reset()``
makes every unacknowledged message due again, oldest first, with its
original id (the server deduplicates and answers a repeat with the original
ack). Per socket, at most ``max_in_flight`` messages are on the wire
unanswered; a ``rate_limited`` refusal switches to one at a time, spaced by
the interval the server's ``retryAfterMs`` implies. A retryable refusal
puts the message back after a full-jitter backoff, and the later messages
of the same channel wait behind it, so one sender's messages keep their
order. A message with neither ack nor error within ``ack_timeout`` is
written again.

One outbox serves one socket: ``WaddleClient``'s (one channel) or
``WaddleConnection``'s (messages tagged with their channel, ``writable``
telling which channels may be written to now). Content the server would
refuse without naming the message (empty, too long, NUL characters, a bad
thread id, a frame over the size limit) is refused here, at once, with
``SendError``. No I/O: the owner writes what ``take()`` returns.
"""

from __future__ import annotations

import asyncio
import json
import logging
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final

from waddle_client.backoff import full_jitter_delay
from waddle_client.errors import QueueFullError, SendError
from waddle_client.events import Ack, ErrorEvent

__all__ = ["RESEND_CODES", "Outbox", "Outgoing", "consume", "dumps"]

log = logging.getLogger("waddle_client")

# Error codes after which a message is resent (with the same clientMsgId)
# rather than failed: the server marks `unavailable` retryable; `not_joined`
# means the publish raced the connection's registration with the channel
# owner, so the message was not stored and resending it is safe.
# `rate_limited` is retryable too and also slows the writes down.
RESEND_CODES: Final = frozenset({"unavailable", "not_joined", "rate_limited"})

MAX_THREAD_ID_LENGTH: Final = 128


def dumps(frame: Mapping[str, Any]) -> str:
    return json.dumps(frame, ensure_ascii=False, separators=(",", ":"))


def consume(future: asyncio.Future[Any]) -> None:
    """Mark a future's exception as retrieved (nobody may await it)."""
    if not future.cancelled():
        future.exception()


@dataclass(eq=False, slots=True)
class Outgoing:
    """One message from ``send`` until its ack (or final failure).

    Queued: ``sent_on`` None and not ``waiting``: the writer will write it.
    In flight: ``sent_on`` is the connection it was written on; ``timer``
    resends it if no answer comes within ``ack_timeout``. Waiting: a
    retryable error arrived; ``timer`` queues it again after a backoff.
    """

    client_msg_id: str
    content: str
    thread_id: str | None
    frame: str
    future: asyncio.Future[Ack]
    channel_id: str | None = None
    sent_on: int | None = None
    gap_epoch: int = 0  # the pacing in force when it was last written
    waiting: bool = False
    retries: int = 0
    timer: asyncio.TimerHandle | None = None

    def cancel_timer(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None


class Outbox:
    """The messages of one socket awaiting their ack, in send order."""

    def __init__(
        self,
        *,
        wake: Callable[[], None],
        random: Callable[[], float],
        backoff_base: float,
        backoff_cap: float,
        max_queue: int = 1000,
        max_in_flight: int = 8,
        ack_timeout: float = 30.0,
        max_frame_bytes: int = 32768,
        max_message_length: int = 4000,
    ) -> None:
        if max_queue < 1 or max_in_flight < 1:
            raise ValueError("max_queue and max_in_flight must be >= 1")
        if max_message_length < 1:
            raise ValueError("max_message_length must be >= 1")
        self.pending: dict[str, Outgoing] = {}
        self.max_queue = max_queue
        self.max_in_flight = max_in_flight
        self.ack_timeout = ack_timeout
        self.max_frame_bytes = max_frame_bytes
        self.max_message_length = max_message_length
        self._wake = wake
        self._random = random
        self._base = backoff_base
        self._cap = backoff_cap
        self.gap = 0.0  # seconds between message writes, learnt from rate limits
        self.gap_epoch = 0  # bumped whenever gap changes
        self._next_write_at = 0.0  # loop time

    # -- queueing -------------------------------------------------------------

    def enqueue(
        self, content: str, thread_id: str | None, *, channel_id: str | None = None
    ) -> Outgoing:
        """Queue a message; raise ``SendError`` for content the server would refuse."""
        if not isinstance(content, str):
            raise TypeError("content must be a string")
        if thread_id is not None and not isinstance(thread_id, str):
            raise TypeError("thread_id must be a string or None")
        client_msg_id = str(uuid.uuid4())
        self._check(content, thread_id, client_msg_id)
        if len(self.pending) >= self.max_queue:
            raise QueueFullError(self.max_queue)
        body: dict[str, Any] = {"type": "message", "content": content, "clientMsgId": client_msg_id}
        if thread_id is not None:
            body["threadId"] = thread_id
        if channel_id is not None:
            body["channelId"] = channel_id
        frame = dumps(body)
        if len(frame.encode()) > self.max_frame_bytes:
            raise SendError(
                "frame_too_big",
                f"the message frame is over {self.max_frame_bytes} bytes",
                client_msg_id,
            )
        future: asyncio.Future[Ack] = asyncio.get_running_loop().create_future()
        future.add_done_callback(consume)
        out = Outgoing(client_msg_id, content, thread_id, frame, future, channel_id)
        self.pending[client_msg_id] = out
        self._wake()
        return out

    def _check(self, content: str, thread_id: str | None, client_msg_id: str) -> None:
        """What the server refuses before it reads ``clientMsgId``: refused here
        at once, since the server's refusal could not say which message it was."""
        if not content.strip():
            raise SendError("empty_message", "Message is empty", client_msg_id)
        if len(content) > self.max_message_length:
            raise SendError(
                "message_too_long",
                f"Message too long: at most {self.max_message_length} characters",
                client_msg_id,
            )
        if "\x00" in content:
            raise SendError("invalid_field", "content must not contain NUL", client_msg_id)
        if thread_id is not None and (
            not 1 <= len(thread_id) <= MAX_THREAD_ID_LENGTH or "\x00" in thread_id
        ):
            raise SendError(
                "invalid_field",
                f"threadId must be 1 to {MAX_THREAD_ID_LENGTH} characters, without NUL",
                client_msg_id,
            )

    # -- writing ----------------------------------------------------------------

    def reset(self) -> None:
        """A new connection: everything unacknowledged is due again, in order, same ids."""
        for out in self.pending.values():
            out.cancel_timer()
            out.sent_on = None
            out.waiting = False

    def take(
        self, conn_no: int, writable: Callable[[str | None], bool] | None = None
    ) -> Outgoing | float | None:
        """The next message to write on connection ``conn_no`` (marked as
        written), seconds to wait before asking again (pacing), or None when
        nothing may be written now (an ack, error or ``wake`` says when)."""
        out = self._next(writable)
        if out is None:
            return None
        in_flight = sum(1 for o in self.pending.values() if o.sent_on == conn_no and not o.waiting)
        # Once rate limited, one message at a time: a burst already on the
        # wire would be refused frame after frame.
        window = 1 if self.gap > 0 else self.max_in_flight
        if in_flight >= window:
            return None
        loop = asyncio.get_running_loop()
        delay = self._next_write_at - loop.time()
        if delay > 0:
            return delay
        out.sent_on = conn_no
        out.gap_epoch = self.gap_epoch
        out.timer = loop.call_later(self.ack_timeout, self._ack_overdue, out, conn_no)
        self._next_write_at = loop.time() + self.gap
        return out

    def _next(self, writable: Callable[[str | None], bool] | None) -> Outgoing | None:
        # The oldest message not on the wire; while one waits for a retry
        # the later ones of its channel wait too, so one sender's messages
        # keep their order and are not refused in a row.
        blocked: set[str | None] = set()
        for out in self.pending.values():
            channel = out.channel_id
            if channel in blocked:
                continue
            if out.waiting:
                blocked.add(channel)
                continue
            if out.sent_on is not None:
                continue
            if writable is not None and not writable(channel):
                blocked.add(channel)
                continue
            return out
        return None

    def _ack_overdue(self, out: Outgoing, conn_no: int) -> None:
        """No ack nor error within ``ack_timeout``: write it again (same id)."""
        out.timer = None
        if self.pending.get(out.client_msg_id) is out and out.sent_on == conn_no:
            log.info(
                "ack overdue, resending",
                extra={"channel_id": out.channel_id, "client_msg_id": out.client_msg_id},
            )
            out.sent_on = None
            self._wake()

    # -- answers ------------------------------------------------------------------

    def on_ack(self, ack: Ack) -> Outgoing | None:
        """Resolve the message ``ack`` names; None for an ack already seen."""
        out = self.pending.pop(ack.client_msg_id, None)
        if out is None:
            return None  # the ack of a resend whose original was acknowledged already
        out.cancel_timer()
        self._wake()  # room in the in-flight window
        if not out.future.done():
            out.future.set_result(ack)
        return out

    def on_error(self, error: ErrorEvent) -> Outgoing | None:
        """Act on an error naming one of the messages; return it (None if it names none)."""
        cmid = error.client_msg_id
        out = self.pending.get(cmid) if cmid is not None else None
        if out is None:
            return None
        if error.code == "rate_limited":
            self._slow_down(error.retry_after, paced=out.gap_epoch == self.gap_epoch)
        self._wake()  # room in the in-flight window
        if error.retryable or error.code in RESEND_CODES:
            self._schedule_resend(out, error.retry_after)
        else:
            del self.pending[out.client_msg_id]
            out.cancel_timer()
            if not out.future.done():
                out.future.set_exception(SendError(error.code, error.message, cmid))
        return out

    def _slow_down(self, retry_after: float | None, *, paced: bool) -> None:
        """The server refused a message for its rate: pace writes from now on.

        ``retryAfterMs`` is the time until the server's bucket holds one
        token again, at most the interval of its sustained rate, so the
        writes are spaced by the largest wait seen (plus a margin); when a
        message written at the current spacing is still refused (``paced``),
        the spacing grows by half. No message goes out before the wait is
        over, and from the first refusal on only one is on the wire at a time.
        """
        wait = retry_after if retry_after is not None else self._base
        wait = min(max(wait, 0.001), self._cap)
        gap = max(self.gap, wait * 1.1)
        if paced and self.gap > 0:
            gap = max(gap, self.gap * 1.5)
        gap = min(gap, self._cap)
        if gap != self.gap:
            self.gap = gap
            self.gap_epoch += 1
        loop_now = asyncio.get_running_loop().time()
        self._next_write_at = max(self._next_write_at, loop_now + wait)

    def _schedule_resend(self, out: Outgoing, retry_after: float | None) -> None:
        delay = full_jitter_delay(out.retries, self._random(), base=self._base, cap=self._cap)
        if retry_after is not None:
            delay = max(delay, retry_after)
        out.retries += 1
        out.cancel_timer()
        out.waiting = True

        def due() -> None:
            out.timer = None
            if self.pending.get(out.client_msg_id) is out and out.waiting:
                out.waiting = False
                out.sent_on = None
                self._wake()

        out.timer = asyncio.get_running_loop().call_later(delay, due)

    # -- the end --------------------------------------------------------------------

    def futures(self, channel_id: str | None = None) -> list[asyncio.Future[Ack]]:
        return [
            o.future
            for o in self.pending.values()
            if channel_id is None or o.channel_id == channel_id
        ]

    def fail(self, error: Callable[[], BaseException], *, channel_id: str | None = None) -> None:
        """Fail every pending message (of ``channel_id`` only, when given)."""
        for key, out in list(self.pending.items()):
            if channel_id is not None and out.channel_id != channel_id:
                continue
            del self.pending[key]
            out.cancel_timer()
            if not out.future.done():
                out.future.set_exception(error())
