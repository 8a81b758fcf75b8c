"""Property-based fuzzing of client frames and token claims against a running edge.

Random JSON shapes and types, unicode (lone surrogates, NUL, right-to-left
marks), binary frames and bursts. The edge must never crash; every frame
gets the answer the pure protocol parser (the oracle) predicts - an error
frame with the right code, or the normal response; the other members keep
receiving; and the store ends up holding exactly the accepted messages.

Tokens signed with the right secret carry random claim values (text with
NUL, control characters and lone surrogates, huge integers, non-finite
floats, lists, nested objects): the edge answers 101 (then
``initial_state``) or 401/403 as the in-process verifier predicts, never
500, and stays healthy.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import orjson
import pytest
import pytest_asyncio
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from edge import protocol
from edge.auth import DEV_CLAIM, AuthError, TokenVerifier
from tests.support.client import WsClient
from tests.support.stack import Stack, start_stack
from waddle_common.text import has_control_chars, has_surrogates

pytestmark = [pytest.mark.e2e, pytest.mark.asyncio(loop_scope="module")]

CHANNEL = f"fuzz-{uuid.uuid4().hex[:8]}"
MAX_LEN = 4000
ENV = {
    "WADDLE_MESSAGE_RATE": "10000",
    "WADDLE_MESSAGE_BURST": "10000",
    "WADDLE_FRAME_RATE": "10000",
    "WADDLE_FRAME_BURST": "10000",
    "WADDLE_TYPING_RATE": "10000",
    "WADDLE_TYPING_BURST": "10000",
    "WADDLE_USER_MAX_CONNECTIONS": "1000",
}

tricky_chars = st.sampled_from(["\x00", "\u200f", "\u202e", "\ufeff", "\U0001f427", "é", "\\", '"'])
texts = st.text(
    alphabet=st.one_of(
        st.characters(codec="utf-8"), st.characters(categories=["Cs"]), tricky_chars
    ),
    max_size=40,
)
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=False, allow_infinity=False),
    texts,
)
json_values = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3)
    ),
    max_leaves=6,
)
frame_objects = st.fixed_dictionaries(
    {
        "type": st.one_of(
            st.sampled_from(["message", "typing", "presence", "sync", "ping"]), json_values
        )
    },
    optional={
        "content": st.one_of(texts, st.text(min_size=3990, max_size=4010), json_values),
        "threadId": st.one_of(st.none(), texts, json_values),
        "clientMsgId": st.one_of(st.none(), texts),
        "isTyping": json_values,
        "status": st.one_of(st.sampled_from(["online", "away", "dnd"]), json_values),
        "afterSeq": st.one_of(st.integers(min_value=-5, max_value=2**64), json_values),
        "afterMessageId": st.one_of(texts, json_values),
    },
)


def encode(obj: Any) -> str:
    # ensure_ascii keeps lone surrogates as \\ud800 escapes the server must refuse.
    import json

    return json.dumps(obj, ensure_ascii=True)


frames = st.one_of(
    frame_objects.map(encode),
    json_values.map(encode),
    texts,
    st.binary(max_size=64),
)


class Ledger:
    def __init__(self) -> None:
        # Ids of acknowledged messages: a repeated clientMsgId is acknowledged
        # again with the original's id, and stored once.
        self.ids: set[str] = set()

    @property
    def accepted(self) -> int:
        return len(self.ids)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def stack(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Stack]:
    async with start_stack(tmp_path_factory.mktemp("fuzz"), env=ENV) as s:
        yield s


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def listener(stack: Stack, http: aiohttp.ClientSession) -> AsyncIterator[WsClient]:
    client = await WsClient.connect(http, stack.ws_url(CHANNEL), token=stack.token("listener"))
    assert (await client.recv())["type"] == "initial_state"
    yield client
    await client.close()


LEDGER = Ledger()


async def until(client: WsClient, kinds: set[str]) -> list[dict[str, Any]]:
    got: list[dict[str, Any]] = []
    while True:
        frame = await client.recv()
        got.append(frame)
        if frame["type"] in kinds:
            return got


@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(frame=frames)
async def test_every_frame_gets_the_predicted_answer(
    stack: Stack, http: aiohttp.ClientSession, listener: WsClient, frame: str | bytes
) -> None:
    client = await WsClient.connect(http, stack.ws_url(CHANNEL), token=stack.token("fuzzer"))
    try:
        assert (await client.recv())["type"] == "initial_state"
        if isinstance(frame, bytes):
            await client.ws.send_bytes(frame)
            expected: Any = "binary"
        else:
            await client.ws.send_str(frame)
            try:
                expected = protocol.parse_client_frame(frame, max_message_length=MAX_LEN)
            except protocol.ProtocolError as exc:
                expected = exc
        await client.send({"type": "ping"})
        before_pong = await until(client, {"pong"})
        immediate = [f for f in before_pong[:-1] if f["type"] == "error"]
        match expected:
            case "binary":
                assert [e["code"] for e in immediate] == ["binary_unsupported"]
            case protocol.ProtocolError() as refusal:
                assert [(e["code"], e["message"]) for e in immediate] == [
                    (refusal.kind.code, orjson.loads(refusal.frame())["message"])
                ]
            case protocol.Ping():
                assert immediate == [] and sum(f["type"] == "pong" for f in before_pong) == 1
                await until(client, {"pong"})  # the answer to the fuzzed ping itself, or ours
            case protocol.SendMessage():
                assert immediate == []
                seen = before_pong + (
                    await until(client, {"ack"})
                    if not any(f["type"] == "ack" for f in before_pong)
                    else []
                )
                acks = [f for f in seen if f["type"] == "ack"]
                assert len(acks) == 1
                LEDGER.ids.add(acks[0]["id"])
            case protocol.Sync():
                if not any(f["type"] in ("sync_complete", "error") for f in before_pong):
                    await until(client, {"sync_complete", "error"})
            case _:
                assert immediate == []
    finally:
        await client.close()


async def test_invalid_utf8_text_frame_closes_1007(
    stack: Stack, http: aiohttp.ClientSession
) -> None:
    client = await WsClient.connect(http, stack.ws_url(CHANNEL), token=stack.token("utf8"))
    assert (await client.recv())["type"] == "initial_state"
    # A text frame whose payload is not UTF-8 (a lone surrogate, encoded raw).
    await client.ws._writer.send_frame("\ud800".encode("utf-8", "surrogatepass"), 0x1)
    assert await client.wait_closed() == 1007


async def test_burst_of_garbage_is_refused_and_bounded(
    stack: Stack, http: aiohttp.ClientSession
) -> None:
    client = await WsClient.connect(http, stack.ws_url(CHANNEL), token=stack.token("burst"))
    assert (await client.recv())["type"] == "initial_state"
    for i in range(300):
        await client.ws.send_str("{" * (i % 7))
    code = await client.wait_closed()
    assert code == 1008, "a flood of refused frames ends with a policy close"


async def test_store_holds_exactly_the_accepted_messages(
    stack: Stack, http: aiohttp.ClientSession, listener: WsClient
) -> None:
    """Runs after the fuzzing (file order): nothing refused was stored, and the
    listener got every accepted message once, in order."""
    import grpc

    from waddle_pb import store_pb2, store_pb2_grpc

    # One message known to be valid, so the check never passes vacuously.
    client = await WsClient.connect(http, stack.ws_url(CHANNEL), token=stack.token("closer"))
    await client.send({"type": "message", "content": "the last word"})
    LEDGER.ids.add((await client.recv_type("ack"))["id"])
    await client.close()

    async with grpc.aio.insecure_channel(stack.store_address) as ch:
        page = await store_pb2_grpc.StoreServiceStub(ch).MessagesAfter(
            store_pb2.MessagesAfterRequest(channel_id=CHANNEL, after_seq=0, limit=1000), timeout=5
        )
    assert len(page.messages) == LEDGER.accepted
    seqs: list[int] = []
    async with asyncio.timeout(20):
        while len(seqs) < LEDGER.accepted:
            frame = await listener.recv()
            if frame["type"] == "message":
                seqs.append(frame["message"]["seq"])
    assert seqs == list(range(1, LEDGER.accepted + 1))


# --- token claims -----------------------------------------------------------------

TOKEN_CHANNEL = f"fuzz-tokens-{uuid.uuid4().hex[:8]}"
START = int(time.time())
claim_texts = st.text(
    alphabet=st.one_of(
        st.characters(codec="utf-8"),
        st.characters(categories=["Cs", "Cc"]),
        tricky_chars,
    ),
    max_size=20,
)
huge_numbers = st.one_of(
    st.integers(min_value=-(10**400), max_value=10**400),
    st.floats(),  # NaN and the infinities too
    st.sampled_from([10**400, -(10**400), 1e308, -1e308, 2**63, 2**64, 253402300800]),
)
claim_values = st.one_of(
    json_values,
    huge_numbers,
    claim_texts,
    st.lists(st.one_of(claim_texts, json_values), max_size=3),
)
claim_overrides = st.dictionaries(
    keys=st.one_of(
        st.sampled_from(
            [
                "sub",
                "username",
                "avatar_url",
                "channels",
                "permissions",
                "exp",
                "nbf",
                "iat",
                "aud",
                "iss",
                "jti",
                DEV_CLAIM,
            ]
        ),
        st.text(max_size=6),
    ),
    values=claim_values,
    max_size=4,
)


def sign(claims: dict[str, Any], secret: str) -> str:
    """HS256 over any JSON (NaN, Infinity and escaped lone surrogates included)."""

    def b64(data: bytes) -> str:
        return base64.urlsafe_b64encode(data).rstrip(b"=").decode()

    head = b64(b'{"alg":"HS256","typ":"JWT"}')
    body = b64(json.dumps(claims, ensure_ascii=True).encode())
    sig = hmac.new(secret.encode(), f"{head}.{body}".encode(), hashlib.sha256).digest()
    return f"{head}.{body}.{b64(sig)}"


async def predicted_status(token: str, secret: str) -> int:
    """What the edge (default lifetime and leeway) must answer, from its verifier."""
    try:
        identity = await TokenVerifier(secret, max_lifetime=2592000).verify(token)
    except AuthError:
        return 401
    return 101 if identity.may_join(TOKEN_CHANNEL) else 403


@settings(
    max_examples=120,
    deadline=5000,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(overrides=claim_overrides)
async def test_token_claims_get_101_or_401_never_500(
    stack: Stack, http: aiohttp.ClientSession, overrides: dict[str, Any]
) -> None:
    claims: dict[str, Any] = {
        "sub": f"fz-{uuid.uuid4().hex[:8]}",
        "username": "Fuzzy",
        "permissions": ["read", "write"],
        "exp": START + 3600,
        **overrides,
    }
    token = sign(claims, stack.jwt_secret)
    expected = await predicted_status(token, stack.jwt_secret)
    event(f"predicted {expected}")
    try:
        client = await WsClient.connect(http, stack.ws_url(TOKEN_CHANNEL), token=token)
    except aiohttp.WSServerHandshakeError as exc:
        assert exc.status in (401, 403), f"answered {exc.status}"
        assert exc.status == expected
    else:
        try:
            assert expected == 101
            state = await client.recv()
            assert state["type"] == "initial_state"
            names = [u["username"] for u in state["onlineUsers"]]
            names += [u["userId"] for u in state["onlineUsers"]]
            assert claims["sub"] in names
            assert not any(has_control_chars(n) or has_surrogates(n) for n in names), names
        finally:
            await client.close()
    async with http.get(stack.http_url("/healthz")) as resp:
        assert resp.status == 200


async def test_edge_is_healthy_after_token_fuzzing(
    stack: Stack, http: aiohttp.ClientSession
) -> None:
    """Runs after the token fuzzing (file order): a good token still joins,
    and the edge never logged a failure."""
    client = await WsClient.connect(http, stack.ws_url(TOKEN_CHANNEL), token=stack.token("after"))
    assert (await client.recv())["type"] == "initial_state"
    await client.close()
    lines = (stack.tmp / "edge0.log").read_text().splitlines()
    assert lines and not [line for line in lines if "Traceback" in line or '"exc"' in line]


# --- replay and history arguments ------------------------------------------------

REPLAY_CHANNEL = f"fuzz-replay-{uuid.uuid4().hex[:8]}"
KNOWN_IDS: list[str] = []
seq_values = st.one_of(
    st.integers(min_value=-3, max_value=40),
    st.integers(min_value=2**62, max_value=2**65),
    json_values,
)
replay_frames = st.one_of(
    st.fixed_dictionaries(
        {"type": st.just("sync")},
        optional={
            "afterSeq": seq_values,
            "afterMessageId": st.one_of(texts, st.sampled_from(["known-0", "known-1"])),
        },
    ),
    st.fixed_dictionaries(
        {"type": st.just("history")},
        optional={
            "beforeSeq": seq_values,
            "limit": st.one_of(st.integers(min_value=-2, max_value=120), json_values),
            "threadId": st.one_of(texts, st.just("known-0"), json_values),
        },
    ),
)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def replay_channel(stack: Stack, http: aiohttp.ClientSession) -> AsyncIterator[WsClient]:
    """A channel with 30 messages (some in a thread), and a member listening."""
    seeder = await WsClient.connect(http, stack.ws_url(REPLAY_CHANNEL), token=stack.token("seeder"))
    assert (await seeder.recv())["type"] == "initial_state"
    for i in range(30):
        frame: dict[str, Any] = {"type": "message", "content": f"r{i}"}
        if KNOWN_IDS and i % 3 == 0:
            frame["threadId"] = KNOWN_IDS[0]
        await seeder.send(frame)
        KNOWN_IDS.append((await seeder.recv_type("ack"))["id"])
    yield seeder
    await seeder.close()


@settings(
    max_examples=80,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(request=replay_frames)
async def test_sync_and_history_arguments_get_one_answer(
    stack: Stack, http: aiohttp.ClientSession, replay_channel: WsClient, request: dict[str, Any]
) -> None:
    """Whatever the arguments, one answer (the frame, or one error the parser
    or the store predicts), and the connection stays live."""
    for key in ("afterMessageId", "threadId"):
        if request.get(key) == "known-0":
            request[key] = KNOWN_IDS[0]
        elif request.get(key) == "known-1":
            request[key] = KNOWN_IDS[1]
    client = await WsClient.connect(
        http, stack.ws_url(REPLAY_CHANNEL), token=stack.token("replay-fuzzer")
    )
    try:
        assert (await client.recv())["type"] == "initial_state"
        text = encode(request)
        try:
            expected: Any = protocol.parse_client_frame(text, max_message_length=MAX_LEN)
        except protocol.ProtocolError as exc:
            expected = exc
        await client.ws.send_str(text)
        answer = "sync_complete" if request["type"] == "sync" else "history"
        got = await until(client, {answer, "error"})
        final = got[-1]
        match expected:
            case protocol.ProtocolError() as refusal:
                assert final["type"] == "error" and final["code"] == refusal.kind.code
            case protocol.Sync(after_message_id=str() as wanted) if wanted not in KNOWN_IDS:
                assert final["type"] == "error" and final["code"] == "unknown_message_id"
            case protocol.History(limit=limit):
                assert final["type"] == "history", final
                assert len(final["messages"]) <= limit
                seqs = [m["seq"] for m in final["messages"]]
                assert seqs == sorted(seqs)
            case _:
                assert final["type"] == "sync_complete", final
        # One answer only, and live afterwards: a ping, then a new message.
        await client.send({"type": "ping"})
        after = await until(client, {"pong"})
        assert not [f for f in after if f["type"] in ("error", answer)], after
        await replay_channel.send({"type": "message", "content": "live"})
        await replay_channel.recv_type("ack")
        assert (await client.recv_message())["content"] == "live"
    finally:
        await client.close()


# --- the multiplexed endpoint ------------------------------------------------------

MUX_SUBSCRIBED = f"fuzz-mux-{uuid.uuid4().hex[:8]}"
mux_channel_ids = st.one_of(
    st.sampled_from([MUX_SUBSCRIBED, f"fuzz-other-{uuid.uuid4().hex[:6]}"]),
    st.sampled_from(["", "bad\nid", "-x", "a" * 129, "a b"]),
    json_values,
)
mux_frames = st.fixed_dictionaries(
    {
        "type": st.one_of(
            st.sampled_from(
                [
                    "message",
                    "typing",
                    "presence",
                    "sync",
                    "ping",
                    "subscribe",
                    "unsubscribe",
                    "history",
                    "read",
                ]
            ),
            json_values,
        )
    },
    optional={
        "channelId": mux_channel_ids,
        "content": st.one_of(texts, json_values),
        "isTyping": json_values,
        "status": st.one_of(st.sampled_from(["online", "away", "dnd"]), json_values),
        "afterSeq": seq_values,
        "beforeSeq": seq_values,
        "limit": st.one_of(st.integers(min_value=-2, max_value=120), json_values),
        "threadId": st.one_of(st.none(), texts),
        "seq": seq_values,
    },
)


@settings(
    max_examples=120,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(request=mux_frames)
async def test_multiplexed_frames_get_the_predicted_answer(
    stack: Stack, http: aiohttp.ClientSession, request: dict[str, Any]
) -> None:
    url = f"ws://127.0.0.1:{stack.edge_port()}/websocket"
    client = await WsClient.connect(http, url, token=stack.token("mux-fuzzer"))
    try:
        await client.send({"type": "subscribe", "channelId": MUX_SUBSCRIBED})
        await client.recv_match(type="initial_state", channelId=MUX_SUBSCRIBED)
        text = encode(request)
        try:
            channel_id, frame = protocol.parse_frame(
                text, max_message_length=MAX_LEN, multiplexed=True
            )
        except protocol.ProtocolError as exc:
            await client.ws.send_str(text)
            err = await client.recv_match(type="error")
            assert err["code"] == exc.kind.code and err.get("channelId") == exc.channel_id
            return
        await client.ws.send_str(text)
        subscribed = channel_id == MUX_SUBSCRIBED
        errors = 0  # the error frames this request should cause
        match frame:
            case protocol.Ping():
                await client.recv_match(type="pong")
            case protocol.Subscribe() if subscribed:
                err = await client.recv_match(type="error", channelId=channel_id)
                assert err["code"] == "already_subscribed"
                errors = 1
            case protocol.Subscribe():
                await client.recv_match(type="initial_state", channelId=channel_id)
            case protocol.Unsubscribe() if subscribed:
                await client.recv_match(type="unsubscribed", channelId=channel_id)
            case _ if not subscribed:
                err = await client.recv_match(type="error", channelId=channel_id)
                assert err["code"] == "not_subscribed"
                errors = 1
            case protocol.SendMessage():
                await client.recv_match(type="ack", channelId=channel_id)
            case protocol.Sync(after_message_id=str()):
                err = await client.recv_match(type="error", channelId=channel_id)
                assert err["code"] == "unknown_message_id"
                errors = 1
            case protocol.Sync():
                await client.recv_match(type="sync_complete", channelId=channel_id)
            case protocol.History():
                await client.recv_match(type="history", channelId=channel_id)
        # Nothing else went wrong, and the socket still answers.
        await client.send({"type": "ping"})
        await client.recv_match(type="pong")
        assert len([f for f in client.received if f["type"] == "error"]) == errors
    finally:
        await client.close()
