"""Which channel shard owns a channel: rendezvous (highest random weight) hashing.

Pure and deterministic, so every edge that sees the same ring (the shards
it knows of and can reach, ``edge.shards``) agrees on every owner without
coordination. Adding or removing one shard moves only the channels that
shard gains or loses (about 1/N of them), and a shard's channels go to
their next choice when it leaves: what failover, drain and scaling need.
Shards do not consult it: they take any channel routed to them, and the
store's fence keeps two owners from forking a channel while edges disagree.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence


def _weight(shard: str, channel_id: str) -> int:
    digest = hashlib.blake2b(
        channel_id.encode("utf-8"), digest_size=8, key=shard.encode("utf-8")[:64]
    ).digest()
    return int.from_bytes(digest, "big")


def owner_of(channel_id: str, shards: Sequence[str]) -> str:
    """Return the shard address that owns ``channel_id``.

    Ties (astronomically unlikely with 64-bit weights) go to the smaller
    address so the answer never depends on the list's order.
    """
    if not shards:
        raise ValueError("no channel shards configured")
    return max(shards, key=lambda shard: (_weight(shard, channel_id), _neg(shard)))


def _neg(shard: str) -> tuple[int, ...]:
    return tuple(-ord(c) for c in shard)
