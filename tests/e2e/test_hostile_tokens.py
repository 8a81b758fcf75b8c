"""Correctly signed tokens with hostile claims, against the real processes.

Identity claims holding NUL, control characters or lone surrogates, and
time claims like 10**400, must be refused with HTTP 401 before the upgrade
(never a 500, never a traceback in the edge log), and users with good
tokens must not notice. ``POST /dev/token`` must hand every request a new
user id (a display name never leads to someone else's identity), renew
only a still-valid development token for its own user, and refuse names
with control characters.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import jwt
import orjson
import pytest
import pytest_asyncio

from edge.auth import DEV_CLAIM
from tests.support.client import WsClient
from tests.support.stack import Stack, start_stack

pytestmark = [pytest.mark.e2e, pytest.mark.asyncio(loop_scope="module")]

MAX_LIFETIME = 7200
ENV = {"WADDLE_JWT_MAX_LIFETIME_SECONDS": str(MAX_LIFETIME)}
HUGE = 10**400


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def stack(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Stack]:
    async with start_stack(tmp_path_factory.mktemp("hostile"), dev_mode=True, env=ENV) as s:
        yield s


@pytest_asyncio.fixture(loop_scope="module")
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


def cid() -> str:
    return f"hostile-{uuid.uuid4().hex[:8]}"


def signed(stack: Stack, **claims: Any) -> str:
    """A token signed with the edge's own secret: only its claims are hostile."""
    body: dict[str, Any] = {
        "sub": "mallory",
        "username": "Mallory",
        "permissions": ["read", "write"],
        "exp": int(time.time()) + 600,
    }
    body.update(claims)
    return jwt.encode(body, stack.jwt_secret, algorithm="HS256")


class EdgeLog:
    """The edge's log from a point on (the file its output is copied to)."""

    def __init__(self, stack: Stack) -> None:
        self.path: Path = stack.tmp / "edge0.log"
        self.start = self.path.stat().st_size

    def entries(self) -> list[dict[str, Any]]:
        with self.path.open("rb") as f:
            f.seek(self.start)
            raw = f.read()
        parsed = []
        for line in raw.splitlines():
            try:
                entry = orjson.loads(line)
            except orjson.JSONDecodeError:
                entry = {"event": line.decode("utf-8", "replace"), "level": "raw"}
            parsed.append(entry if isinstance(entry, dict) else {"event": str(entry)})
        return parsed

    async def wait_for(
        self, condition: Callable[[list[dict[str, Any]]], bool], timeout: float = 5.0
    ) -> list[dict[str, Any]]:
        """The entries once ``condition`` holds for them. The log is a file
        another process writes (line by line, flushed): there is no event to
        wait on, so it is read again every 20 ms until then."""
        async with asyncio.timeout(timeout):
            while not condition(entries := self.entries()):  # noqa: ASYNC110
                await asyncio.sleep(0.02)
        return entries


def assert_no_failure_logged(entries: list[dict[str, Any]]) -> None:
    for entry in entries:
        text = orjson.dumps(entry).decode()
        assert "Traceback" not in text and "exc" not in entry, text
        assert entry.get("level") not in ("error", "critical", "raw"), text


async def handshake_status(http: aiohttp.ClientSession, url: str, token: str) -> int:
    try:
        ws = await http.ws_connect(url, headers={"Authorization": f"Bearer {token}"})
    except aiohttp.WSServerHandshakeError as exc:
        return exc.status
    await ws.close()
    return 101


