"""The PostgreSQL group commit on psycopg directly: one or two statements per commit.

The append transaction is the store's hot path. Through SQLAlchemy it took
eight round trips (pool pre-ping, BEGIN, four statements, COMMIT, the
pool's reset), each paying the async bridge's greenlet switch, statement
cache lookups and result wrapping. Here one dedicated psycopg connection
(autocommit, prepared statements), held by the repository and used by one
commit at a time, runs it as two statements:

1. ``read``: the heads of the batch's channels and the stored messages
   among its idempotency keys (one ``UNION ALL``).
2. ``write``: ONE statement, so one transaction, that compare-and-sets
   every moving head, creates the rows of channels getting their first
   messages, inserts the messages of exactly the channels whose head moved
   or whose row it created, and upserts the changed authors.

The repository decides fencing, numbering and duplicates in Python between
the two (``repository._plan``), as on the SQLAlchemy path. Nothing is
locked between them: the compare-and-set is the fence. A channel whose
head another writer moved after ``read`` (or whose row another writer
created) fails its compare-and-set and has nothing written; ``write``
returns the channels that did move so the caller fences the rest, which is
the answer that writer's commit would have given had it come first. Every
message insert moves its channel's head, so a duplicate key that appeared
after ``read`` moved that head too and is fenced, never inserted twice.

In the steady state (one store writing each channel) even ``read`` is
skipped: the connection remembers the heads it wrote, and a batch whose
every channel it remembers, and whose plan moves every one of them, goes
straight to ``write_guessed``, the same statement made all or nothing, so
that each remembered head is checked by its compare-and-set before anything
counts. A wrong guess (another writer moved a head, a key or message id is
stored already) writes nothing and the batch runs ``read`` then ``write``.

A connection that broke while idle (a database restart) is replaced before
anything is written: ``read`` reconnects and retries once, as the pool's
pre-ping does for the SQLAlchemy path, and a ``write_guessed`` that finds it
broken counts as a wrong guess (``read`` then reconnects). A failed ``write`` is raised as the
psycopg error; its statement wrote nothing unless it committed.
"""

from __future__ import annotations

import asyncio
import select
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import psycopg
import psycopg.errors
from sqlalchemy.ext.asyncio import AsyncEngine

from store_service.batch_sql import (
    HeadMove,
    MessageKey,
    MessageValues,
    NewHead,
    StoredRef,
    UserValues,
    pg_columns,
)
from store_service.db import DEFAULT_CONNECT_TIMEOUT_S

# Head rows have a NULL third column; message rows never do (user_id is NOT NULL).
_READ = (
    "SELECT id, last_seq, NULL::text, NULL::text, NULL::text, NULL::bigint"
    " FROM channels WHERE id = ANY(%s::text[])"
    " UNION ALL"
    " SELECT m.channel_id, m.seq, m.user_id, m.client_msg_id, m.id, m.created_at_ms"
    " FROM unnest(%s::text[], %s::text[], %s::text[]) AS k(channel_id, user_id, client_msg_id)"
    " JOIN messages AS m ON m.channel_id = k.channel_id AND m.user_id = k.user_id"
    " AND m.client_msg_id = k.client_msg_id"
)
_HEADS = "SELECT id, last_seq FROM channels WHERE id = ANY(%s::text[])"
# The sub-statements see one snapshot; ``ok`` (the heads that moved and the
# rows created) gates the messages. The messages' foreign key to a row
# created here is checked at the end of the statement, when the row exists.
_WRITE_CTES = (
    "WITH moved AS ("
    " UPDATE channels AS c SET last_seq = v.head"
    " FROM unnest(%s::text[], %s::bigint[], %s::bigint[]) AS v(id, expected, head)"
    " WHERE c.id = v.id AND c.last_seq = v.expected RETURNING c.id),"
    " created AS ("
    " INSERT INTO channels (id, last_seq) SELECT * FROM unnest(%s::text[], %s::bigint[])"
    " ON CONFLICT (id) DO NOTHING RETURNING id),"
    " ok AS (SELECT id FROM moved UNION ALL SELECT id FROM created),"
    " inserted AS ("
    " INSERT INTO messages (id, channel_id, seq, user_id, username, content, thread_id,"
    " client_msg_id, created_at_ms)"
    " SELECT * FROM unnest(%s::text[], %s::text[], %s::bigint[], %s::text[], %s::text[],"
    " %s::text[], %s::text[], %s::text[], %s::bigint[])"
    " AS r(id, channel_id, seq, user_id, username, content, thread_id, client_msg_id, ts)"
    " WHERE r.channel_id IN (SELECT id FROM ok)),"
    " authors AS ("
    " INSERT INTO users (id, username, avatar_url)"
    " SELECT * FROM unnest(%s::text[], %s::text[], %s::text[])"
    " ON CONFLICT (id) DO UPDATE SET username = excluded.username,"
    " avatar_url = excluded.avatar_url, updated_at = CURRENT_TIMESTAMP)"
)
_WRITE = _WRITE_CTES + " SELECT id FROM ok"
# The write on guessed heads must be all or nothing: when fewer heads moved
# than were guessed, the division fails the statement, which undoes all of it.
_WRITE_ALL = _WRITE_CTES + " SELECT 1 / (CASE WHEN count(*) = %s THEN 1 ELSE 0 END) FROM ok"

HEAD_CACHE_SIZE = 100_000
"""Channels whose head the connection remembers (the least recently written go first)."""


