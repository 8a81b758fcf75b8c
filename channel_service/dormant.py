"""The records of a shard's sleeping channels, packed: one buffer and one
index for all of them, and no Python object per channel.

Why packed: a hibernated channel must not keep anything in the memory its
awake state was allocated in. CPython's small-object allocator hands memory
back to the system an arena (1 MiB) at a time, and only when nothing at all
lives in it; one small record per sleeping channel, allocated among the
freed state of the channels that slept before it, would keep every arena
resident. Here a record is bytes in one ``bytearray`` (allocated by the C
library, not in those arenas) and the index is two ``array``\\ s, so the
memory a sleeping channel costs is about its record's length plus a few
index slots.

An entry is ``<u32 length><u16 key length><key UTF-8><record JSON>``; the
record is ``[[edge id, generation, count, expected, [[user id, name,
status, joined-at], ...]], ...]``. The index is open addressing with linear
probing on the key's hash; removed entries leave a tombstone in the index
and a dead range in the buffer, both reclaimed by rebuilding when they
outweigh the live ones.
"""

from __future__ import annotations

import struct
from array import array
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import orjson

_HEADER = struct.Struct("<IH")
_EMPTY = -1
_GONE = -2


@dataclass(slots=True)
class EdgeShare:
    """One edge's part of a sleeping channel (decoded from the table; changing
    it changes nothing until the record is put back)."""

    edge_id: str
    generation: int  # the Attach session that registered ``count`` connections
    count: int
    expected: int  # connections it had when the channel fell asleep (or was taken over)
    users: list[list[Any]]  # [user id, name, status, joined-at] of its connections' users


Dormant = tuple[EdgeShare, ...]


def encode(record: Dormant) -> bytes:
    return orjson.dumps([[s.edge_id, s.generation, s.count, s.expected, s.users] for s in record])


def decode(data: bytes | memoryview) -> Dormant:
    return tuple(EdgeShare(*share) for share in orjson.loads(data))


class DormantTable:
    """channel id -> ``Dormant``, packed (see the module doc)."""

    def __init__(self, capacity: int = 8) -> None:
        self._buf = bytearray()
        self._dead = 0  # bytes of ``_buf`` no entry uses any more
        self._len = 0
        self._tombstones = 0
        self._members = 0
        self._alloc(max(8, 1 << (capacity - 1).bit_length()))

    def _alloc(self, capacity: int) -> None:
        self._offsets = array("q", [_EMPTY]) * capacity
        self._hashes = array("q", [0]) * capacity
        self._mask = capacity - 1
        self._tombstones = 0

    # -- queries ------------------------------------------------------------

    def __len__(self) -> int:
        return self._len

    def __contains__(self, channel_id: object) -> bool:
        return isinstance(channel_id, str) and self._find(channel_id)[1] >= 0

    @property
    def members(self) -> int:
        """Connections registered in the sleeping channels, all together."""
        return self._members

    @property
    def buffer_bytes(self) -> int:
        return len(self._buf)

    @property
    def nbytes(self) -> int:
        """Memory the table holds: its buffer and its index."""
        return len(self._buf) + self._offsets.itemsize * len(self._offsets) * 2

    def get(self, channel_id: str) -> Dormant | None:
        _, offset = self._find(channel_id)
        return None if offset < 0 else decode(self._record(offset))

    def entry_size(self, channel_id: str) -> int:
        """Bytes of the channel's entry in the buffer (0 when it is not asleep)."""
        _, offset = self._find(channel_id)
        return 0 if offset < 0 else _HEADER.unpack_from(self._buf, offset)[0]

    def with_edge(self, edge_id: str) -> Iterator[tuple[str, Dormant]]:
        """The sleeping channels with members on ``edge_id`` (a snapshot: the
        table may change while this is consumed)."""
        needle = orjson.dumps(edge_id)
        found: list[tuple[str, Dormant]] = []
        for offset in self._offsets:
            if offset >= 0:
                record = self._record(offset)
                if needle in record:
                    shares = decode(record)
                    if any(s.edge_id == edge_id for s in shares):
                        found.append((self._key(offset), shares))
        return iter(found)

    # -- changes ------------------------------------------------------------

    def put(self, channel_id: str, record: Dormant) -> None:
        slot, offset = self._find(channel_id)
        if offset >= 0:
            self._forget(offset)
        else:
            self._len += 1
            if self._offsets[slot] == _GONE:
                self._tombstones -= 1
        key = channel_id.encode()
        body = encode(record)
        entry = _HEADER.pack(_HEADER.size + len(key) + len(body), len(key)) + key + body
        self._hashes[slot] = hash(channel_id)
        self._offsets[slot] = len(self._buf)
        self._buf += entry
        self._members += sum(s.count for s in record)
        self._tidy()

    def pop(self, channel_id: str) -> Dormant | None:
        slot, offset = self._find(channel_id)
        if offset < 0:
            return None
        record = decode(self._record(offset))
        self._forget(offset)
        self._offsets[slot] = _GONE
        self._len -= 1
        self._tombstones += 1
        self._tidy()
        return record

    # -- internals ----------------------------------------------------------

    def _find(self, channel_id: str) -> tuple[int, int]:
        """(slot, offset): the key's slot and entry offset, or the slot to
        insert it in and -1."""
        h = hash(channel_id)
        key = channel_id.encode()
        mask = self._mask
        offsets, hashes = self._offsets, self._hashes
        i = h & mask
        free = -1
        while True:
            offset = offsets[i]
            if offset == _EMPTY:
                return (i if free < 0 else free), -1
            if offset == _GONE:
                if free < 0:
                    free = i
            elif hashes[i] == h and self._key_bytes(offset) == key:
                return i, offset
            i = (i + 1) & mask

    def _key_bytes(self, offset: int) -> bytes:
        _, key_len = _HEADER.unpack_from(self._buf, offset)
        start = offset + _HEADER.size
        return bytes(self._buf[start : start + key_len])

    def _key(self, offset: int) -> str:
        return self._key_bytes(offset).decode()

    def _record(self, offset: int) -> bytes:
        length, key_len = _HEADER.unpack_from(self._buf, offset)
        return bytes(self._buf[offset + _HEADER.size + key_len : offset + length])

    def _forget(self, offset: int) -> None:
        self._members -= sum(s.count for s in decode(self._record(offset)))
        self._dead += _HEADER.unpack_from(self._buf, offset)[0]

    def _tidy(self) -> None:
        """Rebuild when the index is too full or the buffer mostly dead."""
        capacity = self._mask + 1
        grow = (self._len + self._tombstones) * 3 > capacity * 2
        shrink = capacity > 8 and self._len * 8 < capacity
        compact = self._dead > 65536 and self._dead * 2 > len(self._buf)
        if grow or shrink or compact or self._tombstones * 4 > capacity:
            self._rebuild(max(8, 1 << (max(self._len, 1) * 2 - 1).bit_length()))

    def _rebuild(self, capacity: int) -> None:
        old_buf, old_offsets, old_hashes = self._buf, self._offsets, self._hashes
        self._alloc(capacity)
        buf = bytearray()
        mask = self._mask
        for slot, offset in enumerate(old_offsets):
            if offset < 0:
                continue
            length = _HEADER.unpack_from(old_buf, offset)[0]
            h = old_hashes[slot]
            i = h & mask
            while self._offsets[i] != _EMPTY:
                i = (i + 1) & mask
            self._offsets[i] = len(buf)
            self._hashes[i] = h
            buf += old_buf[offset : offset + length]
        self._buf = buf
        self._dead = 0