@pytest.mark.parametrize(
    ("claims", "reason"),
    [
        pytest.param({"sub": "mallory\x00"}, "sub", id="nul-sub"),
        pytest.param({"username": "Mal\x00lory"}, "username", id="nul-username"),
        pytest.param({"avatar_url": "https://img/\x00.png"}, "avatar_url", id="nul-avatar"),
        pytest.param({"channels": ["\x00"]}, "channels", id="nul-channel"),
        pytest.param({"sub": "mallory\x07"}, "sub", id="control-sub"),
        pytest.param({"username": "Mal\x1b[2Jlory"}, "username", id="control-username"),
        pytest.param({"username": "Mallory\r\nadmin"}, "username", id="crlf-username"),
        pytest.param({"avatar_url": "https://img/\x9b.png"}, "avatar_url", id="control-avatar"),
        pytest.param({"username": "Mal\ud800"}, "username", id="surrogate-username"),
        pytest.param({"exp": HUGE}, "exp", id="exp-10e400"),
        pytest.param({"exp": -HUGE}, "expired", id="exp-minus-10e400"),
        pytest.param({"exp": 1.7e308}, "exp", id="exp-huge-float"),
        pytest.param({"exp": float("inf")}, "DecodeError", id="exp-infinity"),
        pytest.param({"exp": str(int(time.time()) + 600)}, "exp", id="exp-string"),
        pytest.param({"exp": int(time.time()) + 3 * MAX_LIFETIME}, "lifetime", id="exp-too-far"),
        pytest.param({"nbf": HUGE}, "ImmatureSignature", id="nbf-10e400"),
        pytest.param({"nbf": -HUGE}, "nbf", id="nbf-minus-10e400"),
        pytest.param({"nbf": -1.7e308}, "nbf", id="nbf-huge-float"),
        pytest.param({"iat": HUGE}, "ImmatureSignature", id="iat-10e400"),
        pytest.param({"iat": -HUGE}, "iat", id="iat-minus-10e400"),
        pytest.param({"iat": -1.7e308}, "iat", id="iat-huge-float"),
    ],
)
async def test_hostile_claims_get_401_before_the_upgrade(
    stack: Stack, http: aiohttp.ClientSession, claims: dict[str, Any], reason: str
) -> None:
    log = EdgeLog(stack)
    with pytest.raises(aiohttp.WSServerHandshakeError) as info:
        await http.ws_connect(
            stack.ws_url(cid()), headers={"Authorization": f"Bearer {signed(stack, **claims)}"}
        )
    assert info.value.status == 401
    # The refusal is logged (naming the claim, never the token) before the
    # answer is sent; nothing else the edge logged meanwhile is a failure.
    entries = await log.wait_for(lambda es: any(e["event"] == "token refused" for e in es))
    [refusal] = [e for e in entries if e["event"] == "token refused"]
    assert reason in refusal["reason"]
    assert_no_failure_logged(entries)


