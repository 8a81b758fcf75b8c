"""Pre-built WebSocket frames (RFC 6455, server side: unmasked, uncompressed).

The fan-out path writes the same bytes to every local socket of a channel,
so a frame is built once per delivered message per edge instead of once per
socket. Pure: bytes in, bytes out.
"""

from __future__ import annotations

import struct

_FIN_TEXT = 0x81


def text_frame(payload: bytes) -> bytes:
    """A single final text frame carrying ``payload`` (already UTF-8)."""
    n = len(payload)
    if n < 126:
        return bytes((_FIN_TEXT, n)) + payload
    if n < 1 << 16:
        return struct.pack("!BBH", _FIN_TEXT, 126, n) + payload
    return struct.pack("!BBQ", _FIN_TEXT, 127, n) + payload
