"""The store over real gRPC: a grpc.aio server on 127.0.0.1:0 and a real client stub."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import TYPE_CHECKING

import grpc
import grpc.aio
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from store_service.server import SERVICE_NAME, RunningStore
from tests.store_service.helpers import exec_sql, pb_msg
from waddle_pb import store_pb2

if TYPE_CHECKING:
    from waddle_pb.store_pb2_grpc import StoreServiceAsyncStub as Stub

OK = store_pb2.ChannelAppendResult.OK
FENCED = store_pb2.ChannelAppendResult.FENCED
TIMEOUT = 10.0


def append_request(
    *groups: tuple[str, int, list[store_pb2.NewMessage]],
) -> store_pb2.AppendBatchRequest:
    return store_pb2.AppendBatchRequest(
        channels=[
            store_pb2.ChannelAppend(channel_id=cid, expected_last_seq=expected, messages=messages)
            for cid, expected, messages in groups
        ]
    )


async def status_of(call: Awaitable[object]) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    return caught.value.code(), caught.value.details() or ""


async def test_append_numbers_dedupes_and_fences(stub: Stub) -> None:
    first = pb_msg("one", key="k", ts=1000)
    response = await stub.AppendBatch(
        append_request(("a", 0, [first, pb_msg("two")])), timeout=TIMEOUT
    )
    [a] = response.channels
    assert (a.channel_id, a.status, a.last_seq) == ("a", OK, 2)
    assert [(r.seq, r.duplicate) for r in a.results] == [(1, False), (2, False)]
    assert (a.results[0].id, a.results[0].timestamp_ms) == (first.id, 1000)

    response = await stub.AppendBatch(
        append_request(("a", 1, [pb_msg("stale")]), ("b", 0, [pb_msg("b")])), timeout=TIMEOUT
    )
    [fenced, b] = response.channels
    assert (fenced.status, fenced.last_seq, len(fenced.results)) == (FENCED, 2, 0)
    assert (b.status, b.last_seq) == (OK, 1)

    retry = pb_msg("one, retried", key="k", ts=5000)
    response = await stub.AppendBatch(append_request(("a", 2, [retry])), timeout=TIMEOUT)
    [again] = response.channels
    assert (again.status, again.last_seq) == (OK, 2)
    [dup] = again.results
    assert (dup.id, dup.seq, dup.timestamp_ms, dup.duplicate) == (first.id, 1, 1000, True)


async def test_concurrent_appends_over_grpc_are_all_numbered_once(stub: Stub) -> None:
    # Each caller owns its channel; all of them race into the committer.
    calls = [
        stub.AppendBatch(append_request((f"c{i}", 0, [pb_msg(), pb_msg()])), timeout=TIMEOUT)
        for i in range(20)
    ]
    responses = await asyncio.wait_for(asyncio.gather(*calls), timeout=30)
    for i, response in enumerate(responses):
        [result] = response.channels
        assert result.channel_id == f"c{i}"
        assert [r.seq for r in result.results] == [1, 2]


async def test_load_channel_returns_state(stub: Stub) -> None:
    state = await stub.LoadChannel(
        store_pb2.LoadChannelRequest(channel_id="c", recent_limit=50), timeout=TIMEOUT
    )
    assert (state.channel_id, state.last_seq, len(state.recent)) == ("c", 0, 0)
    assert (state.settings.channel_id, state.settings.max_connections) == ("c", 0)

    message = store_pb2.NewMessage(
        id="m1",
        user_id="u1",
        username="alice",
        avatar_url="a.png",
        content="hello",
        thread_id="t",
        client_msg_id="k1",
        timestamp_ms=77,
    )
    await stub.AppendBatch(
        append_request(("c", 0, [message, pb_msg("x", user="u2")])), timeout=TIMEOUT
    )
    await stub.UpdateChannelSettings(
        store_pb2.ChannelSettings(channel_id="c", max_connections=9), timeout=TIMEOUT
    )
    state = await stub.LoadChannel(
        store_pb2.LoadChannelRequest(channel_id="c", recent_limit=50), timeout=TIMEOUT
    )
    assert state.last_seq == 2
    assert state.settings.max_connections == 9
    first = state.recent[0]
    assert (
        first.id,
        first.channel_id,
        first.seq,
        first.user_id,
        first.username,
        first.avatar_url,
        first.content,
        first.thread_id,
        first.timestamp_ms,
        first.client_msg_id,
    ) == ("m1", "c", 1, "u1", "alice", "a.png", "hello", "t", 77, "k1")
    assert (state.recent[1].seq, state.recent[1].thread_id) == (2, "")


async def test_messages_after_and_recent(stub: Stub) -> None:
    messages = [pb_msg(f"m{i}") for i in range(1, 6)]
    await stub.AppendBatch(append_request(("c", 0, messages)), timeout=TIMEOUT)

    page = await stub.MessagesAfter(
        store_pb2.MessagesAfterRequest(channel_id="c", after_seq=1, limit=2), timeout=TIMEOUT
    )
    assert ([m.seq for m in page.messages], page.has_more, page.last_seq) == ([2, 3], True, 5)

    page = await stub.MessagesAfter(
        store_pb2.MessagesAfterRequest(channel_id="c", after_message_id=messages[2].id),
        timeout=TIMEOUT,
    )
    assert ([m.seq for m in page.messages], page.has_more) == ([4, 5], False)

    page = await stub.MessagesAfter(store_pb2.MessagesAfterRequest(channel_id="c"), timeout=TIMEOUT)
    assert [m.seq for m in page.messages] == [1, 2, 3, 4, 5]

    code, details = await status_of(
        stub.MessagesAfter(
            store_pb2.MessagesAfterRequest(channel_id="c", after_message_id="nope"),
            timeout=TIMEOUT,
        )
    )
    assert (code, details) == (grpc.StatusCode.NOT_FOUND, "Unknown message id")

    page = await stub.RecentMessages(
        store_pb2.RecentMessagesRequest(channel_id="c", limit=3), timeout=TIMEOUT
    )
    assert ([m.content for m in page.messages], page.has_more) == (["m3", "m4", "m5"], True)


async def test_users(stub: Stub) -> None:
    response = await stub.UpsertUsers(
        store_pb2.UpsertUsersRequest(
            users=[store_pb2.User(id="u1", username="a", avatar_url="x.png")]
        ),
        timeout=TIMEOUT,
    )
    assert response.count == 1
    user = await stub.GetUser(store_pb2.GetUserRequest(id="u1"), timeout=TIMEOUT)
    assert (user.id, user.username, user.avatar_url) == ("u1", "a", "x.png")
    code, _ = await status_of(stub.GetUser(store_pb2.GetUserRequest(id="u2"), timeout=TIMEOUT))
    assert code == grpc.StatusCode.NOT_FOUND


async def test_empty_ids_are_invalid_argument(stub: Stub) -> None:
    calls: list[Awaitable[object]] = [
        stub.AppendBatch(append_request(("", 0, [pb_msg()])), timeout=TIMEOUT),
        stub.AppendBatch(append_request(("c", 0, [pb_msg(id="")])), timeout=TIMEOUT),
        stub.AppendBatch(append_request(("c", 0, [pb_msg(user="")])), timeout=TIMEOUT),
        stub.LoadChannel(store_pb2.LoadChannelRequest(), timeout=TIMEOUT),
        stub.MessagesAfter(store_pb2.MessagesAfterRequest(), timeout=TIMEOUT),
        stub.RecentMessages(store_pb2.RecentMessagesRequest(), timeout=TIMEOUT),
        stub.GetUser(store_pb2.GetUserRequest(), timeout=TIMEOUT),
        stub.UpsertUsers(
            store_pb2.UpsertUsersRequest(users=[store_pb2.User(username="x")]), timeout=TIMEOUT
        ),
        stub.UpdateChannelSettings(store_pb2.ChannelSettings(), timeout=TIMEOUT),
    ]
    for call in calls:
        code, _ = await status_of(call)
        assert code == grpc.StatusCode.INVALID_ARGUMENT


async def test_reused_message_id_is_already_exists(stub: Stub) -> None:
    await stub.AppendBatch(append_request(("c", 0, [pb_msg(id="m", key="k")])), timeout=TIMEOUT)
    code, _ = await status_of(
        stub.AppendBatch(append_request(("c", 1, [pb_msg(id="m", key="k2")])), timeout=TIMEOUT)
    )
    assert code == grpc.StatusCode.ALREADY_EXISTS


async def test_database_errors_are_unavailable_and_counted(
    stub: Stub, store: RunningStore, migrated_url: str
) -> None:
    # A channel with a row, so that loading it reads the (missing) messages table.
    await stub.UpdateChannelSettings(store_pb2.ChannelSettings(channel_id="c"), timeout=TIMEOUT)
    exec_sql(migrated_url, "ALTER TABLE messages RENAME TO messages_gone")
    try:
        append = await status_of(
            stub.AppendBatch(append_request(("c", 0, [pb_msg()])), timeout=TIMEOUT)
        )
        recent = await status_of(
            stub.LoadChannel(
                store_pb2.LoadChannelRequest(channel_id="c", recent_limit=5), timeout=TIMEOUT
            )
        )
    finally:
        exec_sql(migrated_url, "ALTER TABLE messages_gone RENAME TO messages")
    assert append[0] == recent[0] == grpc.StatusCode.UNAVAILABLE
    registry = store.metrics.registry
    assert registry.get_sample_value("waddle_store_errors_total", {"op": "append"}) == 1
    assert registry.get_sample_value("waddle_store_errors_total", {"op": "load_channel"}) == 1
    # Retrying once the database is back works, from the same head.
    response = await stub.AppendBatch(append_request(("c", 0, [pb_msg()])), timeout=TIMEOUT)
    assert response.channels[0].last_seq == 1


async def test_health_is_serving_and_calls_are_timed(
    store: RunningStore, grpc_channel: grpc.aio.Channel, stub: Stub
) -> None:
    health = health_pb2_grpc.HealthStub(grpc_channel)
    for service in ("", SERVICE_NAME):
        reply = await health.Check(health_pb2.HealthCheckRequest(service=service), timeout=TIMEOUT)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING

    await stub.LoadChannel(store_pb2.LoadChannelRequest(channel_id="c"), timeout=TIMEOUT)
    labels = {"method": f"/{SERVICE_NAME}/LoadChannel", "code": "OK"}
    registry = store.metrics.registry
    assert registry.get_sample_value("waddle_grpc_server_seconds_count", labels) == 1

    # Shutdown tells watchers NOT_SERVING before it stops answering.
    watch = health.Watch(health_pb2.HealthCheckRequest(service=SERVICE_NAME), timeout=TIMEOUT)
    first = await asyncio.wait_for(watch.read(), TIMEOUT)
    assert first.status == health_pb2.HealthCheckResponse.SERVING
    stopping = asyncio.create_task(store.stop(1.0))
    second = await asyncio.wait_for(watch.read(), TIMEOUT)
    assert second.status == health_pb2.HealthCheckResponse.NOT_SERVING
    watch.cancel()  # or the stream would hold the server for its whole grace period
    await asyncio.wait_for(stopping, TIMEOUT)
    code, _ = await status_of(
        health.Check(health_pb2.HealthCheckRequest(service=""), timeout=TIMEOUT)
    )
    assert code == grpc.StatusCode.UNAVAILABLE  # stopped: nobody answers
