"""The channel lifecycle on a shard: load, hibernate, wake, take over, hand off.

A channel id is in one of four states on a shard:

* **absent**: nothing is held.
* **loading**: its state is being read from the store and, when it was
  asleep, its connections are being re-registered by the edges that hold
  them (it is *waking*). Its events wait in a backlog.
* **awake**: a ``Channel`` in memory; its events are applied at once.
* **asleep** (hibernated): only a ``Dormant`` record is kept, packed in the
  shard's ``DormantTable`` - for each edge with members there, the edge's
  id, how many connections it registered (and in which Attach session), and
  per user id, name, presence status and joined-at. For a channel of two
  users on one edge that is about 150 bytes (``dormant_size``), whatever its
  history.

Transitions and their contract:

1. **Load.** The first join of an absent channel loads it from the store
   (head, settings, recent window; at most ``load_concurrency`` loads and
   wakes at a time, the others queue). Events that arrive meanwhile are applied
   in arrival order once it is loaded. A channel with no members left is
   forgotten at once (nothing is pending for it).
2. **Hibernate.** With ``idle_seconds`` > 0, an awake channel with members
   that had no event (message, typing, presence, join, leave, read) for that
   long is put to sleep: its recent window, typing state, read-cursor cache
   and everything else of it is freed, and ``memory.Trimmer`` hands the
   pages back to the system. Nothing is sent to anyone: the edges keep their
   sockets and attachments. A channel that still has work is not put to
   sleep yet: publishes queued or committing, a member within the presence
   linger, or an edge within its rejoin grace.
3. **Wake.** Any event for a sleeping channel wakes it: the owner asks each
   edge of the record (``Rehydrate``) to re-register that channel's
   connections silently (``Rehydrated``), loads the channel from the store
   meanwhile, and keeps the channel's events in the backlog. Once the store
   answered and every asked edge answered (or its Attach stream ended, or
   ``rehydrate_timeout`` passed): the re-registrations are applied, each
   user's presence status and joined-at are restored from the record, then
   the backlog in arrival order. ``seq`` continues from the store's head.
   Users the record lists but no edge re-registered left while the channel
   slept without their leave reaching the owner (an edge stream broke or an
   edge died): they depart as any member does (presence linger, then
   ``user_disconnected``), once their edge's rejoin grace is over.
   Clients see no frame about any of this.
4. **Re-registration while asleep.** An edge whose Attach stream re-opened
   re-registers every connection it holds (``rejoin``); for a sleeping
   channel that only updates the record - no store call, no wake. When the
   edge's rejoin grace ends and it did not re-register as many connections
   as it had, the channel is woken in the background to announce who left.
5. **Take over.** A re-registration for a channel this shard does not hold
   (the shard restarted, or the channel's ownership moved here) takes the
   channel over asleep: no store load. A light head check (``LoadChannel``
   with no messages; at most ``background_concurrency`` at a time) tells
   the edges the channel's head so connections that missed a message catch
   up from the store. Hibernation off (``idle_seconds`` = 0): the channel
   is loaded, as before.
6. **Hand off.** A shard gives a channel up by forgetting it: nothing needs
   saving, since everything durable is in the store and everything else is
   rebuilt from the edges' registrations by the next owner. The store's
   fence (the expected head on every append) keeps two owners from both
   committing the same ``seq`` while they disagree.

Read receipts coalesced for a channel that fell asleep meanwhile go to the
edges of its record; presence lingers never span a hibernation (rule 2).
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import Coroutine, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from channel_service.alarm import Alarm
from channel_service.channel import Channel, ChannelPolicy, Emitter
from channel_service.dormant import Dormant, DormantTable, EdgeShare
from channel_service.memory import Trimmer
from channel_service.metrics import ChannelMetrics
from waddle_common.store_client import StoreUnavailable
from waddle_pb import channel_pb2, store_pb2

if TYPE_CHECKING:
    from channel_service.hub import Session

log = logging.getLogger("channel.lifecycle")

Backlog = list[tuple["Session", channel_pb2.EdgeEvent]]


@dataclass(frozen=True, slots=True)
class LifecycleConfig:
    # Seconds without an event before a channel with members is hibernated (0: never).
    idle_seconds: float = 0.0
    # How long a wake waits for the edges' re-registrations.
    rehydrate_timeout: float = 5.0
    # Background store calls (head checks, wakes that announce departures) at a time.
    background_concurrency: int = 8
    # Channel loads (first joins and wakes) at a time; the others wait their
    # turn. Thousands at once would all outlive the store's deadline, be
    # refused, and wake again on the next message.
    load_concurrency: int = 32
    # Channels put to sleep per loop turn (the rest on the next turns).
    sweep_batch: int = 500
    retry_initial: float = 0.05
    retry_max: float = 1.0


class ChannelStore(Protocol):
    """The part of the store client the lifecycle needs."""

    async def load_channel(self, channel_id: str, recent_limit: int) -> store_pb2.ChannelState: ...


class Host(Emitter, Protocol):
    """What the lifecycle needs of the hub: its Attach sessions, applying
    events to an awake channel, and answering what cannot wait."""

    def session(self, edge_id: str) -> Session | None:
        """The edge's open Attach session, if any."""

    def apply(self, channel: Channel, session: Session, event: channel_pb2.EdgeEvent) -> None:
        """Apply one event to an awake channel."""

    def rejoin(self, channel: Channel, session: Session, join: channel_pb2.Join) -> None:
        """Apply one silent re-registration to an awake channel."""

    def refuse_backlog(self, backlog: Backlog) -> Backlog:
        """Answer what cannot wait for the store; return the re-registrations."""

    def refuse_unloaded_publish(self, session: Session, pub: channel_pb2.Publish) -> None:
        """A publish for a channel nobody is registered in."""

    def grace_pending(self, edge_id: str) -> bool:
        """The edge's connections are within their rejoin grace (its stream broke or re-opened)."""

    def evict_if_idle(self, channel: Channel) -> None:
        """Forget an awake channel that has no members and nothing pending."""

    def spawn(self, coro: Coroutine[Any, Any, None], name: str) -> None:
        """Run a task the hub cancels when it stops."""

    def channel_asleep(self, channel_id: str) -> None:
        """A channel went to sleep: drop whatever shard-wide state still names it."""


