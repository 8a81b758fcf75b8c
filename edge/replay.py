"""Replay from the store: a client's ``sync`` and the edge's own gap fill.

Both run the same procedure on one connection, with live sequenced frames
held back meanwhile (the connection is ``SYNCING``):

1. For a client ``sync`` after seq ``A`` below the connection's floor, send
   ``(A, floor]`` — what the client lacks from before it connected.
2. Send everything after the cursor the store has, page by page.
3. Release the held live frames that continue the cursor; if they still
   leave a gap, go back to 2.

So a connection writes each seq at most once, in order. A client ``sync``
ends with ``sync_complete``. When the store stays unreachable, the
connection is closed with 1013 rather than left with a silent gap: the
client reconnects and syncs.

Bounds, because a client frame may never start unbounded work:
* Every loop here ends: an unknown ``afterMessageId`` is answered once
  with ``unknown_message_id`` and the replay goes on from the cursor; store
  trouble is retried with backoff for at most ``give_up_after`` seconds.
* Replay streams within the socket's send buffer: a page is written in
  chunks, and the next chunk only once the socket has drained below the
  transport's high-water mark. A socket that drains nothing for
  ``stall_after`` seconds is closed with 1013. So the edge holds at most
  one store page and one chunk per replaying socket.
* Client syncs spend a replay budget (messages per second) per user and
  per edge. A sync asked for while either budget is in debt is answered
  ``rate_limited`` with ``retryAfterMs``; a replay under way is never cut,
  its messages are charged as they go.
"""

from __future__ import annotations

import asyncio
import logging
import math
from dataclasses import dataclass
from typing import Any

from edge.connection import Connection, LocalChannels, State
from edge.limits import TokenBucket
from edge.metrics import EdgeMetrics
from edge.protocol import Sync
from waddle_common import wire
from waddle_common.store_client import (
    StoreClient,
    StoreUnavailable,
    UnknownMessageId,
    stored_to_body,
)

log = logging.getLogger("edge.replay")

# Bytes written to a socket between two looks at its flow control.
CHUNK_BYTES = 64 * 1024


@dataclass(frozen=True, slots=True)
class ReplayBudget:
    """Messages per second that client syncs may replay, per user and per edge."""

    user_rate: float = 1000.0
    user_burst: float = 5000.0
    edge_rate: float = 10000.0
    edge_burst: float = 50000.0


class ReplayBudgets:
    """Token buckets in debt-allowed form: admission needs a positive balance,
    replayed messages are charged afterwards. Buckets of users who are back
    to full are forgotten, so the table holds only recent replayers."""

    def __init__(self, budget: ReplayBudget, now: float) -> None:
        self.budget = budget
        self.edge = TokenBucket.full(budget.edge_rate, budget.edge_burst, now)
        self.users: dict[str, TokenBucket] = {}

    def _user(self, user_id: str, now: float) -> TokenBucket:
        bucket = self.users.get(user_id)
        if bucket is None:
            if len(self.users) >= 10_000:
                self._forget_full(now)
            bucket = self.users[user_id] = TokenBucket.full(
                self.budget.user_rate, self.budget.user_burst, now
            )
        return bucket

    def _forget_full(self, now: float) -> None:
        for user_id, bucket in list(self.users.items()):
            bucket.refill(now)
            if bucket.tokens >= bucket.burst:
                del self.users[user_id]

    def admit(self, user_id: str, now: float) -> float:
        """0.0 when a sync may start, else the seconds until it may."""
        return max(self._user(user_id, now).wait_for(now), self.edge.wait_for(now))

    def charge(self, user_id: str, count: int, now: float) -> None:
        self._user(user_id, now).charge(now, count)
        self.edge.charge(now, count)


