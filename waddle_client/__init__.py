"""Typed asyncio client of Waddle realtime (client protocol v1).

    from waddle_client import Message, WaddleClient

    async with WaddleClient("http://localhost:8080", "general", token) as client:
        ack = await client.send("hello")
        async for event in client.events():
            if isinstance(event, Message):
                print(event.seq, event.username, event.content)

See ``docs/client-python.md`` for the guarantees (exactly-once in-order
delivery, durable sends resent across reconnects, backoff) and the options.
"""

from waddle_client.backoff import Backoff, full_jitter_delay
from waddle_client.client import PRESENCE_STATUSES, EventStream, WaddleClient, channel_socket_url
from waddle_client.errors import ClientClosedError, QueueFullError, SendError, WaddleError
from waddle_client.events import (
    Ack,
    ConnectionState,
    ErrorEvent,
    Event,
    InitialState,
    Message,
    OnlineUser,
    Presence,
    State,
    SyncComplete,
    Typing,
    UserConnected,
    UserDisconnected,
)

__all__ = [
    "PRESENCE_STATUSES",
    "Ack",
    "Backoff",
    "ClientClosedError",
    "ConnectionState",
    "ErrorEvent",
    "Event",
    "EventStream",
    "InitialState",
    "Message",
    "OnlineUser",
    "Presence",
    "QueueFullError",
    "SendError",
    "State",
    "SyncComplete",
    "Typing",
    "UserConnected",
    "UserDisconnected",
    "WaddleClient",
    "WaddleError",
    "channel_socket_url",
    "full_jitter_delay",
]