# -- the dormant record ------------------------------------------------------------


def user_entry(user_id: str, username: str, status: str, joined_at_ms: int) -> list[Any]:
    return [user_id, username, status, joined_at_ms]


@dataclass(frozen=True, slots=True)
class KnownUser:
    username: str
    status: str
    joined_at_ms: int


def known_users(shares: Iterable[EdgeShare]) -> dict[str, KnownUser]:
    """Users of the given shares (a later entry about the same user wins)."""
    out: dict[str, KnownUser] = {}
    for share in shares:
        for user_id, username, status, joined in share.users:
            out[user_id] = KnownUser(username, status, joined)
    return out


def dormant_size(table: DormantTable, channel_id: str) -> int:
    """Bytes a sleeping channel costs: its entry in the table's buffer and
    its share of the table's index."""
    index = table.nbytes - table.buffer_bytes
    return table.entry_size(channel_id) + index // max(1, len(table))


@dataclass(eq=False, slots=True)
class Waking:
    """A channel being loaded (and, when it was asleep, re-registered)."""

    channel_id: str
    backlog: Backlog
    shares: Dormant = ()
    asked: set[str] = field(default_factory=set)  # edges whose answer is awaited
    answered: dict[str, tuple[Session, channel_pb2.Rehydrated]] = field(default_factory=dict)
    state: store_pb2.ChannelState | None = None
    started: float = 0.0
    timer: asyncio.TimerHandle | None = None


