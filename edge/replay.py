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
"""

from __future__ import annotations

import asyncio
import logging

from edge.connection import Connection, LocalChannels, State
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


class Replayer:
    def __init__(
        self,
        store: StoreClient,
        local: LocalChannels,
        metrics: EdgeMetrics,
        *,
        page_size: int = 500,
        give_up_after: float = 10.0,
    ) -> None:
        self.store = store
        self.local = local
        self.metrics = metrics
        self.page_size = page_size
        self.give_up_after = give_up_after
        self._tasks: set[asyncio.Task[None]] = set()
        local.on_gap = self.fill_gap

    def fill_gap(self, conn: Connection) -> None:
        if conn.sync_task is None or conn.sync_task.done():
            self._start(conn, None, None, requested=False)

    def client_sync(self, conn: Connection, frame: Sync) -> None:
        if conn.sync_task is not None and not conn.sync_task.done():
            # The edge may be filling a gap on its own; the client's request
            # runs right after it. Only a second queued request is refused.
            if conn.queued_sync is not None:
                conn.send(
                    wire.error_frame(wire.SYNC_IN_PROGRESS),
                    self.metrics,
                    self.local.limits,
                    "error",
                )
                return
            conn.queued_sync = frame
            return
        conn.state = State.SYNCING
        self._start(conn, frame.after_seq, frame.after_message_id, requested=True)

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
        count = 0
        while conn.state is State.SYNCING:
            try:
                if after_id is not None:
                    after_seq = await self._resolve(conn, after_id)
                    after_id = None
                if after_seq is not None and after_seq < conn.floor:
                    count += await self._send_range(conn, after_seq, conn.floor)
                    conn.floor = after_seq
                    after_seq = None
                while conn.state is State.SYNCING:
                    before = conn.cursor
                    count += await self._send_range(conn, conn.cursor, None)
                    if self.local.release_held(conn):
                        break
                    if conn.cursor == before:
                        # Held frames are ahead of what the store returned:
                        # wait (bounded) instead of spinning.
                        raise StoreUnavailable("store is behind the live stream")
            except UnknownMessageId:
                conn.send(
                    wire.error_frame(wire.UNKNOWN_MESSAGE_ID),
                    self.metrics,
                    self.local.limits,
                    "error",
                )
                requested = False
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
            if conn.state is State.SYNCING:
                conn.state = State.LIVE
            break
        if requested and conn.state is State.LIVE:
            conn.send(
                wire.sync_complete_frame(last_seq=conn.cursor, count=count),
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

    async def _send_range(self, conn: Connection, after: int, upto: int | None) -> int:
        """Send stored messages with ``after < seq <= upto`` (no upper bound when None).

        Messages past the cursor advance it; older ones (below the floor)
        only fill in history the client asked for."""
        sent = 0
        while conn.state is State.SYNCING:
            page = await self.store.messages_after(
                conn.channel_id, after_seq=after, limit=self.page_size
            )
            for m in page.messages:
                if upto is not None and m.seq > upto:
                    return sent
                if upto is None and m.seq != conn.cursor + 1:
                    # A hole in the store itself cannot be: stop and let the
                    # caller re-read rather than skip a seq.
                    if m.seq <= conn.cursor:
                        after = m.seq
                        continue
                    return sent
                conn.send(
                    wire.message_frame(stored_to_body(m)),
                    self.metrics,
                    self.local.limits,
                    "message",
                )
                self.metrics.replayed.inc()
                sent += 1
                after = m.seq
                if upto is None:
                    conn.cursor = m.seq
            if not page.has_more or not page.messages:
                return sent
        return sent