async def test_good_users_are_unaffected_by_hostile_tokens(
    stack: Stack, http: aiohttp.ClientSession
) -> None:
    channel_id = cid()
    log = EdgeLog(stack)
    alice = await WsClient.connect(http, stack.ws_url(channel_id), token=stack.token("alice"))
    assert (await alice.recv())["type"] == "initial_state"
    url = stack.ws_url(channel_id)
    for hostile in (
        {"username": "\x00"},
        {"sub": "\x00", "username": "ok"},
        {"exp": HUGE},
        {"iat": -HUGE},
    ):
        assert await handshake_status(http, url, signed(stack, **hostile)) == 401
    within = signed(stack, sub="bob", username="Bob", exp=int(time.time()) + MAX_LIFETIME // 2)
    bob = await WsClient.connect(http, url, token=within)
    state = await bob.recv()
    assert sorted(u["userId"] for u in state["onlineUsers"]) == ["alice", "bob"]
    await alice.send({"type": "message", "content": "still here", "clientMsgId": "k1"})
    assert (await alice.recv_type("ack"))["clientMsgId"] == "k1"
    assert (await bob.recv_message())["content"] == "still here"
    await alice.close()
    await bob.close()
    async with http.get(stack.http_url("/healthz")) as resp:
        assert resp.status == 200
    assert_no_failure_logged(log.entries())


async def dev_token(http: aiohttp.ClientSession, stack: Stack, **kw: Any) -> aiohttp.ClientResponse:
    async with http.post(stack.http_url("/dev/token"), **kw) as resp:
        await resp.read()
        return resp


async def test_dev_tokens_never_share_a_user_id(stack: Stack, http: aiohttp.ClientSession) -> None:
    grants = []
    for name in ("alice", "Alice ", "ALICE", "alice"):
        resp = await dev_token(http, stack, json={"username": name})
        assert resp.status == 200
        grants.append(await resp.json())
    assert [g["username"] for g in grants] == ["alice", "Alice", "ALICE", "alice"]
    assert len({g["userId"] for g in grants}) == 4
    # Each token is a user of its own in a channel.
    channel_id = cid()
    clients = []
    for g in grants:
        client = await WsClient.connect(http, stack.ws_url(channel_id), token=g["token"])
        state = await client.recv()
        clients.append(client)
    assert {u["userId"] for u in state["onlineUsers"]} == {g["userId"] for g in grants}
    for client in clients:
        await client.close()


@pytest.mark.parametrize(
    ("body", "detail"),
    [
        pytest.param({"username": "al\x00ice"}, "control characters", id="nul"),
        pytest.param({"username": "alice\x1b[31m"}, "control characters", id="escape"),
        pytest.param({"username": "alice\nbob"}, "control characters", id="newline"),
        pytest.param({"username": "al\x9bice"}, "control characters", id="c1"),
        pytest.param({"username": "al\ud800ice"}, "surrogates", id="surrogate"),
        pytest.param({"username": "  "}, "1 to 64", id="blank"),
        pytest.param({"username": ["alice"]}, "1 to 64", id="not-a-string"),
    ],
)
async def test_dev_token_refuses_bad_names(
    stack: Stack, http: aiohttp.ClientSession, body: dict[str, Any], detail: str
) -> None:
    log = EdgeLog(stack)
    # json.dumps escapes what orjson would refuse to write (lone surrogates).
    resp = await dev_token(
        http, stack, data=json.dumps(body), headers={"Content-Type": "application/json"}
    )
    assert resp.status == 400
    assert detail in await resp.text()
    assert_no_failure_logged(log.entries())


async def test_dev_token_renewal_keeps_the_user(stack: Stack, http: aiohttp.ClientSession) -> None:
    resp = await dev_token(http, stack, json={"username": "Renée"})
    first = await resp.json()
    auth = {"Authorization": f"Bearer {first['token']}"}
    resp = await dev_token(http, stack, headers=auth)
    assert resp.status == 200
    renewed = await resp.json()
    assert (renewed["userId"], renewed["username"]) == (first["userId"], "Renée")
    assert renewed["token"] and renewed["expiresAt"] >= first["expiresAt"]
    client = await WsClient.connect(http, stack.ws_url(cid()), token=renewed["token"])
    state = await client.recv()
    assert [u["userId"] for u in state["onlineUsers"]] == [first["userId"]]
    await client.close()


@pytest.mark.parametrize(
    "make_token",
    [
        # A token from the identity provider: renewing would outlast its expiry
        # and drop its permission and channel limits.
        pytest.param(
            lambda s: s.token("carol", permissions=["read"], channels=["x"]), id="not-dev"
        ),
        pytest.param(
            lambda s: jwt.encode(
                {"sub": "dev-1", "username": "D", DEV_CLAIM: True, "exp": int(time.time()) - 60},
                s.jwt_secret,
                algorithm="HS256",
            ),
            id="expired",
        ),
        pytest.param(
            lambda s: jwt.encode(
                {"sub": "dev-1", "username": "D", DEV_CLAIM: True, "exp": int(time.time()) + 60},
                "another-secret-0123456789abcdef-0123456789",
                algorithm="HS256",
            ),
            id="bad-signature",
        ),
        pytest.param(lambda s: signed(s, username="x\x00", **{DEV_CLAIM: True}), id="nul"),
        pytest.param(lambda s: "garbage", id="garbage"),
    ],
)
async def test_dev_token_renews_only_valid_dev_tokens(
    stack: Stack, http: aiohttp.ClientSession, make_token: Callable[[Stack], str]
) -> None:
    headers = {"Authorization": f"Bearer {make_token(stack)}"}
    resp = await dev_token(http, stack, headers=headers, json={"username": "carol"})
    assert resp.status == 401
    assert "still-valid development token" in await resp.text()