class Lifecycle:
    """Every channel of one shard, in whichever state it is (see the module doc)."""

    def __init__(
        self,
        host: Host,
        store: ChannelStore,
        metrics: ChannelMetrics,
        *,
        config: LifecycleConfig,
        policy: ChannelPolicy,
        default_max_connections: int,
    ) -> None:
        self.host = host
        self.store = store
        self.metrics = metrics
        self.config = config
        self.policy = policy
        self.default_max = default_max_connections
        self.channels: dict[str, Channel] = {}
        self.sleeping = DormantTable()
        self.waking: dict[str, Waking] = {}
        # Departures to settle once an edge's rejoin grace is over: channel -> edge -> share.
        self._deferred: dict[str, dict[str, EdgeShare]] = {}
        self._sweeper = Alarm("hibernate", self._sweep)
        self._trimmer = Trimmer(on_trim=metrics.trim_seconds.observe)
        self._background: collections.deque[tuple[str, str]] = collections.deque()
        self._background_running = 0
        self._loads = asyncio.Semaphore(config.load_concurrency)
        metrics.hibernated_bytes.set_function(lambda: self.sleeping.nbytes)

    @property
    def hibernates(self) -> bool:
        return self.config.idle_seconds > 0

    def members(self) -> int:
        """Connections registered in this shard's channels, awake or asleep."""
        awake = sum(len(c.conns) for c in self.channels.values())
        return awake + self.sleeping.members

    def start(self) -> None:
        if self.hibernates:
            self._trimmer.start()

    def stop(self) -> None:
        self._sweeper.cancel()
        self._trimmer.cancel()
        for waking in self.waking.values():
            if waking.timer is not None:
                waking.timer.cancel()
        self._background.clear()

    # -- events -------------------------------------------------------------

    def route(self, session: Session, event: channel_pb2.EdgeEvent) -> None:
        """Deliver one event from an edge to its channel, whatever the channel's state."""
        kind = event.WhichOneof("kind")
        if kind is None or kind == "hello":
            return
        if kind == "rehydrated":
            self._answered(session, event.rehydrated)
            return
        channel_id: str = getattr(event, kind).channel_id
        channel = self.channels.get(channel_id)
        if channel is not None:
            self.host.apply(channel, session, event)
            return
        waking = self.waking.get(channel_id)
        if waking is not None:
            if kind == "leave" and event.leave.moved:
                self._moved_while_waking(waking, session.edge_id)
            waking.backlog.append((session, event))
            return
        record = self.sleeping.get(channel_id)
        if record is not None:
            if kind == "join" and event.join.rejoin:
                self.sleeping.put(channel_id, absorb(record, session, event.join))
            elif kind == "leave" and event.leave.moved:
                self._moved_while_asleep(channel_id, record, session.edge_id)
            else:
                waking = self._wake(channel_id, record, [(session, event)], reason="event")
                self.host.spawn(self._load(waking), f"wake:{channel_id}")
            return
        if kind in ("leave", "typing", "presence", "read"):
            return  # nothing to act on in a channel nobody is in
        if kind == "publish":
            # The sender is not (or no longer) registered here.
            self.host.refuse_unloaded_publish(session, event.publish)
            return
        if kind == "join" and event.join.rejoin and self.hibernates:
            self._take_over(channel_id, session, event.join)
            return
        waking = Waking(channel_id, [(session, event)])
        self.waking[channel_id] = waking
        self.host.spawn(self._load(waking), f"load:{channel_id}")

    def touched(self, channel: Channel) -> None:
        channel.active_at = time.monotonic()

    # -- loading and waking -------------------------------------------------

    def _wake(self, channel_id: str, record: Dormant, backlog: Backlog, *, reason: str) -> Waking:
        """Start waking a sleeping channel; ``_load`` finishes it."""
        self.sleeping.pop(channel_id)
        waking = Waking(channel_id, backlog, shares=record, started=time.perf_counter())
        self.waking[channel_id] = waking
        ask = channel_pb2.ShardEvent(rehydrate=channel_pb2.Rehydrate(channel_id=channel_id))
        for share in record:
            session = self.host.session(share.edge_id)
            if session is not None and not session.closed:
                session.send(ask)
                waking.asked.add(share.edge_id)
        if waking.asked:
            loop = asyncio.get_running_loop()
            waking.timer = loop.call_later(
                self.config.rehydrate_timeout, self._stop_waiting, waking
            )
        self.metrics.wakes.labels(reason).inc()
        return waking

    async def _load(self, waking: Waking) -> None:
        channel_id = waking.channel_id
        delay = self.config.retry_initial
        while self.waking.get(channel_id) is waking:
            try:
                async with self._loads:
                    state = await self.store.load_channel(channel_id, self.policy.recent_limit)
            except StoreUnavailable as exc:
                log.warning(
                    "channel load failed", extra={"channel_id": channel_id, "error": str(exc)}
                )
                if self._load_failed(waking):
                    return
                # Re-registrations must not be refused: keep trying.
                await asyncio.sleep(delay)
                delay = min(delay * 2, self.config.retry_max)
                continue
            self.metrics.loads.labels("full").inc()
            waking.state = state
            self._maybe_complete(waking)
            return

    def _load_failed(self, waking: Waking) -> bool:
        """The store did not answer: refuse what cannot wait. True when the
        load is over (the channel went back to sleep, or was forgotten)."""
        waking.backlog = self.host.refuse_backlog(waking.backlog)
        if not self.hibernates:
            if waking.backlog:
                return False
            self._forget(waking)
            return True
        # Whatever is still registered sleeps; the next event wakes it again.
        record = waking.shares
        for session, event in waking.backlog:
            record = absorb(record, session, event.join)
        self._forget(waking)
        if record:
            self.sleeping.put(waking.channel_id, record)
        return True

    def _forget(self, waking: Waking) -> None:
        if self.waking.get(waking.channel_id) is waking:
            del self.waking[waking.channel_id]
        if waking.timer is not None:
            waking.timer.cancel()

    def _answered(self, session: Session, answer: channel_pb2.Rehydrated) -> None:
        channel_id = answer.channel_id
        if self.host.session(session.edge_id) is not session:
            return  # from a stream that has ended: its re-registrations follow on the new one
        waking = self.waking.get(channel_id)
        if waking is not None:
            waking.asked.discard(session.edge_id)
            waking.answered[session.edge_id] = (session, answer)
            self._maybe_complete(waking)
            return
        channel = self.channels.get(channel_id)
        if channel is not None:  # later than the wake would wait: still re-registrations
            for join in answer.members:
                self.host.rejoin(channel, session, join)

    def _stop_waiting(self, waking: Waking) -> None:
        waking.timer = None
        if self.waking.get(waking.channel_id) is waking and waking.asked:
            log.warning(
                "edges did not re-register a waking channel in time",
                extra={"channel_id": waking.channel_id, "edges": sorted(waking.asked)},
            )
            waking.asked.clear()
            self._maybe_complete(waking)

    def _moved_while_asleep(self, channel_id: str, record: Dormant, edge_id: str) -> None:
        """An edge moved the sleeping channel elsewhere (all of its connections
        at once): its share of the record goes and the channel sleeps on (a
        wake would count those users as departed)."""
        rest = tuple(share for share in record if share.edge_id != edge_id)
        if rest:
            self.sleeping.put(channel_id, rest)
        else:
            self.sleeping.pop(channel_id)

    def _moved_while_waking(self, waking: Waking, edge_id: str) -> None:
        """An edge moved the waking channel elsewhere (it moves all of a
        channel's connections at once): its share of the sleeping record
        is not departures to settle, and its answer is not awaited."""
        waking.shares = tuple(s for s in waking.shares if s.edge_id != edge_id)
        if edge_id in waking.asked:
            waking.asked.discard(edge_id)
            self._maybe_complete(waking)

    def session_ended(self, edge_id: str) -> None:
        """An edge's Attach stream ended (or was replaced): stop waiting for its answers."""
        for waking in list(self.waking.values()):
            if edge_id in waking.asked:
                waking.asked.discard(edge_id)
                self._maybe_complete(waking)

    def _maybe_complete(self, waking: Waking) -> None:
        if (
            waking.state is not None
            and not waking.asked
            and self.waking.get(waking.channel_id) is waking
        ):
            self._complete(waking, waking.state)

    def _complete(self, waking: Waking, state: store_pb2.ChannelState) -> None:
        channel_id = waking.channel_id
        self._forget(waking)
        channel = Channel.from_state(state, default_max=self.default_max, policy=self.policy)
        self.touched(channel)
        self.channels[channel_id] = channel
        host = self.host
        for session, answer in waking.answered.values():
            if not session.closed:
                for join in answer.members:
                    host.rejoin(channel, session, join)
        if waking.shares:
            for user_id, user in known_users(waking.shares).items():
                channel.restore_user(user_id, status=user.status, joined_at_ms=user.joined_at_ms)
        for session, event in waking.backlog:
            host.apply(channel, session, event)
        for share in waking.shares:
            if share.edge_id in waking.answered or not host.grace_pending(share.edge_id):
                self._settle(channel, share)
            else:
                self._deferred.setdefault(channel_id, {})[share.edge_id] = share
        if waking.shares:
            self.metrics.wake_seconds.observe(time.perf_counter() - waking.started)
        if self.hibernates:
            self._sweeper.arm(channel.active_at + self.config.idle_seconds)
        host.evict_if_idle(channel)

    def _settle(self, channel: Channel, share: EdgeShare) -> None:
        """Users of a share that nobody re-registered have left."""
        for user_id, user in known_users([share]).items():
            if user_id not in channel.users:
                channel.depart_unregistered(
                    user_id, user.username, user.status, user.joined_at_ms, self.host
                )

    def forgotten(self, channel: Channel) -> None:
        """An awake channel left memory for good (no members)."""
        self._deferred.pop(channel.channel_id, None)

    # -- taking over and the edges' grace -----------------------------------

    def _take_over(self, channel_id: str, session: Session, join: channel_pb2.Join) -> None:
        self.sleeping.put(channel_id, absorb((), session, join))
        self.metrics.takeovers.inc()
        self._background_add("head", channel_id)

    def edge_stale(self, edge_id: str, keep_generation: int | None) -> None:
        """The edge's rejoin grace is over: connections it did not re-register
        (in session ``keep_generation``) are gone."""
        for channel_id, by_edge in list(self._deferred.items()):
            share = by_edge.pop(edge_id, None)
            if not by_edge:
                del self._deferred[channel_id]
            channel = self.channels.get(channel_id)
            if share is not None and channel is not None:
                self._settle(channel, share)
                self.host.evict_if_idle(channel)
        short = [
            channel_id
            for channel_id, record in self.sleeping.with_edge(edge_id)
            if any(
                share.edge_id == edge_id
                and (share.generation != keep_generation or share.count < share.expected)
                for share in record
            )
        ]
        for channel_id in short:
            self._background_add("departures", channel_id)

    def _background_add(self, kind: str, channel_id: str) -> None:
        self._background.append((kind, channel_id))
        self._pump()

    def _pump(self) -> None:
        while self._background and self._background_running < self.config.background_concurrency:
            kind, channel_id = self._background.popleft()
            record = self.sleeping.get(channel_id)
            if record is None:
                continue  # woken meanwhile: the wake did the work
            self._background_running += 1
            if kind == "head":
                work = self._head_check(channel_id)
            else:
                work = self._load(self._wake(channel_id, record, [], reason="departures"))
            self.host.spawn(self._background_run(work), f"{kind}:{channel_id}")

    async def _background_run(self, work: Coroutine[Any, Any, None]) -> None:
        try:
            await work
        finally:
            self._background_running -= 1
            self._pump()

    async def _head_check(self, channel_id: str) -> None:
        delay = self.config.retry_initial
        while channel_id in self.sleeping:
            try:
                state = await self.store.load_channel(channel_id, 0)
            except StoreUnavailable:
                await asyncio.sleep(delay)
                delay = min(delay * 2, self.config.retry_max)
                continue
            self.metrics.loads.labels("head").inc()
            record = self.sleeping.get(channel_id)
            if record is None or not state.last_seq:
                return
            head = channel_pb2.ShardEvent(
                head=channel_pb2.Head(channel_id=channel_id, last_seq=state.last_seq)
            )
            for share in record:
                session = self.host.session(share.edge_id)
                if session is not None:
                    session.send(head)
            return

    # -- hibernation --------------------------------------------------------

    def _can_sleep(self, channel: Channel) -> bool:
        if channel.pending or channel.committing or not channel.conns:
            return False
        if channel.channel_id in self._deferred:
            return False
        if any(self.host.grace_pending(edge_id) for edge_id in channel.edges):
            return False
        return all(user.conns for user in channel.users.values())  # nobody lingering

    def _sweep(self, now: float) -> float | None:
        idle = self.config.idle_seconds
        threshold = now - idle
        due = [c for c in self.channels.values() if c.active_at <= threshold]
        asleep = 0
        retry = False
        for channel in due:
            if asleep >= self.config.sweep_batch:
                break
            if not channel.conns:
                self.host.evict_if_idle(channel)
            elif self._can_sleep(channel):
                self.hibernate(channel)
                asleep += 1
            else:
                retry = True
        if asleep:
            self._trimmer.freed()
        if asleep < len(due) and asleep >= self.config.sweep_batch:
            return now  # more to put to sleep: next loop turn
        # One sweep per tenth of the idle period at most, however the
        # channels' deadlines are spread.
        pace = now + max(0.05, idle / 10)
        if retry:
            return max(pace, now + min(idle, 1.0))
        if not self.channels:
            return None
        return max(pace, min(c.active_at for c in self.channels.values()) + idle)

    def hibernate(self, channel: Channel) -> None:
        """Put an awake channel to sleep (``_can_sleep`` must hold)."""
        by_edge: dict[str, list[list[Any]]] = {}
        for user in channel.users.values():
            entry = user_entry(user.user_id, user.username, user.status, user.joined_at_ms)
            for edge_id in {edge_id for edge_id, _ in user.conns}:
                by_edge.setdefault(edge_id, []).append(entry)
        record: list[EdgeShare] = []
        for edge_id, count in channel.edges.items():
            session = self.host.session(edge_id)
            record.append(
                EdgeShare(
                    edge_id,
                    session.generation if session is not None else 0,
                    count,
                    count,
                    by_edge.get(edge_id, []),
                )
            )
        channel_id = channel.channel_id
        del self.channels[channel_id]
        self.sleeping.put(channel_id, tuple(record))
        self.host.channel_asleep(channel_id)
        self.metrics.hibernations.inc()


def absorb(record: Dormant, session: Session, join: channel_pb2.Join) -> Dormant:
    """A sleeping channel's record after one silent re-registration."""
    m = join.member
    entry = user_entry(m.user_id, m.username, m.status or "online", m.joined_at_ms)
    for share in record:
        if share.edge_id != session.edge_id:
            continue
        if share.generation != session.generation:
            # The edge's stream re-opened: it re-registers what it still holds.
            share.generation = session.generation
            share.count = 0
        share.count += 1
        if share.count > share.expected:
            # More than it had: a connection the record does not know yet
            # (a channel taken over, re-registered one connection at a time).
            share.expected = share.count
            share.users.append(entry)
        return record
    return (*record, EdgeShare(session.edge_id, session.generation, 1, 1, [entry]))
