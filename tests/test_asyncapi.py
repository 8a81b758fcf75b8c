"""docs/asyncapi.yaml is a valid AsyncAPI 3.0 document and describes the
frames the code accepts and sends.

Offline validation: the official AsyncAPI 3.0 JSON Schema comes from the npm
package ``@asyncapi/specs`` (a pinned devDependency that ``npm ci`` installs
into node_modules). That file bundles every definition it references under
its own ``$id``, so ``jsonschema`` resolves them from it, and the draft-07
meta-schema from ``jsonschema-specifications``; any other reference fails
instead of reaching for the network.

Frame types, directions and error codes are collected from the code (the
edge's parsers, every encoder in ``waddle_common.wire``, the frames the edge
builds itself), so a new frame type fails here until the document has it.
Real frames (from the encoders, a scripted channel actor and the edge's
history server) must validate against the document's payload schemas, and
the document's client schemas must accept exactly the frames the edge's
parser accepts. Payload schemas are checked with ECMA-262 regular
expressions (``regress``), the dialect JSON Schema's ``pattern`` uses.
"""

from __future__ import annotations

import ast
import asyncio
import copy
import functools
import inspect
import json
import re
import sys
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import orjson
import pytest
import regress
import yaml
from jsonschema import Draft7Validator, ValidationError, validators
from jsonschema.exceptions import best_match
from referencing import Registry
from referencing.jsonschema import DRAFT7

from channel_service.channel import Channel, Conn
from edge import presence_diff, protocol
from edge.connection import Limits, State
from edge.history import HistoryServer
from edge.metrics import EdgeMetrics
from edge.replay import ReplayBudget, ReplayBudgets
from waddle_common import wire
from waddle_common.settings import Settings
from waddle_pb import channel_pb2, store_pb2

ROOT = Path(__file__).resolve().parent.parent
DOC_PATH = ROOT / "docs" / "asyncapi.yaml"
SPEC_PATH = ROOT / "node_modules" / "@asyncapi" / "specs" / "schemas" / "3.0.0.json"
# Base URI of the document's own references; never fetched.
DOC_URI = "https://waddle.invalid/asyncapi.yaml"
V1, V11 = "channelSocket", "multiplexedSocket"
CHANNEL = "team-42:general"
MAX_MESSAGE_LENGTH: int = Settings.model_fields["max_message_length"].default
# Packages whose code builds server frames.
FRAME_BUILDERS = ("edge", "channel_service", "waddle_common")


# -- loading ---------------------------------------------------------------


class _StrictLoader(yaml.SafeLoader):
    """YAML loader refusing duplicate keys (PyYAML keeps the last silently)."""


def _mapping(loader: _StrictLoader, node: yaml.MappingNode) -> dict[Any, Any]:
    keys = [loader.construct_object(k, deep=True) for k, _ in node.value]
    duplicates = sorted({str(k) for k in keys if keys.count(k) > 1})
    if duplicates:
        raise yaml.constructor.ConstructorError(
            None, None, f"duplicate keys {duplicates}", node.start_mark
        )
    return loader.construct_mapping(node, deep=True)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping)


@functools.cache
def _doc_text() -> str:
    return DOC_PATH.read_text(encoding="utf-8")


def load_doc() -> dict[str, Any]:
    """A fresh copy of the document (tests may change it)."""
    doc = yaml.load(_doc_text(), Loader=_StrictLoader)
    assert isinstance(doc, dict)
    return doc


@functools.cache
def spec_validator() -> Draft7Validator:
    if not SPEC_PATH.is_file():
        pytest.fail(
            f"{SPEC_PATH.relative_to(ROOT)} is missing: run `npm ci` in the repository root"
        )
    schema = json.loads(SPEC_PATH.read_text(encoding="utf-8"))
    Draft7Validator.check_schema(schema)
    # A Registry retrieves nothing: a reference outside it fails, offline.
    registry: Registry[Any] = (
        Registry().with_resource(schema["$id"], DRAFT7.create_resource(schema)).crawl()
    )
    return Draft7Validator(schema, registry=registry)


