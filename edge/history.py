"""``history`` frames: pages of a channel's (or one thread's) past, from the store.

A page is read from the store and answered with one ``history`` frame
{``channelId``, ``messages`` oldest first, ``hasMore``}. History spends the
same per-user and per-edge replay budget as ``sync`` (one token per message
returned), and a socket has at most ``MAX_IN_FLIGHT`` pages being read at
once: a client frame never starts unbounded work. Over either bound the
answer is ``rate_limited`` with ``retryAfterMs``; a store that cannot answer
gives ``unavailable``.
"""

from __future__ import annotations

import asyncio
import logging
import math
from typing import Any

import orjson

from edge.connection import Connection, Limits, State
from edge.metrics import EdgeMetrics
from edge.protocol import History
from edge.replay import ReplayBudgets
from waddle_common import wire
from waddle_common.store_client import StoreClient, StoreUnavailable, stored_to_body
from waddle_pb import store_pb2

log = logging.getLogger("edge.history")

MAX_IN_FLIGHT = 4
RETRY_BUSY_MS = 100


def history_body(m: store_pb2.StoredMessage) -> dict[str, Any]:
    body = stored_to_body(m)
    if m.reply_count:
        body["replyCount"] = m.reply_count
    return body


class HistoryServer:
    def __init__(
        self,
        store: StoreClient,
        budgets: ReplayBudgets,
        metrics: EdgeMetrics,
        limits: Limits,
    ) -> None:
        self.store = store
        self.budgets = budgets
        self.metrics = metrics
        self.limits = limits
        self._in_flight: dict[int, int] = {}  # per socket (the ws object's id)
        self._tasks: set[asyncio.Task[None]] = set()

    def request(self, conn: Connection, frame: History) -> None:
        key = id(conn.ws)
        busy = self._in_flight.get(key, 0)
        now = asyncio.get_running_loop().time()
        wait = self.budgets.admit(conn.identity.user_id, now)
        if busy >= MAX_IN_FLIGHT or wait:
            retry_ms = max(RETRY_BUSY_MS, math.ceil(wait * 1000))
            self._error(conn, wire.RATE_LIMITED, retryAfterMs=retry_ms)
            return
        self._in_flight[key] = busy + 1
        task = asyncio.create_task(self._serve(conn, frame, key))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _serve(self, conn: Connection, frame: History, key: int) -> None:
        try:
            page = await self.store.history(
                conn.channel_id,
                before_seq=frame.before_seq or 0,
                limit=frame.limit,
                thread_id=frame.thread_id or "",
            )
        except StoreUnavailable as exc:
            log.info(
                "history unavailable", extra={"channel_id": conn.channel_id, "error": str(exc)}
            )
            self._error(conn, wire.UNAVAILABLE, retryAfterMs=1000)
            return
        finally:
            left = self._in_flight.get(key, 1) - 1
            if left:
                self._in_flight[key] = left
            else:
                self._in_flight.pop(key, None)
        if conn.state is State.CLOSED:
            return
        messages = [history_body(m) for m in page.messages]
        self.budgets.charge(conn.identity.user_id, len(messages), asyncio.get_running_loop().time())
        body: dict[str, Any] = {
            "type": "history",
            "channelId": conn.channel_id,
            "messages": messages,
            "hasMore": page.has_more,
        }
        if frame.thread_id:
            body["threadId"] = frame.thread_id
        if frame.before_seq:
            body["beforeSeq"] = frame.before_seq
        conn.send(orjson.dumps(body), self.metrics, self.limits, "history")

    def _error(self, conn: Connection, kind: wire.ErrorKind, **extra: Any) -> None:
        payload = wire.error_frame(kind, channel_id=conn.channel_id, **extra)
        conn.send(payload, self.metrics, self.limits, "error")

    async def stop(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
