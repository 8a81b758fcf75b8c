"""The edge's own WebSocket after the upgrade (``EdgeSocket``), fed bytes
as a transport would: messages whole and in order however the stream is
cut, fragments joined, the RFC's refusals with their close codes, the
close handshake both ways, pings, and flow control for waiting writers."""

from __future__ import annotations

import asyncio
import os
import struct

import pytest

from edge import upgraded
from edge.upgraded import EdgeSocket


class Transport(asyncio.Transport):
    """What the socket writes, and whether it closed or aborted."""

    def __init__(self) -> None:
        super().__init__()
        self.out = bytearray()
        self.closing = False
        self.aborted = False
        self.gone = asyncio.Event()

    def write(self, data: bytes | bytearray | memoryview) -> None:
        assert not self.closing, "nothing is written after close()"
        self.out += data

    def is_closing(self) -> bool:
        return self.closing

    def close(self) -> None:
        self.closing = True

    def abort(self) -> None:
        self.closing = self.aborted = True
        self.gone.set()

    def frames(self) -> list[tuple[int, bytes]]:
        """The server's frames written so far (unmasked, short)."""
        found, data, pos = [], bytes(self.out), 0
        while pos < len(data):
            opcode, size = data[pos] & 0x0F, data[pos + 1] & 0x7F
            found.append((opcode, data[pos + 2 : pos + 2 + size]))
            pos += 2 + size
        return found


class Recorder:
    def __init__(self, keep: bool = True) -> None:
        self.texts: list[str] = []
        self.binaries = 0
        self.ended: list[int | None] = []
        self.keep = keep

    def on_text(self, text: str) -> bool:
        self.texts.append(text)
        return self.keep

    def on_binary(self) -> bool:
        self.binaries += 1
        return True

    def on_closed(self, code: int | None) -> None:
        self.ended.append(code)


def frame(opcode: int, payload: bytes, *, fin: bool = True, masked: bool = True) -> bytes:
    """A client frame."""
    head = bytes(((0x80 if fin else 0) | opcode,))
    n = len(payload)
    bit = 0x80 if masked else 0
    if n < 126:
        head += bytes((bit | n,))
    elif n < 1 << 16:
        head += bytes((bit | 126,)) + struct.pack("!H", n)
    else:
        head += bytes((bit | 127,)) + struct.pack("!Q", n)
    if not masked:
        return head + payload
    key = os.urandom(4)
    return head + key + bytes(b ^ key[i % 4] for i, b in enumerate(payload))


def close_frame(code: int) -> bytes:
    return frame(0x8, struct.pack("!H", code))


def socket(max_size: int = 1024, keep: bool = True) -> tuple[EdgeSocket, Transport, Recorder]:
    transport, session = Transport(), Recorder(keep)
    return EdgeSocket(transport, max_size=max_size, session=lambda _: session), transport, session


def close_code_written(transport: Transport) -> int:
    closes = [payload for opcode, payload in transport.frames() if opcode == 0x8]
    assert len(closes) == 1, transport.frames()
    code: int = struct.unpack("!H", closes[0][:2])[0]
    return code


async def test_messages_arrive_whole_and_in_order_however_the_stream_is_cut() -> None:
    stream = (
        frame(0x1, b'{"type":"ping"}')
        + frame(0x1, "héllo ".encode(), fin=False)
        + frame(0x9, b"are you there")  # a ping between fragments
        + frame(0x0, b"wor", fin=False)
        + frame(0x0, b"ld", fin=True)
        + frame(0x2, b"\x00\x01")
        + frame(0x1, b"x" * 300)
    )
    for cut in range(1, 40):
        sock, transport, session = socket()
        for start in range(0, len(stream), cut):
            sock.data_received(stream[start : start + cut])
        assert session.texts == ['{"type":"ping"}', "héllo world", "x" * 300], cut
        assert session.binaries == 1
        assert transport.frames() == [(0xA, b"are you there")], "the ping is answered"
        assert sock.open and not transport.closing


async def test_an_unmasked_frame_is_refused_with_1002_and_nothing_after_it_is_served() -> None:
    sock, transport, session = socket()
    sock.data_received(
        frame(0x1, b"before") + frame(0x1, b"unmasked", masked=False) + frame(0x1, b"after")
    )
    assert session.texts == ["before"]
    assert close_code_written(transport) == 1002 and transport.closing
    sock.connection_lost(None)
    assert session.ended == [None]


async def test_text_that_is_not_utf8_closes_with_1007() -> None:
    sock, transport, session = socket()
    sock.data_received(frame(0x1, b"ok") + frame(0x1, b"\xff\xfe") + frame(0x1, b"later"))
    assert session.texts == ["ok"]
    assert close_code_written(transport) == 1007 and transport.closing


@pytest.mark.parametrize("fragmented", [False, True])
async def test_a_message_over_the_limit_closes_with_1009(fragmented: bool) -> None:
    sock, transport, session = socket(max_size=100)
    if fragmented:  # each fragment is small; the message is not
        data = b"".join(frame(0x1 if i == 0 else 0x0, b"y" * 40, fin=False) for i in range(3))
    else:
        data = frame(0x1, b"y" * 101)
    sock.data_received(frame(0x1, b"y" * 100) + data)
    assert session.texts == ["y" * 100]
    assert close_code_written(transport) == 1009 and transport.closing


async def test_a_session_that_ends_the_socket_gets_nothing_more() -> None:
    sock, transport, session = socket(keep=False)
    sock.data_received(frame(0x1, b"first") + frame(0x1, b"second"))
    sock.data_received(frame(0x1, b"third"))
    assert session.texts == ["first"]
    assert close_code_written(transport) == 1000
    assert not transport.closing, "the peer's close frame is awaited"
    sock.data_received(close_frame(1000))
    assert transport.closing and not transport.aborted


async def test_the_peers_close_is_answered_after_what_came_before_it() -> None:
    sock, transport, session = socket()
    sock.data_received(frame(0x1, b"last words") + close_frame(4000))
    assert session.texts == ["last words"]
    assert close_code_written(transport) == 4000, "the close is echoed"
    assert transport.closing and sock.closed
    sock.connection_lost(None)
    assert session.ended == [4000]


async def test_a_close_the_peer_never_answers_is_aborted(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(upgraded, "CLOSE_TIMEOUT", 0.05)
    sock, transport, _ = socket()
    sock.close(1008, "x" * 300)  # an over-long reason is cut to fit the frame
    assert close_code_written(transport) == 1008
    assert len(transport.frames()[0][1]) <= 125
    assert not sock.open and not transport.closing
    async with asyncio.timeout(5):
        await transport.gone.wait()
    assert transport.aborted


async def test_writers_wait_while_the_peer_is_slow_and_fail_once_it_is_gone() -> None:
    sock, _, session = socket()
    await sock.drained()  # nothing to wait for
    sock.pause_writing()
    waiter = asyncio.ensure_future(sock.drained())
    await asyncio.sleep(0)
    assert not waiter.done()
    sock.resume_writing()
    async with asyncio.timeout(5):
        await waiter
    sock.pause_writing()
    waiter = asyncio.ensure_future(sock.drained())
    await asyncio.sleep(0)
    sock.connection_lost(ConnectionResetError())
    with pytest.raises(ConnectionError):
        async with asyncio.timeout(5):
            await waiter
    with pytest.raises(ConnectionError):
        await sock.drained()
    await sock.wait_closed()
    assert session.ended == [None]


def test_accept_key_is_the_rfc_example() -> None:
    # RFC 6455 section 1.3.
    assert upgraded.accept_key("dGhlIHNhbXBsZSBub25jZQ==") == "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
