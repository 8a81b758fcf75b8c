"""Registering one connection with its channel's owner, and the
``initial_state`` it then gets - on either endpoint.

The owner answers a join with the channel's state (recent messages,
online users, ``lastSeq``, and the user's read cursor when the user is
connected elsewhere); the edge reads the stored cursor meanwhile and sends
the newer of the two as ``readSeq``, with ``unreadCount`` (messages after
the cursor, at most ``UNREAD_CAP``). A store that does not answer within
``edge.cursor_reads.CURSOR_TIMEOUT`` costs the join nothing: the owner's value stands, or the
two fields are left out.
A resumed subscription (``afterSeq``) gets no recent messages: what it
missed follows as a replay.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import orjson

from edge.connection import Connection
from edge.runtime import EdgeRuntime
from edge.shards import ShardRouter

UNREAD_CAP = 1000
REFUSALS = frozenset({"channel_full", "user_limit", "unavailable"})


@dataclass(frozen=True, slots=True)
class Joined:
    initial_state: bytes
    last_seq: int


async def _read_cursor(runtime: EdgeRuntime, conn: Connection) -> int | None:
    """None when the store is unavailable or slower than ``CURSOR_TIMEOUT`` (batched)."""
    return await runtime.cursors.get(conn.identity.user_id, conn.channel_id)


async def join(
    runtime: EdgeRuntime, conn: Connection, link: ShardRouter, *, resume: bool
) -> Joined | str:
    """Add ``conn`` here and at the owner; return what to send first, or the
    refusal (``channel_full``, ``user_limit``, ``unavailable``) after undoing it."""
    runtime.local.add(conn)
    cursor = asyncio.ensure_future(_read_cursor(runtime, conn))
    try:
        result = await asyncio.wait_for(link.join(conn), runtime.settings.join_timeout_seconds)
    except TimeoutError:
        result = None
    except BaseException:
        cursor.cancel()
        link.leave(conn)
        runtime.local.remove(conn)
        raise
    if result is None or not result.ok:
        cursor.cancel()
        link.leave(conn)
        runtime.local.remove(conn)
        refusal = result.refusal if result is not None else ""
        return refusal if refusal in REFUSALS else "unavailable"
    stored = await cursor
    if not resume:
        spliced = with_read_state(result.initial_state, stored, result.last_seq)
        if spliced is not None:
            return Joined(spliced, result.last_seq)
    state = orjson.loads(result.initial_state)
    # The owner knows the newest cursor of a user connected elsewhere (its
    # store writes are batched); the store knows it for everyone else.
    owners = state.get("readSeq", 0)
    read_seq = owners if stored is None else max(stored, owners)
    if stored is not None or owners:
        state["readSeq"] = read_seq
        state["unreadCount"] = min(max(0, result.last_seq - read_seq), UNREAD_CAP)
    if resume:
        state["messages"] = []
    return Joined(orjson.dumps(state), result.last_seq)


_INITIAL = b'{"type":"initial_state",'
_READ_SEQ = b',"readSeq":'


def with_read_state(initial: bytes, stored: int | None, last_seq: int) -> bytes | None:
    """The owner's ``initial_state`` with ``readSeq``/``unreadCount`` set as
    ``join`` would set them, without decoding and re-encoding it.

    The frame lists up to a thousand online users and the recent messages,
    so a join storm would otherwise parse and re-encode each one on the
    edge. The owner writes it compactly (``wire.initial_state_frame``)
    with ``readSeq``, when it knows one, as the last field: the cursor
    fields are spliced in at the end. None for any other shape (the caller
    then decodes it)."""
    if not (initial.startswith(_INITIAL) and initial.endswith(b"}")):
        return None
    body = initial[:-1]
    owners = 0
    at = body.rfind(_READ_SEQ)
    if at != -1:
        digits = body[at + len(_READ_SEQ) :]
        if not digits.isdigit():
            return None
        owners = int(digits)
        body = body[:at]
    if stored is None and not owners:
        return body + b"}"
    read_seq = owners if stored is None else max(stored, owners)
    unread = min(max(0, last_seq - read_seq), UNREAD_CAP)
    return body + b',"readSeq":%d,"unreadCount":%d}' % (read_seq, unread)
