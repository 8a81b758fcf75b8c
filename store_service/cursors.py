"""Read cursors: how far each user has read each channel.

One row per (user_id, channel_id) in ``read_cursors`` with the highest seq
read. ``ReadCursors.set`` writes a batch (many users and channels) in one
transaction and one upsert statement per dialect (SQLite: per chunk of
``SQLITE_MAX_PARAMS``), decided in the database, so that concurrent writers
cannot move a cursor back:

* a cursor never moves back: the upsert keeps ``GREATEST`` (PostgreSQL) /
  ``MAX`` (SQLite) of the stored and the written seq, and skips the row
  when the write is not newer (no dead row versions for repeated writes);
* a cursor never passes its channel's head: a seq beyond ``channels.last_seq``
  is stored as the head (0 for a channel without a row), so one bogus write
  cannot pin a cursor far ahead for good. Writing a cursor never creates a
  channel row.

Every write answers with the values stored after it, in request order: a
stale write answers with the newer stored value. Keys the upsert skipped
are read back in the same transaction. PostgreSQL takes the row locks in
(user_id, channel_id) order, so concurrent batches cannot deadlock.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass

from sqlalchemy import select, text
from sqlalchemy.ext.asyncio import AsyncConnection

from store_service.batch_sql import fetch_all, flat, pg_columns, sqlite_chunks, sqlite_values
from store_service.db import writer
from store_service.models import ReadCursorRow
from store_service.repository import MAX_SEQ, InvalidArgument, Repository, require_id

MAX_CURSOR_BATCH = 10_000
"""Most cursors one ``SetReadCursors`` call may write (a larger batch is
``InvalidArgument``; split it)."""

CursorKey = tuple[str, str]
"""(user_id, channel_id)."""


@dataclass(frozen=True, slots=True)
class ReadCursor:
    user_id: str
    channel_id: str
    seq: int  # 0: nothing read


def validate_cursors(cursors: Sequence[ReadCursor]) -> None:
    """Raise ``InvalidArgument`` unless every cursor is well formed."""
    if len(cursors) > MAX_CURSOR_BATCH:
        raise InvalidArgument(f"at most {MAX_CURSOR_BATCH} cursors per call, got {len(cursors)}")
    for cursor in cursors:
        require_id(cursor.user_id, "user_id")
        require_id(cursor.channel_id, "channel_id")
        if not 0 <= cursor.seq <= MAX_SEQ:
            raise InvalidArgument("seq out of range")


class ReadCursors:
    """Read cursors over a ``Repository``'s engine, timed in its metrics.

    Query timings: ``waddle_store_query_seconds{query="set_read_cursors"}``,
    ``{query="get_read_cursor"}`` and ``{query="get_read_cursors"}``.
    """

    def __init__(self, repository: Repository) -> None:
        self._repository = repository
        self._writer = writer(repository.engine)
        self._sql = _for_dialect(repository.engine.dialect.name)

    async def set(self, cursors: Sequence[ReadCursor]) -> tuple[ReadCursor, ...]:
        """Move each cursor forward to its seq (never back); return the stored cursors.

        One result per given cursor, in the same order (a key given twice
        is written once, with the higher seq). Raises ``InvalidArgument``
        for a malformed batch (nothing written) and ``Unavailable`` when the
        database fails (nothing written).
        """
        validate_cursors(cursors)
        wanted: dict[CursorKey, int] = {}
        for c in cursors:
            key = (c.user_id, c.channel_id)
            wanted[key] = max(wanted.get(key, 0), c.seq)
        if not wanted:
            return ()
        rows = sorted((user, channel, seq) for (user, channel), seq in wanted.items())
        async with self._repository.timed("set_read_cursors"), self._writer.begin() as conn:
            stored = await self._sql.upsert(conn, rows)
            skipped = [key for key in wanted if key not in stored]
            if skipped:
                stored.update(await self._sql.read(conn, skipped))
        return tuple(
            ReadCursor(c.user_id, c.channel_id, stored[(c.user_id, c.channel_id)]) for c in cursors
        )

    async def get(self, user_id: str, channel_id: str) -> int:
        """The user's cursor in the channel; 0 when none was written."""
        require_id(user_id, "user_id")
        require_id(channel_id, "channel_id")
        statement = select(ReadCursorRow.seq).where(
            ReadCursorRow.user_id == user_id, ReadCursorRow.channel_id == channel_id
        )
        async with (
            self._repository.timed("get_read_cursor"),
            self._repository.engine.connect() as conn,
        ):
            seq = await conn.scalar(statement)
        return 0 if seq is None else int(seq)

    async def get_many(self, keys: Sequence[CursorKey]) -> tuple[int, ...]:
        """The cursor of each (user_id, channel_id), in order; 0 where none was written.

        One query for the whole batch (SQLite: per chunk of ``SQLITE_MAX_PARAMS``),
        the same read ``set`` uses for the keys its upsert skipped. At most
        ``MAX_CURSOR_BATCH`` keys (``InvalidArgument`` otherwise, or for a
        malformed key).
        """
        if len(keys) > MAX_CURSOR_BATCH:
            raise InvalidArgument(f"at most {MAX_CURSOR_BATCH} keys per call, got {len(keys)}")
        for user_id, channel_id in keys:
            require_id(user_id, "user_id")
            require_id(channel_id, "channel_id")
        distinct = list(dict.fromkeys(keys))
        if not distinct:
            return ()
        async with (
            self._repository.timed("get_read_cursors"),
            self._repository.engine.connect() as conn,
        ):
            found = await self._sql.read(conn, distinct)
        return tuple(found.get(key, 0) for key in keys)


