"""One channel's live state, owned by exactly one shard: membership, presence,
typing, the sequence head and the recent-message window.

Contract:
* Membership is per connection (edge id, connection id); presence is per
  user. A user's first connection broadcasts ``user_connected``, the last one
  to leave ``user_disconnected``; re-registrations (``rejoin``) are silent.
  With a presence linger (``ChannelPolicy.presence_linger``) a user whose
  last connection left stays listed until the linger is over
  (``linger_expired``); coming back within it is silent.
* A channel restored after hibernation (``channel_service.lifecycle``) gets
  its members back as re-registrations, then ``restore_user`` puts back each
  user's status and joined-at, and ``depart_unregistered`` lets the users
  nobody re-registered depart as above.
* ``typing`` is relayed to every member but the typist and never stored.
* Read cursors (per user, cached while the user is a member) only move
  forward and never past the sequence head. A move is told at once to the
  user's other connections; persisting it and the coalesced receipts to the
  other members are the hub's (``Emitter.cursor_moved``).
* A publish is only *queued* here; the hub's committer persists it and then
  calls ``committed``, which broadcasts in sequence order and acks the
  sender. Nothing is broadcast before it is durable.
The class does no I/O: everything it says goes through an ``Emitter``.
"""

from __future__ import annotations

import collections
import itertools
import time
import uuid
from array import array
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, cast

import orjson

from waddle_common import wire
from waddle_common.store_client import stored_to_body
from waddle_pb import channel_pb2, store_pb2

ConnKey = tuple[str, int]  # (edge id, connection id within that edge)


class Emitter(Protocol):
    """Where a channel's output goes (implemented by the hub)."""

    def broadcast(
        self,
        channel: Channel,
        payload: bytes,
        *,
        frame_type: str,
        seq: int = 0,
        exclude_user_id: str = "",
        received_at_ns: int = 0,
        ephemeral: bool = False,
    ) -> None: ...

    def reply(
        self,
        edge_id: str,
        conn_id: int,
        channel_id: str,
        payload: bytes,
        *,
        client_msg_id: str = "",
        final: bool = False,
        frame_type: str = "",
    ) -> None: ...

    def join_result(self, edge_id: str, result: channel_pb2.JoinResult) -> None: ...

    def linger(self, channel: Channel, user_id: str) -> None:
        """``user_id``'s last connection left: call ``linger_expired`` after the linger."""

    def cursor_moved(self, channel: Channel, user_id: str, seq: int) -> None:
        """``user_id``'s read cursor moved forward to ``seq``: persist and announce it."""


class PublishLike(Protocol):
    """What a refusal needs of a publish: a proto ``Publish`` or a ``PendingPublish``."""

    @property
    def conn_id(self) -> int: ...
    @property
    def client_msg_id(self) -> str: ...
    @property
    def client_supplied_id(self) -> bool: ...


def refuse_publish(
    emit: Emitter, edge_id: str, channel_id: str, pub: PublishLike, kind: wire.ErrorKind
) -> None:
    """Settle a publish with an error frame (echoing the client's key if it chose one)."""
    emit.reply(
        edge_id,
        pub.conn_id,
        channel_id,
        wire.error_frame(
            kind,
            channel_id=channel_id,
            clientMsgId=pub.client_msg_id if pub.client_supplied_id else None,
        ),
        client_msg_id=pub.client_msg_id,
        final=True,
    )


def storable(msg: store_pb2.NewMessage) -> bool:
    """False for a message the store would refuse: NUL in any text field
    (PostgreSQL text cannot hold it). The edge checks client fields and
    token claims alike; this holds for any edge on the other end."""
    return not any(
        "\x00" in value
        for value in (
            msg.user_id,
            msg.username,
            msg.avatar_url,
            msg.content,
            msg.thread_id,
            msg.client_msg_id,
        )
    )


