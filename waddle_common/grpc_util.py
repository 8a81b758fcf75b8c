"""gRPC plumbing every Waddle service shares: latency metrics and channel/server options.

* ``ServerMetricsInterceptor`` records ``waddle_grpc_server_seconds``
  (labels ``method``, ``code``) for unary-unary methods; streaming methods
  pass through untouched (their duration is the stream's lifetime, which is
  not a latency).
* ``ClientMetricsInterceptor`` records ``waddle_grpc_client_seconds``
  (labels ``method``, ``code``) for unary-unary calls.
* ``server_options()`` / ``channel_options()``: message size limits and
  keepalive settings that agree with each other, so a long-lived idle
  channel (shard -> store) notices a dead peer within about half a minute
  and the server never answers pings with GOAWAY. ``shard_channel_options()``
  is the edge's link to a channel shard: it pings every 2 s, so a shard
  that hangs or whose machine died (no FIN, no RST) is found within about
  4 s and its channels fail over (``WADDLE_SHARD_DOWN_SECONDS`` later).

Both interceptors register their histogram in the registry they are given,
so create ONE of each per registry and share it between channels/servers.
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Awaitable, Callable
from contextlib import suppress
from time import perf_counter
from typing import Any

import grpc
import grpc.aio
from prometheus_client import CollectorRegistry, Histogram

MAX_MESSAGE_BYTES = 16 * 1024 * 1024
KEEPALIVE_TIME_MS = 20_000
KEEPALIVE_TIMEOUT_MS = 10_000
# The edge -> shard link: a stream that carries nothing for a while is
# still pinged, and an unanswered ping breaks it (HTTP/2 pings are answered
# by gRPC's core, not by the shard's busy Python code).
SHARD_KEEPALIVE_TIME_MS = 2_000
SHARD_KEEPALIVE_TIMEOUT_MS = 2_000
# Servers accept client pings this often (must be below every keepalive
# time, or a server would treat our own keepalives as abuse and close the
# channel).
MIN_PING_INTERVAL_MS = 1_000

LATENCY_BUCKETS = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)

GrpcOptions = list[tuple[str, int]]


def _common_options() -> GrpcOptions:
    return [
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        ("grpc.keepalive_time_ms", KEEPALIVE_TIME_MS),
        ("grpc.keepalive_timeout_ms", KEEPALIVE_TIMEOUT_MS),
        # The core waits this long for a ping's answer (a minute by default,
        # whatever the keepalive timeout says).
        ("grpc.http2.ping_timeout_ms", KEEPALIVE_TIMEOUT_MS),
        ("grpc.keepalive_permit_without_calls", 1),
        # 0: keep pinging an idle connection for as long as it lives.
        ("grpc.http2.max_pings_without_data", 0),
    ]


def server_options() -> GrpcOptions:
    """Options for every Waddle ``grpc.aio.server(options=...)``."""
    return [
        *_common_options(),
        ("grpc.http2.min_recv_ping_interval_without_data_ms", MIN_PING_INTERVAL_MS),
        ("grpc.http2.min_ping_interval_without_data_ms", MIN_PING_INTERVAL_MS),
        # gRPC binds with SO_REUSEPORT by default: a second service started on
        # a taken port would then silently share it instead of failing.
        ("grpc.so_reuseport", 0),
    ]


def channel_options() -> GrpcOptions:
    """Options for every Waddle ``grpc.aio.insecure_channel(options=...)``."""
    return [
        *_common_options(),
        # Reconnect quickly after a peer restarts (the default backs off to 120 s).
        ("grpc.initial_reconnect_backoff_ms", 250),
        ("grpc.max_reconnect_backoff_ms", 5_000),
    ]


def shard_channel_options() -> GrpcOptions:
    """``channel_options()`` for the edge's links to channel shards."""
    faster = {
        "grpc.keepalive_time_ms": SHARD_KEEPALIVE_TIME_MS,
        "grpc.keepalive_timeout_ms": SHARD_KEEPALIVE_TIMEOUT_MS,
        "grpc.http2.ping_timeout_ms": SHARD_KEEPALIVE_TIMEOUT_MS,
    }
    return [(key, faster.get(key, value)) for key, value in channel_options()]


