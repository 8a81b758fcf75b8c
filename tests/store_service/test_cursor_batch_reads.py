"""Reading many read cursors in one query (SQLite and PostgreSQL), in the
repository and over gRPC (``GetReadCursors``): request order, 0 for none,
limits."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc
import grpc.aio
import pytest

from store_service.cursors import MAX_CURSOR_BATCH, ReadCursor, ReadCursors
from store_service.repository import InvalidArgument, Repository
from store_service.server import RunningStore
from tests.store_service.helpers import group, msg, pb_msg
from waddle_common.store_client import StoreClient
from waddle_pb import store_pb2


@pytest.fixture
def cursors(repository: Repository) -> ReadCursors:
    return ReadCursors(repository)


@pytest.fixture
async def client(store: RunningStore) -> AsyncIterator[StoreClient]:
    client = StoreClient(f"127.0.0.1:{store.grpc_port}", timeout=10.0)
    yield client
    await client.close()


async def test_many_cursors_read_in_request_order_with_zero_for_none(
    repository: Repository, cursors: ReadCursors
) -> None:
    for channel in ("a", "b"):
        await repository.append_batch([group(channel, 0, *(msg() for _ in range(10)))])
    await cursors.set(
        [ReadCursor("u1", "a", 4), ReadCursor("u2", "a", 7), ReadCursor("u1", "b", 9)]
    )
    keys = [("u2", "a"), ("u9", "a"), ("u1", "b"), ("u1", "a"), ("u2", "a"), ("u1", "zz")]
    assert await cursors.get_many(keys) == (7, 0, 9, 4, 7, 0)
    assert await cursors.get_many([]) == ()


async def test_the_largest_batch_is_read_whole(
    repository: Repository, cursors: ReadCursors
) -> None:
    await repository.append_batch([group("c", 0, *(msg() for _ in range(5)))])
    users = [f"u{i}" for i in range(MAX_CURSOR_BATCH)]
    await cursors.set([ReadCursor(user, "c", 1 + i % 5) for i, user in enumerate(users)])
    got = await cursors.get_many([(user, "c") for user in users])
    assert got == tuple(1 + i % 5 for i in range(MAX_CURSOR_BATCH))


async def test_a_malformed_or_oversized_read_is_invalid_argument(cursors: ReadCursors) -> None:
    with pytest.raises(InvalidArgument, match="user_id is required"):
        await cursors.get_many([("u", "c"), ("", "c")])
    with pytest.raises(InvalidArgument, match="channel_id contains a NUL"):
        await cursors.get_many([("u", "c\x00")])
    with pytest.raises(InvalidArgument, match=f"at most {MAX_CURSOR_BATCH} keys"):
        await cursors.get_many([("u", "c")] * (MAX_CURSOR_BATCH + 1))


async def test_get_read_cursors_over_grpc(client: StoreClient) -> None:
    await client.append_batch(
        store_pb2.AppendBatchRequest(
            channels=[
                store_pb2.ChannelAppend(
                    channel_id="a", expected_last_seq=0, messages=[pb_msg() for _ in range(6)]
                )
            ]
        )
    )
    await client.set_read_cursors([("u1", "a", 5), ("u3", "a", 2)])
    assert await client.get_read_cursors([]) == []
    got = await client.get_read_cursors([("u1", "a"), ("u2", "a"), ("u3", "a"), ("u1", "a")])
    assert got == [5, 0, 2, 5]
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await client.get_read_cursors([("u1", "")])
    assert caught.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert "channel_id is required" in (caught.value.details() or "")
