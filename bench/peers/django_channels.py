"""The Django Channels peer: ``python -m bench.peers.django_channels``.

One ``AsyncWebsocketConsumer`` at ``/channel/<id>/websocket`` served by
daphne, with ``channels_redis``'s ``RedisChannelLayer``: a consumer joins
the channel's group on connect and sends ``initial_state``; a ``message``
frame is turned into a Waddle-shaped ``message`` and sent to the group with
``group_send`` (every member, sender included, gets it through Redis), and
acknowledged to the sender.

The layer's per-channel ``capacity`` is raised from 100 to 2000 so that a
burst is queued rather than dropped at once; everything else is the
default. Environment: ``BENCH_PORT`` (default 0), ``BENCH_REDIS_HOST``,
``BENCH_REDIS_PORT``, ``BENCH_REDIS_PREFIX``.
"""

from __future__ import annotations

import os
import time
from typing import Any

import daphne.server  # type: ignore[import-untyped]  # installs the asyncio reactor: first
import django  # type: ignore[import-untyped]
import orjson
from django.conf import settings  # type: ignore[import-untyped]

from bench.peers import announce_ready, message_body

settings.configure(
    DEBUG=False,
    SECRET_KEY="bench-only-" + "k" * 40,
    ALLOWED_HOSTS=["*"],
    INSTALLED_APPS=["channels"],
    USE_TZ=True,
    CHANNEL_LAYERS={
        "default": {
            "BACKEND": "channels_redis.core.RedisChannelLayer",
            "CONFIG": {
                "hosts": [
                    (
                        os.environ.get("BENCH_REDIS_HOST", "127.0.0.1"),
                        int(os.environ.get("BENCH_REDIS_PORT", "6379")),
                    )
                ],
                "prefix": os.environ.get("BENCH_REDIS_PREFIX", f"benchdc{os.getpid()}:"),
                "capacity": 2000,
            },
        }
    },
)
django.setup()

from channels.generic.websocket import (  # type: ignore[import-untyped]  # noqa: E402
    AsyncWebsocketConsumer,
)
from channels.routing import URLRouter  # type: ignore[import-untyped]  # noqa: E402
from django.urls import path  # type: ignore[import-untyped]  # noqa: E402

seqs: dict[str, int] = {}


class ChatConsumer(AsyncWebsocketConsumer):  # type: ignore[misc]
    async def connect(self) -> None:
        self.channel_id: str = self.scope["url_route"]["kwargs"]["channel_id"]
        await self.channel_layer.group_add(self.channel_id, self.channel_name)
        await self.accept()
        initial = {
            "type": "initial_state",
            "channelId": self.channel_id,
            "messages": [],
            "onlineUsers": [],
            "lastSeq": seqs.get(self.channel_id, 0),
        }
        await self.send(text_data=orjson.dumps(initial).decode())

    async def disconnect(self, code: int) -> None:
        await self.channel_layer.group_discard(self.channel_id, self.channel_name)

    async def receive(self, text_data: str | None = None, bytes_data: bytes | None = None) -> None:
        if text_data is None:
            return
        try:
            frame = orjson.loads(text_data)
        except orjson.JSONDecodeError:
            return
        if not isinstance(frame, dict) or frame.get("type") != "message":
            return
        channel_id = self.channel_id
        seq = seqs[channel_id] = seqs.get(channel_id, 0) + 1
        now_ms = time.time_ns() // 1_000_000
        body = message_body(
            seq=seq,
            channel_id=channel_id,
            user_id=self.channel_name,
            content=str(frame.get("content", "")),
            now_ms=now_ms,
        )
        text = orjson.dumps({"type": "message", "message": body}).decode()
        await self.channel_layer.group_send(channel_id, {"type": "chat.message", "text": text})
        ack = {"type": "ack", "id": body["id"], "seq": seq, "timestamp": now_ms}
        await self.send(text_data=orjson.dumps(ack).decode())

    async def chat_message(self, event: dict[str, Any]) -> None:
        await self.send(text_data=event["text"])


application = URLRouter([path("channel/<str:channel_id>/websocket", ChatConsumer.as_asgi())])


def main() -> None:
    from twisted.internet import reactor

    server = daphne.server.Server(
        application=application,
        endpoints=[
            f"tcp:port={int(os.environ.get('BENCH_PORT', '0'))}:interface=127.0.0.1:backlog=4096"
        ],
        signal_handlers=True,
        verbosity=0,
        websocket_handshake_timeout=30,
        ping_interval=30,
        ping_timeout=60,
    )

    def ready() -> None:
        def announce() -> None:
            announce_ready(server.listening_addresses[0][1])

        reactor.callWhenRunning(announce)

    server.ready_callable = ready
    server.run()


if __name__ == "__main__":
    main()
