"""The mask check in front of aiohttp's WebSocket reader: masked frames
pass through byte for byte however the stream is cut; an unmasked frame,
and everything after it, never reaches the reader."""

from __future__ import annotations

import os
import struct

import pytest

from edge.masking import REFUSED_FRAME, MaskedFramesOnly


class Recorder:
    """Stands in for aiohttp's reader: keeps what it is fed."""

    def __init__(self) -> None:
        self.fed = bytearray()
        self.eof = False

    def feed_data(self, data: bytes) -> tuple[bool, bytes]:
        self.fed += data
        return REFUSED_FRAME in data, b""

    def feed_eof(self) -> None:
        self.eof = True


def frame(payload: bytes, *, masked: bool = True, opcode: int = 0x1) -> bytes:
    n = len(payload)
    mask_bit = 0x80 if masked else 0
    if n < 126:
        head = bytes((0x80 | opcode, mask_bit | n))
    elif n < 1 << 16:
        head = struct.pack("!BBH", 0x80 | opcode, mask_bit | 126, n)
    else:
        head = struct.pack("!BBQ", 0x80 | opcode, mask_bit | 127, n)
    if not masked:
        return head + payload
    key = os.urandom(4)
    return head + key + bytes(b ^ key[i % 4] for i, b in enumerate(payload))


def feed(check: MaskedFramesOnly, stream: bytes, cut: int) -> list[tuple[bool, bytes]]:
    return [check.feed_data(stream[i : i + cut]) for i in range(0, len(stream), cut)]


MASKED = frame(b"a" * 10) + frame(b"b" * 125) + frame(b"c" * 126) + frame(b"d" * 70000)


@pytest.mark.parametrize("cut", [1, 2, 3, 7, 64, 4096, len(MASKED)])
def test_masked_frames_pass_through_unchanged(cut: int) -> None:
    reader = Recorder()
    refused: list[bool] = []
    check = MaskedFramesOnly(reader, lambda: refused.append(True))
    results = feed(check, MASKED, cut)
    assert bytes(reader.fed) == MASKED
    assert not refused and not check.refused
    assert not any(eof for eof, _ in results)


@pytest.mark.parametrize("cut", [1, 2, 5, 64, 100000])
def test_unmasked_frame_never_reaches_the_reader(cut: int) -> None:
    before = frame(b"ping") + frame(b"x" * 300)
    stream = before + frame(b"unmasked", masked=False) + frame(b"after")
    reader = Recorder()
    refused: list[bool] = []
    check = MaskedFramesOnly(reader, lambda: refused.append(True))
    results = feed(check, stream, cut)
    # What came before, then the frame aiohttp itself refuses with 1002.
    assert bytes(reader.fed) == before + REFUSED_FRAME
    assert refused == [True] and check.refused
    assert results[-1] == (True, b"")
    assert check.feed_data(frame(b"more")) == (True, b"")
    assert bytes(reader.fed) == before + REFUSED_FRAME


@pytest.mark.parametrize("length", [0, 125, 126, 65535, 65536])
def test_unmasked_frame_of_any_length_is_refused(length: int) -> None:
    reader = Recorder()
    check = MaskedFramesOnly(reader, lambda: None)
    check.feed_data(frame(b"z" * length, masked=False))
    assert bytes(reader.fed) == REFUSED_FRAME


def test_eof_is_passed_on() -> None:
    reader = Recorder()
    MaskedFramesOnly(reader, lambda: None).feed_eof()
    assert reader.eof
