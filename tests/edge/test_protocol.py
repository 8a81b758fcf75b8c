"""The pure client-frame parser: every accepted shape and every refusal."""

from __future__ import annotations

import pytest

from edge.protocol import (
    Ping,
    ProtocolError,
    SendMessage,
    SetPresence,
    SetTyping,
    Sync,
    frame_type,
    parse_client_frame,
)
from waddle_common import wire


def parse(text: str | bytes, max_len: int = 4000) -> object:
    return parse_client_frame(text, max_message_length=max_len)


def refused(text: str | bytes, max_len: int = 4000) -> ProtocolError:
    with pytest.raises(ProtocolError) as info:
        parse(text, max_len)
    return info.value


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('{"type":"message","content":"hi"}', SendMessage("hi")),
        (
            '{"type":"message","content":"hi","threadId":"t","clientMsgId":"c"}',
            SendMessage("hi", thread_id="t", client_msg_id="c"),
        ),
        ('{"type":"message","content":"hi","threadId":null}', SendMessage("hi")),
        ('{"type":"typing","isTyping":true}', SetTyping(True)),
        ('{"type":"typing","isTyping":false}', SetTyping(False)),
        ('{"type":"presence","status":"dnd"}', SetPresence("dnd")),
        ('{"type":"sync","afterSeq":0}', Sync(after_seq=0)),
        ('{"type":"sync","afterMessageId":"abc"}', Sync(after_message_id="abc")),
        ('{"type":"ping"}', Ping()),
        (b'{"type":"ping","extra":1}', Ping()),
    ],
)
def test_accepted_frames(text: str, expected: object) -> None:
    assert parse(text) == expected


@pytest.mark.parametrize(
    ("text", "kind"),
    [
        ("", wire.INVALID_FORMAT),
        ("nope", wire.INVALID_FORMAT),
        ("null", wire.INVALID_FORMAT),
        ('"message"', wire.INVALID_FORMAT),
        ('{"type": 3}', wire.INVALID_FORMAT),
        ('{"type":"shout"}', wire.UNKNOWN_TYPE),
        ('{"type":"message","content":["x"]}', wire.INVALID_FIELD),
        ('{"type":"message","content":""}', wire.EMPTY_MESSAGE),
        ('{"type":"message","content":"a","clientMsgId":""}', wire.INVALID_FIELD),
        ('{"type":"message","content":"a","clientMsgId":"' + "c" * 129 + '"}', wire.INVALID_FIELD),
        ('{"type":"typing","isTyping":1}', wire.INVALID_FIELD),
        ('{"type":"presence","status":"ONLINE"}', wire.INVALID_FIELD),
        ('{"type":"sync","afterSeq":true}', wire.INVALID_FIELD),
        ('{"type":"sync","afterSeq":1.5}', wire.INVALID_FIELD),
        ('{"type":"sync","afterSeq":9223372036854775808}', wire.INVALID_FIELD),
        ('{"type":"sync","afterSeq":1,"afterMessageId":"x"}', wire.INVALID_FIELD),
        ('{"type":"sync","afterMessageId":5}', wire.INVALID_FIELD),
        ('{"type":"message","content":"\\ud800"}', wire.INVALID_FORMAT),
    ],
)
def test_refused_frames(text: str, kind: wire.ErrorKind) -> None:
    assert refused(text).kind is kind


def test_content_length_limit_counts_characters() -> None:
    assert parse('{"type":"message","content":"' + "é" * 10 + '"}', max_len=10) == SendMessage(
        "é" * 10
    )
    err = refused('{"type":"message","content":"' + "é" * 11 + '"}', max_len=10)
    assert err.kind is wire.MESSAGE_TOO_LONG
    assert b"Message too long" in err.frame()


def test_error_frame_keeps_seed_words() -> None:
    assert (
        refused("{").frame()
        == b'{"type":"error","message":"Invalid message format","code":"invalid_format"}'
    )
    assert refused('{"type":"x"}').frame() == (
        b'{"type":"error","message":"Unknown message type","code":"unknown_type"}'
    )


def test_frame_type_names() -> None:
    assert [
        frame_type(f)
        for f in (SendMessage("a"), SetTyping(True), SetPresence("away"), Sync(0), Ping())
    ] == [
        "message",
        "typing",
        "presence",
        "sync",
        "ping",
    ]


@pytest.mark.parametrize(
    "text",
    [
        '{"type":"message","content":"a\\u0000b"}',
        '{"type":"message","content":"a","threadId":"t\\u0000"}',
        '{"type":"message","content":"a","clientMsgId":"\\u0000"}',
        '{"type":"sync","afterMessageId":"x\\u0000"}',
    ],
)
def test_nul_is_refused_in_every_string_field(text: str) -> None:
    err = refused(text)
    assert err.kind is wire.INVALID_FIELD and "NUL" in (err.detail or "")
