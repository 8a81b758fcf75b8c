"""Group commits over ``AppendStream``: the store's stream handler over real
gRPC, and the store client the channel shard commits through (one stream,
in-band refusals, a stream that breaks, a store that does not answer, and a
store without the stream)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

import grpc
import grpc.aio
import pytest
from prometheus_client import CollectorRegistry

from store_service.server import SERVICE_NAME, RunningStore, start
from tests.store_service.conftest import store_settings
from tests.store_service.helpers import exec_sql, pb_msg
from waddle_common.grpc_util import ClientMetricsInterceptor
from waddle_common.store_client import StoreClient, StoreUnavailable
from waddle_pb import store_pb2

if TYPE_CHECKING:
    from waddle_pb.store_pb2_grpc import StoreServiceAsyncStub as Stub

OK = store_pb2.ChannelAppendResult.OK
FENCED = store_pb2.ChannelAppendResult.FENCED
TIMEOUT = 10.0
STREAM = f"/{SERVICE_NAME}/AppendStream"
UNARY = f"/{SERVICE_NAME}/AppendBatch"


def request(channel_id: str, expected: int, *messages: store_pb2.NewMessage) -> Any:
    return store_pb2.AppendBatchRequest(
        channels=[
            store_pb2.ChannelAppend(
                channel_id=channel_id, expected_last_seq=expected, messages=messages
            )
        ]
    )


async def exchange(stream: Any, req: store_pb2.AppendBatchRequest) -> Any:
    await stream.write(req)
    answer = await asyncio.wait_for(stream.read(), TIMEOUT)
    assert answer is not grpc.aio.EOF, "the stream ended instead of answering"
    return answer


def served(store: RunningStore, method: str, code: str) -> float | None:
    return store.metrics.registry.get_sample_value(
        "waddle_grpc_server_seconds_count", {"method": method, "code": code}
    )


# --- the store's handler --------------------------------------------------------------


async def test_one_stream_numbers_fences_and_dedupes_each_request_in_order(
    stub: Stub, store: RunningStore
) -> None:
    stream = stub.AppendStream()
    first = pb_msg("one", key="k", ts=1000)
    answer = await exchange(stream, request("a", 0, first, pb_msg("two")))
    assert answer.code == 0
    [a] = answer.batch.channels
    assert (a.status, a.last_seq, [r.seq for r in a.results]) == (OK, 2, [1, 2])
    assert (a.results[0].id, a.results[0].timestamp_ms) == (first.id, 1000)

    [fenced] = (await exchange(stream, request("a", 1, pb_msg("stale")))).batch.channels
    assert (fenced.status, fenced.last_seq, len(fenced.results)) == (FENCED, 2, 0)

    retry = pb_msg("one, retried", key="k", ts=5000)
    [again] = (await exchange(stream, request("a", 2, retry))).batch.channels
    assert (again.status, again.last_seq) == (OK, 2)
    [dup] = again.results
    assert (dup.id, dup.seq, dup.timestamp_ms, dup.duplicate) == (first.id, 1, 1000, True)

    await stream.done_writing()
    assert await asyncio.wait_for(stream.read(), TIMEOUT) is grpc.aio.EOF
    assert await stream.code() == grpc.StatusCode.OK
    assert served(store, STREAM, "OK") == 3, "each request is timed as the unary call was"


async def test_a_refused_request_is_answered_in_band_and_the_stream_goes_on(
    stub: Stub, store: RunningStore
) -> None:
    stream = stub.AppendStream()
    nameless = await exchange(stream, request("", 0, pb_msg()))
    assert nameless.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert nameless.details and not nameless.batch.channels

    await exchange(stream, request("c", 0, pb_msg(id="m", key="k")))
    reused = await exchange(stream, request("c", 1, pb_msg(id="m", key="k2")))
    assert reused.code == grpc.StatusCode.ALREADY_EXISTS.value[0]

    [ok] = (await exchange(stream, request("c", 1, pb_msg("after")))).batch.channels
    assert (ok.status, ok.last_seq) == (OK, 2)
    assert served(store, STREAM, "INVALID_ARGUMENT") == 1
    assert served(store, STREAM, "ALREADY_EXISTS") == 1
    stream.cancel()


async def test_a_database_failure_is_unavailable_in_band_and_the_same_stream_retries(
    stub: Stub, store: RunningStore, migrated_url: str
) -> None:
    stream = stub.AppendStream()
    exec_sql(migrated_url, "ALTER TABLE messages RENAME TO messages_gone")
    try:
        down = await exchange(stream, request("c", 0, pb_msg()))
    finally:
        exec_sql(migrated_url, "ALTER TABLE messages_gone RENAME TO messages")
    assert down.code == grpc.StatusCode.UNAVAILABLE.value[0]
    [ok] = (await exchange(stream, request("c", 0, pb_msg()))).batch.channels
    assert (ok.status, ok.last_seq) == (OK, 1), "nothing of the failed request was written"
    stream.cancel()


async def test_shutdown_ends_an_open_stream_with_ok_instead_of_holding_the_grace(
    stub: Stub, store: RunningStore
) -> None:
    stream = stub.AppendStream()
    await exchange(stream, request("c", 0, pb_msg()))
    # Without the handler ending it, the open stream would hold stop() for
    # its whole grace and then be cancelled.
    await asyncio.wait_for(store.stop(60.0), TIMEOUT * 3)
    assert await asyncio.wait_for(stream.read(), TIMEOUT) is grpc.aio.EOF
    assert await stream.code() == grpc.StatusCode.OK


# --- the client ---------------------------------------------------------------------


@pytest.fixture
def registry() -> CollectorRegistry:
    return CollectorRegistry()


@pytest.fixture
async def client(store: RunningStore, registry: CollectorRegistry) -> AsyncIterator[StoreClient]:
    timing = ClientMetricsInterceptor(registry)
    running = StoreClient(f"127.0.0.1:{store.grpc_port}", timeout=TIMEOUT, timing=timing)
    yield running
    await running.close()


def called(registry: CollectorRegistry, method: str, code: str) -> float | None:
    return registry.get_sample_value(
        "waddle_grpc_client_seconds_count", {"method": method, "code": code}
    )


async def test_the_client_commits_over_the_stream_and_reopens_it_after_a_restart(
    client: StoreClient, store: RunningStore, migrated_url: str, registry: CollectorRegistry
) -> None:
    for expected in (0, 1):
        [r] = (await client.append_batch(request("c", expected, pb_msg()))).channels
        assert (r.status, r.last_seq) == (OK, expected + 1)
    assert served(store, STREAM, "OK") == 2
    assert served(store, UNARY, "OK") is None, "no unary call"
    assert called(registry, STREAM, "OK") == 2

    await store.stop(2.0)
    settings = store_settings(migrated_url).model_copy(update={"store_port": store.grpc_port})
    again = await start(settings)
    try:
        # The first round after the restart goes through: the stream that
        # ended is replaced, not reported as a failure.
        [r] = (await client.append_batch(request("c", 2, pb_msg()))).channels
        assert (r.status, r.last_seq) == (OK, 3)
        assert served(again, STREAM, "OK") == 1
    finally:
        await again.stop(2.0)


async def test_a_refusal_raises_as_the_unary_call_did_and_keeps_the_stream(
    client: StoreClient, store: RunningStore, registry: CollectorRegistry
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await client.append_batch(request("", 0, pb_msg()))
    assert refused.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert refused.value.details()
    [r] = (await client.append_batch(request("c", 0, pb_msg()))).channels
    assert (r.status, r.last_seq) == (OK, 1)
    assert called(registry, STREAM, "INVALID_ARGUMENT") == 1
    assert called(registry, STREAM, "OK") == 1


def append_stream_handler(behavior: Any) -> grpc.RpcMethodHandler:
    return grpc.stream_stream_rpc_method_handler(
        behavior,
        request_deserializer=store_pb2.AppendBatchRequest.FromString,
        response_serializer=store_pb2.AppendStreamResponse.SerializeToString,
    )


def numbered(req: store_pb2.AppendBatchRequest) -> store_pb2.AppendBatchResponse:
    """The answer of a store that takes the one group at the head it names."""
    [group] = req.channels
    head = group.expected_last_seq + len(group.messages)
    return store_pb2.AppendBatchResponse(
        channels=[store_pb2.ChannelAppendResult(channel_id=group.channel_id, last_seq=head)]
    )


class Silent:
    """Reads append requests and never answers them."""

    def __init__(self) -> None:
        self.opened = 0
        self.ended = asyncio.Event()

    async def append_stream(
        self, request_iterator: AsyncIterator[Any], context: grpc.aio.ServicerContext
    ) -> None:
        self.opened += 1
        try:
            async for _ in request_iterator:
                pass
        finally:
            self.ended.set()

    def handlers(self) -> dict[str, grpc.RpcMethodHandler]:
        return {"AppendStream": append_stream_handler(self.append_stream)}


class Dropping:
    """Answers the first ``answered[i]`` requests of its i-th stream (numbering
    from the head each names), then ends that stream without answering the
    next: a store that went away between two rounds."""

    def __init__(self, *answered: int) -> None:
        self.answered = list(answered)
        self.opened = 0

    async def append_stream(
        self, request_iterator: AsyncIterator[Any], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[store_pb2.AppendStreamResponse]:
        budget = self.answered[self.opened] if self.opened < len(self.answered) else 0
        self.opened += 1
        async for req in request_iterator:
            if budget == 0:
                return
            budget -= 1
            yield store_pb2.AppendStreamResponse(batch=numbered(req))

    def handlers(self) -> dict[str, grpc.RpcMethodHandler]:
        return {"AppendStream": append_stream_handler(self.append_stream)}


class UnaryOnly:
    """A store from before the stream: ``AppendBatch`` only, numbering from the head."""

    def __init__(self) -> None:
        self.calls = 0

    async def append_batch(
        self, request: store_pb2.AppendBatchRequest, context: grpc.aio.ServicerContext
    ) -> store_pb2.AppendBatchResponse:
        self.calls += 1
        return numbered(request)

    def handlers(self) -> dict[str, grpc.RpcMethodHandler]:
        return {
            "AppendBatch": grpc.unary_unary_rpc_method_handler(
                self.append_batch,
                request_deserializer=store_pb2.AppendBatchRequest.FromString,
                response_serializer=store_pb2.AppendBatchResponse.SerializeToString,
            )
        }


@asynccontextmanager
async def client_of(
    handlers: dict[str, grpc.RpcMethodHandler], timeout: float = TIMEOUT
) -> AsyncIterator[StoreClient]:
    """A store client of a gRPC server on 127.0.0.1:0 with only these StoreService methods."""
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    client = StoreClient(f"127.0.0.1:{port}", timeout=timeout)
    try:
        yield client
    finally:
        await client.close()
        await server.stop(None)


async def test_a_store_that_does_not_answer_is_unavailable_and_the_stream_is_dropped() -> None:
    servicer = Silent()
    async with client_of(servicer.handlers(), timeout=0.5) as client:
        for _ in range(2):
            with pytest.raises(StoreUnavailable, match="DEADLINE_EXCEEDED"):
                await client.append_batch(request("c", 0, pb_msg()))
        await asyncio.wait_for(servicer.ended.wait(), TIMEOUT)  # the first one was cancelled
        # An answer that came late must never be read as the next one's:
        # each round after a deadline gets a stream of its own.
        assert servicer.opened == 2


async def test_a_store_without_the_stream_gets_unary_calls() -> None:
    servicer = UnaryOnly()
    async with client_of(servicer.handlers()) as client:
        for expected in (0, 1):
            [r] = (await client.append_batch(request("c", expected, pb_msg()))).channels
            assert r.last_seq == expected + 1
        assert servicer.calls == 2


async def test_a_stream_that_ended_between_rounds_is_replaced_once() -> None:
    servicer = Dropping(1, 1, 0)
    async with client_of(servicer.handlers()) as client:
        [first] = (await client.append_batch(request("c", 0, pb_msg()))).channels
        # The first stream ends instead of answering this one; it is sent
        # again on a second stream, which answers.
        [second] = (await client.append_batch(request("c", 1, pb_msg()))).channels
        assert (first.last_seq, second.last_seq, servicer.opened) == (1, 2, 2)
        # The second stream ends too, and so does the third, new one: that
        # is a failure to report, not a reason to keep opening streams.
        with pytest.raises(StoreUnavailable, match="ended"):
            await client.append_batch(request("c", 2, pb_msg()))
        assert servicer.opened == 3
