"""The shard drain: what SIGTERM does before the gRPC server stops.

Contract, in order:

1. The hub stops taking publishes and joins (``Hub.draining``): they are
   left unanswered, so the edges still hold them as unsettled and re-send
   them, with their idempotency keys, to the channels' next owners.
2. Every publish already taken is settled: queued and committing ones are
   committed (or refused) and acknowledged; channels being loaded finish.
3. Every edge is told (``Draining`` on its Attach stream, after those acks;
   an edge that attaches now is welcomed as draining). Each edge re-routes
   the shard's channels to their next rendezvous choice and ends its stream.
4. Once no edge stream is left (or the budget is spent), the shard exits.

Nothing here is lost on a timeout: a publish not settled in step 2 is never
acknowledged here, and is re-sent by its edge. The store's fence keeps the
old and the new owner from both committing the same ``seq``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass

from channel_service.hub import Hub
from waddle_pb import channel_pb2

log = logging.getLogger("channel.drain")

POLL = 0.01  # how often the drain looks again at commits and streams


@dataclass(frozen=True, slots=True)
class DrainReport:
    settled_seconds: float  # until every publish taken was settled
    released_seconds: float  # until every edge had ended its stream
    edges_left: int  # streams still open when the budget ran out


def draining_event() -> channel_pb2.ShardEvent:
    return channel_pb2.ShardEvent(draining=channel_pb2.Draining())


async def drain(hub: Hub, budget: float) -> DrainReport:
    """Hand every channel of this shard over to the edges' next choice within ``budget``."""
    started = time.monotonic()
    deadline = started + budget
    hub.draining = True
    log.info("draining", extra={"edges": len(hub.sessions), "channels": len(hub.channels)})
    while hub.settling() and time.monotonic() < deadline:  # noqa: ASYNC110
        # Commits finish on the hub's committer; a short poll keeps this free
        # of hooks into it.
        await asyncio.sleep(POLL)
    settled = time.monotonic() - started
    event = draining_event()
    for session in list(hub.sessions.values()):
        session.send(event)
    while hub.sessions and time.monotonic() < deadline:  # noqa: ASYNC110
        await asyncio.sleep(POLL)
    report = DrainReport(
        settled_seconds=settled,
        released_seconds=time.monotonic() - started,
        edges_left=len(hub.sessions),
    )
    (log.warning if report.edges_left else log.info)(
        "drained",
        extra={
            "settled_seconds": round(report.settled_seconds, 3),
            "released_seconds": round(report.released_seconds, 3),
            "edges_left": report.edges_left,
        },
    )
    return report
