"""The hub's committer: a refused batch settles its senders and the committer
keeps serving; a transient store failure is retried."""

from __future__ import annotations

import asyncio
from typing import Any

import grpc
import orjson
import pytest

from channel_service.channel import ChannelPolicy
from channel_service.hub import Hub, HubConfig, Session
from channel_service.metrics import ChannelMetrics
from waddle_common.store_client import StoreUnavailable
from waddle_pb import channel_pb2, store_pb2


class ScriptedStore:
    """Answers like the store service; ``failures`` are raised first, in order."""

    def __init__(self, failures: list[Exception]) -> None:
        self.failures = failures
        self.heads: dict[str, int] = {}

    async def load_channel(self, channel_id: str, recent_limit: int) -> store_pb2.ChannelState:
        return store_pb2.ChannelState(channel_id=channel_id, last_seq=self.heads.get(channel_id, 0))

    async def append_batch(
        self, req: store_pb2.AppendBatchRequest
    ) -> store_pb2.AppendBatchResponse:
        if self.failures:
            raise self.failures.pop(0)
        out = []
        for group in req.channels:
            head = self.heads.get(group.channel_id, 0)
            results = [
                store_pb2.AppendResult(id=m.id, seq=head + i + 1, timestamp_ms=1)
                for i, m in enumerate(group.messages)
            ]
            self.heads[group.channel_id] = head + len(results)
            out.append(
                store_pb2.ChannelAppendResult(
                    channel_id=group.channel_id,
                    last_seq=self.heads[group.channel_id],
                    results=results,
                )
            )
        return store_pb2.AppendBatchResponse(channels=out)


def event(**kw: Any) -> channel_pb2.EdgeEvent:
    return channel_pb2.EdgeEvent(**kw)


async def replies(session: Session, n: int) -> list[dict[str, Any]]:
    got: list[dict[str, Any]] = []
    async with asyncio.timeout(10):
        async for batch in session.batches():
            got.extend(orjson.loads(e.reply.payload) for e in batch.events if e.HasField("reply"))
            if len(got) >= n:
                return got
    raise AssertionError("session closed")


def publish(content: str, key: str) -> channel_pb2.EdgeEvent:
    return event(
        publish=channel_pb2.Publish(
            conn_id=1, channel_id="c", content=content, client_msg_id=key, client_supplied_id=True
        )
    )


@pytest.mark.parametrize(
    ("failure", "first_code"),
    [
        (
            grpc.aio.AioRpcError(
                grpc.StatusCode.INVALID_ARGUMENT, grpc.aio.Metadata(), grpc.aio.Metadata(), "bad"
            ),
            "rejected",
        ),
        (StoreUnavailable("down for a moment"), None),
    ],
    ids=["refused", "transient"],
)
async def test_committer_survives_store_failures(
    failure: Exception, first_code: str | None
) -> None:
    store = ScriptedStore([failure])
    hub = Hub(
        HubConfig(
            default_max_connections=10,
            max_message_length=100,
            policy=ChannelPolicy(),
            retry_initial=0.01,
        ),
        store,  # type: ignore[arg-type]
        ChannelMetrics(),
    )
    hub.start()
    try:
        session = hub.open_session("edge-1")
        member = channel_pb2.Member(user_id="u", username="U", permissions=["read", "write"])
        hub.handle(session, event(join=channel_pb2.Join(conn_id=1, channel_id="c", member=member)))
        hub.handle(session, publish("first", "k1"))
        got = await replies(session, 1)
        if first_code is None:  # retried until the store answered
            assert got[0]["type"] == "ack" and got[0]["clientMsgId"] == "k1"
        else:
            assert got[0]["code"] == first_code and got[0]["clientMsgId"] == "k1"
        hub.handle(session, publish("second", "k2"))
        got = await replies(session, 1)
        assert got[0]["type"] == "ack" and got[0]["clientMsgId"] == "k2", "the committer still runs"
    finally:
        await hub.stop()
