"""The exactly-once, in-order filter between the wire and the application.

Every message the client receives — the history in each ``initial_state``,
live ``message`` frames and replayed ones — goes through one ``Sequencer``:

* ``seq <= last`` (``last`` = the highest seq handed to the application) is
  a duplicate or an old message and is dropped;
* ``seq == last + 1`` is handed over, followed by any held messages that now
  continue the sequence;
* a larger seq means something was missed: the message is held back and a
  ``sync`` for ``afterSeq = last`` is asked for, so the server replays the gap.

A v1.1 subscription resumed with ``subscribe {afterSeq: last}`` gets its
replay without a ``sync``: ``on_resume`` counts it as the sync in flight.
One sequencer serves one channel.

The sequencer does no I/O: its methods return the messages to deliver and
whether a ``sync`` should be sent, and the client acts on that.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from waddle_client.events import InitialState, Message

__all__ = ["Outcome", "Sequencer"]


@dataclass(slots=True)
class Outcome:
    """What the client must do after feeding the sequencer."""

    deliver: list[Message] = field(default_factory=list)
    """Messages to hand to the application, in this order."""
    want_sync: bool = False
    """A ``sync`` after ``Sequencer.last`` should be sent (unless one is outstanding)."""
    history_reset: bool = False
    """The server's history went backwards; the sequencer started over."""
    gap_skipped: tuple[int, int] | None = None
    """An unfillable gap ``(first missing, last missing)`` was given up on."""


class Sequencer:
    """Tracks the last delivered seq, held-back messages and the sync in flight."""

    def __init__(self, *, max_held: int = 10_000, max_gap_syncs: int = 3) -> None:
        self.last: int | None = None
        """The highest seq handed to the application (or the channel's position
        when this client first joined an empty window); ``None`` before that."""
        self.held: dict[int, Message] = {}
        self.sync_outstanding = False
        self.max_held = max_held
        self.max_gap_syncs = max_gap_syncs
        self._sync_from: int | None = None
        self._fruitless_syncs = 0

    # -- connection life ----------------------------------------------------

    def connection_lost(self) -> None:
        """A sync sent on the old connection will never complete."""
        self.sync_outstanding = False
        self._sync_from = None

    def on_initial_state(self, state: InitialState, *, reconnect: bool) -> Outcome:
        """Feed a connection's ``initial_state``; on a reconnect always ask for a sync."""
        out = Outcome()
        if self.last is not None and state.last_seq < self.last:
            # The channel's history went backwards (a wiped database): nothing
            # after our position will ever come, so start over from here.
            out.history_reset = True
            self.last = None
            self.held.clear()
            self._fruitless_syncs = 0
        messages = sorted(state.messages, key=lambda m: m.seq)
        if self.last is None:
            # First position: the oldest message shown, or the channel head.
            self.last = (messages[0].seq - 1) if messages else state.last_seq
            reconnect = False
        for message in messages:
            self._offer(message, out)
        if reconnect or (self.last is not None and self.last < state.last_seq):
            out.want_sync = True
        return out

    def on_resume(self, state: InitialState, after: int) -> Outcome:
        """Feed the ``initial_state`` of a ``subscribe {afterSeq: after}`` (v1.1).

        The server replays what follows ``after`` and then sends
        ``sync_complete``, exactly as for a ``sync``: the replay counts as
        the sync in flight, so no other is asked for meanwhile.
        """
        if self.last is None:
            return self.on_initial_state(state, reconnect=False)
        out = Outcome()
        if state.last_seq < self.last:
            # History went backwards: the replay brings nothing; start at the head.
            out.history_reset = True
            self.held.clear()
            self._fruitless_syncs = 0
            self.last = state.last_seq
        self.sync_outstanding = True
        self._sync_from = after
        return out

    # -- messages ------------------------------------------------------------

    def offer(self, message: Message) -> Outcome:
        """Feed one live or replayed message."""
        out = Outcome()
        self._offer(message, out)
        return out

    def _offer(self, message: Message, out: Outcome) -> None:
        seq = message.seq
        if self.last is None:
            # No initial_state yet (cannot happen with a conforming server):
            # take this message as the starting point.
            self.last = seq - 1
        if seq <= self.last or seq in self.held:
            return
        if seq == self.last + 1:
            self._deliver(message, out)
            self._drain(out)
            return
        if len(self.held) < self.max_held:
            self.held[seq] = message
        # Even when the hold is full, the sync replays everything after `last`.
        out.want_sync = True

    def _deliver(self, message: Message, out: Outcome) -> None:
        self.last = message.seq
        out.deliver.append(message)

    def _drain(self, out: Outcome) -> None:
        while self.last is not None and (nxt := self.held.pop(self.last + 1, None)) is not None:
            self._deliver(nxt, out)
        if self.last is not None:
            for seq in [s for s in self.held if s <= self.last]:
                del self.held[seq]

    # -- sync ----------------------------------------------------------------

    @property
    def has_gap(self) -> bool:
        return bool(self.held)

    def sync_started(self) -> int:
        """A ``sync`` is being sent; return its ``afterSeq``."""
        after = self.last if self.last is not None else 0
        self.sync_outstanding = True
        self._sync_from = after
        return after

    def sync_refused(self) -> None:
        """The server refused the sync (another one was in progress there)."""
        self.sync_outstanding = False

    def on_sync_complete(self) -> Outcome:
        """The server finished a replay; ask again if a gap is still open."""
        out = Outcome()
        started_from = self._sync_from
        self.sync_outstanding = False
        self._sync_from = None
        if not self.held:
            self._fruitless_syncs = 0
            return out
        if started_from is not None and self.last == started_from:
            self._fruitless_syncs += 1
        else:
            self._fruitless_syncs = 0
        if self._fruitless_syncs >= self.max_gap_syncs:
            # The server says it has nothing more: give up on the gap rather
            # than stall the channel forever.
            first_missing = (self.last or 0) + 1
            seqs = sorted(self.held)
            out.gap_skipped = (first_missing, seqs[0] - 1)
            for seq in seqs:
                message = self.held.pop(seq)
                if self.last is None or seq > self.last:
                    self._deliver(message, out)
            self._fruitless_syncs = 0
            return out
        out.want_sync = True
        return out