def _ecma_pattern(
    validator: Any, pattern: str, instance: Any, schema: dict[str, Any]
) -> Iterator[ValidationError]:
    # Python's `re` differs from ECMA-262: its `$` also matches before a
    # final newline, so "general\n" would pass the channel id pattern.
    if validator.is_type(instance, "string") and _regex(pattern).find(instance) is None:
        yield ValidationError(f"{instance!r} does not match {pattern!r}")


@functools.cache
def _regex(pattern: str) -> regress.Regex:
    return regress.Regex(pattern)


PayloadValidator = validators.extend(  # type: ignore[no-untyped-call]
    Draft7Validator, {"pattern": _ecma_pattern}
)


def _strict(doc: dict[str, Any]) -> dict[str, Any]:
    """The document with every object schema closed (additionalProperties false)."""

    def close(node: Any) -> None:
        if isinstance(node, dict):
            if node.get("type") == "object" and "properties" in node:
                node.setdefault("additionalProperties", False)
            for value in node.values():
                close(value)
        elif isinstance(node, list):
            for value in node:
                close(value)

    strict = copy.deepcopy(doc)
    close(strict["components"]["schemas"])
    return strict


@functools.cache
def _registry(strict: bool) -> Registry[Any]:
    doc = _strict(load_doc()) if strict else load_doc()
    registry: Registry[Any] = Registry().with_resource(DOC_URI, DRAFT7.create_resource(doc))
    return registry


def resolve(ref: str) -> tuple[str, Any]:
    """Follow ``ref`` (and any reference it lands on) to (final pointer, node)."""
    resolver = _registry(False).resolver(DOC_URI)
    node: Any = {"$ref": ref}
    while isinstance(node, dict) and set(node) == {"$ref"}:
        ref = node["$ref"]
        node = resolver.lookup(ref).contents
    return ref, node


def frame_type_of(schema: Any) -> str | None:
    """The ``type`` constant of a frame schema (through references and allOf)."""
    if isinstance(schema, dict) and "$ref" in schema:
        return frame_type_of(resolve(schema["$ref"])[1])
    const = schema.get("properties", {}).get("type", {}).get("const")
    if isinstance(const, str):
        return const
    for part in schema.get("allOf", []):
        found = frame_type_of(part)
        if found is not None:
            return found
    return None


@functools.cache
def payloads(channel: str, action: str) -> dict[str, str]:
    """Frame type -> pointer to the payload schema, for the messages that the
    ``action`` operations of ``channel`` list."""
    found: dict[str, str] = {}
    for name, op in load_doc()["operations"].items():
        if op["action"] != action or op["channel"]["$ref"] != f"#/channels/{channel}":
            continue
        for ref in op["messages"]:
            assert ref["$ref"].startswith(f"#/channels/{channel}/messages/"), (name, ref)
            pointer, message = resolve(ref["$ref"])
            kind = frame_type_of(message["payload"])
            assert kind is not None, f"{pointer}: payload has no `type` constant"
            assert kind not in found, f"{channel} {action}: two messages of type {kind!r}"
            found[kind] = f"{pointer}/payload"
    return found


def payload_errors(pointer: str, frame: Any, *, strict: bool = False) -> list[str]:
    validator = PayloadValidator({"$ref": DOC_URI + pointer}, registry=_registry(strict))
    return [
        f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(frame)
    ]


def server_payloads() -> dict[str, str]:
    merged: dict[str, str] = {}
    for channel in (V1, V11):
        for kind, pointer in payloads(channel, "send").items():
            assert merged.setdefault(kind, pointer) == pointer, f"{kind}: differs between endpoints"
    return merged


# -- the document is valid AsyncAPI 3.0 ------------------------------------


def test_document_is_valid_asyncapi_3() -> None:
    doc = load_doc()
    assert doc["asyncapi"].startswith("3.0"), doc["asyncapi"]
    # best_match descends into oneOf/anyOf to the likeliest cause.
    errors = [best_match([e]) for e in spec_validator().iter_errors(doc)]
    assert not errors, "\n".join(f"{list(e.absolute_path)}: {e.message}" for e in errors[:10])