def status_code(value: int) -> grpc.StatusCode:
    """The ``grpc.StatusCode`` of a numeric status (UNKNOWN for one gRPC lacks)."""
    for status in grpc.StatusCode:
        if status.value[0] == value:
            return status
    return grpc.StatusCode.UNKNOWN


def _code_name(code: Any) -> str:
    if isinstance(code, grpc.StatusCode):
        return str(code.name)
    if isinstance(code, int):
        return str(status_code(code).name)
    return "UNKNOWN"


def _method_name(method: str | bytes) -> str:
    return method.decode() if isinstance(method, bytes) else method


class ServerMetricsInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """Times unary-unary handlers into ``waddle_grpc_server_seconds{method, code}``;
    a stream's handler times its requests with ``observe``."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.seconds = Histogram(
            "waddle_grpc_server_seconds",
            "Time to handle a unary gRPC call, by method and status code.",
            ["method", "code"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )

    def observe(self, method: str, code: str, seconds: float) -> None:
        """Record one request handled outside a unary call (a stream's message)."""
        self.seconds.labels(method=method, code=code).observe(seconds)

    async def intercept_service(
        self,
        continuation: Callable[[Any], Awaitable[Any]],
        handler_call_details: Any,
    ) -> Any:
        handler = await continuation(handler_call_details)
        if handler is None or handler.unary_unary is None:
            return handler
        return grpc.unary_unary_rpc_method_handler(
            self._timed(_method_name(handler_call_details.method), handler.unary_unary),
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )

    def _timed(
        self, method: str, behavior: Callable[[Any, Any], Any]
    ) -> Callable[[Any, Any], Awaitable[Any]]:
        async def handle(request: Any, context: Any) -> Any:
            start = perf_counter()
            code = "UNKNOWN"
            try:
                response = behavior(request, context)
                if inspect.isawaitable(response):
                    response = await response
                # A handler may set_code() without raising.
                code = _code_name(context.code() or grpc.StatusCode.OK)
                return response
            except grpc.aio.AbortError:
                code = _code_name(context.code())
                raise
            except asyncio.CancelledError:
                code = "CANCELLED"
                raise
            finally:
                self.seconds.labels(method=method, code=code).observe(perf_counter() - start)

        return handle


class ClientMetricsInterceptor(grpc.aio.UnaryUnaryClientInterceptor):  # type: ignore[misc]
    """Times unary-unary calls into ``waddle_grpc_client_seconds{method, code}``;
    a stream's caller times its requests with ``observe``."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.seconds = Histogram(
            "waddle_grpc_client_seconds",
            "Time from issuing a unary gRPC call to its status, by method and status code.",
            ["method", "code"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )

    def observe(self, method: str, code: str, seconds: float) -> None:
        """Record one request made outside a unary call (a stream's message)."""
        self.seconds.labels(method=method, code=code).observe(seconds)

    async def intercept_unary_unary(
        self,
        continuation: Callable[[Any, Any], Awaitable[Any]],
        client_call_details: Any,
        request: Any,
    ) -> Any:
        method = _method_name(client_call_details.method)
        start = perf_counter()
        code = "UNKNOWN"
        try:
            call = await continuation(client_call_details, request)
            # Wait for the outcome here so the time covers the whole call;
            # the caller's own await then returns the finished result.
            with suppress(grpc.aio.AioRpcError):
                await call
            code = _code_name(await call.code())
            return call
        except grpc.aio.AioRpcError as exc:
            code = _code_name(exc.code())
            raise
        except asyncio.CancelledError:
            code = "CANCELLED"
            raise
        finally:
            self.seconds.labels(method=method, code=code).observe(perf_counter() - start)
