"""Structured logs: one JSON object a line on stdout.

Services log through the standard ``logging`` module; ``extra={...}`` fields
(``channel_id``, ``user_id``, ...) become keys of the JSON object. Tokens are
never passed to a logger, and as a second line of defence every line is
scrubbed of anything shaped like one (``redact``) before it is written: a
JWT, whole or cut short, and the value after ``Bearer``/``bearer.``.

Libraries can still quote what a client sent: aiohttp logs a malformed
request as an error whose traceback quotes up to 100 bytes of the
offending line or header (a token's header and the start of its claims,
for an over-long ``Authorization``). Such records become one info line
naming the error class and the peer (``BadRequestFilter``).
"""

from __future__ import annotations

import logging
import re
import sys
import time
from typing import Any

import orjson
from aiohttp.http_exceptions import HttpProcessingError

REDACTED = "[redacted]"
# A JWT starts with the base64url of '{"', whole or cut anywhere; a bearer
# credential is whatever follows the scheme (header) or the prefix
# (WebSocket subprotocol). Stops at quotes and backslashes, which end a
# string in a JSON line or a repr.
_SECRET = re.compile(
    r"(?P<scheme>\b[Bb][Ee][Aa][Rr][Ee][Rr](?:\.|\s+))[^\s\"'\\,;]+"
    r"|eyJ[A-Za-z0-9_-]*(?:\.[A-Za-z0-9_-]*){0,2}"
)

_RESERVED = frozenset(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {
    "message",
    "asctime",
    "taskName",
}


class JsonFormatter(logging.Formatter):
    def __init__(self, service: str) -> None:
        super().__init__()
        self.service = service

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": round(record.created, 3),
            "level": record.levelname.lower(),
            "service": self.service,
            "logger": record.name,
            "event": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key not in _RESERVED:
                entry[key] = value
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return redact(orjson.dumps(entry, default=str).decode())


def redact(text: str) -> str:
    """``text`` with every token-shaped part replaced by ``[redacted]``."""
    return _SECRET.sub(_redacted, text)


def _redacted(match: re.Match[str]) -> str:
    return (match["scheme"] or "") + REDACTED


class BadRequestFilter(logging.Filter):
    """Turn aiohttp's record of a request its parser refused (an error with
    a traceback that quotes the request) into one info line that does not."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, HttpProcessingError):
            remote = record.args[0] if isinstance(record.args, tuple) and record.args else None
            record.levelno, record.levelname = logging.INFO, "INFO"
            record.msg, record.args = "bad request", ()
            record.exc_info, record.exc_text, record.stack_info = None, None, None
            record.error = type(exc).__name__
            record.remote = remote
            return logging.getLogger().isEnabledFor(logging.INFO)
        return True


def setup(service: str, level: str = "info") -> None:
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(JsonFormatter(service))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # aiohttp's access log is one line per HTTP request; keep it, but at info.
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    for name in ("aiohttp.server", "aiohttp.web"):
        aiohttp_logger = logging.getLogger(name)
        if not any(isinstance(f, BadRequestFilter) for f in aiohttp_logger.filters):
            aiohttp_logger.addFilter(BadRequestFilter())
    logging.Formatter.converter = time.gmtime


def announce_ready(service: str, **ports: int | str) -> None:
    """The line process supervisors and the test harness wait for."""
    logging.getLogger(service).info("ready", extra={"ready": True, **ports})