def _unknown_top_level_key(doc: dict[str, Any]) -> None:
    doc["channel"] = doc.pop("channels")


def _payload_with_an_unknown_json_type(doc: dict[str, Any]) -> None:
    doc["components"]["schemas"]["PongFrame"]["type"] = "frame"


def _asyncapi_2_action(doc: dict[str, Any]) -> None:
    next(iter(doc["operations"].values()))["action"] = "publish"


def _server_without_protocol(doc: dict[str, Any]) -> None:
    del doc["servers"]["edge"]["protocol"]


@pytest.mark.parametrize(
    "breakage",
    [
        _unknown_top_level_key,
        _payload_with_an_unknown_json_type,
        _asyncapi_2_action,
        _server_without_protocol,
    ],
)
def test_the_official_schema_rejects_a_broken_copy(breakage: Any) -> None:
    doc = load_doc()
    breakage(doc)
    assert not spec_validator().is_valid(doc), f"{breakage.__name__} was not caught"


def test_duplicate_keys_are_refused() -> None:
    with pytest.raises(yaml.YAMLError, match="duplicate keys"):
        yaml.load("messages:\n  ack: 1\n  ack: 2\n", Loader=_StrictLoader)


def test_every_reference_resolves_and_every_message_is_used() -> None:
    doc = load_doc()
    resolver = _registry(False).resolver(DOC_URI)

    def refs(node: Any) -> Iterator[str]:
        if isinstance(node, dict):
            if isinstance(node.get("$ref"), str):
                yield node["$ref"]
            for value in node.values():
                yield from refs(value)
        elif isinstance(node, list):
            for value in node:
                yield from refs(value)

    found = list(refs(doc))
    for ref in found:
        resolver.lookup(ref)  # raises if it points nowhere
    for name, channel in doc["channels"].items():
        listed = {
            ref["$ref"]
            for op in doc["operations"].values()
            if op["channel"]["$ref"] == f"#/channels/{name}"
            for ref in op["messages"]
        }
        assert listed == {f"#/channels/{name}/messages/{key}" for key in channel["messages"]}
    used = {ref for ref in found if ref.startswith("#/components/messages/")}
    assert used == {f"#/components/messages/{key}" for key in doc["components"]["messages"]}


def test_channel_addresses_are_the_edge_websocket_routes() -> None:
    tree = ast.parse((ROOT / "edge" / "app.py").read_text(encoding="utf-8"))
    routes = {
        str(node.args[0].value)
        for node in ast.walk(tree)
        if isinstance(node, ast.Call)
        and isinstance(node.func, ast.Attribute)
        and node.func.attr == "add_get"
        and node.args
        and isinstance(node.args[0], ast.Constant)
        and str(node.args[0].value).endswith("/websocket")
    }
    doc = load_doc()
    addresses = {channel["address"] for channel in doc["channels"].values()}

    def shape(path: str) -> str:
        return re.sub(r"\{[^}]+\}", "{}", path)

    assert {shape(a) for a in addresses} == {shape(r) for r in routes}
    v1 = doc["channels"][V1]
    assert set(re.findall(r"\{([^}]+)\}", v1["address"])) == set(v1["parameters"])


# -- every frame type, in the right direction ------------------------------


def test_every_client_frame_type_is_received_on_its_endpoints() -> None:
    accepted = set(protocol._PARSERS) | {"ping"}
    assert set(payloads(V11, "receive")) == accepted
    assert set(payloads(V1, "receive")) == accepted - protocol._MULTIPLEXED_ONLY
    # Client frames are never listed as the edge's own output by mistake.
    assert not protocol._MULTIPLEXED_ONLY & set(server_payloads())


