"""Exceptions raised by the client.

``WaddleError`` is the base of all of them. ``SendError`` fails one message
(the server refused it for good, or it can never be sent), ``QueueFullError``
refuses a send because too many messages await their ``ack``, and
``ClientClosedError`` says the client reached its terminal state (closed by
the application, or refused by the server) and carries the reason.
``ChannelClosedError`` (a ``ClientClosedError``) says one channel of a v1.1
connection ended (unsubscribed, or refused), and ``SubscribeError`` (a
``ChannelClosedError``) that the server refused a subscription for good.
"""

from __future__ import annotations

__all__ = [
    "ChannelClosedError",
    "ClientClosedError",
    "QueueFullError",
    "SendError",
    "SubscribeError",
    "WaddleError",
]


class WaddleError(Exception):
    """Base class of the client's exceptions."""


class SendError(WaddleError):
    """A message was refused for good: it will not be resent.

    ``code`` is the server's error code (``no_write_permission``,
    ``message_too_long``, ...) or the client's ``frame_too_big`` for a
    message too large to put on the wire at all.
    """

    def __init__(self, code: str, message: str, client_msg_id: str | None = None) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.client_msg_id = client_msg_id


class QueueFullError(WaddleError):
    """Too many messages are waiting for their ``ack``; try again later."""

    def __init__(self, limit: int) -> None:
        super().__init__(f"send queue is full ({limit} messages awaiting acknowledgement)")
        self.limit = limit


class ClientClosedError(WaddleError):
    """The client is closed for good, by the application or by the server.

    ``close_code`` is the WebSocket close code (1008, 1000) and
    ``http_status`` the status of a refused upgrade (401, 403); both are
    ``None`` when the application called ``close()``.
    """

    def __init__(
        self,
        reason: str,
        *,
        close_code: int | None = None,
        http_status: int | None = None,
    ) -> None:
        super().__init__(reason)
        self.reason = reason
        self.close_code = close_code
        self.http_status = http_status


class ChannelClosedError(ClientClosedError):
    """One channel of a ``WaddleConnection`` is closed: ``unsubscribe()`` was
    called, or the server refused it for good (``code``, e.g. ``forbidden``)."""

    def __init__(self, reason: str, *, channel_id: str, code: str | None = None) -> None:
        super().__init__(reason)
        self.channel_id = channel_id
        self.code = code


class SubscribeError(ChannelClosedError):
    """The server refused a subscription for good.

    ``code`` is the server's: ``forbidden`` (the token may not read the
    channel), ``too_many_subscriptions`` (the socket holds the server's
    maximum), or ``invalid_field``; ``message`` its text.
    """

    def __init__(self, code: str, message: str, *, channel_id: str) -> None:
        super().__init__(f"{code}: {message}", channel_id=channel_id, code=code)
        self.message = message
