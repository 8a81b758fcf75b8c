"""``with_read_state``: the cursor fields spliced into the owner's
``initial_state`` without decoding it, exactly as decoding would set them."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from edge.joining import UNREAD_CAP, with_read_state
from waddle_common import wire


def _owner_frame(read_seq: int, users: int = 3, last_seq: int = 40) -> bytes:
    return wire.initial_state_frame(
        channel_id="general",
        messages=[{"id": f"m{i}", "seq": i, "content": 'a "readSeq": 7 },'} for i in (1, 2)],
        online_users=[{"userId": f"u{i}", "username": f"U{i}"} for i in range(users)],
        online_count=users,
        last_seq=last_seq,
        read_seq=read_seq,
    )


def _decoded(initial: bytes, stored: int | None, last_seq: int) -> dict[str, Any]:
    """What ``join`` builds by decoding the frame (the reference)."""
    state: dict[str, Any] = orjson.loads(initial)
    owners = state.get("readSeq", 0)
    read_seq = owners if stored is None else max(stored, owners)
    if stored is not None or owners:
        state["readSeq"] = read_seq
        state["unreadCount"] = min(max(0, last_seq - read_seq), UNREAD_CAP)
    return state


@pytest.mark.parametrize(
    ("owners", "stored", "last_seq"),
    [(0, None, 40), (0, 12, 40), (25, None, 40), (25, 12, 40), (25, 30, 40), (0, 0, 5000)],
)
def test_splice_matches_decoding(owners: int, stored: int | None, last_seq: int) -> None:
    initial = _owner_frame(owners, last_seq=last_seq)
    spliced = with_read_state(initial, stored, last_seq)
    assert spliced is not None
    assert orjson.loads(spliced) == _decoded(initial, stored, last_seq)


def test_unread_count_is_capped_and_fields_come_last() -> None:
    spliced = with_read_state(_owner_frame(0, last_seq=5000), 1, 5000)
    assert spliced is not None
    assert spliced.endswith(b',"readSeq":1,"unreadCount":%d}' % UNREAD_CAP)
    assert spliced.count(b'"readSeq"') == 1


@pytest.mark.parametrize(
    "initial",
    [
        b'{"type":"initial_state","readSeq":3,"channelId":"x"}',  # readSeq not last
        b'{"channelId":"x","type":"initial_state"}',  # another writer's order
        b'{"type":"initial_state","lastSeq":1',  # truncated
        b"[]",
    ],
)
def test_other_shapes_are_left_to_the_decoder(initial: bytes) -> None:
    assert with_read_state(initial, 5, 10) is None
