"""History and read cursors over real gRPC: the servicer, the typed ``StoreClient``, errors."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable
from typing import TYPE_CHECKING

import grpc
import grpc.aio
import pytest

from store_service.cursors import MAX_CURSOR_BATCH
from store_service.server import SERVICE_NAME, RunningStore
from tests.store_service.helpers import exec_sql, pb_msg
from waddle_common.store_client import CURSOR_BATCH, StoreClient, StoreUnavailable
from waddle_pb import store_pb2

if TYPE_CHECKING:
    from waddle_pb.store_pb2_grpc import StoreServiceAsyncStub as Stub

TIMEOUT = 10.0
INVALID = grpc.StatusCode.INVALID_ARGUMENT


@pytest.fixture
async def client(store: RunningStore) -> AsyncIterator[StoreClient]:
    client = StoreClient(f"127.0.0.1:{store.grpc_port}", timeout=TIMEOUT)
    yield client
    await client.close()


async def append(
    stub: Stub, channel_id: str, expected: int, *messages: store_pb2.NewMessage
) -> list[int]:
    response = await stub.AppendBatch(
        store_pb2.AppendBatchRequest(
            channels=[
                store_pb2.ChannelAppend(
                    channel_id=channel_id, expected_last_seq=expected, messages=messages
                )
            ]
        ),
        timeout=TIMEOUT,
    )
    [result] = response.channels
    assert result.status == store_pb2.ChannelAppendResult.OK
    return [r.seq for r in result.results]


def reply(content: str, root_id: str) -> store_pb2.NewMessage:
    message = pb_msg(content)
    message.thread_id = root_id
    return message


async def code_of(call: Awaitable[object]) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    return caught.value.code(), caught.value.details() or ""


# --- history ----------------------------------------------------------------------------


async def test_history_pages_back_with_threads_and_reply_counts(
    stub: Stub, client: StoreClient
) -> None:
    root = pb_msg("root")
    await append(stub, "c", 0, root, pb_msg("m2"), pb_msg("m3"))
    await append(stub, "c", 3, reply("r1", root.id), pb_msg("m5"), reply("r2", root.id))
    # A reply to the same id in another channel: not counted in c.
    await append(stub, "d", 0, reply("stray", root.id))

    newest = await client.history("c", limit=4)
    assert [m.seq for m in newest.messages] == [3, 4, 5, 6]
    assert [m.content for m in newest.messages] == ["m3", "r1", "m5", "r2"]
    assert (newest.has_more, newest.last_seq) == (True, 6)
    assert [m.thread_id for m in newest.messages] == ["", root.id, "", root.id]

    oldest = await client.history("c", before_seq=newest.messages[0].seq, limit=4)
    assert [m.seq for m in oldest.messages] == [1, 2]
    assert (oldest.has_more, oldest.last_seq) == (False, 6)
    assert [(m.id, m.reply_count) for m in oldest.messages] == [
        (root.id, 2),
        (oldest.messages[1].id, 0),
    ]
    assert oldest.messages[0].username == "name-u1"

    thread = await client.history("c", thread_id=root.id, limit=1)
    assert ([m.content for m in thread.messages], thread.has_more) == (["r2"], True)
    thread = await client.history(
        "c", thread_id=root.id, before_seq=thread.messages[0].seq, limit=1
    )
    assert ([m.content for m in thread.messages], thread.has_more) == (["r1"], False)

    # The raw request, defaults included, answers the same as the client.
    raw = await stub.History(store_pb2.HistoryRequest(channel_id="c", limit=4), timeout=TIMEOUT)
    assert raw == newest


async def test_history_of_unknown_and_empty_channels_is_an_empty_page(
    stub: Stub, client: StoreClient
) -> None:
    await stub.UpdateChannelSettings(
        store_pb2.ChannelSettings(channel_id="empty", max_connections=3), timeout=TIMEOUT
    )
    for channel in ("empty", "unknown"):
        page = await client.history(channel)
        assert (list(page.messages), page.last_seq, page.has_more) == ([], 0, False)
    # Reading history created no row: the channel still loads as never written.
    state = await stub.LoadChannel(
        store_pb2.LoadChannelRequest(channel_id="unknown"), timeout=TIMEOUT
    )
    assert state.last_seq == 0
    await append(stub, "unknown", 0, pb_msg())  # expected head 0: no row appeared


async def test_malformed_history_requests_are_invalid_argument(
    stub: Stub, client: StoreClient
) -> None:
    await append(stub, "c", 0, pb_msg())
    calls: list[tuple[Awaitable[object], str]] = [
        (client.history("c", limit=0), "limit must be 1..100, got 0"),
        (client.history("c", limit=101), "limit must be 1..100, got 101"),
        (client.history(""), "channel_id is required"),
        (client.history("c\x00"), "channel_id contains a NUL character"),
        (client.history("c", thread_id="\x00"), "thread_id contains a NUL character"),
        (
            stub.History(store_pb2.HistoryRequest(channel_id="c"), timeout=TIMEOUT),
            "limit must be 1..100, got 0",
        ),
    ]
    for call, details in calls:
        assert await code_of(call) == (INVALID, details)


# --- read cursors -----------------------------------------------------------------------


async def test_read_cursors_move_forward_only_and_answer_the_stored_values(
    stub: Stub, client: StoreClient
) -> None:
    await append(stub, "a", 0, *(pb_msg() for _ in range(10)))
    await append(stub, "b", 0, *(pb_msg() for _ in range(10)))

    stored = await client.set_read_cursors([("u1", "a", 4), ("u2", "a", 9), ("u1", "b", 2)])
    assert [(c.user_id, c.channel_id, c.seq) for c in stored] == [
        ("u1", "a", 4),
        ("u2", "a", 9),
        ("u1", "b", 2),
    ]
    stale = await client.set_read_cursors([("u2", "a", 3), ("u1", "a", 7), ("u3", "b", 99)])
    assert [(c.user_id, c.channel_id, c.seq) for c in stale] == [
        ("u2", "a", 9),  # stale: the stored, newer value
        ("u1", "a", 7),
        ("u3", "b", 10),  # past the head: the head
    ]
    assert await client.get_read_cursor("u1", "a") == 7
    assert await client.get_read_cursor("u2", "a") == 9
    assert await client.get_read_cursor("u1", "b") == 2
    assert await client.get_read_cursor("u9", "a") == 0
    assert await client.set_read_cursors([]) == []

    raw = await stub.GetReadCursor(
        store_pb2.GetReadCursorRequest(user_id="u1", channel_id="a"), timeout=TIMEOUT
    )
    assert (raw.user_id, raw.channel_id, raw.seq) == ("u1", "a", 7)


async def test_malformed_cursor_requests_are_invalid_argument_and_write_nothing(
    stub: Stub, client: StoreClient
) -> None:
    await append(stub, "a", 0, pb_msg(), pb_msg())
    calls: list[tuple[Awaitable[object], str]] = [
        (client.set_read_cursors([("u", "a", 1), ("", "a", 1)]), "user_id is required"),
        (client.set_read_cursors([("u", "a", 1), ("u", "", 1)]), "channel_id is required"),
        (client.set_read_cursors([("u", "a\x00", 1)]), "channel_id contains a NUL character"),
        (client.set_read_cursors([("u", "a", 2**63)]), "seq out of range"),
        (
            stub.SetReadCursors(
                store_pb2.SetReadCursorsRequest(
                    cursors=[store_pb2.ReadCursor(user_id="u", channel_id="a", seq=1)] * 10_001
                ),
                timeout=TIMEOUT,
            ),
            "at most 10000 cursors per call, got 10001",
        ),
        (client.get_read_cursor("", "a"), "user_id is required"),
        (client.get_read_cursor("u", "a\x00"), "channel_id contains a NUL character"),
    ]
    for call, details in calls:
        assert await code_of(call) == (INVALID, details)
    assert await client.get_read_cursor("u", "a") == 0


async def test_the_client_splits_a_large_batch_into_calls_the_store_takes(
    stub: Stub, client: StoreClient, store: RunningStore
) -> None:
    assert CURSOR_BATCH == MAX_CURSOR_BATCH
    await append(stub, "a", 0, *(pb_msg() for _ in range(5)))
    batch = [(f"u{i}", "a", i % 6) for i in range(2 * CURSOR_BATCH + 5)]
    stored = await client.set_read_cursors(batch)
    assert [(c.user_id, c.channel_id, c.seq) for c in stored] == batch
    labels = {"method": f"/{SERVICE_NAME}/SetReadCursors", "code": "OK"}
    assert store.metrics.registry.get_sample_value("waddle_grpc_server_seconds_count", labels) == 3
    # One key from each call, each with a non-zero seq.
    for user, channel, seq in (batch[1], batch[CURSOR_BATCH + 1], batch[-2]):
        assert seq > 0
        assert await client.get_read_cursor(user, channel) == seq


async def test_database_failures_reach_the_client_as_store_unavailable(
    stub: Stub, client: StoreClient, store: RunningStore, migrated_url: str
) -> None:
    await append(stub, "c", 0, pb_msg())
    exec_sql(migrated_url, "ALTER TABLE messages RENAME TO messages_gone")
    exec_sql(migrated_url, "ALTER TABLE read_cursors RENAME TO read_cursors_gone")
    try:
        with pytest.raises(StoreUnavailable, match="UNAVAILABLE"):
            await client.history("c")
        with pytest.raises(StoreUnavailable, match="UNAVAILABLE"):
            await client.set_read_cursors([("u", "c", 1)])
        with pytest.raises(StoreUnavailable, match="UNAVAILABLE"):
            await client.get_read_cursor("u", "c")
    finally:
        exec_sql(migrated_url, "ALTER TABLE messages_gone RENAME TO messages")
        exec_sql(migrated_url, "ALTER TABLE read_cursors_gone RENAME TO read_cursors")
    registry = store.metrics.registry
    for op in ("history", "set_read_cursors", "get_read_cursor"):
        assert registry.get_sample_value("waddle_store_errors_total", {"op": op}) == 1
    # Served again once the database is back.
    assert [m.seq for m in (await client.history("c")).messages] == [1]
    labels = {"method": f"/{SERVICE_NAME}/History", "code": "OK"}
    assert registry.get_sample_value("waddle_grpc_server_seconds_count", labels) == 1
