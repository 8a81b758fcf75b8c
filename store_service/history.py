"""History pages: a channel's (or one thread's) messages, paged backwards from a seq.

A page is the ``limit`` newest messages with ``seq < before_seq`` (the newest
of all when ``before_seq`` is 0), returned oldest first; ``has_more`` says
whether older ones exist, so a client pages on with the first message's
seq as the next ``before_seq``. The whole channel's pages hold every
message, roots and replies alike; a thread's pages hold only the messages
whose ``thread_id`` is the thread's root id (not the root itself).

Every returned message that roots a thread (its id is the ``thread_id`` of
some message of the same channel) carries its ``reply_count``.

Reads only: an unknown channel is an empty page at head 0 and gets no row.
A page is ONE statement, so the page, ``last_seq`` and the reply counts
come from one snapshot (an append moves the head and inserts its messages
in one transaction, so no message of a snapshot is past its head):

* the page: ``uq_messages_channel_id_seq`` (whole channel) or
  ``ix_messages_channel_id_thread_id_seq`` (thread), walked backwards from
  ``before_seq``, stopping after ``limit + 1`` rows;
* per returned row, its reply count: an index-only count on
  ``ix_messages_channel_id_thread_id_seq`` (0 for a message no one replied to);
* the head: one primary-key read of ``channels``, evaluated once.

On PostgreSQL that statement runs in autocommit mode, so a page costs no
BEGIN/ROLLBACK round trips (a statement is one snapshot anyway). An empty
page has no row to carry the head: it is read again with the head in one
REPEATABLE READ transaction (on SQLite, one read transaction), so an
append between the two cannot be missed.

``limit`` must be 1..``MAX_HISTORY_LIMIT``; anything else is
``InvalidArgument`` rather than silently clamped, so a caller's bug shows.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import BigInteger, Integer, Select, Text, bindparam, func, select
from sqlalchemy.orm import aliased

from store_service.models import ChannelRow, MessageRow
from store_service.repository import (
    MAX_SEQ,
    InvalidArgument,
    MessagePage,
    Repository,
    check_text,
    message_select,
    read_head,
    require_id,
    stored_message,
)

MAX_HISTORY_LIMIT = 100
"""Most messages one history page returns (the request's ``limit`` is 1..this)."""


def validate_history(channel_id: str, before_seq: int, limit: int, thread_id: str) -> None:
    """Raise ``InvalidArgument`` unless the request is well formed."""
    require_id(channel_id, "channel_id")
    check_text(thread_id, "thread_id")
    if not 1 <= limit <= MAX_HISTORY_LIMIT:
        raise InvalidArgument(f"limit must be 1..{MAX_HISTORY_LIMIT}, got {limit}")
    if before_seq < 0:
        raise InvalidArgument("before_seq out of range")


# One statement per page, built once with bound parameters (a page is on
# the read path of every client scrolling back, and building a SELECT costs
# more Python than the query costs PostgreSQL). One statement is also one
# snapshot: an append moves the head and inserts its messages in one
# transaction, so the page, the head and the reply counts always agree.

_REPLY = aliased(MessageRow, name="reply")


def _page_statement(*, thread: bool) -> Select[*tuple[Any, ...]]:
    channel_id = bindparam("channel_id", type_=Text)
    head = select(ChannelRow.last_seq).where(ChannelRow.id == channel_id).scalar_subquery()
    # Per returned row, an index-only count on ix_messages_channel_id_thread_id_seq.
    replies = (
        select(func.count())
        .select_from(_REPLY)
        .where(_REPLY.channel_id == MessageRow.channel_id, _REPLY.thread_id == MessageRow.id)
        .scalar_subquery()
    )
    conditions = [
        MessageRow.channel_id == channel_id,
        MessageRow.seq <= bindparam("upper", type_=BigInteger),
    ]
    if thread:
        conditions.append(MessageRow.thread_id == bindparam("thread_id", type_=Text))
    return (
        message_select()
        .add_columns(head.label("head"), replies.label("reply_count"))
        .where(*conditions)
        .order_by(MessageRow.seq.desc())
        .limit(bindparam("limit", type_=Integer))
    )


_CHANNEL_PAGE = _page_statement(thread=False)
_THREAD_PAGE = _page_statement(thread=True)


def history_query(
    channel_id: str, upper: int, limit: int, thread_id: str | None = None
) -> Select[*tuple[Any, ...]]:
    """Up to ``limit`` messages with ``seq <= upper``, NEWEST first; of one thread when given.

    Each row also carries the channel's ``head`` and its ``reply_count``.
    The statement a page runs, with its values bound (for EXPLAIN and tests).
    """
    if thread_id is None:
        return _CHANNEL_PAGE.params(channel_id=channel_id, upper=upper, limit=limit)
    return _THREAD_PAGE.params(channel_id=channel_id, upper=upper, limit=limit, thread_id=thread_id)


class HistoryReader:
    """History pages over a ``Repository``'s engine, timed in its metrics.

    Query timings: ``waddle_store_query_seconds{query="history"}`` for the
    whole channel's pages, ``{query="history_thread"}`` for a thread's.
    """

    def __init__(self, repository: Repository) -> None:
        self._repository = repository
        engine = repository.engine
        postgres = engine.dialect.name == "postgresql"
        self._statement_engine = (
            engine.execution_options(isolation_level="AUTOCOMMIT") if postgres else engine
        )
        self._snapshot_engine = (
            engine.execution_options(isolation_level="REPEATABLE READ") if postgres else engine
        )

    async def page(
        self,
        channel_id: str,
        *,
        before_seq: int = 0,
        limit: int = 50,
        thread_id: str = "",
    ) -> MessagePage:
        """The newest ``limit`` messages before ``before_seq`` (0: the newest), oldest first.

        ``thread_id`` "" pages the whole channel; otherwise the replies of
        that root. ``last_seq`` is the channel's head; an unknown channel is
        an empty page at head 0. Raises ``InvalidArgument`` for a malformed
        request and ``Unavailable`` when the database fails.
        """
        validate_history(channel_id, before_seq, limit, thread_id)
        name = "history_thread" if thread_id else "history"
        # before_seq is exclusive; seq is a BIGINT, so the bound is too.
        upper = MAX_SEQ if before_seq == 0 else min(before_seq - 1, MAX_SEQ)
        params: dict[str, Any] = {"channel_id": channel_id, "upper": upper, "limit": limit + 1}
        if thread_id:
            params["thread_id"] = thread_id
        statement = _THREAD_PAGE if thread_id else _CHANNEL_PAGE
        async with self._repository.timed(name):
            async with self._statement_engine.connect() as conn:
                rows = (await conn.execute(statement, params)).all() if upper > 0 else []
            if not rows:
                async with self._snapshot_engine.connect() as conn:
                    if upper > 0:
                        rows = (await conn.execute(statement, params)).all()
                    if not rows:
                        # An empty channel or thread, a page before the first
                        # message, or an unknown channel (head 0).
                        head = await read_head(conn, channel_id)
                        return MessagePage((), head or 0, False)
        page = rows[:limit]
        messages = tuple(stored_message(r, int(r.reply_count)) for r in reversed(page))
        return MessagePage(messages, int(rows[0].head), len(rows) > limit)