class Replayer:
    def __init__(
        self,
        store: StoreClient,
        local: LocalChannels,
        metrics: EdgeMetrics,
        *,
        page_size: int = 100,
        give_up_after: float = 10.0,
        stall_after: float = 10.0,
        budget: ReplayBudget | None = None,
    ) -> None:
        self.store = store
        self.local = local
        self.metrics = metrics
        self.page_size = page_size
        self.give_up_after = give_up_after
        self.stall_after = stall_after
        self.budgets = ReplayBudgets(budget or ReplayBudget(), 0.0)
        self._tasks: set[asyncio.Task[None]] = set()
        local.on_gap = self.fill_gap

    def fill_gap(self, conn: Connection) -> None:
        if conn.sync_task is None or conn.sync_task.done():
            self._start(conn, None, None, requested=False)

    def client_sync(self, conn: Connection, frame: Sync, *, admitted: bool = False) -> None:
        """Replay what ``frame`` asks for; ``admitted``: the budget was checked already."""
        if conn.sync_task is not None and not conn.sync_task.done():
            # The edge may be filling a gap on its own; the client's request
            # runs right after it. Only a second queued request is refused.
            if conn.queued_sync is not None:
                self._error(conn, wire.SYNC_IN_PROGRESS)
                return
            conn.queued_sync = frame
            return
        wait = 0.0 if admitted else self.admit(conn)
        if wait:
            self._error(conn, wire.RATE_LIMITED, retryAfterMs=max(1, math.ceil(wait * 1000)))
            return
        conn.state = State.SYNCING
        self._start(conn, frame.after_seq, frame.after_message_id, requested=True)

    def admit(self, conn: Connection) -> float:
        """0.0 when ``conn``'s user and this edge may start a replay, else seconds to wait."""
        wait = self.budgets.admit(conn.identity.user_id, asyncio.get_running_loop().time())
        if wait:
            self.metrics.replays_refused.inc()
        return wait

    def _error(self, conn: Connection, kind: wire.ErrorKind, **extra: Any) -> None:
        payload = wire.error_frame(kind, channel_id=conn.channel_id, **extra)
        conn.send(payload, self.metrics, self.local.limits, "error")

    def _start(
        self, conn: Connection, after_seq: int | None, after_id: str | None, *, requested: bool
    ) -> None:
        task = asyncio.create_task(self._run(conn, after_seq, after_id, requested))
        conn.sync_task = task
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        task.add_done_callback(lambda _: self._next_queued(conn))

    def _next_queued(self, conn: Connection) -> None:
        frame, conn.queued_sync = conn.queued_sync, None
        if frame is not None and conn.state is not State.CLOSED:
            self.client_sync(conn, frame)

    async def stop(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _run(
        self, conn: Connection, after_seq: int | None, after_id: str | None, requested: bool
    ) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.give_up_after
        delay = 0.05
        sent = _Sent(self, conn, requested)
        while conn.state is State.SYNCING:
            try:
                if after_id is not None:
                    # Cleared before the lookup: an id the store does not know
                    # is answered once, never looked up again.
                    message_id, after_id = after_id, None
                    after_seq = await self._resolve(conn, message_id)
                if after_seq is not None and after_seq < conn.floor:
                    await self._send_range(conn, after_seq, conn.floor, sent)
                    conn.floor = after_seq
                    after_seq = None
                while conn.state is State.SYNCING:
                    before = conn.cursor
                    await self._send_range(conn, conn.cursor, None, sent)
                    if self.local.release_held(conn):
                        break
                    if conn.cursor == before:
                        # Held frames are ahead of what the store returned:
                        # wait (bounded) instead of spinning.
                        raise StoreUnavailable("store is behind the live stream")
            except UnknownMessageId:
                self._error(conn, wire.UNKNOWN_MESSAGE_ID)
                requested = sent.requested = False
                after_seq = None
                continue  # still catch up on anything held
            except StoreUnavailable as exc:
                if loop.time() >= deadline:
                    log.warning(
                        "replay gave up: store unreachable",
                        extra={"channel_id": conn.channel_id, "error": str(exc)},
                    )
                    conn.close(wire.CLOSE_TRY_AGAIN, "store unavailable")
                    return
                await asyncio.sleep(delay)
                delay = min(delay * 2, 1.0)
                continue
            except SlowConsumer:
                self.metrics.slow_consumer_closes.inc()
                log.info(
                    "slow consumer closed during replay",
                    extra={"channel_id": conn.channel_id, "user_id": conn.identity.user_id},
                )
                conn.close(wire.CLOSE_TRY_AGAIN, "slow consumer")
                return
            if conn.state is State.SYNCING:
                conn.state = State.LIVE
            break
        if requested and conn.state is State.LIVE:
            conn.send(
                wire.sync_complete_frame(
                    last_seq=conn.cursor, count=sent.count, channel_id=conn.channel_id
                ),
                self.metrics,
                self.local.limits,
                "sync_complete",
            )

    async def _resolve(self, conn: Connection, message_id: str) -> int:
        page = await self.store.messages_after(
            conn.channel_id, after_message_id=message_id, limit=1
        )
        if page.messages:
            return int(page.messages[0].seq) - 1
        return int(page.last_seq)

    async def _send_range(
        self, conn: Connection, after: int, upto: int | None, sent: _Sent
    ) -> None:
        """Send stored messages with ``after < seq <= upto`` (no upper bound when None).

        Messages past the cursor advance it; older ones (below the floor)
        only fill in history the client asked for."""
        while conn.state is State.SYNCING:
            page = await self.store.messages_after(
                conn.channel_id, after_seq=after, limit=self.page_size
            )
            for m in page.messages:
                if upto is not None and m.seq > upto:
                    return
                if upto is None and m.seq != conn.cursor + 1:
                    # A hole in the store itself cannot be: stop and let the
                    # caller re-read rather than skip a seq.
                    if m.seq <= conn.cursor:
                        after = m.seq
                        continue
                    return
                await sent.message(wire.message_frame(stored_to_body(m)))
                after = m.seq
                if upto is None:
                    conn.cursor = m.seq
                if conn.state is not State.SYNCING:
                    return
            if not page.has_more or not page.messages:
                return

    async def drain(self, conn: Connection) -> None:
        """Wait until ``conn``'s socket takes more; raise ``SlowConsumer`` after ``stall_after``."""
        conn.flush()
        try:
            await asyncio.wait_for(conn.drained(), self.stall_after)
        except TimeoutError:
            raise SlowConsumer from None
        except ConnectionError:
            conn.close(wire.CLOSE_NORMAL, "connection lost")


class SlowConsumer(Exception):
    """A replaying socket took nothing for too long."""


class _Sent:
    """What one replay has written: counts, the budget charge, the chunking."""

    __slots__ = ("chunk", "conn", "count", "replayer", "requested")

    def __init__(self, replayer: Replayer, conn: Connection, requested: bool) -> None:
        self.replayer, self.conn, self.requested = replayer, conn, requested
        self.count = 0
        self.chunk = 0

    async def message(self, payload: bytes) -> None:
        r, conn = self.replayer, self.conn
        conn.send(payload, r.metrics, r.local.limits, "message")
        r.metrics.replayed.inc()
        self.count += 1
        if self.requested:
            r.budgets.charge(conn.identity.user_id, 1, asyncio.get_running_loop().time())
        self.chunk += len(payload)
        if self.chunk >= CHUNK_BYTES:
            self.chunk = 0
            await r.drain(conn)