@dataclass(slots=True)
class Conn:
    edge_id: str
    conn_id: int
    user_id: str
    username: str
    avatar_url: str
    can_write: bool
    joined_at_ms: int
    status: str
    session: int  # the Attach stream generation that registered it


# The fields of an ``onlineUsers`` entry: changing one re-encodes it.
_LISTED = frozenset({"user_id", "username", "joined_at_ms", "status"})


@dataclass(slots=True)
class OnlineUser:
    user_id: str
    username: str
    joined_at_ms: int
    status: str
    # The user's connections in the channel; empty while the user lingers.
    conns: set[ConnKey] = field(default_factory=set)
    # The encoded ``onlineUsers`` entry and the roster holding it, if any.
    _json: bytes | None = field(default=None, init=False, repr=False, compare=False)
    _roster: Roster | None = field(default=None, init=False, repr=False, compare=False)

    def __setattr__(self, name: str, value: Any) -> None:
        object.__setattr__(self, name, value)
        # Only a user already encoded can be in a roster's listing.
        if name in _LISTED and getattr(self, "_json", None) is not None:
            object.__setattr__(self, "_json", None)
            if self._roster is not None:
                self._roster.stale = True

    def json(self) -> bytes:
        """The user's ``onlineUsers`` entry, encoded once per change."""
        if self._json is None:
            self._json = wire.kept(
                orjson.dumps(
                    {
                        "userId": self.user_id,
                        "username": self.username,
                        "joinedAt": self.joined_at_ms,
                        "status": self.status,
                    }
                )
            )
        return self._json


class Roster(dict[str, OnlineUser]):
    """A channel's online users by id, in the order they came, with the first
    ``limit`` users' ``onlineUsers`` entries kept as one encoded buffer.

    Each join splices the joiner's entry in front of that buffer (less the
    joiner's own entry) instead of building and encoding up to ``limit``
    dicts, which made filling a big channel quadratic. A user appended below
    the limit is added to the buffer in place; any other change (a removal,
    a listed field of an encoded user) marks it stale and the next listing
    rebuilds it from the users' cached entries.
    """

    __slots__ = ("_buf", "_index", "_limit", "_starts", "stale")

    def __init__(self) -> None:
        super().__init__()
        self.stale = True
        self._limit = 0
        self._buf = bytearray()  # entries, each followed by a comma
        self._starts = array("q")  # where each buffered entry starts
        self._index: dict[str, int] = {}  # user id -> position in the buffer

    def __setitem__(self, user_id: str, user: OnlineUser) -> None:
        new = user_id not in self
        super().__setitem__(user_id, user)
        if self.stale:
            return
        if not new:
            self.stale = True
        elif len(self._index) < self._limit:
            self._add(user)

    def __delitem__(self, user_id: str) -> None:
        super().__delitem__(user_id)
        self.stale = True

    def pop(self, *args: Any) -> Any:
        self.stale = True
        return super().pop(*args)

    def popitem(self) -> tuple[str, OnlineUser]:
        self.stale = True
        return super().popitem()

    def clear(self) -> None:
        self.stale = True
        super().clear()

    def setdefault(self, *args: Any) -> Any:
        self.stale = True
        return super().setdefault(*args)

    def update(self, *args: Any, **kwargs: Any) -> None:
        self.stale = True
        super().update(*args, **kwargs)

    def _add(self, user: OnlineUser) -> None:
        self._index[user.user_id] = len(self._starts)
        self._starts.append(len(self._buf))
        self._buf += user.json()
        self._buf += b","
        user._roster = self

    def _rebuild(self, limit: int) -> None:
        self._limit = limit
        self._buf = bytearray()
        self._starts = array("q")
        self._index = {}
        for user in itertools.islice(self.values(), limit):
            self._add(user)
        self.stale = False

    def listing(self, first: str, limit: int) -> bytes:
        """The ``onlineUsers`` array: ``first`` (the joiner) leading, then the
        others in the order they came, at most ``limit`` in all."""
        if self.stale or limit != self._limit:
            self._rebuild(limit)
        view = memoryview(self._buf)
        starts = self._starts
        user = self.get(first)
        if user is None:
            # The whole buffer, less its last comma.
            return b"".join((b"[", view[:-1], b"]")) if starts else b"[]"
        i = self._index.get(first)
        if i is None:
            # The joiner is past the limit: the first limit - 1 others.
            rest = view[: starts[limit - 1]] if len(starts) >= limit else view
            return _splice(user.json(), rest, view[:0])
        end = starts[i + 1] if i + 1 < len(starts) else len(view)
        return _splice(user.json(), view[: starts[i]], view[end:])