# --- the statements, per dialect -------------------------------------------------------


class _CursorSQL(ABC):
    @abstractmethod
    async def upsert(
        self, conn: AsyncConnection, rows: Sequence[tuple[str, str, int]]
    ) -> dict[CursorKey, int]:
        """Write ``rows`` (distinct keys, sorted); return the cursors the write moved."""

    @abstractmethod
    async def read(self, conn: AsyncConnection, keys: Sequence[CursorKey]) -> dict[CursorKey, int]:
        """The stored cursors among ``keys``."""


def _for_dialect(name: str) -> _CursorSQL:
    if name == "postgresql":
        return _PostgresCursorSQL()
    if name == "sqlite":
        return _SqliteCursorSQL()
    raise ValueError(f"unsupported database dialect: {name}")


# ORDER BY: the rows are inserted, and so locked, in key order.
_PG_UPSERT = text(
    "INSERT INTO read_cursors (user_id, channel_id, seq)"
    " SELECT v.user_id, v.channel_id, LEAST(v.seq, COALESCE(c.last_seq, 0))"
    " FROM unnest(CAST(:users AS text[]), CAST(:channels AS text[]), CAST(:seqs AS bigint[]))"
    " AS v(user_id, channel_id, seq)"
    " LEFT JOIN channels AS c ON c.id = v.channel_id"
    " ORDER BY v.user_id, v.channel_id"
    " ON CONFLICT (user_id, channel_id)"
    " DO UPDATE SET seq = GREATEST(read_cursors.seq, excluded.seq)"
    " WHERE excluded.seq > read_cursors.seq"
    " RETURNING user_id, channel_id, seq"
)
_PG_READ = text(
    "SELECT r.user_id, r.channel_id, r.seq"
    " FROM unnest(CAST(:users AS text[]), CAST(:channels AS text[])) AS k(user_id, channel_id)"
    " JOIN read_cursors AS r ON r.user_id = k.user_id AND r.channel_id = k.channel_id"
)


class _PostgresCursorSQL(_CursorSQL):
    async def upsert(
        self, conn: AsyncConnection, rows: Sequence[tuple[str, str, int]]
    ) -> dict[CursorKey, int]:
        users, channels, seqs = pg_columns(rows, 3)
        result = await conn.execute(
            _PG_UPSERT, {"users": users, "channels": channels, "seqs": seqs}
        )
        return {(user, channel): int(seq) for user, channel, seq in result}

    async def read(self, conn: AsyncConnection, keys: Sequence[CursorKey]) -> dict[CursorKey, int]:
        users, channels = pg_columns(keys, 2)
        result = await conn.execute(_PG_READ, {"users": users, "channels": channels})
        return {(user, channel): int(seq) for user, channel, seq in result}


class _SqliteCursorSQL(_CursorSQL):
    """The transaction holds SQLite's write lock from its start (``db.writer``)."""

    async def upsert(
        self, conn: AsyncConnection, rows: Sequence[tuple[str, str, int]]
    ) -> dict[CursorKey, int]:
        moved: dict[CursorKey, int] = {}
        for chunk in sqlite_chunks(rows, 3):
            # "WHERE true" tells SQLite's parser that ON CONFLICT is the
            # upsert clause, not a join constraint.
            result = await fetch_all(
                conn,
                f"WITH v(user_id, channel_id, seq) AS (VALUES {sqlite_values(len(chunk), 3)})"
                " INSERT INTO read_cursors (user_id, channel_id, seq)"
                " SELECT v.user_id, v.channel_id, MIN(v.seq, COALESCE(c.last_seq, 0))"
                " FROM v LEFT JOIN channels AS c ON c.id = v.channel_id WHERE true"
                " ON CONFLICT (user_id, channel_id)"
                " DO UPDATE SET seq = MAX(read_cursors.seq, excluded.seq)"
                " WHERE excluded.seq > read_cursors.seq"
                " RETURNING user_id, channel_id, seq",
                flat(chunk),
            )
            moved.update(((row[0], row[1]), int(row[2])) for row in result)
        return moved

    async def read(self, conn: AsyncConnection, keys: Sequence[CursorKey]) -> dict[CursorKey, int]:
        found: dict[CursorKey, int] = {}
        for chunk in sqlite_chunks(keys, 2):
            result = await fetch_all(
                conn,
                f"WITH k(user_id, channel_id) AS (VALUES {sqlite_values(len(chunk), 2)})"
                " SELECT r.user_id, r.channel_id, r.seq FROM k CROSS JOIN read_cursors AS r"
                " ON r.user_id = k.user_id AND r.channel_id = k.channel_id",
                flat(chunk),
            )
            found.update(((row[0], row[1]), int(row[2])) for row in result)
        return found
