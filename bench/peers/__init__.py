"""The peers Waddle is measured against, each a small server process.

* ``floor``: a single-process aiohttp broadcast server speaking Waddle's JSON
  frames, with no authentication, no gRPC hop and no persistence.
* ``sio``: python-socketio's ``AsyncServer`` on aiohttp with
  ``AsyncRedisManager`` (every emit goes through Redis pub/sub).
* ``django_channels``: a Django Channels consumer with ``channels_redis`` on
  daphne.

Every peer prints one JSON line with ``"ready": true`` and its ``http_port``
once it listens, like Waddle's services, so ``waddle_common.supervise``
starts them all the same way.
"""

from __future__ import annotations

import orjson


def announce_ready(port: int) -> None:
    """The line ``waddle_common.supervise.start_service`` waits for."""
    print(orjson.dumps({"ready": True, "http_port": port}).decode(), flush=True)


def message_body(
    *, seq: int, channel_id: str, user_id: str, content: str, now_ms: int
) -> dict[str, object]:
    """The ``message`` object of Waddle's protocol, as the peers build it."""
    return {
        "id": f"{channel_id}-{seq}",
        "seq": seq,
        "channelId": channel_id,
        "userId": user_id,
        "username": user_id,
        "avatarUrl": None,
        "content": content,
        "timestamp": now_ms,
        "threadId": None,
    }
