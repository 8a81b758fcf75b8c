"""The store's database layer: appends, the group committer, and the channel reads.

History pages live in ``history.py`` and read cursors in ``cursors.py``;
both build on the values, validation and ``Repository.timed`` defined here.

Plain dataclasses in, plain dataclasses out: no protobuf and no gRPC here
(``servicer.py`` translates). Failures are ``StoreError`` subclasses, which
the servicer maps to gRPC status codes in one place.

Appends are the hot path. ``Repository.append_many`` writes many callers'
requests in ONE transaction; ``AppendCommitter`` is the single task that
feeds it, merging every request that arrives while a commit is in flight
into the next transaction (group commit across callers). A transaction
runs a fixed handful of set-based statements (``batch_sql``), however many
channels and requests it holds: fencing, numbering and duplicate detection
are decided in Python between them (``_plan``). On PostgreSQL those
statements run on psycopg directly, two or (for channels whose head this
store wrote last) one per transaction (``pg_append``); SQLite, and the
per-request retry after a conflict, go through SQLAlchemy (``batch_sql``).

Sequence fencing: the owner of a channel states the head it believes in
(``expected_last_seq``); the new messages are numbered after it and the head
moves by a compare-and-set on ``channels.last_seq``. If the head moved (a
second owner wrote), the group is FENCED and none of its messages are
written, so two owners can never commit the same sequence number.

A channel has no row until its first message commits (or its settings are
written): loading or reading a channel never writes, so joins alone cannot
fill the ``channels`` table. A channel without a row reads as empty, at
head 0 with the default settings.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import time
from collections import OrderedDict, deque
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass, field, replace
from time import perf_counter
from typing import Any

import psycopg
from sqlalchemy import ColumnElement, Select, func, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import DataError, IntegrityError, SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from store_service.batch_sql import HeadMove, MessageKey, MessageValues, StoredRef, for_dialect
from store_service.db import writer
from store_service.metrics import StoreMetrics
from store_service.models import ChannelRow, MessageRow, UserRow
from store_service.pg_append import PgAppendConnection

log = logging.getLogger(__name__)

MAX_PAGE = 1000
"""Most messages one page (``MessagesAfter``/``RecentMessages``/``LoadChannel``) returns."""
MAX_SEQ = 2**63 - 1  # BIGINT
MAX_CONNECTIONS_LIMIT = 2**31 - 1  # INTEGER


# --- errors ---------------------------------------------------------------------


class StoreError(Exception):
    """Base of every error the store reports to its callers."""


class InvalidArgument(StoreError):
    """The request is malformed; retrying it unchanged cannot succeed."""


class NotFound(StoreError):
    """The named user or message does not exist."""


class Conflict(StoreError):
    """The request contradicts stored data (e.g. a message id reused with a new key)."""


class Unavailable(StoreError):
    """The database failed; nothing of the request was written and it may be retried."""


# --- values ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class NewMessage:
    """A message to append. ``client_msg_id`` is the idempotency key ("" = none)."""

    id: str
    user_id: str
    username: str
    content: str
    client_msg_id: str = ""
    avatar_url: str = ""
    thread_id: str | None = None
    timestamp_ms: int = 0  # 0: the store stamps the commit time

    @property
    def key(self) -> str:
        # Without a client key the message id is the key: a retry that reuses
        # the id is still recognised, and two keyless messages never collide
        # on the (channel_id, user_id, client_msg_id) unique constraint.
        return self.client_msg_id or self.id


@dataclass(frozen=True, slots=True)
class ChannelAppend:
    """All new messages of one channel in a request, numbered after ``expected_last_seq``."""

    channel_id: str
    expected_last_seq: int
    messages: Sequence[NewMessage] = ()


@dataclass(frozen=True, slots=True)
class AppendResult:
    id: str
    seq: int
    timestamp_ms: int
    duplicate: bool = False


class AppendStatus(enum.Enum):
    OK = "ok"
    FENCED = "fenced"


@dataclass(frozen=True, slots=True)
class ChannelAppendResult:
    channel_id: str
    status: AppendStatus
    last_seq: int  # the head after this group (OK) or the head that fenced it
    results: tuple[AppendResult, ...] = ()  # request order; empty when FENCED


@dataclass(frozen=True, slots=True)
class StoredMessage:
    id: str
    channel_id: str
    seq: int
    user_id: str
    username: str
    avatar_url: str
    content: str
    thread_id: str | None
    timestamp_ms: int
    client_msg_id: str
    reply_count: int = 0  # history pages only: replies in the thread this message roots


@dataclass(frozen=True, slots=True)
class MessagePage:
    messages: tuple[StoredMessage, ...]
    last_seq: int
    has_more: bool


@dataclass(frozen=True, slots=True)
class ChannelState:
    channel_id: str
    last_seq: int
    max_connections: int  # 0: the service default
    recent: tuple[StoredMessage, ...]


@dataclass(frozen=True, slots=True)
class User:
    id: str
    username: str
    avatar_url: str = ""


@dataclass(frozen=True, slots=True)
class ChannelSettings:
    channel_id: str
    max_connections: int = 0  # 0: the service default


AppendOutcome = tuple[ChannelAppendResult, ...] | StoreError


# --- validation -------------------------------------------------------------------


def check_text(value: str, what: str) -> None:
    """Raise ``InvalidArgument`` when ``value`` holds a NUL character."""
    # PostgreSQL text cannot hold NUL; failing that inside a merged commit
    # would fail every caller in it, so refuse it here, per request.
    if "\x00" in value:
        raise InvalidArgument(f"{what} contains a NUL character")


def require_id(value: str, what: str) -> None:
    """Raise ``InvalidArgument`` when ``value`` is empty or holds a NUL character."""
    if not value:
        raise InvalidArgument(f"{what} is required")
    check_text(value, what)


def validate_append(groups: Sequence[ChannelAppend]) -> None:
    """Raise ``InvalidArgument`` unless every group and message is well formed."""
    owners: dict[str, tuple[str, str, str]] = {}
    for group in groups:
        require_id(group.channel_id, "channel_id")
        if group.expected_last_seq < 0 or group.expected_last_seq + len(group.messages) > MAX_SEQ:
            raise InvalidArgument("expected_last_seq out of range")
        for m in group.messages:
            require_id(m.id, "message id")
            require_id(m.user_id, "user_id")
            for value, what in (
                (m.username, "username"),
                (m.avatar_url, "avatar_url"),
                (m.content, "content"),
                (m.client_msg_id, "client_msg_id"),
                (m.thread_id or "", "thread_id"),
            ):
                check_text(value, what)
            if not -MAX_SEQ <= m.timestamp_ms <= MAX_SEQ:
                raise InvalidArgument("timestamp_ms out of range")
            owner = (group.channel_id, m.user_id, m.key)
            if owners.setdefault(m.id, owner) != owner:
                raise InvalidArgument(f"message id {m.id} used for two different messages")


def _page_limit(limit: int) -> int:
    return limit if 0 < limit <= MAX_PAGE else MAX_PAGE


# --- the user cache ---------------------------------------------------------------


class _UserCache:
    """Last (username, avatar_url) written per user id, so unchanged authors cost no write.

    Bounded LRU. With several store replicas it can be stale; the worst case
    is one skipped profile refresh until the user's next change.
    """

    def __init__(self, capacity: int) -> None:
        self._capacity = capacity
        self._entries: OrderedDict[str, tuple[str, str]] = OrderedDict()

    def changed(self, users: Iterable[User]) -> list[User]:
        out = []
        for user in users:
            known = self._entries.get(user.id)
            if known == (user.username, user.avatar_url):
                self._entries.move_to_end(user.id)
            else:
                out.append(user)
        return out

    def remember(self, users: Iterable[User]) -> None:
        for user in users:
            self._entries[user.id] = (user.username, user.avatar_url)
            self._entries.move_to_end(user.id)
        while len(self._entries) > self._capacity:
            self._entries.popitem(last=False)


# --- planning a write ---------------------------------------------------------------


@dataclass(slots=True)
class _Plan:
    """What one write does, decided in Python before its statements run.

    ``rows[i]`` is the stored form of ``inserted[i]``.
    """

    results: list[tuple[ChannelAppendResult, ...]]  # one tuple per request
    rows: list[MessageValues]
    inserted: list[NewMessage]
    heads: dict[str, int]  # every channel's head after the write
    moves: list[HeadMove]  # one per channel whose head moves
    present: list[str] = field(default_factory=list)  # channels known to have a row after it

    def fence(self, current: dict[str, int]) -> None:
        """Refuse every group of the channels in ``current`` (their real heads)."""
        self.results = [
            tuple(
                ChannelAppendResult(r.channel_id, AppendStatus.FENCED, current.get(r.channel_id, 0))
                if r.channel_id in current
                else r
                for r in request
            )
            for request in self.results
        ]
        kept = [i for i, row in enumerate(self.rows) if row[1] not in current]
        self.rows = [self.rows[i] for i in kept]
        self.inserted = [self.inserted[i] for i in kept]
        self.moves = [move for move in self.moves if move[0] not in current]
        self.heads.update(current)


def _plan(
    requests: Sequence[Sequence[ChannelAppend]],
    heads: dict[str, int],
    stored: dict[MessageKey, StoredRef],
    now_ms: int,
) -> _Plan:
    """Fence, number and deduplicate ``requests`` in order, as if written one group at a time.

    A group is FENCED unless it expects the channel's head as the groups
    before it left it; its messages are numbered after that head, skipping
    keys already ``stored`` or written earlier in this write (both answer
    with the original).
    """
    head = dict(heads)
    fresh: dict[MessageKey, AppendResult] = {}
    rows: list[MessageValues] = []
    inserted: list[NewMessage] = []
    results: list[tuple[ChannelAppendResult, ...]] = []
    for groups in requests:
        request: list[ChannelAppendResult] = []
        for group in groups:
            cid = group.channel_id
            seq = head.get(cid, 0)
            # Checked even when every message is a duplicate: a stale owner
            # must learn that it is stale.
            if group.expected_last_seq != seq:
                request.append(ChannelAppendResult(cid, AppendStatus.FENCED, seq))
                continue
            appended: list[AppendResult] = []
            for m in group.messages:
                key = (cid, m.user_id, m.key)
                if (original := stored.get(key)) is not None:
                    appended.append(AppendResult(*original, duplicate=True))
                elif key in fresh:
                    appended.append(replace(fresh[key], duplicate=True))
                else:
                    seq += 1
                    ts = m.timestamp_ms if m.timestamp_ms > 0 else now_ms
                    fresh[key] = AppendResult(m.id, seq, ts)
                    appended.append(fresh[key])
                    inserted.append(m)
                    rows.append(
                        (
                            m.id,
                            cid,
                            seq,
                            m.user_id,
                            m.username,
                            m.content,
                            m.thread_id or None,
                            m.key,
                            ts,
                        )
                    )
            head[cid] = seq
            request.append(ChannelAppendResult(cid, AppendStatus.OK, seq, tuple(appended)))
        results.append(tuple(request))
    moves = [(cid, heads.get(cid, 0), new) for cid, new in head.items() if new != heads.get(cid, 0)]
    return _Plan(results, rows, inserted, head, moves)


# --- the repository ---------------------------------------------------------------


class Repository:
    """All reads and writes of the store, over one ``AsyncEngine``."""

    def __init__(
        self,
        engine: AsyncEngine,
        metrics: StoreMetrics | None = None,
        *,
        user_cache_size: int = 100_000,
    ) -> None:
        self._engine = engine
        self._writer = writer(engine)
        self.metrics = metrics if metrics is not None else StoreMetrics()
        self._users = _UserCache(user_cache_size)
        self._postgres = engine.dialect.name == "postgresql"
        self._upsert: Callable[[Any], Any] = postgresql.insert if self._postgres else sqlite.insert
        self._sql = for_dialect(engine.dialect.name)
        # PostgreSQL appends bypass SQLAlchemy (see pg_append); SQLite's stay on it.
        self._pg = PgAppendConnection(engine) if self._postgres else None

    @property
    def engine(self) -> AsyncEngine:
        return self._engine

    async def close(self) -> None:
        """Close the append connection (PostgreSQL); the engine is the caller's."""
        if self._pg is not None:
            async with self._pg.lock:
                await self._pg.close()

    # --- append ---------------------------------------------------------------

    async def append_batch(
        self, groups: Sequence[ChannelAppend]
    ) -> tuple[ChannelAppendResult, ...]:
        """Append one request in its own transaction (no merging with other callers)."""
        [outcome] = await self.append_many([groups])
        if isinstance(outcome, StoreError):
            raise outcome
        return outcome

    async def append_many(self, requests: Sequence[Sequence[ChannelAppend]]) -> list[AppendOutcome]:
        """Write every request in ONE transaction; return one outcome per request.

        An outcome is the request's per-group results or the ``StoreError``
        that request alone failed with (invalid, or conflicting with stored
        rows: each request runs in its own SAVEPOINT when there are several,
        so one bad request cannot fail the others). A database failure fails
        every request with ``Unavailable`` and writes nothing.
        """
        outcomes: list[AppendOutcome | None] = [None] * len(requests)
        valid: list[int] = []
        for i, groups in enumerate(requests):
            try:
                validate_append(groups)
            except InvalidArgument as exc:
                outcomes[i] = exc
            else:
                valid.append(i)
        if valid:
            batch = [requests[i] for i in valid]
            for i, outcome in zip(valid, await self._commit(batch), strict=True):
                outcomes[i] = outcome
        return [o for o in outcomes if o is not None]

    async def _commit(self, batch: list[Sequence[ChannelAppend]]) -> list[AppendOutcome]:
        start = perf_counter()
        try:
            try:
                if self._pg is not None:
                    outcomes, written = await self._pg_transaction(self._pg, batch)
                else:
                    outcomes, written = await self._transaction(batch, isolate=False)
            except (IntegrityError, DataError, psycopg.IntegrityError, psycopg.DataError) as exc:
                if len(batch) == 1:
                    return [_request_error(exc)]
                # One of the merged requests conflicts with stored rows (say, a
                # reused message id). That is rare, so the whole batch first
                # runs as one set of statements; now it runs again with every
                # request in a SAVEPOINT of its own, so that the bad one fails
                # alone. Nothing of the first try was committed.
                log.debug(
                    "merged append failed; retrying request by request",
                    extra={"requests": len(batch), "error": type(exc).__name__},
                )
                if self._pg is not None:
                    self._pg.forget()  # heads written behind its back
                outcomes, written = await self._transaction(batch, isolate=True)
        except (SQLAlchemyError, psycopg.Error) as exc:
            return self._failed_commit(batch, exc)
        finally:
            self.metrics.append_seconds.observe(perf_counter() - start)
        self._users.remember(written)
        self.metrics.append_batch_size.observe(
            sum(len(g.messages) for groups in batch for g in groups)
        )
        return outcomes

    def _failed_commit(
        self, batch: list[Sequence[ChannelAppend]], exc: SQLAlchemyError | psycopg.Error
    ) -> list[AppendOutcome]:
        self.metrics.errors.labels(op="append").inc()
        log.warning(
            "append transaction failed",
            extra={"requests": len(batch), "error": type(exc).__name__},
            exc_info=exc,
        )
        return [Unavailable("database unavailable; nothing was written") for _ in batch]

    async def _pg_transaction(
        self, pg: PgAppendConnection, batch: list[Sequence[ChannelAppend]]
    ) -> tuple[list[AppendOutcome], list[User]]:
        """``_append_tx`` without SAVEPOINTs, as one or two of ``pg``'s statements.

        The same decisions: heads and duplicates read, ``_plan``, then one
        statement that compare-and-sets, creates, inserts and upserts; the
        channels whose head did not move in it are fenced.

        When ``pg`` remembers the head of every channel of the batch (it
        wrote them last) the read is skipped: the batch is planned on those
        heads with nothing stored, and written only if the plan moves every
        channel, so that every head it was planned on is checked by its
        compare-and-set. That write is all or nothing; if a head moved or a
        key is stored after all, nothing is written and the batch runs on
        what ``read`` finds.
        """
        now_ms = time.time_ns() // 1_000_000
        ids = sorted({g.channel_id for groups in batch for g in groups})
        keys = _message_keys(batch)
        async with pg.lock:
            try:
                known = pg.known_heads(ids)
                if known is not None:
                    plan = _plan(batch, known, {}, now_ms)
                    if len(plan.moves) == len(ids):
                        written = self._users.changed(_authors(plan.inserted))
                        if await pg.write_guessed(plan.moves, plan.rows, _user_rows(written)):
                            pg.remember(plan.heads)
                            outcomes: list[AppendOutcome] = list(plan.results)
                            return outcomes, written
                    pg.forget(ids)
                heads, stored = await pg.read(ids, keys)
                plan = _plan(batch, heads, stored, now_ms)
                cas = [move for move in plan.moves if move[0] in heads]
                new = sorted((cid, head) for cid, _, head in plan.moves if cid not in heads)
                written = self._users.changed(_authors(plan.inserted))
                moved = await pg.write(cas, new, plan.rows, _user_rows(written))
                stale = [cid for cid, _, _ in plan.moves if cid not in moved]
                if stale:
                    # Another writer moved the head (or created the row)
                    # since it was read. Nothing of these channels was written.
                    log.warning(
                        "channel head moved under the commit", extra={"channels": len(stale)}
                    )
                    current = await pg.heads(stale)
                    plan.fence({cid: current.get(cid, 0) for cid in stale})
                # Heads read or written here; a wrong one only costs a read.
                pg.remember(
                    {
                        cid: plan.heads[cid]
                        for cid in ids
                        if (cid in heads or cid in moved) and cid not in stale
                    }
                )
            except psycopg.Error:
                pg.forget()  # the connection, if broken, is replaced on next use
                raise
            except BaseException:
                pg.forget()
                pg.discard()  # cancelled mid-statement: its state is unknown
                raise
        outcomes = list(plan.results)
        return outcomes, written

    async def _transaction(
        self, batch: list[Sequence[ChannelAppend]], *, isolate: bool
    ) -> tuple[list[AppendOutcome], list[User]]:
        async with self._writer.begin() as conn:
            return await self._append_tx(conn, batch, isolate=isolate)

    async def _append_tx(
        self, conn: AsyncConnection, batch: list[Sequence[ChannelAppend]], *, isolate: bool
    ) -> tuple[list[AppendOutcome], list[User]]:
        """Write ``batch`` in the open transaction ``conn``.

        The number of statements does not depend on the number of channel
        groups: read (and on PostgreSQL lock) the head of every existing
        channel, then per write (the whole batch, or each request in its
        SAVEPOINT when ``isolate``) one duplicate lookup, one compare-and-set
        of the moving heads, one insert of the rows of channels getting their
        first messages and one insert of messages; last, one upsert of the
        authors.
        """
        now_ms = time.time_ns() // 1_000_000
        ids = sorted({g.channel_id for groups in batch for g in groups})
        heads: dict[str, int] = {}
        if ids:
            heads = await self._sql.lock_heads(conn, ids)
        existing = set(heads)
        outcomes: list[AppendOutcome] = []
        inserted: list[NewMessage] = []
        if isolate:
            # Here new channel rows are created request by request, not in
            # one id order: two replicas creating the same new channels at
            # once could deadlock, which PostgreSQL breaks by failing one
            # commit (Unavailable, nothing written, retried by its caller).
            for groups in batch:
                try:
                    async with conn.begin_nested():
                        plan = await self._write(conn, [groups], heads, existing, now_ms)
                except (IntegrityError, DataError) as exc:
                    outcomes.append(_request_error(exc))
                    continue
                # Only a request that committed to its savepoint moves the
                # heads (and creates the rows) the next request is checked
                # against.
                heads = plan.heads
                existing.update(plan.present)
                outcomes.extend(plan.results)
                inserted.extend(plan.inserted)
        else:
            plan = await self._write(conn, batch, heads, existing, now_ms)
            outcomes.extend(plan.results)
            inserted = plan.inserted
        written = self._users.changed(_authors(inserted))
        await self._write_users(conn, written)
        return outcomes, written

    async def _write(
        self,
        conn: AsyncConnection,
        requests: Sequence[Sequence[ChannelAppend]],
        heads: dict[str, int],
        existing: set[str],
        now_ms: int,
    ) -> _Plan:
        """Append ``requests`` in order against ``heads`` (read under the lock).

        ``existing``: the channels with a row in this transaction; any other
        channel is at head 0 and gets its row here, with its first messages.
        """
        keys = _message_keys(requests)
        stored = await self._sql.stored(conn, keys) if keys else {}
        plan = _plan(requests, heads, stored, now_ms)
        if plan.moves:
            # The fence itself: a compare-and-set of every moving head. The
            # heads were read under the row locks (PostgreSQL) or SQLite's
            # write lock, so every head should match; one that does not
            # moved behind the lock's back, and its groups are refused.
            moves = plan.moves
            cas = [move for move in moves if move[0] in existing]
            new = sorted((cid, head) for cid, _, head in moves if cid not in existing)
            moved = await self._sql.move_heads(conn, cas) if cas else set()
            if new:
                # A channel's row is born at its head with its first
                # messages. A row another writer created since the heads were
                # read (nothing could be locked then) is left alone, and its
                # groups are fenced like any head that moved.
                moved |= await self._sql.create_channels(conn, new)
            plan.present = [cid for cid, _, _ in moves]
            stale = [cid for cid, _, _ in moves if cid not in moved]
            if stale:
                log.warning("channel head moved under the commit", extra={"channels": len(stale)})
                current = await self._sql.heads(conn, stale)
                plan.fence({cid: current.get(cid, 0) for cid in stale})
        if plan.rows:
            await self._sql.insert_messages(conn, plan.rows)
        return plan

    async def _write_users(self, conn: AsyncConnection, users: Sequence[User]) -> None:
        if users:
            await self._sql.upsert_users(
                conn,
                [(u.id, u.username, u.avatar_url) for u in sorted(users, key=lambda u: u.id)],
            )

    # --- reads ----------------------------------------------------------------

    @asynccontextmanager
    async def timed(self, name: str) -> AsyncIterator[None]:
        """Time the block as query ``name``; a database error in it becomes ``Unavailable``."""
        start = perf_counter()
        try:
            yield
        except SQLAlchemyError as exc:
            self.metrics.errors.labels(op=name).inc()
            log.warning("query failed", extra={"query": name}, exc_info=exc)
            raise Unavailable(f"database unavailable ({name})") from exc
        finally:
            self.metrics.query_seconds.labels(query=name).observe(perf_counter() - start)

    async def load_channel(self, channel_id: str, recent_limit: int) -> ChannelState:
        """The channel's head, settings and newest ``recent_limit`` messages.

        Read-only. A channel without a row (no message, no settings yet) is
        empty: head 0, the default settings, no messages.
        """
        require_id(channel_id, "channel_id")
        limit = min(max(recent_limit, 0), MAX_PAGE)
        async with self.timed("load_channel"), self._engine.connect() as conn:
            row = (
                await conn.execute(
                    select(ChannelRow.last_seq, ChannelRow.max_connections).where(
                        ChannelRow.id == channel_id
                    )
                )
            ).first()
            if row is None:
                return ChannelState(channel_id, 0, 0, ())
            head = int(row.last_seq)
            recent, _ = await self._recent(conn, channel_id, head, limit)
        return ChannelState(channel_id, head, int(row.max_connections or 0), recent)

    async def messages_after(
        self,
        channel_id: str,
        *,
        after_seq: int = 0,
        after_message_id: str | None = None,
        limit: int = 0,
    ) -> MessagePage:
        """Messages strictly after ``after_seq`` (or after ``after_message_id``), in seq order.

        ``limit`` is capped at ``MAX_PAGE``; 0 means the cap. Raises
        ``NotFound("Unknown message id")`` when the id is not in the channel.
        """
        require_id(channel_id, "channel_id")
        if after_message_id is not None:
            require_id(after_message_id, "after_message_id")
        cap = _page_limit(limit)
        async with self.timed("messages_after"), self._engine.connect() as conn:
            head = await read_head(conn, channel_id)
            after = min(max(after_seq, 0), MAX_SEQ)
            if after_message_id is not None:
                seq = await conn.scalar(
                    select(MessageRow.seq).where(
                        MessageRow.channel_id == channel_id, MessageRow.id == after_message_id
                    )
                )
                if seq is None:
                    raise NotFound("Unknown message id")
                after = int(seq)
            if head is None:
                return MessagePage((), 0, False)
            # Bounded by the head read first, so the page and last_seq agree
            # even under READ COMMITTED with appends landing in between.
            rows = await conn.execute(after_query(channel_id, after, head, cap + 1))
            messages = [stored_message(r) for r in rows]
        return MessagePage(tuple(messages[:cap]), head, len(messages) > cap)

    async def recent_messages(self, channel_id: str, limit: int = 0) -> MessagePage:
        """The newest ``limit`` messages (capped; 0 = the cap), oldest first.

        ``has_more`` says whether older messages exist.
        """
        require_id(channel_id, "channel_id")
        cap = _page_limit(limit)
        async with self.timed("recent_messages"), self._engine.connect() as conn:
            head = await read_head(conn, channel_id)
            if head is None:
                return MessagePage((), 0, False)
            messages, has_more = await self._recent(conn, channel_id, head, cap)
        return MessagePage(messages, head, has_more)

    async def _recent(
        self, conn: AsyncConnection, channel_id: str, head: int, limit: int
    ) -> tuple[tuple[StoredMessage, ...], bool]:
        if limit <= 0:
            return (), False
        rows = await conn.execute(recent_query(channel_id, head, limit + 1))
        newest_first = [stored_message(r) for r in rows]
        return tuple(reversed(newest_first[:limit])), len(newest_first) > limit

    # --- users and settings -------------------------------------------------------

    async def upsert_users(self, users: Sequence[User]) -> int:
        """Insert or update profiles; return how many distinct users were given."""
        latest: dict[str, User] = {}
        for user in users:
            require_id(user.id, "user id")
            check_text(user.username, "username")
            check_text(user.avatar_url, "avatar_url")
            latest[user.id] = user
        changed = self._users.changed(latest.values())
        if changed:
            async with self.timed("upsert_users"), self._writer.begin() as conn:
                await self._write_users(conn, changed)
            self._users.remember(changed)
        return len(latest)

    async def get_user(self, user_id: str) -> User:
        require_id(user_id, "user id")
        async with self.timed("get_user"), self._engine.connect() as conn:
            row = (
                await conn.execute(
                    select(UserRow.id, UserRow.username, UserRow.avatar_url).where(
                        UserRow.id == user_id
                    )
                )
            ).first()
        if row is None:
            raise NotFound("Unknown user")
        return User(row.id, row.username, row.avatar_url)

    async def update_channel_settings(self, settings: ChannelSettings) -> ChannelSettings:
        """Store the channel's settings, creating the channel's row when missing."""
        require_id(settings.channel_id, "channel_id")
        if not 0 <= settings.max_connections <= MAX_CONNECTIONS_LIMIT:
            raise InvalidArgument("max_connections out of range")
        value = settings.max_connections or None
        stmt = self._upsert(ChannelRow).values(id=settings.channel_id, max_connections=value)
        async with self.timed("update_channel_settings"), self._writer.begin() as conn:
            await conn.execute(
                stmt.on_conflict_do_update(
                    index_elements=[ChannelRow.id], set_={"max_connections": value}
                )
            )
        return ChannelSettings(settings.channel_id, settings.max_connections)


