"""The set-based statements of the group commit, one implementation per dialect.

A commit touches many channels, often with one message each. Every
statement costs a round trip plus SQLAlchemy's and the driver's fixed
overhead, far more than a row inside a statement does, so every step of a
commit is ONE statement for all of its channel groups (``Repository``
decides fencing, numbering and duplicates in Python in between):

* ``lock_heads``: the current ``last_seq`` of every existing channel
  (PostgreSQL also takes the row locks, in id order);
* ``stored``: which idempotency keys are already stored;
* ``move_heads``: the compare-and-set of every moving head;
* ``create_channels``: the rows of channels getting their first messages
  (a channel has no row until then: loading or reading one writes nothing);
* ``insert_messages``: every new message;
* ``upsert_users``: every changed author profile.

PostgreSQL gets each column as one array parameter (``unnest``), so a
statement's text never depends on the batch size (psycopg prepares it after a
few runs) and the 65535-parameter limit never applies. SQLite has no arrays:
writes without results go through ``executemany`` (one call, a C loop over a
prepared statement) and the rest through ``VALUES`` lists, chunked to stay
under SQLite's bound-parameter limit.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from typing import Any

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection

MessageKey = tuple[str, str, str]
"""(channel_id, user_id, client_msg_id): the idempotency key of a stored message."""

StoredRef = tuple[str, int, int]
"""(id, seq, created_at_ms) of a stored message."""

HeadMove = tuple[str, int, int]
"""(channel_id, expected last_seq, new last_seq)."""

NewHead = tuple[str, int]
"""(channel_id, last_seq) of a channel row to create."""

MessageValues = tuple[str, str, int, str, str, str, str | None, str, int]
"""A messages row: id, channel_id, seq, user_id, username, content, thread_id,
client_msg_id, created_at_ms."""

UserValues = tuple[str, str, str]
"""A users row: id, username, avatar_url."""

SQLITE_MAX_PARAMS = 32766
"""SQLITE_MAX_VARIABLE_NUMBER's default since SQLite 3.32 (the store needs
3.35, see ``db.MIN_SQLITE_VERSION``)."""

_MESSAGE_COLUMNS = (
    "id, channel_id, seq, user_id, username, content, thread_id, client_msg_id, created_at_ms"
)


class BatchSQL(ABC):
    """One dialect's statements; each method is one statement (SQLite: a few chunks).

    Callers skip a step whose input is empty; the statements assume rows.
    """

    @abstractmethod
    async def lock_heads(self, conn: AsyncConnection, ids: Sequence[str]) -> dict[str, int]:
        """``last_seq`` of each existing channel in ``ids``, held still until commit."""

    @abstractmethod
    async def heads(self, conn: AsyncConnection, ids: Sequence[str]) -> dict[str, int]:
        """``last_seq`` of each existing channel in ``ids`` (no lock)."""

    @abstractmethod
    async def stored(
        self, conn: AsyncConnection, keys: Sequence[MessageKey]
    ) -> dict[MessageKey, StoredRef]:
        """The stored messages among ``keys`` (distinct)."""

    @abstractmethod
    async def move_heads(self, conn: AsyncConnection, moves: Sequence[HeadMove]) -> set[str]:
        """Compare-and-set each head; return the channels whose head moved.

        A channel appears at most once in ``moves``.
        """

    @abstractmethod
    async def create_channels(self, conn: AsyncConnection, rows: Sequence[NewHead]) -> set[str]:
        """Insert each channel row at its head unless it exists; return the ids inserted.

        ``rows``: distinct ids, sorted (so replicas wait on each other's new
        rows in one order). A row that exists already is left untouched.
        """

    @abstractmethod
    async def insert_messages(self, conn: AsyncConnection, rows: Sequence[MessageValues]) -> None:
        """Insert ``rows`` into ``messages``."""

    @abstractmethod
    async def upsert_users(self, conn: AsyncConnection, users: Sequence[UserValues]) -> None:
        """Insert or update ``users`` (distinct ids; sorted, so replicas lock in one order)."""


def for_dialect(name: str) -> BatchSQL:
    """The statements for the engine dialect ``name`` ("postgresql" or "sqlite")."""
    if name == "postgresql":
        return PostgresBatchSQL()
    if name == "sqlite":
        return SqliteBatchSQL()
    raise ValueError(f"unsupported database dialect: {name}")


def pg_columns(rows: Sequence[Sequence[Any]], width: int) -> list[list[Any]]:
    """Rows to one list per column (PostgreSQL's array parameters)."""
    return [[row[i] for row in rows] for i in range(width)]


# --- PostgreSQL ---------------------------------------------------------------------

_PG_CREATE = text(
    "INSERT INTO channels (id, last_seq)"
    " SELECT * FROM unnest(CAST(:ids AS text[]), CAST(:heads AS bigint[]))"
    " ON CONFLICT (id) DO NOTHING RETURNING id"
)
# ORDER BY under FOR UPDATE locks in id order, so two store replicas
# committing overlapping channels cannot deadlock.
_PG_LOCK_HEADS = text(
    "SELECT id, last_seq FROM channels WHERE id = ANY(CAST(:ids AS text[])) ORDER BY id FOR UPDATE"
)
_PG_HEADS = text("SELECT id, last_seq FROM channels WHERE id = ANY(CAST(:ids AS text[]))")
_PG_STORED = text(
    "SELECT m.channel_id, m.user_id, m.client_msg_id, m.id, m.seq, m.created_at_ms"
    " FROM unnest(CAST(:channels AS text[]), CAST(:users AS text[]), CAST(:keys AS text[]))"
    " AS k(channel_id, user_id, client_msg_id)"
    " JOIN messages AS m ON m.channel_id = k.channel_id AND m.user_id = k.user_id"
    " AND m.client_msg_id = k.client_msg_id"
)
_PG_MOVE_HEADS = text(
    "UPDATE channels AS c SET last_seq = v.head"
    " FROM unnest(CAST(:ids AS text[]), CAST(:expected AS bigint[]), CAST(:heads AS bigint[]))"
    " AS v(id, expected, head)"
    " WHERE c.id = v.id AND c.last_seq = v.expected"
    " RETURNING c.id"
)
_PG_INSERT_MESSAGES = text(
    f"INSERT INTO messages ({_MESSAGE_COLUMNS})"
    " SELECT * FROM unnest(CAST(:id AS text[]), CAST(:channel_id AS text[]),"
    " CAST(:seq AS bigint[]), CAST(:user_id AS text[]), CAST(:username AS text[]),"
    " CAST(:content AS text[]), CAST(:thread_id AS text[]), CAST(:client_msg_id AS text[]),"
    " CAST(:created_at_ms AS bigint[]))"
)
_PG_UPSERT_USERS = text(
    "INSERT INTO users (id, username, avatar_url)"
    " SELECT * FROM unnest(CAST(:ids AS text[]), CAST(:names AS text[]),"
    " CAST(:avatars AS text[]))"
    " ON CONFLICT (id) DO UPDATE SET username = excluded.username,"
    " avatar_url = excluded.avatar_url, updated_at = CURRENT_TIMESTAMP"
)
_MESSAGE_PARAMS = (
    "id",
    "channel_id",
    "seq",
    "user_id",
    "username",
    "content",
    "thread_id",
    "client_msg_id",
    "created_at_ms",
)


class PostgresBatchSQL(BatchSQL):
    """psycopg 3: one statement per step, whatever the batch size."""

    async def lock_heads(self, conn: AsyncConnection, ids: Sequence[str]) -> dict[str, int]:
        rows = await conn.execute(_PG_LOCK_HEADS, {"ids": list(ids)})
        return {cid: int(seq) for cid, seq in rows}

    async def heads(self, conn: AsyncConnection, ids: Sequence[str]) -> dict[str, int]:
        rows = await conn.execute(_PG_HEADS, {"ids": list(ids)})
        return {cid: int(seq) for cid, seq in rows}

    async def stored(
        self, conn: AsyncConnection, keys: Sequence[MessageKey]
    ) -> dict[MessageKey, StoredRef]:
        channels, users, client_keys = pg_columns(keys, 3)
        rows = await conn.execute(
            _PG_STORED, {"channels": channels, "users": users, "keys": client_keys}
        )
        return {(c, u, k): (mid, int(seq), int(ts)) for c, u, k, mid, seq, ts in rows}

    async def move_heads(self, conn: AsyncConnection, moves: Sequence[HeadMove]) -> set[str]:
        ids, expected, heads = pg_columns(moves, 3)
        rows = await conn.execute(
            _PG_MOVE_HEADS, {"ids": ids, "expected": expected, "heads": heads}
        )
        return {cid for (cid,) in rows}

    async def create_channels(self, conn: AsyncConnection, rows: Sequence[NewHead]) -> set[str]:
        ids, heads = pg_columns(rows, 2)
        created = await conn.execute(_PG_CREATE, {"ids": ids, "heads": heads})
        return {cid for (cid,) in created}

    async def insert_messages(self, conn: AsyncConnection, rows: Sequence[MessageValues]) -> None:
        values = pg_columns(rows, len(_MESSAGE_PARAMS))
        await conn.execute(_PG_INSERT_MESSAGES, dict(zip(_MESSAGE_PARAMS, values, strict=True)))

    async def upsert_users(self, conn: AsyncConnection, users: Sequence[UserValues]) -> None:
        ids, names, avatars = pg_columns(users, 3)
        await conn.execute(_PG_UPSERT_USERS, {"ids": ids, "names": names, "avatars": avatars})


# --- SQLite ---------------------------------------------------------------------------

_LITE_INSERT_MESSAGES = (
    f"INSERT INTO messages ({_MESSAGE_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)"
)
_LITE_UPSERT_USERS = (
    "INSERT INTO users (id, username, avatar_url) VALUES (?, ?, ?)"
    " ON CONFLICT (id) DO UPDATE SET username = excluded.username,"
    " avatar_url = excluded.avatar_url, updated_at = CURRENT_TIMESTAMP"
)


def sqlite_chunks(rows: Sequence[Sequence[Any]], width: int) -> Iterator[Sequence[Sequence[Any]]]:
    """``rows`` in slices of at most ``SQLITE_MAX_PARAMS`` bound values."""
    size = max(1, SQLITE_MAX_PARAMS // width)
    for start in range(0, len(rows), size):
        yield rows[start : start + size]


def sqlite_values(count: int, width: int) -> str:
    """``count`` rows of ``width`` placeholders, for a VALUES list."""
    row = "(" + ", ".join("?" * width) + ")"
    return ", ".join([row] * count)


def flat(rows: Sequence[Sequence[Any]]) -> tuple[Any, ...]:
    """``rows`` as one flat parameter tuple."""
    return tuple(value for row in rows for value in row)


async def fetch_all(conn: AsyncConnection, sql: str, params: tuple[Any, ...]) -> Sequence[Any]:
    # exec_driver_sql is typed as returning one-column rows; these have more.
    rows: Sequence[Any] = (await conn.exec_driver_sql(sql, params)).all()
    return rows


class SqliteBatchSQL(BatchSQL):
    """aiosqlite: executemany for blind writes, chunked VALUES lists for the rest.

    The transaction holds SQLite's write lock from its ``BEGIN IMMEDIATE``
    (see ``db.writer``), so heads read in it cannot move under it.
    """

    async def lock_heads(self, conn: AsyncConnection, ids: Sequence[str]) -> dict[str, int]:
        return await self.heads(conn, ids)

    async def heads(self, conn: AsyncConnection, ids: Sequence[str]) -> dict[str, int]:
        found: dict[str, int] = {}
        for chunk in sqlite_chunks([(cid,) for cid in ids], 1):
            marks = ", ".join("?" * len(chunk))
            rows = await fetch_all(
                conn, f"SELECT id, last_seq FROM channels WHERE id IN ({marks})", flat(chunk)
            )
            found.update((row[0], int(row[1])) for row in rows)
        return found

    async def stored(
        self, conn: AsyncConnection, keys: Sequence[MessageKey]
    ) -> dict[MessageKey, StoredRef]:
        found: dict[MessageKey, StoredRef] = {}
        for chunk in sqlite_chunks(keys, 3):
            # CROSS JOIN fixes the join order: walk the keys, probe the
            # (channel_id, user_id, client_msg_id) index for each. A row-value
            # IN list would scan the whole index instead.
            rows = await fetch_all(
                conn,
                "WITH k(channel_id, user_id, client_msg_id)"
                f" AS (VALUES {sqlite_values(len(chunk), 3)})"
                " SELECT m.channel_id, m.user_id, m.client_msg_id, m.id, m.seq, m.created_at_ms"
                " FROM k CROSS JOIN messages AS m ON m.channel_id = k.channel_id"
                " AND m.user_id = k.user_id AND m.client_msg_id = k.client_msg_id",
                flat(chunk),
            )
            found.update(
                ((row[0], row[1], row[2]), (row[3], int(row[4]), int(row[5]))) for row in rows
            )
        return found

    async def move_heads(self, conn: AsyncConnection, moves: Sequence[HeadMove]) -> set[str]:
        moved: set[str] = set()
        for chunk in sqlite_chunks(moves, 3):
            rows = await fetch_all(
                conn,
                f"WITH v(cid, expected, head) AS (VALUES {sqlite_values(len(chunk), 3)})"
                " UPDATE channels SET last_seq = v.head FROM v"
                " WHERE channels.id = v.cid AND channels.last_seq = v.expected"
                " RETURNING id",
                flat(chunk),
            )
            moved.update(row[0] for row in rows)
        return moved

    async def create_channels(self, conn: AsyncConnection, rows: Sequence[NewHead]) -> set[str]:
        created: set[str] = set()
        for chunk in sqlite_chunks(rows, 2):
            inserted = await fetch_all(
                conn,
                f"INSERT INTO channels (id, last_seq) VALUES {sqlite_values(len(chunk), 2)}"
                " ON CONFLICT (id) DO NOTHING RETURNING id",
                flat(chunk),
            )
            created.update(row[0] for row in inserted)
        return created

    async def insert_messages(self, conn: AsyncConnection, rows: Sequence[MessageValues]) -> None:
        await conn.exec_driver_sql(_LITE_INSERT_MESSAGES, list(rows))

    async def upsert_users(self, conn: AsyncConnection, users: Sequence[UserValues]) -> None:
        await conn.exec_driver_sql(_LITE_UPSERT_USERS, list(users))
