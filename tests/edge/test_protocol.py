"""The pure client-frame parser: every accepted shape and every refusal."""

from __future__ import annotations

import orjson
import pytest

from edge.protocol import (
    History,
    MarkRead,
    Ping,
    ProtocolError,
    SendMessage,
    SetPresence,
    SetTyping,
    Subscribe,
    Sync,
    Unsubscribe,
    frame_type,
    parse_client_frame,
    parse_frame,
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


# -- v1.1: channel-addressed frames ---------------------------------------------


def parse_mux(text: str) -> tuple[str | None, object]:
    return parse_frame(text, max_message_length=4000, multiplexed=True)


def refused_mux(text: str) -> ProtocolError:
    with pytest.raises(ProtocolError) as info:
        parse_mux(text)
    return info.value


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('{"type":"subscribe","channelId":"a"}', ("a", Subscribe())),
        ('{"type":"subscribe","channelId":"a","afterSeq":7}', ("a", Subscribe(after_seq=7))),
        ('{"type":"unsubscribe","channelId":"a.b:c-d_e"}', ("a.b:c-d_e", Unsubscribe())),
        ('{"type":"message","channelId":"a","content":"hi"}', ("a", SendMessage("hi"))),
        ('{"type":"history","channelId":"a"}', ("a", History())),
        (
            '{"type":"history","channelId":"a","beforeSeq":9,"limit":100,"threadId":"r"}',
            ("a", History(before_seq=9, limit=100, thread_id="r")),
        ),
        ('{"type":"read","channelId":"a","seq":3}', ("a", MarkRead(3))),
        ('{"type":"sync","channelId":"a","afterSeq":0}', ("a", Sync(after_seq=0))),
        ('{"type":"ping"}', (None, Ping())),
    ],
)
def test_multiplexed_frames(text: str, expected: tuple[str | None, object]) -> None:
    assert parse_mux(text) == expected


@pytest.mark.parametrize(
    ("text", "code", "channel"),
    [
        ('{"type":"subscribe"}', "invalid_field", None),
        ('{"type":"message","content":"hi"}', "invalid_field", None),
        ('{"type":"subscribe","channelId":"abc\\n"}', "invalid_field", None),
        ('{"type":"subscribe","channelId":""}', "invalid_field", None),
        ('{"type":"subscribe","channelId":7}', "invalid_field", None),
        ('{"type":"subscribe","channelId":"' + "a" * 129 + '"}', "invalid_field", None),
        ('{"type":"subscribe","channelId":"a","afterSeq":-1}', "invalid_field", "a"),
        ('{"type":"history","channelId":"a","limit":0}', "invalid_field", "a"),
        ('{"type":"history","channelId":"a","limit":101}', "invalid_field", "a"),
        ('{"type":"history","channelId":"a","beforeSeq":0}', "invalid_field", "a"),
        ('{"type":"history","channelId":"a","threadId":"x\\u0000"}', "invalid_field", "a"),
        ('{"type":"read","channelId":"a"}', "invalid_field", "a"),
        ('{"type":"read","channelId":"a","seq":0}', "invalid_field", "a"),
        ('{"type":"read","channelId":"a","seq":true}', "invalid_field", "a"),
        ('{"type":"read","channelId":"a","seq":9223372036854775808}', "invalid_field", "a"),
        ('{"type":"message","channelId":"a","content":""}', "empty_message", "a"),
        ('{"type":"nope","channelId":"a"}', "unknown_type", None),
    ],
)
def test_multiplexed_refusals_name_the_channel_when_valid(
    text: str, code: str, channel: str | None
) -> None:
    err = refused_mux(text)
    assert err.kind.code == code
    assert err.channel_id == channel
    frame = orjson.loads(err.frame())
    assert frame.get("channelId") == channel


def test_v1_knows_history_and_read_but_not_subscriptions() -> None:
    assert parse('{"type":"read","seq":4}') == MarkRead(4)
    assert parse('{"type":"history","limit":10}') == History(limit=10)
    # On v1 the socket names the channel; a channelId in the frame is ignored.
    assert parse('{"type":"read","seq":4,"channelId":"other"}') == MarkRead(4)
    assert refused('{"type":"subscribe","channelId":"a"}').kind.code == "unknown_type"
    assert refused('{"type":"unsubscribe","channelId":"a"}').kind.code == "unknown_type"