def _message_keys(requests: Iterable[Sequence[ChannelAppend]]) -> list[MessageKey]:
    """The idempotency keys of every message of ``requests``, each once, in order."""
    return list(
        dict.fromkeys(
            (g.channel_id, m.user_id, m.key)
            for groups in requests
            for g in groups
            for m in g.messages
        )
    )


def _authors(inserted: Iterable[NewMessage]) -> list[User]:
    """The latest profile of each author of ``inserted``."""
    authors: dict[str, User] = {}
    for m in inserted:
        # An empty name would erase a known one; the snapshot in the
        # message row still has whatever was sent.
        if m.username:
            authors[m.user_id] = User(m.user_id, m.username, m.avatar_url)
    return list(authors.values())


def _user_rows(users: Iterable[User]) -> list[tuple[str, str, str]]:
    """``users`` as rows, sorted by id (so replicas lock them in one order)."""
    return sorted((u.id, u.username, u.avatar_url) for u in users)


def _request_error(exc: SQLAlchemyError | psycopg.Error) -> StoreError:
    if isinstance(exc, DataError | psycopg.DataError):
        return InvalidArgument("a value does not fit the database column")
    return Conflict("append conflicts with stored messages (message id reused?)")


def message_select() -> Select[*tuple[Any, ...]]:
    """The columns of a ``StoredMessage``, with the author's current profile.

    ``stored_message`` reads them by position: keep the two in step.
    """
    # The current profile wins over the snapshot taken at write time; the
    # snapshot covers users the store never saw a profile for.
    username: ColumnElement[str] = func.coalesce(
        func.nullif(UserRow.username, ""), MessageRow.username
    )
    return select(
        MessageRow.id,
        MessageRow.channel_id,
        MessageRow.seq,
        MessageRow.user_id,
        username.label("username"),
        func.coalesce(UserRow.avatar_url, "").label("avatar_url"),
        MessageRow.content,
        MessageRow.thread_id,
        MessageRow.created_at_ms,
        MessageRow.client_msg_id,
    ).outerjoin(UserRow, UserRow.id == MessageRow.user_id)