class PgAppendConnection:
    """One autocommit psycopg connection for appends, opened on first use.

    Hold ``lock`` from ``read`` to ``write``: one commit at a time.
    """

    def __init__(self, engine: AsyncEngine, *, head_cache_size: int = HEAD_CACHE_SIZE) -> None:
        args, params = engine.dialect.create_connect_args(engine.url)
        options: dict[str, Any] = dict(params)
        # SQLAlchemy's adapters are for its own statements; these use psycopg's.
        options.pop("context", None)
        options.setdefault("connect_timeout", DEFAULT_CONNECT_TIMEOUT_S)
        self._args: list[Any] = list(args)
        self._options = options
        self._conn: psycopg.AsyncConnection[Any] | None = None
        self.lock = asyncio.Lock()
        self._heads: dict[str, int] = {}  # oldest first
        self._head_cache_size = head_cache_size
        self.statements = 0  # sent, failed ones included (tests count them)

    async def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            await conn.close()

    def discard(self) -> None:
        """Drop the connection at once (after a failure that left it in an unknown state)."""
        conn, self._conn = self._conn, None
        if conn is not None and not conn.closed:
            conn.pgconn.finish()

    async def _connection(self) -> psycopg.AsyncConnection[Any]:
        conn = self._conn
        if conn is not None and (conn.closed or conn.broken or _readable(conn)):
            self.discard()
        if self._conn is None:
            self._conn = await psycopg.AsyncConnection.connect(
                *self._args, **self._options, autocommit=True, prepare_threshold=0
            )
        return self._conn

    # --- the heads this connection last wrote -------------------------------------

    def known_heads(self, ids: Sequence[str]) -> dict[str, int] | None:
        """The remembered head of every channel in ``ids``, or None if one is unknown."""
        heads = self._heads
        try:
            return {cid: heads[cid] for cid in ids}
        except KeyError:
            return None

    def remember(self, heads: Mapping[str, int]) -> None:
        for cid, seq in heads.items():
            self._heads.pop(cid, None)
            self._heads[cid] = seq
        while len(self._heads) > self._head_cache_size:
            del self._heads[next(iter(self._heads))]

    def forget(self, ids: Iterable[str] | None = None) -> None:
        """Forget the heads of ``ids`` (None: of every channel)."""
        if ids is None:
            self._heads.clear()
        else:
            for cid in ids:
                self._heads.pop(cid, None)

    async def write_guessed(
        self, moves: Sequence[HeadMove], rows: Sequence[MessageValues], users: Sequence[UserValues]
    ) -> bool:
        """``write`` on remembered heads, without ``read``: all or nothing.

        True: committed, every head in ``moves`` moved. False: nothing was
        written, because a head was not the one remembered (another writer
        moved it) or a row is already stored (a duplicate key, a reused id);
        ``read`` then ``write`` decide from what is stored.
        """
        conn = await self._connection()
        try:
            self.statements += 1
            await conn.execute(
                _WRITE_ALL,
                [
                    *pg_columns(moves, 3),
                    [],
                    [],
                    *pg_columns(rows, 9),
                    *pg_columns(users, 3),
                    len(moves),
                ],
            )
        except (psycopg.errors.DivisionByZero, psycopg.errors.UniqueViolation):
            return False
        except psycopg.OperationalError:
            if not conn.broken:
                raise
            # Broken before the idle check could see it (a backend terminated
            # a moment ago): as a wrong guess. ``read`` reconnects, and what is
            # stored decides; a statement that did commit shows as moved heads
            # and stored keys, so nothing is written twice.
            self.discard()
            return False
        return True

    # --- the two statements ---------------------------------------------------------

    async def read(
        self, ids: Sequence[str], keys: Sequence[MessageKey]
    ) -> tuple[dict[str, int], dict[MessageKey, StoredRef]]:
        """The heads of the existing channels among ``ids``; the stored among ``keys``."""
        params = [list(ids), *pg_columns(keys, 3)]
        conn = await self._connection()
        try:
            self.statements += 1
            cur = await conn.execute(_READ, params)
        except psycopg.OperationalError:
            if not conn.broken:
                raise
            # Broken while idle (the server restarted): a fresh connection, once.
            self.discard()
            self.statements += 1
            cur = await (await self._connection()).execute(_READ, params)
        heads: dict[str, int] = {}
        stored: dict[MessageKey, StoredRef] = {}
        for cid, seq, user_id, key, mid, ts in await cur.fetchall():
            if user_id is None:
                heads[cid] = int(seq)
            else:
                stored[(cid, user_id, key)] = (mid, int(seq), int(ts))
        return heads, stored

    async def write(
        self,
        cas: Sequence[HeadMove],
        new: Sequence[NewHead],
        rows: Sequence[MessageValues],
        users: Sequence[UserValues],
    ) -> set[str]:
        """Commit the head moves and new rows, the ``rows`` of the channels that moved,
        and ``users``; return the channels whose head moved or row was created."""
        conn = await self._connection()
        self.statements += 1
        cur = await conn.execute(
            _WRITE,
            [
                *pg_columns(cas, 3),
                *pg_columns(new, 2),
                *pg_columns(rows, 9),
                *pg_columns(users, 3),
            ],
        )
        return {cid for (cid,) in await cur.fetchall()}

    async def heads(self, ids: Sequence[str]) -> dict[str, int]:
        """The current heads of the existing channels among ``ids``."""
        self.statements += 1
        cur = await (await self._connection()).execute(_HEADS, (list(ids),))
        return {cid: int(seq) for cid, seq in await cur.fetchall()}


def _readable(conn: psycopg.AsyncConnection[Any]) -> bool:
    """Whether an idle connection has input: the server closed it or is about to.

    The server announces a restart or a terminated backend before it closes
    the socket; nothing else is sent to an idle connection that listens to
    no notifications. This is the cheap stand-in for a pre-ping.
    """
    readable, _, _ = select.select([conn.fileno()], [], [], 0)
    return bool(readable)
