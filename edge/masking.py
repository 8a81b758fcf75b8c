"""RFC 6455 §5.1 on the server side: every frame a client sends must be masked.

aiohttp's WebSocket reader is shared by clients and servers and accepts
frames with or without a mask. ``MaskedFramesOnly`` sits in front of it
(``EdgeRequestHandler.set_parser`` installs it) and follows the frame
boundaries of the byte stream, reading only each frame's header: payload
bytes are skipped, never copied. Frames before an unmasked one reach the
reader unchanged; the unmasked frame and everything after it never do.
Instead the reader is handed a frame its own checks refuse (a reserved
opcode), so aiohttp fails the connection through its ordinary error path:
a close frame with 1002 (protocol error), then the TCP connection closes.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

# FIN + reserved opcode 0x3, masked, empty: aiohttp raises
# WebSocketError(PROTOCOL_ERROR) on its first two bytes, whatever state
# the reader is in between frames.
REFUSED_FRAME = b"\x83\x80\x00\x00\x00\x00"
_MASK_BIT = 0x80
_LENGTH = 0x7F
_MASK_KEY_BYTES = 4


class FrameReader(Protocol):
    """What aiohttp's ``RequestHandler`` calls on a WebSocket parser."""

    def feed_data(self, data: bytes) -> tuple[bool, bytes]: ...

    def feed_eof(self) -> None: ...


class MaskedFramesOnly:
    """Pass client frames to ``reader`` while they are masked."""

    __slots__ = ("_held", "_on_refused", "_reader", "_refused", "_skip")

    def __init__(self, reader: FrameReader, on_refused: Callable[[], None]) -> None:
        self._reader = reader
        self._on_refused = on_refused
        self._skip = 0  # bytes of the current frame not seen yet
        self._held = b""  # the start of a header cut by a read boundary
        self._refused = False

    @property
    def refused(self) -> bool:
        return self._refused

    def feed_eof(self) -> None:
        self._reader.feed_eof()

    def feed_data(self, data: bytes) -> tuple[bool, bytes]:
        if self._refused:
            return True, b""
        if type(data) is not bytes:
            data = bytes(data)
        if self._held:
            data, self._held = self._held + data, b""
        size = len(data)
        pos = self._skip
        while pos < size:
            # A frame header starts at ``pos``.
            if size - pos < 2:
                break
            second = data[pos + 1]
            if not second & _MASK_BIT:
                self._refused = True
                self._skip = 0
                self._on_refused()
                return self._reader.feed_data(data[:pos] + REFUSED_FRAME)
            length = second & _LENGTH
            extra = 2 if length == 126 else 8 if length == 127 else 0
            if size - pos < 2 + extra:
                break
            if extra:
                length = int.from_bytes(data[pos + 2 : pos + 2 + extra], "big")
            pos += 2 + extra + _MASK_KEY_BYTES + length
        if pos < size:
            # Hold the incomplete header back: the reader gets it together
            # with the byte that says whether the frame is masked.
            self._held = data[pos:]
            self._skip = 0
            data = data[:pos]
        else:
            self._skip = pos - size
        if not data:
            return False, b""
        return self._reader.feed_data(data)