def after_query(channel_id: str, after: int, head: int, limit: int) -> Select[*tuple[Any, ...]]:
    """Up to ``limit`` messages with ``after < seq <= head``, oldest first."""
    return (
        message_select()
        .where(
            MessageRow.channel_id == channel_id,
            MessageRow.seq > after,
            MessageRow.seq <= head,
        )
        .order_by(MessageRow.seq)
        .limit(limit)
    )


def recent_query(channel_id: str, head: int, limit: int) -> Select[*tuple[Any, ...]]:
    """Up to ``limit`` messages with ``seq <= head``, NEWEST first."""
    return (
        message_select()
        .where(MessageRow.channel_id == channel_id, MessageRow.seq <= head)
        .order_by(MessageRow.seq.desc())
        .limit(limit)
    )


async def read_head(conn: AsyncConnection, channel_id: str) -> int | None:
    """The channel's ``last_seq``, or None when it has no row (never written)."""
    head = await conn.scalar(select(ChannelRow.last_seq).where(ChannelRow.id == channel_id))
    return None if head is None else int(head)


def stored_message(row: Any, reply_count: int = 0) -> StoredMessage:
    """A row of ``message_select()`` (its first ten columns) as a ``StoredMessage``."""
    # By position, in message_select()'s order: a page converts up to a
    # hundred rows, and named access costs a lookup per field.
    mid, channel_id, seq, user_id, username, avatar_url, content, thread_id, ts, key = row[:10]
    return StoredMessage(
        id=mid,
        channel_id=channel_id,
        seq=int(seq),
        user_id=user_id,
        username=username,
        avatar_url=avatar_url,
        content=content,
        thread_id=thread_id,
        timestamp_ms=int(ts),
        # A keyless message is stored under its own id (see NewMessage.key);
        # report it as keyless, the way it was sent.
        client_msg_id="" if key == mid else key,
        reply_count=reply_count,
    )


