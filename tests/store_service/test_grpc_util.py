"""waddle_common.grpc_util: metrics interceptors (server and client) and options."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import grpc
import grpc.aio
import pytest
from prometheus_client import CollectorRegistry

from waddle_common.grpc_util import (
    KEEPALIVE_TIME_MS,
    MAX_MESSAGE_BYTES,
    SHARD_KEEPALIVE_TIME_MS,
    SHARD_KEEPALIVE_TIMEOUT_MS,
    ClientMetricsInterceptor,
    ServerMetricsInterceptor,
    channel_options,
    server_options,
    shard_channel_options,
)

UNARY = "/test.Echo/Unary"
STREAM = "/test.Echo/Stream"


async def unary(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
    if request == b"abort":
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "bad")
    if request == b"set-code":
        context.set_code(grpc.StatusCode.NOT_FOUND)
        return b""
    if request == b"crash":
        raise RuntimeError("boom")
    if request == b"big":
        return b"x" * (MAX_MESSAGE_BYTES - 1024)
    return request


async def stream(request: bytes, _context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
    for _ in range(3):
        yield request


@dataclass
class Harness:
    registry: CollectorRegistry
    channel: grpc.aio.Channel

    def count(self, name: str, method: str, code: str) -> float:
        labels = {"method": method, "code": code}
        return self.registry.get_sample_value(f"{name}_count", labels) or 0.0

    async def call(self, payload: bytes) -> grpc.StatusCode:
        try:
            await self.channel.unary_unary(UNARY)(payload, timeout=10)
        except grpc.aio.AioRpcError as exc:
            code: grpc.StatusCode = exc.code()
            return code
        return grpc.StatusCode.OK


@pytest.fixture
async def harness() -> AsyncIterator[Harness]:
    registry = CollectorRegistry()
    server = grpc.aio.server(
        interceptors=[ServerMetricsInterceptor(registry)], options=server_options()
    )
    handlers: dict[str, Any] = {
        "Unary": grpc.unary_unary_rpc_method_handler(unary),
        "Stream": grpc.unary_stream_rpc_method_handler(stream),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("test.Echo", handlers),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    channel = grpc.aio.insecure_channel(
        f"127.0.0.1:{port}",
        options=channel_options(),
        interceptors=[ClientMetricsInterceptor(registry)],
    )
    yield Harness(registry, channel)
    await channel.close()
    await server.stop(None)


@pytest.mark.parametrize(
    ("payload", "code"),
    [
        (b"hello", "OK"),
        (b"abort", "INVALID_ARGUMENT"),
        (b"set-code", "NOT_FOUND"),
        (b"crash", "UNKNOWN"),
    ],
)
async def test_unary_calls_are_timed_by_method_and_code(
    harness: Harness, payload: bytes, code: str
) -> None:
    assert (await harness.call(payload)).name == code
    assert harness.count("waddle_grpc_server_seconds", UNARY, code) == 1
    assert harness.count("waddle_grpc_client_seconds", UNARY, code) == 1


async def test_client_sees_the_response_through_the_interceptor(harness: Harness) -> None:
    reply = await harness.channel.unary_unary(UNARY)(b"ping", timeout=10)
    assert reply == b"ping"


async def test_streaming_methods_pass_through_untimed(harness: Harness) -> None:
    replies = [r async for r in harness.channel.unary_stream(STREAM)(b"s", timeout=10)]
    assert replies == [b"s", b"s", b"s"]
    for name in ("waddle_grpc_server_seconds", "waddle_grpc_client_seconds"):
        for code in ("OK", "UNKNOWN", "CANCELLED"):
            assert harness.count(name, STREAM, code) == 0


async def test_failed_connection_is_recorded_on_the_client() -> None:
    # No server at this address answers in time: the client records the code.
    registry = CollectorRegistry()
    interceptor = ClientMetricsInterceptor(registry)
    async with grpc.aio.insecure_channel(
        "127.0.0.1:1", options=channel_options(), interceptors=[interceptor]
    ) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await asyncio.wait_for(channel.unary_unary(UNARY)(b"x", timeout=0.2), 10)
    code = caught.value.code().name
    assert code in ("DEADLINE_EXCEEDED", "UNAVAILABLE")
    labels = {"method": UNARY, "code": code}
    assert registry.get_sample_value("waddle_grpc_client_seconds_count", labels) == 1


async def test_messages_up_to_16_mib_pass(harness: Harness) -> None:
    reply = await harness.channel.unary_unary(UNARY)(b"big", timeout=30)
    assert len(reply) == MAX_MESSAGE_BYTES - 1024


def test_options_agree() -> None:
    server, client = dict(server_options()), dict(channel_options())
    for options in (server, client):
        assert options["grpc.max_send_message_length"] == 16 * 1024 * 1024
        assert options["grpc.max_receive_message_length"] == 16 * 1024 * 1024
        assert options["grpc.keepalive_time_ms"] == KEEPALIVE_TIME_MS == 20_000
        assert options["grpc.keepalive_permit_without_calls"] == 1
    # The server must accept the client's keepalive pings, or it sends GOAWAY.
    assert server["grpc.http2.min_recv_ping_interval_without_data_ms"] <= KEEPALIVE_TIME_MS
    shard = dict(shard_channel_options())
    assert shard["grpc.keepalive_time_ms"] == SHARD_KEEPALIVE_TIME_MS < KEEPALIVE_TIME_MS
    assert shard["grpc.keepalive_timeout_ms"] == SHARD_KEEPALIVE_TIMEOUT_MS
    assert server["grpc.http2.min_recv_ping_interval_without_data_ms"] <= SHARD_KEEPALIVE_TIME_MS
    assert shard["grpc.http2.ping_timeout_ms"] == SHARD_KEEPALIVE_TIMEOUT_MS
    assert client["grpc.http2.ping_timeout_ms"] == dict(client)["grpc.keepalive_timeout_ms"]
    faster = ("grpc.keepalive_time_ms", "grpc.keepalive_timeout_ms", "grpc.http2.ping_timeout_ms")
    assert {k: v for k, v in shard.items() if k not in faster} == {
        k: v for k, v in client.items() if k not in faster
    }


async def test_a_second_server_cannot_share_a_taken_port() -> None:
    first = grpc.aio.server(options=server_options())
    port = first.add_insecure_port("127.0.0.1:0")
    await first.start()
    try:
        second = grpc.aio.server(options=server_options())
        with pytest.raises(RuntimeError):
            second.add_insecure_port(f"127.0.0.1:{port}")
    finally:
        await first.stop(None)
