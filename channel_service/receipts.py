"""Read cursors on their way out of the shard: to the store, and to the
channel's other members as read receipts.

Contract:
* A cursor that moved (a ``read`` frame, or the sender of a committed
  message) is persisted through the store in batches: one
  ``SetReadCursors`` call per round carries every channel's cursors that
  moved since the previous round (the latest seq per user and channel);
  rounds are at least 100 ms apart, so a busy shard makes a few calls a
  second, not one per message. A failed round is retried with backoff and
  never stops the writer. Cursors improve the user experience but are not
  messages: the moves of the last round or so (about 100 ms) before a crash
  may be lost (a client then sees an older cursor, and reads again).
* Other members hear of a move as a ``read`` receipt, at most one per user
  per channel per ``interval`` (one second): the first move is announced at
  once, later ones within the interval are coalesced and the newest seq is
  announced when the interval is over. ``ReceiptCoalescer`` keeps that
  state for the whole shard without I/O (time is an argument), and one
  ``Alarm`` serves it.
* The user's own other connections are told by the channel at once (see
  ``Channel.move_cursor``); nothing here delays them.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import logging
import math
import time
from collections.abc import Callable, Sequence
from typing import Protocol

import grpc

from channel_service.alarm import Alarm
from channel_service.metrics import ChannelMetrics
from waddle_common.store_client import StoreUnavailable
from waddle_pb import store_pb2

log = logging.getLogger("channel.receipts")

ReceiptKey = tuple[str, str]  # (channel id, user id)
CursorKey = tuple[str, str]  # (user id, channel id), as the store names them


class CursorStore(Protocol):
    """The part of the store client the writer needs."""

    async def set_read_cursors(
        self, cursors: Sequence[tuple[str, str, int]]
    ) -> list[store_pb2.ReadCursor]: ...


class ReceiptCoalescer:
    """At most one receipt per key per ``interval``; the newest seq wins."""

    def __init__(self, interval: float = 1.0) -> None:
        self.interval = interval
        # Keys announced within the last interval, oldest first (a key sent
        # again moves to the end), so expired ones are dropped from the front.
        self._sent: dict[ReceiptKey, float] = {}
        self._pending: dict[ReceiptKey, int] = {}
        self._due: list[tuple[float, ReceiptKey]] = []  # heap; one entry per pending key

    def __len__(self) -> int:
        return len(self._pending)

    def offer(self, key: ReceiptKey, seq: int, now: float) -> int | None:
        """A cursor moved: the seq to announce now, or None when it waits."""
        self._forget_old(now)
        if key in self._pending:
            self._pending[key] = max(self._pending[key], seq)
            return None
        last = self._sent.get(key)
        if last is None:
            self._mark_sent(key, now)
            return seq
        self._pending[key] = seq
        heapq.heappush(self._due, (last + self.interval, key))
        return None

    def due(self, now: float) -> list[tuple[ReceiptKey, int]]:
        """Remove and return the coalesced receipts whose interval is over."""
        out: list[tuple[ReceiptKey, int]] = []
        while self._due and self._due[0][0] <= now:
            _, key = heapq.heappop(self._due)
            seq = self._pending.pop(key)
            self._mark_sent(key, now)
            out.append((key, seq))
        self._forget_old(now)
        return out

    def next_due(self) -> float | None:
        return self._due[0][0] if self._due else None

    def _mark_sent(self, key: ReceiptKey, now: float) -> None:
        self._sent.pop(key, None)
        self._sent[key] = now

    def forget_old(self, now: float) -> None:
        """Drop the memory of receipts sent more than an interval ago (that
        happens on every ``offer`` and ``due`` anyway; this is for a shard
        that wants it done now, e.g. before a channel hibernates)."""
        self._forget_old(now)

    def _forget_old(self, now: float) -> None:
        while self._sent:
            key, at = next(iter(self._sent.items()))
            if now - at < self.interval:
                return
            del self._sent[key]

    def clear(self) -> None:
        self._sent.clear()
        self._pending.clear()
        self._due.clear()


class CursorWriter:
    """Persists read cursors: one store call per round for every channel.

    Rounds are at least ``min_interval`` apart (from the end of one to the
    start of the next). A sender's cursor moves with every message it sends
    and a reader's with every message it reads, so without the pause a busy
    shard would make one store call per message; with it, every cursor that
    moved in the interval goes in one call, the newest seq of each. A
    cursor waits at most that long (plus the call) before it is stored;
    ``stop`` writes what is pending at once.
    """

    def __init__(
        self,
        store: CursorStore,
        metrics: ChannelMetrics,
        *,
        stored: Callable[[list[store_pb2.ReadCursor]], None],
        retry_initial: float = 0.05,
        retry_max: float = 1.0,
        max_batch: int = 5000,
        min_interval: float = 0.1,
    ) -> None:
        self.store = store
        self.metrics = metrics
        self._stored = stored
        self.retry_initial = retry_initial
        self.retry_max = retry_max
        self.max_batch = max_batch
        self.min_interval = min_interval
        self._pending: dict[CursorKey, int] = {}
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    @property
    def pending(self) -> int:
        return len(self._pending)

    def put(self, user_id: str, channel_id: str, seq: int) -> None:
        key = (user_id, channel_id)
        if seq > self._pending.get(key, 0):
            self._pending[key] = seq
            self._wake.set()

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="cursor-writer")

    async def stop(self) -> None:
        """Stop the writer after one last attempt to write what is pending."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        while self._pending:
            if not await self.write_round():
                return

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        delay = self.retry_initial
        last_round = -math.inf
        while True:
            if not self._pending:
                await self._wake.wait()
            self._wake.clear()
            wait = last_round + self.min_interval - loop.time()
            if wait > 0:
                await asyncio.sleep(wait)  # gather the cursors of the interval
            if not self._pending:
                continue
            if await self.write_round():
                delay = self.retry_initial
                last_round = loop.time()
                continue
            # The store is down: wait before the next attempt, keep
            # collecting (newer cursors replace older ones meanwhile).
            await asyncio.sleep(delay)
            delay = min(delay * 2, self.retry_max)

    async def write_round(self) -> bool:
        """Write up to ``max_batch`` pending cursors in one call; False if it must be retried."""
        keys = list(self._pending)[: self.max_batch]
        return await self._write({key: self._pending.pop(key) for key in keys})

    async def _write(self, batch: dict[CursorKey, int]) -> bool:
        try:
            stored = await self.store.set_read_cursors(
                [(user_id, channel_id, seq) for (user_id, channel_id), seq in batch.items()]
            )
        except asyncio.CancelledError:
            self._put_back(batch)
            raise
        except StoreUnavailable as exc:
            self.metrics.cursor_write_failures.inc()
            log.warning("read cursor write failed", extra={"error": str(exc), "count": len(batch)})
            self._put_back(batch)
            return False
        except grpc.aio.AioRpcError as exc:
            # Refused as such: the same request can never succeed. Split it
            # until the refused cursor stands alone, so it takes no other with it.
            if exc.code() is grpc.StatusCode.INVALID_ARGUMENT and len(batch) > 1:
                items = list(batch.items())
                first = await self._write(dict(items[: len(items) // 2]))
                return await self._write(dict(items[len(items) // 2 :])) and first
            self.metrics.cursor_write_failures.inc()
            log.error(
                "store refused read cursors",
                extra={"code": exc.code().name, "details": exc.details(), "count": len(batch)},
            )
            return True
        except Exception:
            self.metrics.cursor_write_failures.inc()
            log.exception("read cursor write failed")
            self._put_back(batch)
            return False
        self.metrics.reads_persisted.inc(len(batch))
        self._stored(stored)
        return True

    def _put_back(self, batch: dict[CursorKey, int]) -> None:
        for (user_id, channel_id), seq in batch.items():
            key = (user_id, channel_id)
            if seq > self._pending.get(key, 0):
                self._pending[key] = seq


class ReadReceipts:
    """The shard's outgoing read cursors: persisted by a ``CursorWriter``,
    announced through ``announce(channel_id, user_id, seq)`` coalesced."""

    def __init__(
        self,
        writer: CursorWriter,
        announce: Callable[[str, str, int], None],
        *,
        interval: float = 1.0,
    ) -> None:
        self.writer = writer
        self.coalescer = ReceiptCoalescer(interval)
        self._announce = announce
        self._alarm = Alarm("read-receipts", self._due)

    def start(self) -> None:
        self.writer.start()

    async def stop(self) -> None:
        self._alarm.cancel()
        self.coalescer.clear()
        await self.writer.stop()

    def moved(self, channel_id: str, user_id: str, seq: int, *, receipt: bool) -> None:
        """``user_id``'s cursor in ``channel_id`` moved to ``seq``: persist it, and
        announce it to the other members unless ``receipt`` is False."""
        self.writer.put(user_id, channel_id, seq)
        if not receipt:
            return
        now_seq = self.coalescer.offer((channel_id, user_id), seq, time.monotonic())
        if now_seq is not None:
            self._announce(channel_id, user_id, now_seq)
        else:
            self._alarm.arm(self.coalescer.next_due())

    def _due(self, now: float) -> float | None:
        for (channel_id, user_id), seq in self.coalescer.due(now):
            try:
                self._announce(channel_id, user_id, seq)
            except Exception:  # one failure must not drop the other receipts
                log.exception("read receipt failed", extra={"channel_id": channel_id})
        return self.coalescer.next_due()