# --- group commit across callers ------------------------------------------------------


@dataclass(slots=True)
class _Pending:
    groups: Sequence[ChannelAppend]
    size: int
    future: asyncio.Future[tuple[ChannelAppendResult, ...]] = field(repr=False)


class AppendCommitter:
    """The single task that commits appends, merging concurrent callers.

    ``append`` queues a request and waits for its own results. The task takes
    everything queued (up to ``max_requests``/``max_messages``) into one
    transaction; requests that arrive while that commit is in flight wait
    for, and share, the next one. A caller that gives up (cancelled) before
    its request is taken is dropped; after that, its request commits anyway
    and a retry with the same idempotency keys gets the originals back.
    """

    def __init__(
        self,
        repository: Repository,
        *,
        max_requests: int = 256,
        max_messages: int = 5000,
    ) -> None:
        self._repository = repository
        self._max_requests = max_requests
        self._max_messages = max_messages
        self._queue: deque[_Pending] = deque()
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self.in_flight = 0
        """Requests in the transaction being committed right now."""

    @property
    def queued(self) -> int:
        """Requests waiting for the next transaction."""
        return len(self._queue)

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(
                self._run(), name="store-append-committer"
            )

    async def __aenter__(self) -> AppendCommitter:
        self.start()
        return self

    async def __aexit__(self, *_exc: object) -> None:
        await self.close()

    async def append(self, groups: Sequence[ChannelAppend]) -> tuple[ChannelAppendResult, ...]:
        """Commit ``groups`` (one request) with whatever else is queued; return its results."""
        validate_append(groups)  # a malformed request fails alone, before it queues
        if self._task is None or self._closing:
            raise Unavailable("store is shutting down")
        future: asyncio.Future[tuple[ChannelAppendResult, ...]] = (
            asyncio.get_running_loop().create_future()
        )
        self._queue.append(_Pending(groups, sum(len(g.messages) for g in groups), future))
        self._wakeup.set()
        return await future

    async def close(self, timeout: float | None = None) -> None:
        """Commit what is queued, then stop; after ``timeout`` seconds, abandon it."""
        self._closing = True
        self._wakeup.set()
        task = self._task
        if task is None:
            return
        try:
            await asyncio.wait_for(asyncio.shield(task), timeout)
        except TimeoutError:
            task.cancel()
            with suppress(asyncio.CancelledError):
                await task
        for pending in self._queue:
            pending.future.cancel()
        self._queue.clear()

    def _take(self) -> list[_Pending]:
        batch: list[_Pending] = []
        messages = 0
        while self._queue and len(batch) < self._max_requests:
            nxt = self._queue[0]
            if batch and messages + nxt.size > self._max_messages:
                break
            self._queue.popleft()
            if nxt.future.done():  # its caller gave up
                continue
            batch.append(nxt)
            messages += nxt.size
        return batch

    async def _run(self) -> None:
        while True:
            if not self._queue:
                if self._closing:
                    return
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            batch = self._take()
            if not batch:
                continue
            self.in_flight = len(batch)
            try:
                outcomes = await self._repository.append_many([p.groups for p in batch])
            except asyncio.CancelledError:
                for pending in batch:
                    pending.future.cancel()
                raise
            except Exception:
                # append_many turns database errors into outcomes; anything
                # else is a bug, and the committer must outlive it.
                log.exception("append committer failed")
                outcomes = [Unavailable("append failed") for _ in batch]
            finally:
                self.in_flight = 0
            for pending, outcome in zip(batch, outcomes, strict=True):
                if pending.future.done():
                    continue
                if isinstance(outcome, StoreError):
                    pending.future.set_exception(outcome)
                else:
                    pending.future.set_result(outcome)