def _splice(head: bytes, before: memoryview, after: memoryview) -> bytes:
    """``[head,before...after...]`` where ``before`` and ``after`` are runs of
    comma-terminated entries."""
    if not before and not after:
        return b"".join((b"[", head, b"]"))
    if after:
        return b"".join((b"[", head, b",", before, after[:-1], b"]"))
    return b"".join((b"[", head, b",", before[:-1], b"]"))


@dataclass(slots=True)
class PendingPublish:
    edge_id: str
    conn_id: int
    client_msg_id: str
    client_supplied_id: bool
    received_at_ns: int
    deadline: float  # time.monotonic() after which the sender is told to retry
    message: store_pb2.NewMessage


class RecentWindow:
    """The newest ``maxlen`` messages of a channel, encoded, in one buffer.

    What a joiner gets in ``initial_state``. One ``bytearray`` (and an
    array of end offsets) per channel rather than a dict and a dozen strings
    per message: a third of the memory, and one block the C library can give
    back whole when the channel is freed (see ``channel_service.memory``).
    Iterating or indexing yields the decoded messages; ``fragments`` yields
    them ready for ``orjson`` to splice into a frame unchanged.
    """

    __slots__ = ("_buf", "_ends", "_fragments", "maxlen")

    def __init__(self, maxlen: int, bodies: Iterable[Mapping[str, Any]] = ()) -> None:
        self.maxlen = max(maxlen, 1)
        self._buf = bytearray()
        self._ends = array("I")
        # ``fragments`` as of the last append: every join reads it, a
        # storm's thousand joins between two messages included.
        self._fragments: tuple[orjson.Fragment, ...] | None = None
        for body in bodies:
            self.append(body)

    def append(self, body: Mapping[str, Any]) -> None:
        self._fragments = None
        data = orjson.dumps(body)
        ends = self._ends
        if len(ends) >= self.maxlen:
            cut = ends[0]
            del self._buf[:cut]
            del ends[0]
            for i in range(len(ends)):
                ends[i] -= cut
        self._buf += data
        ends.append(len(self._buf))

    def _spans(self) -> Iterator[tuple[int, int]]:
        start = 0
        for end in self._ends:
            yield start, end
            start = end

    def fragments(self) -> tuple[orjson.Fragment, ...]:
        """The messages, oldest first, each encoded (made once per append)."""
        if self._fragments is None:
            buf = self._buf
            self._fragments = tuple(orjson.Fragment(bytes(buf[a:b])) for a, b in self._spans())
        return self._fragments

    def __len__(self) -> int:
        return len(self._ends)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        buf = self._buf
        return (orjson.loads(buf[a:b]) for a, b in self._spans())

    def __getitem__(self, i: int) -> dict[str, Any]:
        spans = list(self._spans())
        a, b = spans[i]
        body: dict[str, Any] = orjson.loads(self._buf[a:b])
        return body


class Window(Protocol):
    """What a channel needs of its recent window (a ``RecentWindow``, or a
    bounded ``deque`` of message bodies)."""

    def append(self, body: dict[str, Any], /) -> None: ...
    def __iter__(self) -> Iterator[Any]: ...
    def __len__(self) -> int: ...
    def __getitem__(self, i: int, /) -> dict[str, Any]: ...


