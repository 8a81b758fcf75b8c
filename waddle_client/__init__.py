"""Typed asyncio client of Waddle realtime (client protocols v1 and v1.1).

One socket for many channels (v1.1)::

    from waddle_client import Message, WaddleConnection

    async with WaddleConnection("http://localhost:8080", token) as conn:
        general = await conn.subscribe("general")
        ack = await general.send("hello")
        async for event in general:
            if isinstance(event, Message):
                print(event.seq, event.username, event.content)

One socket per channel (v1)::

    async with WaddleClient("http://localhost:8080", "general", token) as client:
        ack = await client.send("hello")
        async for event in client.events():
            ...

See ``docs/client-python.md`` for the guarantees (exactly-once in-order
delivery, durable sends resent across reconnects, backoff) and the options.
"""

from waddle_client.backoff import Backoff, full_jitter_delay
from waddle_client.channel import ChannelHandle, Page, Subscription
from waddle_client.client import PRESENCE_STATUSES, EventStream, WaddleClient, channel_socket_url
from waddle_client.errors import (
    ChannelClosedError,
    ClientClosedError,
    QueueFullError,
    SendError,
    SubscribeError,
    WaddleError,
)
from waddle_client.events import (
    Ack,
    ChannelClosed,
    ConnectionState,
    ErrorEvent,
    Event,
    InitialState,
    Message,
    OnlineUser,
    Presence,
    PresenceDiff,
    ReadReceipt,
    State,
    SyncComplete,
    Typing,
    UserConnected,
    UserDisconnected,
)
from waddle_client.multiplexed import WaddleConnection, valid_channel_id
from waddle_client.socket_loop import multiplexed_socket_url

__all__ = [
    "PRESENCE_STATUSES",
    "Ack",
    "Backoff",
    "ChannelClosed",
    "ChannelClosedError",
    "ChannelHandle",
    "ClientClosedError",
    "ConnectionState",
    "ErrorEvent",
    "Event",
    "EventStream",
    "InitialState",
    "Message",
    "OnlineUser",
    "Page",
    "Presence",
    "PresenceDiff",
    "QueueFullError",
    "ReadReceipt",
    "SendError",
    "State",
    "SubscribeError",
    "Subscription",
    "SyncComplete",
    "Typing",
    "UserConnected",
    "UserDisconnected",
    "WaddleClient",
    "WaddleConnection",
    "WaddleError",
    "channel_socket_url",
    "full_jitter_delay",
    "multiplexed_socket_url",
    "valid_channel_id",
]
