"""Pre-built server frames decode as RFC 6455 text frames at every length class."""

from __future__ import annotations

import struct

import pytest

from edge.wsframe import text_frame


def decode(frame: bytes) -> tuple[int, bytes]:
    first, second = frame[0], frame[1]
    assert second & 0x80 == 0, "server frames are never masked"
    n = second & 0x7F
    offset = 2
    if n == 126:
        (n,) = struct.unpack("!H", frame[2:4])
        offset = 4
    elif n == 127:
        (n,) = struct.unpack("!Q", frame[2:10])
        offset = 10
    payload = frame[offset:]
    assert len(payload) == n
    return first, payload


@pytest.mark.parametrize("size", [0, 1, 125, 126, 127, 65535, 65536, 70000])
def test_text_frame_lengths(size: int) -> None:
    payload = b"x" * size
    first, decoded = decode(text_frame(payload))
    assert first == 0x81  # FIN + text opcode
    assert decoded == payload