def _literal_frame_types() -> set[str]:
    """`type` values of the dict literals the server packages build."""
    found: set[str] = set()
    for package in FRAME_BUILDERS:
        for path in sorted((ROOT / package).glob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                if not isinstance(node, ast.Dict):
                    continue
                for key, value in zip(node.keys, node.values, strict=True):
                    if (
                        isinstance(key, ast.Constant)
                        and key.value == "type"
                        and isinstance(value, ast.Constant)
                        and isinstance(value.value, str)
                    ):
                        found.add(value.value)
    return found


def test_every_server_frame_type_is_sent_on_the_right_endpoints() -> None:
    code = _literal_frame_types() | {
        orjson.loads(frame)["type"] for frames in ENCODED.values() for frame in frames
    }
    assert {"history", "presence_diff", "pong", "error"} <= code, "the scan missed edge frames"
    assert set(server_payloads()) == code
    v1, v11 = set(payloads(V1, "send")), set(payloads(V11, "send"))
    diff_type = orjson.loads(presence_diff.diff_frame(CHANNEL, [], []))["type"]
    unsubscribed_type = orjson.loads(wire.unsubscribed_frame(CHANNEL))["type"]
    # v1.1 gets joins and leaves as presence_diff; v1 has no subscriptions.
    assert v11 == code - presence_diff.TYPES
    assert v1 == code - {diff_type, unsubscribed_type}


def test_error_codes_and_value_ranges_match_the_code() -> None:
    schemas = load_doc()["components"]["schemas"]
    assert schemas["ErrorCode"]["enum"] == [kind.code for kind in wire.ERRORS]
    assert set(schemas["PresenceStatus"]["enum"]) == set(wire.PRESENCE_STATUSES)
    assert schemas["ChannelId"]["pattern"] == f"^{protocol.CHANNEL_ID_RE.pattern}$"
    assert schemas["Seq"]["maximum"] == schemas["SeqOrZero"]["maximum"] == protocol.MAX_SEQ
    assert schemas["ClientMessageFrame"]["properties"]["content"]["maxLength"] == MAX_MESSAGE_LENGTH
    limit = schemas["ClientHistoryFrame"]["properties"]["limit"]
    assert (limit["maximum"], limit["default"]) == (
        protocol.MAX_HISTORY_LIMIT,
        protocol.DEFAULT_HISTORY_LIMIT,
    )
    for length in (
        protocol.MAX_THREAD_ID_LENGTH,
        protocol.MAX_CLIENT_MSG_ID_LENGTH,
        protocol.MAX_MESSAGE_ID_LENGTH,
    ):
        assert schemas["ShortId"]["maxLength"] == length
    retryable = schemas["ErrorFrame"]["properties"]["retryable"]["description"]
    for kind in wire.ERRORS:
        assert (f"`{kind.code}`" in retryable) == kind.retryable, kind.code


# -- real server frames validate -------------------------------------------

BODY = wire.message_body(
    id="0b9c6a34-3d1e-4f57-9a55-3f1f3c0c2a10",
    seq=7,
    channel_id=CHANNEL,
    user_id="user-1",
    username="Ada",
    avatar_url="",
    content="hello",
    timestamp_ms=1_700_000_000_000,
    thread_id="",
)
REPLY = wire.message_body(
    id="5c1f0e0e-8a8b-4c1e-9d43-6f1c2b7e9d01",
    seq=8,
    channel_id=CHANNEL,
    user_id="user-2",
    username="Grace",
    avatar_url="https://example.com/grace.png",
    content="a reply",
    timestamp_ms=1_700_000_000_500,
    thread_id=BODY["id"],
)
ONLINE = [{"userId": "user-1", "username": "Ada", "joinedAt": 1_700_000_000_000, "status": "away"}]

# Every encoder of waddle_common.wire (functions `*_frame`, constants
# `*_FRAME`) with sample arguments.
ENCODED: dict[str, list[bytes]] = {
    "error_frame": [
        frame
        for kind in wire.ERRORS
        for frame in (
            wire.error_frame(kind),
            wire.error_frame(kind, "some detail", channel_id=CHANNEL),
            wire.error_frame(kind, channelId=CHANNEL, retryAfterMs=250, clientMsgId="k-1"),
        )
    ],
    "message_frame": [wire.message_frame(BODY), wire.message_frame(REPLY)],
    "ack_frame": [
        wire.ack_frame(
            channel_id=CHANNEL, client_msg_id="k-1", id=BODY["id"], seq=7, timestamp_ms=1
        ),
        wire.ack_frame(
            channel_id=CHANNEL, client_msg_id=None, id=BODY["id"], seq=7, timestamp_ms=1
        ),
    ],
    "typing_frame": [
        wire.typing_frame(channel_id=CHANNEL, user_id="user-1", username="Ada", is_typing=flag)
        for flag in (True, False)
    ],
    "presence_frame": [
        wire.presence_frame(channel_id=CHANNEL, user_id="user-1", username="Ada", status=status)
        for status in sorted(wire.PRESENCE_STATUSES)
    ],
    "user_connected_frame": [
        wire.user_connected_frame(channel_id=CHANNEL, user_id="user-1", username="Ada")
    ],
    "user_disconnected_frame": [
        wire.user_disconnected_frame(channel_id=CHANNEL, user_id="user-1", username="Ada")
    ],
    "read_frame": [wire.read_frame(channel_id=CHANNEL, user_id="user-1", seq=7)],
    "initial_state_frame": [
        wire.initial_state_frame(
            channel_id=CHANNEL, messages=[], online_users=[], online_count=0, last_seq=0
        ),
        wire.initial_state_frame(
            channel_id=CHANNEL,
            messages=[BODY, REPLY],
            online_users=ONLINE,
            online_count=3,
            last_seq=8,
            read_seq=7,
        ),
    ],
    "sync_complete_frame": [wire.sync_complete_frame(last_seq=8, count=2, channel_id=CHANNEL)],
    "unsubscribed_frame": [wire.unsubscribed_frame(CHANNEL)],
    "PONG_FRAME": [wire.PONG_FRAME],
}
# Frames the edge builds itself, outside waddle_common.wire.
EDGE_BUILT: list[bytes] = [
    presence_diff.diff_frame(
        CHANNEL,
        [{"userId": "user-1", "username": "Ada", "status": "online"}],
        [{"userId": "user-2", "username": "Grace"}],
    ),
    presence_diff.diff_frame(CHANNEL, [], []),
]


def test_every_wire_encoder_has_samples() -> None:
    encoders = {
        name
        for name, value in vars(wire).items()
        if (inspect.isfunction(value) and name.endswith("_frame"))
        or (isinstance(value, bytes) and name.endswith("_FRAME"))
    }
    assert encoders == set(ENCODED), "give each encoder sample arguments in ENCODED"
    assert all(ENCODED.values())


def _check_server_frames(frames: list[bytes]) -> int:
    table = server_payloads()
    for raw in frames:
        frame = orjson.loads(raw)
        pointer = table.get(frame["type"])
        assert pointer is not None, f"{frame['type']!r} is not in the document"
        errors = payload_errors(pointer, frame, strict=True)
        assert not errors, f"{frame}: {errors}"
    return len(frames)


def test_encoded_frames_validate(record_property: Any) -> None:
    count = _check_server_frames([f for frames in ENCODED.values() for f in frames] + EDGE_BUILT)
    record_property("checked", f"{count} encoded frames")


class _Emitter:
    """Collects what a channel actor sends (implements channel_service.channel.Emitter)."""

    def __init__(self) -> None:
        self.frames: list[bytes] = []

    def broadcast(self, channel: Channel, payload: bytes, **kw: Any) -> None:
        self.frames.append(payload)

    def reply(self, edge_id: str, conn_id: int, channel_id: str, payload: bytes, **kw: Any) -> None:
        self.frames.append(payload)

    def join_result(self, edge_id: str, result: channel_pb2.JoinResult) -> None:
        if result.initial_state:
            self.frames.append(result.initial_state)

    def linger(self, channel: Channel, user_id: str) -> None:
        pass

    def cursor_moved(self, channel: Channel, user_id: str, seq: int) -> None:
        pass


def _publish(ch: Channel, emit: _Emitter, conn_id: int, content: str, **fields: Any) -> None:
    pub = channel_pb2.Publish(conn_id=conn_id, channel_id=CHANNEL, content=content, **fields)
    ch.publish("e1", pub, max_length=MAX_MESSAGE_LENGTH, deadline=sys.maxsize, emit=emit)


def _commit(ch: Channel, emit: _Emitter) -> None:
    pendings = ch.take_pending()
    results = [
        store_pb2.AppendResult(
            id=p.message.id, seq=ch.last_seq + i, timestamp_ms=p.message.timestamp_ms
        )
        for i, p in enumerate(pendings, start=1)
    ]
    ch.committed(pendings, results, ch.last_seq + len(pendings), cast(Any, emit))


def test_channel_actor_frames_validate(record_property: Any) -> None:
    """A scripted session of the channel owner, every frame it sends checked."""
    ch, emit = Channel(channel_id=CHANNEL, last_seq=0, max_connections=10), _Emitter()
    out = cast(Any, emit)
    ada = Conn("e1", 1, "user-1", "Ada", "", True, 1_700_000_000_000, "online", 1)
    ada_phone = Conn("e2", 2, "user-1", "Ada", "", True, 1_700_000_000_100, "online", 1)
    grace = Conn(
        "e1", 3, "user-2", "Grace", "https://example.com/g.png", True, 1_700_000_001_000, "away", 1
    )
    reader = Conn("e1", 4, "user-3", "Lin", "", False, 1_700_000_002_000, "dnd", 1)
    ch.join(ada, rejoin=False, emit=out)  # initial_state, empty
    ch.join(grace, rejoin=False, emit=out)  # user_connected, initial_state
    ch.join(ada_phone, rejoin=False, emit=out)
    ch.set_typing("e1", 1, True, out)
    ch.set_presence("e1", 3, "dnd", out)
    _publish(ch, emit, 1, "hello", client_msg_id="k-1", client_supplied_id=True)
    _publish(ch, emit, 3, "no key", client_msg_id="edge-made", client_supplied_id=False)
    _commit(ch, emit)  # message, ack, read (to Ada's other connection)
    root = ch.recent[0]["id"]
    _publish(ch, emit, 3, "a reply", thread_id=root, client_msg_id="k-2", client_supplied_id=True)
    _commit(ch, emit)
    _publish(ch, emit, 1, " \t ", client_msg_id="k-3", client_supplied_id=True)  # empty_message
    _publish(ch, emit, 1, "x" * (MAX_MESSAGE_LENGTH + 1))  # message_too_long
    _publish(ch, emit, 99, "hello")  # not_joined
    ch.join(reader, rejoin=False, emit=out)  # initial_state with messages
    _publish(ch, emit, 4, "hello")  # no_write_permission
    ch.read("e1", 3, ch.last_seq, out)
    ch.set_typing("e1", 3, True, out)
    ch.leave("e1", 3, out)  # typing false, user_disconnected
    ada_tablet = Conn("e2", 5, "user-1", "Ada", "", True, 1_700_000_003_000, "online", 1)
    ch.join(ada_tablet, rejoin=False, emit=out)  # initial_state with readSeq
    types = {orjson.loads(f)["type"] for f in emit.frames}
    assert types == {
        "initial_state",
        "user_connected",
        "user_disconnected",
        "typing",
        "presence",
        "message",
        "ack",
        "read",
        "error",
    }, "the script no longer drives what it says"
    count = _check_server_frames(emit.frames)
    record_property("checked", f"{count} channel actor frames")


async def test_history_frames_validate() -> None:
    """The edge builds `history` itself: run its history server on a stub store."""
    stored = [
        store_pb2.StoredMessage(
            id=body["id"],
            channel_id=CHANNEL,
            seq=body["seq"],
            user_id=body["userId"],
            username=body["username"],
            avatar_url=body["avatarUrl"] or "",
            content=body["content"],
            thread_id=body["threadId"] or "",
            timestamp_ms=body["timestamp"],
            reply_count=replies,
        )
        for body, replies in ((BODY, 1), (REPLY, 0))
    ]

    class Store:
        async def history(self, channel_id: str, **kw: Any) -> store_pb2.MessagePage:
            return store_pb2.MessagePage(messages=stored, last_seq=8, has_more=True)

    sent: asyncio.Queue[bytes] = asyncio.Queue()
    conn = SimpleNamespace(
        ws=object(),
        channel_id=CHANNEL,
        identity=SimpleNamespace(user_id="user-1"),
        state=State.LIVE,
        send=lambda payload, *_: sent.put_nowait(payload),
    )
    server = HistoryServer(
        cast(Any, Store()),
        ReplayBudgets(ReplayBudget(), asyncio.get_running_loop().time()),
        EdgeMetrics(),
        Limits(),
    )
    requests = [
        protocol.History(),
        protocol.History(before_seq=9, limit=2),
        protocol.History(thread_id=BODY["id"], limit=100),
    ]
    try:
        frames = []
        for request in requests:
            server.request(cast(Any, conn), request)
            frames.append(await asyncio.wait_for(sent.get(), timeout=5))
    finally:
        await server.stop()
    assert [orjson.loads(f)["type"] for f in frames] == ["history"] * len(requests)
    assert _check_server_frames(frames) == len(requests)


# -- client frames: the document accepts what the parser accepts -----------

LONG_ID = "i" * 129
# Each is sent on v1 as is and on v1.1 with channelId added.
CLIENT_FRAMES: list[dict[str, Any]] = [
    {"type": "message", "content": "hello"},
    {"type": "message", "content": " x ", "threadId": "root-1", "clientMsgId": "k-1"},
    {"type": "message", "content": "hello", "threadId": None, "clientMsgId": None, "extra": 1},
    {"type": "message", "content": "x" * MAX_MESSAGE_LENGTH},
    {"type": "message", "content": "x" * (MAX_MESSAGE_LENGTH + 1)},
    {"type": "message", "content": ""},
    {"type": "message", "content": "  \n\t "},
    {"type": "message", "content": "a\x00b"},
    {"type": "message", "content": 5},
    {"type": "message"},
    {"type": "message", "content": "hi", "threadId": ""},
    {"type": "message", "content": "hi", "threadId": LONG_ID},
    {"type": "message", "content": "hi", "clientMsgId": "i" * 128},
    {"type": "message", "content": "hi", "clientMsgId": LONG_ID},
    {"type": "message", "content": "hi", "clientMsgId": 7},
    {"type": "message", "content": "hi", "clientMsgId": "k\x00"},
    {"type": "typing", "isTyping": True},
    {"type": "typing", "isTyping": False},
    {"type": "typing", "isTyping": "yes"},
    {"type": "typing"},
    *({"type": "presence", "status": s} for s in sorted(wire.PRESENCE_STATUSES)),
    {"type": "presence", "status": "sleeping"},
    {"type": "presence", "status": "ONLINE"},
    {"type": "presence"},
    {"type": "sync", "afterSeq": 0},
    {"type": "sync", "afterSeq": protocol.MAX_SEQ},
    {"type": "sync", "afterSeq": protocol.MAX_SEQ + 1},
    {"type": "sync", "afterMessageId": "m-1"},
    {"type": "sync", "afterSeq": 3, "afterMessageId": "m-1"},
    {"type": "sync"},
    {"type": "sync", "afterSeq": -1},
    {"type": "sync", "afterSeq": True},
    {"type": "sync", "afterSeq": "3"},
    {"type": "sync", "afterMessageId": ""},
    {"type": "sync", "afterMessageId": LONG_ID},
    {"type": "read", "seq": 1},
    {"type": "read", "seq": 0},
    {"type": "read", "seq": protocol.MAX_SEQ + 1},
    {"type": "read"},
    {"type": "history"},
    {"type": "history", "limit": 1},
    {"type": "history", "limit": protocol.MAX_HISTORY_LIMIT},
    {"type": "history", "limit": 0},
    {"type": "history", "limit": protocol.MAX_HISTORY_LIMIT + 1},
    {"type": "history", "limit": False},
    {"type": "history", "beforeSeq": 5, "threadId": "root-1"},
    {"type": "history", "beforeSeq": 0},
    {"type": "history", "threadId": LONG_ID},
    {"type": "ping"},
    {"type": "subscribe"},
    {"type": "subscribe", "afterSeq": 3},
    {"type": "subscribe", "afterSeq": -3},
    {"type": "unsubscribe"},
    {"type": "shout", "content": "hi"},
    {"type": 5},
    {"content": "hi"},
    # Each white space character the edge or ECMA-262 knows, alone.
    *(
        {"type": "message", "content": chr(c)}
        for c in (
            *range(0x09, 0x0E),
            *range(0x1C, 0x21),
            0x85,
            0xA0,
            0x1680,
            0x2028,
            0x3000,
            0xFEFF,
        )
    ),
]
# Sent as they are on both endpoints: what v1.1 checks of channelId.
CHANNEL_CASES: list[dict[str, Any]] = [
    {"type": "read", "seq": 1},
    {"type": "read", "seq": 1, "channelId": None},
    {"type": "read", "seq": 1, "channelId": "general\n"},
    {"type": "read", "seq": 1, "channelId": "-general"},
    {"type": "read", "seq": 1, "channelId": "a b"},
    {"type": "read", "seq": 1, "channelId": "c" * 128},
    {"type": "read", "seq": 1, "channelId": "c" * 129},
    {"type": "subscribe"},
    {"type": "ping"},
    {"type": "ping", "channelId": "not a channel"},
]


def _parser_accepts(frame: dict[str, Any], multiplexed: bool) -> bool:
    try:
        protocol.parse_frame(
            orjson.dumps(frame), max_message_length=MAX_MESSAGE_LENGTH, multiplexed=multiplexed
        )
    except protocol.ProtocolError as exc:
        error = orjson.loads(exc.frame())
        assert not payload_errors(server_payloads()["error"], error, strict=True), error
        return False
    return True


def _document_accepts(frame: dict[str, Any], channel: str) -> bool:
    kind = frame.get("type")
    pointer = payloads(channel, "receive").get(kind) if isinstance(kind, str) else None
    return pointer is not None and not payload_errors(pointer, frame)


@pytest.mark.parametrize("channel", [V1, V11])
def test_client_schemas_accept_what_the_parser_accepts(channel: str, record_property: Any) -> None:
    multiplexed = channel == V11
    frames = [
        {**frame, "channelId": CHANNEL} if multiplexed and frame.get("type") != "ping" else frame
        for frame in CLIENT_FRAMES
    ] + CHANNEL_CASES
    verdicts = {True: 0, False: 0}
    disagreements = []
    for frame in frames:
        parser = _parser_accepts(frame, multiplexed)
        document = _document_accepts(frame, channel)
        verdicts[parser] += 1
        if parser != document:
            shown = {
                k: (v if not isinstance(v, str) or len(v) < 40 else f"{v[:10]}...({len(v)})")
                for k, v in frame.items()
            }
            disagreements.append(f"{shown}: parser {parser}, document {document}")
    assert not disagreements, "\n".join(disagreements)
    assert verdicts[True] >= 10 and verdicts[False] >= 10, verdicts
    record_property("checked", f"{len(frames)} client frames ({verdicts[False]} refused)")


def test_refused_examples_do_not_validate() -> None:
    """Three refusals spelled out: by the parser and by the document, on both endpoints."""
    refused: list[dict[str, Any]] = [
        {"type": "message", "content": "x" * (MAX_MESSAGE_LENGTH + 1)},
        {"type": "history", "limit": 0},
        {"type": "presence", "status": "sleeping"},
    ]
    for frame in refused:
        for channel in (V1, V11):
            framed = {**frame, "channelId": CHANNEL}
            assert not _parser_accepts(framed, channel == V11), frame
            assert not _document_accepts(framed, channel), frame
