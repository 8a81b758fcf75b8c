"""Coalesced joins and leaves for multiplexed sockets: ``presence_diff``.

The owner announces each user's arrival and departure (``user_connected``,
``user_disconnected``) once per edge. v1 sockets get those frames as they
are; multiplexed sockets get, per channel, one ``presence_diff``
{``channelId``, ``joins``, ``leaves``} for everything that happened within
``WINDOW`` seconds, so a crowd joining at once (after an edge restart, say)
costs each member a few frames instead of one per user. A user who comes
and goes within one window appears in neither list. A recipient is never
told about itself. Only presence waits for the window: chat messages are
written at once, never behind it. One timer per channel with a pending
diff, none otherwise.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import orjson

WINDOW = 0.1
JOIN, LEAVE = "user_connected", "user_disconnected"
TYPES = frozenset({JOIN, LEAVE})


@dataclass(slots=True)
class _Diff:
    joins: dict[str, dict[str, Any]] = field(default_factory=dict)
    leaves: dict[str, dict[str, Any]] = field(default_factory=dict)


def diff_frame(
    channel_id: str, joins: Iterable[dict[str, Any]], leaves: Iterable[dict[str, Any]]
) -> bytes:
    return orjson.dumps(
        {
            "type": "presence_diff",
            "channelId": channel_id,
            "joins": list(joins),
            "leaves": list(leaves),
        }
    )


class PresenceCoalescer:
    """Collects one channel's joins and leaves for ``window`` seconds, then
    hands ``emit(channel_id, frame_for)`` a function that gives each
    recipient user its frame (None when nothing is left for it)."""

    def __init__(
        self,
        emit: Callable[[str, Callable[[str], bytes | None]], None],
        *,
        window: float = WINDOW,
    ) -> None:
        self._emit = emit
        self.window = window
        self._pending: dict[str, _Diff] = {}

    def add(self, channel_id: str, frame_type: str, payload: bytes) -> None:
        event = orjson.loads(payload)
        user_id = event.get("userId")
        if not isinstance(user_id, str):
            return
        diff = self._pending.get(channel_id)
        if diff is None:
            diff = self._pending[channel_id] = _Diff()
            asyncio.get_running_loop().call_later(self.window, self.flush, channel_id)
        if frame_type == JOIN:
            if diff.leaves.pop(user_id, None) is None:
                diff.joins[user_id] = {
                    "userId": user_id,
                    "username": event.get("username", ""),
                    "status": event.get("status", "online"),
                }
        elif diff.joins.pop(user_id, None) is None:
            diff.leaves[user_id] = {"userId": user_id, "username": event.get("username", "")}

    def flush(self, channel_id: str) -> None:
        diff = self._pending.pop(channel_id, None)
        if diff is None or not (diff.joins or diff.leaves):
            return
        shared = diff_frame(channel_id, diff.joins.values(), diff.leaves.values())

        def frame_for(user_id: str) -> bytes | None:
            if user_id not in diff.joins and user_id not in diff.leaves:
                return shared
            joins = [j for u, j in diff.joins.items() if u != user_id]
            leaves = [v for u, v in diff.leaves.items() if u != user_id]
            return diff_frame(channel_id, joins, leaves) if joins or leaves else None

        self._emit(channel_id, frame_for)