@dataclass(frozen=True, slots=True)
class ChannelPolicy:
    """Limits every channel of a shard shares (each channel keeps its own capacity)."""

    recent_limit: int = 50
    max_user_connections: int = 10
    # Big channels: `initial_state` lists at most this many users (with the
    # full count), and joins/leaves are not announced above this many
    # connections - otherwise filling a channel costs O(members^2) frames.
    online_users_limit: int = 1000
    presence_fanout_limit: int = 1000
    # Seconds a user whose last connection left stays online before
    # `user_disconnected` goes out (0: at once).
    presence_linger: float = 0.0


@dataclass(slots=True)
class Channel:
    channel_id: str
    last_seq: int
    max_connections: int
    policy: ChannelPolicy = field(default_factory=ChannelPolicy)
    recent: Window = field(default_factory=lambda: collections.deque[dict[str, Any]]())
    conns: dict[ConnKey, Conn] = field(default_factory=dict)
    users: Roster = field(default_factory=Roster)
    edges: collections.Counter[str] = field(default_factory=collections.Counter)
    typing: set[str] = field(default_factory=set)
    cursors: dict[str, int] = field(default_factory=dict)  # user id -> read seq, members only
    pending: list[PendingPublish] = field(default_factory=list)
    committing: bool = False
    active_at: float = 0.0  # time.monotonic() of its last event (for hibernation)

    @classmethod
    def from_state(
        cls,
        state: store_pb2.ChannelState,
        *,
        default_max: int,
        policy: ChannelPolicy,
    ) -> Channel:
        return cls(
            channel_id=state.channel_id,
            last_seq=state.last_seq,
            max_connections=state.settings.max_connections or default_max,
            policy=policy,
            recent=RecentWindow(policy.recent_limit, (stored_to_body(m) for m in state.recent)),
        )

    # -- membership ---------------------------------------------------------

    @property
    def idle(self) -> bool:
        return not self.conns and not self.pending and not self.committing

    def online_users(self, first: str = "") -> bytes:
        """Online users as an encoded JSON array, ``first`` (the joiner)
        leading, at most ``online_users_limit``."""
        return self.users.listing(first, self.policy.online_users_limit)

    def announces_presence(self) -> bool:
        """Small enough for per-user announcements (joins, leaves, read receipts)."""
        return len(self.conns) <= self.policy.presence_fanout_limit

    def join(self, conn: Conn, *, rejoin: bool, emit: Emitter) -> None:
        key = (conn.edge_id, conn.conn_id)
        existing = self.conns.get(key)
        refusal = ""
        if existing is None and not rejoin:
            user = self.users.get(conn.user_id)
            if len(self.conns) >= self.max_connections:
                refusal = "channel_full"
            elif user is not None and len(user.conns) >= self.policy.max_user_connections:
                refusal = "user_limit"
        if refusal:
            emit.join_result(
                conn.edge_id,
                channel_pb2.JoinResult(
                    conn_id=conn.conn_id, channel_id=self.channel_id, ok=False, refusal=refusal
                ),
            )
            return
        if existing is not None:
            # Same connection registered again (stream re-opened): refresh it.
            existing.session = conn.session
            existing.status = conn.status
            self._set_user_status(existing.user_id, conn.status)
        else:
            self.conns[key] = conn
            self.edges[conn.edge_id] += 1
            user = self.users.get(conn.user_id)
            if user is None:
                self.users[conn.user_id] = OnlineUser(
                    conn.user_id, conn.username, conn.joined_at_ms, conn.status, conns={key}
                )
                if not rejoin and self.announces_presence():
                    emit.broadcast(
                        self,
                        wire.user_connected_frame(
                            channel_id=self.channel_id,
                            user_id=conn.user_id,
                            username=conn.username,
                        ),
                        frame_type="user_connected",
                        exclude_user_id=conn.user_id,
                        ephemeral=True,
                    )
            else:
                came_back = not user.conns  # within the linger: no user_connected
                user.conns.add(key)
                if rejoin:
                    user.status = conn.status
                elif came_back and user.status != conn.status:
                    self.set_user_status(conn, conn.status, emit)
        initial = b""
        if not rejoin:
            recent = self.recent
            initial = wire.initial_state_frame(
                channel_id=self.channel_id,
                # orjson writes a window's fragments unchanged, as it would the bodies.
                messages=cast(
                    Iterable[Mapping[str, Any]],
                    recent.fragments() if isinstance(recent, RecentWindow) else recent,
                ),
                online_users=self.online_users(first=conn.user_id),
                online_count=len(self.users),
                last_seq=self.last_seq,
                read_seq=self.cursors.get(conn.user_id, 0),
            )
        emit.join_result(
            conn.edge_id,
            channel_pb2.JoinResult(
                conn_id=conn.conn_id,
                channel_id=self.channel_id,
                ok=True,
                initial_state=initial,
                last_seq=self.last_seq,
            ),
        )

    def _set_user_status(self, user_id: str, status: str) -> None:
        user = self.users.get(user_id)
        if user is not None and status:
            user.status = status

    def leave(self, edge_id: str, conn_id: int, emit: Emitter) -> None:
        key = (edge_id, conn_id)
        conn = self.conns.pop(key, None)
        if conn is None:
            return
        self.edges[edge_id] -= 1
        if self.edges[edge_id] <= 0:
            del self.edges[edge_id]
        user = self.users.get(conn.user_id)
        if user is None:
            return
        user.conns.discard(key)
        if user.conns:
            return
        if conn.user_id in self.typing:
            # A departed user stops typing at once, linger or not.
            self.typing.discard(conn.user_id)
            emit.broadcast(
                self,
                wire.typing_frame(
                    channel_id=self.channel_id,
                    user_id=conn.user_id,
                    username=conn.username,
                    is_typing=False,
                ),
                frame_type="typing",
                exclude_user_id=conn.user_id,
                ephemeral=True,
            )
        if self.policy.presence_linger > 0:
            emit.linger(self, conn.user_id)
        else:
            self._gone(user, emit)

    def linger_expired(self, user_id: str, emit: Emitter) -> bool:
        """The linger of ``user_id``'s departure is over: announce it unless the
        user came back. True if the user is gone now."""
        user = self.users.get(user_id)
        if user is None or user.conns:
            return False
        self._gone(user, emit)
        return True

    def _gone(self, user: OnlineUser, emit: Emitter) -> None:
        del self.users[user.user_id]
        self.cursors.pop(user.user_id, None)
        if not self.announces_presence():
            return
        emit.broadcast(
            self,
            wire.user_disconnected_frame(
                channel_id=self.channel_id, user_id=user.user_id, username=user.username
            ),
            frame_type="user_disconnected",
            exclude_user_id=user.user_id,
            ephemeral=True,
        )

    def restore_user(self, user_id: str, *, status: str, joined_at_ms: int) -> None:
        """Put back what a re-registered user had before the channel slept: the
        user-level presence status (a user's connections may disagree) and
        when the user joined."""
        user = self.users.get(user_id)
        if user is None or not user.conns:
            return
        if status in wire.PRESENCE_STATUSES:
            user.status = status
        if joined_at_ms:
            user.joined_at_ms = joined_at_ms

    def depart_unregistered(
        self, user_id: str, username: str, status: str, joined_at_ms: int, emit: Emitter
    ) -> None:
        """A user the channel knew before it slept, whose connections no edge
        re-registered, has left: it departs as a member whose last connection
        left (the presence linger, then ``user_disconnected``)."""
        if user_id in self.users:
            return
        user = OnlineUser(user_id, username, joined_at_ms, status)
        self.users[user_id] = user
        if self.policy.presence_linger > 0:
            emit.linger(self, user_id)
        else:
            self._gone(user, emit)

    def drop_session(self, edge_id: str, keep_session: int | None, emit: Emitter) -> int:
        """Remove ``edge_id``'s connections not re-registered by session ``keep_session``."""
        stale = [
            c.conn_id
            for c in self.conns.values()
            if c.edge_id == edge_id and c.session != keep_session
        ]
        for conn_id in stale:
            self.leave(edge_id, conn_id, emit)
        return len(stale)

    # -- ephemeral ----------------------------------------------------------

    def set_typing(self, edge_id: str, conn_id: int, is_typing: bool, emit: Emitter) -> None:
        conn = self.conns.get((edge_id, conn_id))
        if conn is None:
            return
        if is_typing:
            self.typing.add(conn.user_id)
        else:
            self.typing.discard(conn.user_id)
        emit.broadcast(
            self,
            wire.typing_frame(
                channel_id=self.channel_id,
                user_id=conn.user_id,
                username=conn.username,
                is_typing=is_typing,
            ),
            frame_type="typing",
            exclude_user_id=conn.user_id,
            ephemeral=True,
        )

    def set_presence(self, edge_id: str, conn_id: int, status: str, emit: Emitter) -> None:
        conn = self.conns.get((edge_id, conn_id))
        if conn is None or status not in wire.PRESENCE_STATUSES:
            return
        conn.status = status
        self.set_user_status(conn, status, emit)

    def set_user_status(self, conn: Conn, status: str, emit: Emitter) -> None:
        user = self.users.get(conn.user_id)
        if user is None or user.status == status:
            return
        user.status = status
        emit.broadcast(
            self,
            wire.presence_frame(
                channel_id=self.channel_id,
                user_id=conn.user_id,
                username=conn.username,
                status=status,
            ),
            frame_type="presence",
            exclude_user_id=conn.user_id,
            ephemeral=True,
        )

    # -- read cursors -------------------------------------------------------

    def read(self, edge_id: str, conn_id: int, seq: int, emit: Emitter) -> int:
        """A connection read up to ``seq``: move its user's cursor there (clamped
        to the sequence head). Returns the new cursor, or 0 if it did not move
        (unknown connection, seq 0, or not past the cursor)."""
        conn = self.conns.get((edge_id, conn_id))
        if conn is None or seq <= 0:
            return 0
        return self.move_cursor(
            conn.user_id, min(seq, self.last_seq), emit, source=(edge_id, conn_id)
        )

    def move_cursor(
        self, user_id: str, seq: int, emit: Emitter, *, source: ConnKey | None = None
    ) -> int:
        """Move ``user_id``'s cursor forward to ``seq`` and tell the user's
        connections but ``source`` at once. Returns the new cursor or 0."""
        if seq <= self.cursors.get(user_id, 0):
            return 0
        user = self.users.get(user_id)
        if user is not None:  # cached while a member only
            self.cursors[user_id] = seq
            others = [key for key in user.conns if key != source]
            if others:
                frame = wire.read_frame(channel_id=self.channel_id, user_id=user_id, seq=seq)
                for edge_id, conn_id in others:
                    emit.reply(edge_id, conn_id, self.channel_id, frame, frame_type="read")
        emit.cursor_moved(self, user_id, seq)
        return seq

    def stored_cursor(self, user_id: str, seq: int) -> None:
        """The store's value of a member's cursor (authoritative: never lower than ours)."""
        if user_id in self.users and seq > self.cursors.get(user_id, 0):
            self.cursors[user_id] = seq

    # -- messages -----------------------------------------------------------

    def publish(
        self,
        edge_id: str,
        pub: channel_pb2.Publish,
        *,
        max_length: int,
        deadline: float,
        emit: Emitter,
    ) -> PendingPublish | None:
        """Validate and queue a publish; refusals are answered here."""
        conn = self.conns.get((edge_id, pub.conn_id))
        kind: wire.ErrorKind | None = None
        if conn is None:
            kind = wire.NOT_JOINED
        elif not conn.can_write:
            kind = wire.NO_WRITE_PERMISSION
        elif not pub.content.strip():
            kind = wire.EMPTY_MESSAGE
        elif len(pub.content) > max_length:
            kind = wire.MESSAGE_TOO_LONG
        if kind is not None or conn is None:
            refuse_publish(emit, edge_id, self.channel_id, pub, kind or wire.NOT_JOINED)
            return None
        pending = PendingPublish(
            edge_id=edge_id,
            conn_id=pub.conn_id,
            client_msg_id=pub.client_msg_id,
            client_supplied_id=pub.client_supplied_id,
            received_at_ns=pub.received_at_ns or time.time_ns(),
            deadline=deadline,
            message=store_pb2.NewMessage(
                id=str(uuid.uuid4()),
                user_id=conn.user_id,
                username=conn.username,
                avatar_url=conn.avatar_url,
                content=pub.content,
                thread_id=pub.thread_id,
                timestamp_ms=time.time_ns() // 1_000_000,
                client_msg_id=pub.client_msg_id or str(uuid.uuid4()),
            ),
        )
        if not storable(pending.message):
            # Refused alone here, not inside a group commit with other
            # channels' messages.
            refuse_publish(emit, edge_id, self.channel_id, pub, wire.INVALID_FIELD)
            return None
        self.pending.append(pending)
        return pending

    def take_pending(self) -> list[PendingPublish]:
        batch, self.pending = self.pending, []
        return batch

    def committed(
        self,
        pendings: Sequence[PendingPublish],
        results: Iterable[store_pb2.AppendResult],
        last_seq: int,
        emit: Emitter,
    ) -> None:
        """Broadcast what the store made durable (in seq order), ack the senders
        and move each sender's read cursor to its newest message."""
        sent: dict[str, tuple[int, ConnKey]] = {}  # user id -> (newest seq, its connection)
        for pending, result in zip(pendings, results, strict=True):
            msg = pending.message
            body = wire.message_body(
                id=result.id,
                seq=result.seq,
                channel_id=self.channel_id,
                user_id=msg.user_id,
                username=msg.username,
                avatar_url=msg.avatar_url,
                content=msg.content,
                timestamp_ms=result.timestamp_ms,
                thread_id=msg.thread_id,
            )
            self.broadcast_stored(body, received_at_ns=pending.received_at_ns, emit=emit)
            emit.reply(
                pending.edge_id,
                pending.conn_id,
                self.channel_id,
                wire.ack_frame(
                    channel_id=self.channel_id,
                    client_msg_id=pending.client_msg_id if pending.client_supplied_id else None,
                    id=result.id,
                    seq=result.seq,
                    timestamp_ms=result.timestamp_ms,
                ),
                client_msg_id=pending.client_msg_id,
                final=True,
            )
            newest = sent.get(msg.user_id)
            if newest is None or result.seq > newest[0]:
                sent[msg.user_id] = (result.seq, (pending.edge_id, pending.conn_id))
        self.last_seq = max(self.last_seq, last_seq)
        # Sending a message reads the channel up to it: one move per sender
        # and commit, its other connections told (the sending one has its ack).
        for user_id, (seq, source) in sent.items():
            self.move_cursor(user_id, seq, emit, source=source)

    def broadcast_stored(self, body: dict[str, Any], *, received_at_ns: int, emit: Emitter) -> None:
        """Broadcast one durable message. A duplicate (seq already known) is sent
        again too: edges drop what a connection already has, and a retry after a
        crash may be the only copy some connections ever get."""
        seq = int(body["seq"])
        if seq > self.last_seq:
            self.last_seq = seq
            if self.policy.recent_limit:
                self.recent.append(body)
        emit.broadcast(
            self,
            wire.message_frame(body),
            frame_type="message",
            seq=seq,
            received_at_ns=received_at_ns,
        )

    def fail_pending(self, pendings: Iterable[PendingPublish], emit: Emitter) -> None:
        for pending in pendings:
            refuse_publish(emit, pending.edge_id, self.channel_id, pending, wire.UNAVAILABLE)
