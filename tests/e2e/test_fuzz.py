"""Property-based fuzzing of client frames against a running edge.

Random JSON shapes and types, unicode (lone surrogates, NUL, right-to-left
marks), binary frames and bursts. The edge must never crash; every frame
gets the answer the pure protocol parser (the oracle) predicts - an error
frame with the right code, or the normal response; the other members keep
receiving; and the store ends up holding exactly the accepted messages.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import orjson
import pytest
import pytest_asyncio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edge import protocol
from tests.support.client import WsClient
from tests.support.stack import Stack, start_stack

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
        self.accepted = 0


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
                assert [f["type"] for f in seen].count("ack") == 1
                LEDGER.accepted += 1
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
    await client.recv_type("ack")
    await client.close()
    LEDGER.accepted += 1

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
