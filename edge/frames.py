"""What the edge does with one client frame, on either endpoint.

Both the v1 socket (one channel) and the multiplexed socket (many
channels) read frames, parse them with ``edge.protocol`` and hand a frame
for a channel to ``channel_frame`` with that channel's ``Connection``. The
per-socket budgets (``ConnectionBudget``) and the refusal rules live here:
going over the message or typing budget is back-pressure (``rate_limited``
with ``retryAfterMs``), going over the all-frames budget or sending invalid
frames is abuse, and sustained abuse closes the socket with 1008.

Every error about a channel names it (``channelId``), on both endpoints.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
import uuid

from edge import protocol
from edge.connection import Connection
from edge.limits import ConnectionBudget
from edge.runtime import EdgeRuntime
from edge.shards import ShardRouter
from waddle_common import wire
from waddle_pb import channel_pb2

log = logging.getLogger("edge")


def first_budget(runtime: EdgeRuntime) -> ConnectionBudget:
    """A socket's budgets, made when its first frame arrives: a silent socket costs none."""
    return ConnectionBudget.create(runtime.rates, asyncio.get_running_loop().time())


def refuse_binary(runtime: EdgeRuntime, conn: Connection, budget: ConnectionBudget) -> bool:
    """A binary frame (the protocol has none): refused as ``refuse_frame`` does."""
    runtime.metrics.frames_in.labels("binary").inc()
    return refuse_frame(runtime, conn, budget, wire.error_frame(wire.BINARY_UNSUPPORTED))


def refuse_frame(
    runtime: EdgeRuntime, conn: Connection, budget: ConnectionBudget, payload: bytes
) -> bool:
    """Send an error and count it; return False once the socket must be closed for abuse."""
    conn.send(payload, runtime.metrics, runtime.local.limits, "error")
    if budget.strike(asyncio.get_running_loop().time()):
        runtime.metrics.refusals.labels("abuse").inc()
        log.info(
            "closing abusive connection",
            extra={"channel_id": conn.channel_id, "user_id": conn.identity.user_id},
        )
        conn.close(wire.CLOSE_POLICY, "too many refused frames")
        return False
    return True


def rate_limited(
    runtime: EdgeRuntime,
    conn: Connection,
    budget: ConnectionBudget,
    wait: float,
    client_msg_id: str | None,
    *,
    abuse: bool,
    channel_id: str | None = None,
) -> bool:
    """Refuse an over-budget frame. Going over the message or typing budget
    is ordinary back-pressure (a client flushing its queue after a
    reconnect); going over the budget for all frames is abuse."""
    runtime.metrics.frames_in.labels("rate_limited").inc()
    payload = wire.error_frame(
        wire.RATE_LIMITED,
        retryAfterMs=max(1, math.ceil(wait * 1000)),
        clientMsgId=client_msg_id,
        channel_id=channel_id,
    )
    if abuse:
        return refuse_frame(runtime, conn, budget, payload)
    conn.send(payload, runtime.metrics, runtime.local.limits, "error")
    return True


def take_frame(
    runtime: EdgeRuntime,
    conn: Connection,
    budget: ConnectionBudget,
    frame: protocol.ClientFrame,
    channel_id: str | None,
) -> bool | None:
    """Spend the all-frames budget on ``frame``: None when allowed, else
    whether the socket stays open after the refusal."""
    wait = budget.frames.take(asyncio.get_running_loop().time())
    if not wait:
        runtime.metrics.frames_in.labels(protocol.frame_type(frame)).inc()
        return None
    cmid = frame.client_msg_id if isinstance(frame, protocol.SendMessage) else None
    return rate_limited(runtime, conn, budget, wait, cmid, abuse=True, channel_id=channel_id)


def channel_frame(
    runtime: EdgeRuntime,
    conn: Connection,
    link: ShardRouter,
    budget: ConnectionBudget,
    frame: protocol.ClientFrame,
) -> bool:
    """Act on one frame for ``conn``'s channel; return False when the socket must end.

    Synchronous on purpose: frames are handled as they are parsed
    (``edge.upgraded``), and nothing waits per socket."""
    metrics, limits = runtime.metrics, runtime.local.limits
    match frame:
        case protocol.Ping():
            conn.send(wire.PONG_FRAME, metrics, limits, "pong")
        case protocol.SendMessage(content=content, thread_id=thread_id, client_msg_id=cmid):
            wait = budget.messages.take(asyncio.get_running_loop().time())
            if wait:
                return rate_limited(
                    runtime, conn, budget, wait, cmid, abuse=False, channel_id=conn.channel_id
                )
            link.publish(
                conn,
                channel_pb2.Publish(
                    conn_id=conn.id,
                    channel_id=conn.channel_id,
                    content=content,
                    thread_id=thread_id or "",
                    client_msg_id=cmid or str(uuid.uuid4()),
                    client_supplied_id=cmid is not None,
                    received_at_ns=time.time_ns(),
                ),
            )
        case protocol.SetTyping(is_typing=is_typing):
            wait = budget.typing.take(asyncio.get_running_loop().time())
            if wait:
                return rate_limited(
                    runtime, conn, budget, wait, None, abuse=False, channel_id=conn.channel_id
                )
            link.typing(conn, is_typing)
        case protocol.SetPresence(status=status):
            conn.status = status
            link.presence(conn, status)
        case protocol.Sync():
            runtime.replayer.client_sync(conn, frame)
        case protocol.History():
            runtime.history.request(conn, frame)
        case protocol.MarkRead(seq=seq):
            link.read(conn, seq)
        case protocol.Subscribe() | protocol.Unsubscribe():
            # Only the multiplexed socket knows these; it handles them itself.
            raise AssertionError("subscriptions are the socket's business")
    return True
