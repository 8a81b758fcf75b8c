"""No part of a token reaches a log line: the redaction every JSON line
goes through, and the filter that turns aiohttp's record of a malformed
request (which quotes it) into one info line."""

from __future__ import annotations

import logging
import sys

import jwt
import orjson
import pytest
from aiohttp.http_exceptions import BadHttpMethod, InvalidHeader, LineTooLong

from waddle_common.logs import REDACTED, BadRequestFilter, JsonFormatter, redact

TOKEN = jwt.encode(
    {"sub": "mallory", "username": "Mallory", "exp": 4102444800}, "k" * 32, algorithm="HS256"
)
HEADER, CLAIMS, SIGNATURE = TOKEN.split(".")


def pieces(text: str, token: str = TOKEN, size: int = 8) -> list[str]:
    """Every ``size``-character piece of ``token`` found in ``text``."""
    return [
        token[i : i + size] for i in range(len(token) - size + 1) if token[i : i + size] in text
    ]


@pytest.mark.parametrize(
    "text",
    [
        pytest.param(TOKEN, id="whole"),
        pytest.param(f"Authorization: Bearer {TOKEN}", id="authorization"),
        pytest.param(f"waddle.v1, bearer.{TOKEN}", id="subprotocol"),
        pytest.param(f"{HEADER}.{CLAIMS[:20]}", id="cut-in-claims"),
        pytest.param(HEADER[:12], id="cut-in-header"),
        pytest.param(f"token={TOKEN}&x=1", id="in-a-query"),
        pytest.param(
            str(LineTooLong(f"Bearer {TOKEN}".encode()[:100] + b"...", 8190)),
            id="aiohttp-line-too-long",
        ),
        pytest.param(repr(f"BEARER {TOKEN}".encode()), id="bytes-repr-upper-case"),
    ],
)
def test_token_shapes_are_redacted(text: str) -> None:
    out = redact(text)
    assert REDACTED in out
    assert not pieces(out), out


def test_bearer_credential_that_is_not_a_jwt_is_redacted() -> None:
    assert redact("Authorization: Bearer opaque-secret-value") == (
        "Authorization: Bearer [redacted]"
    )
    assert redact("bearer.opaque-secret-value, waddle.v1") == "bearer.[redacted], waddle.v1"


@pytest.mark.parametrize(
    "text",
    ["connected", "token refused", "invalid token (exp)", "channel lobby-1 user u-42", "eye"],
)
def test_ordinary_text_is_left_alone(text: str) -> None:
    assert redact(text) == text


def record(
    msg: str, *args: object, exc: BaseException | None = None, name: str = "edge"
) -> logging.LogRecord:
    exc_info = None
    if exc is not None:
        try:
            raise exc
        except type(exc):
            exc_info = sys.exc_info()
    return logging.LogRecord(name, logging.ERROR, __file__, 1, msg, args, exc_info)


def test_json_lines_hold_no_token_in_message_fields_or_traceback() -> None:
    rec = record("refused %s", f"Bearer {TOKEN}", exc=ValueError(f"bad token {TOKEN}"))
    rec.header = f"bearer.{TOKEN}"
    line = JsonFormatter("edge").format(rec)
    entry = orjson.loads(line)  # still one valid JSON object
    assert entry["event"] == "refused Bearer [redacted]"
    assert entry["header"] == "bearer.[redacted]"
    assert "Traceback" in entry["exc"]
    assert not pieces(line)


@pytest.mark.parametrize(
    "exc",
    [
        LineTooLong(f"Bearer {TOKEN}".encode()[:100] + b"...", 8190),
        InvalidHeader(f"Bearer {TOKEN}".encode()),
        BadHttpMethod("GARBAGE"),
    ],
)
def test_aiohttp_bad_request_record_becomes_one_info_line(
    exc: BaseException, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    rec = record("Error handling request from %s", "203.0.113.9", exc=exc, name="aiohttp.server")
    assert BadRequestFilter().filter(rec)
    line = JsonFormatter("edge").format(rec)
    entry = orjson.loads(line)
    assert entry["level"] == "info" and entry["event"] == "bad request"
    assert entry["error"] == type(exc).__name__ and entry["remote"] == "203.0.113.9"
    assert "exc" not in entry and "Traceback" not in line
    assert not pieces(line)


def test_other_aiohttp_records_pass_unchanged() -> None:
    rec = record("Unhandled exception", exc=RuntimeError("boom"), name="aiohttp.server")
    assert BadRequestFilter().filter(rec)
    assert rec.levelno == logging.ERROR and rec.exc_info is not None
