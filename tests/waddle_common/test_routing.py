"""Rendezvous hashing: deterministic, order-independent, balanced, minimal movement."""

from __future__ import annotations

from collections import Counter

import pytest

from waddle_common.routing import owner_of

SHARDS = [f"channel-{i}.svc:50051" for i in range(4)]
CHANNELS = [f"channel-{i}" for i in range(4000)]


def test_owner_is_deterministic_and_ignores_list_order() -> None:
    for cid in CHANNELS[:200]:
        assert owner_of(cid, SHARDS) == owner_of(cid, list(reversed(SHARDS)))
        assert owner_of(cid, SHARDS) in SHARDS


def test_load_is_balanced() -> None:
    counts = Counter(owner_of(cid, SHARDS) for cid in CHANNELS)
    assert set(counts) == set(SHARDS)
    assert min(counts.values()) > len(CHANNELS) / len(SHARDS) * 0.8


def test_adding_a_shard_moves_only_its_share() -> None:
    bigger = [*SHARDS, "channel-4.svc:50051"]
    moved = [cid for cid in CHANNELS if owner_of(cid, SHARDS) != owner_of(cid, bigger)]
    # Every moved channel moved to the new shard, and about 1/5 moved.
    assert all(owner_of(cid, bigger) == bigger[-1] for cid in moved)
    assert 0.12 < len(moved) / len(CHANNELS) < 0.28


def test_removing_a_shard_moves_only_its_channels() -> None:
    smaller = SHARDS[:-1]
    for cid in CHANNELS:
        if owner_of(cid, SHARDS) != SHARDS[-1]:
            assert owner_of(cid, smaller) == owner_of(cid, SHARDS)


def test_no_shards_is_an_error() -> None:
    with pytest.raises(ValueError, match="no channel shards"):
        owner_of("x", [])
