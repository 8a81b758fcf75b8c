"""Percentiles, latency summaries and the all-members aggregation."""

from __future__ import annotations

import math

import pytest

np = pytest.importorskip("numpy")

from bench.protocols import bench_content, parse_stamp  # noqa: E402
from bench.stats import (  # noqa: E402
    all_members,
    percentile,
    quantiles_ms,
    slowest_per_message_ms,
    summarize_ns,
)


def test_percentile_interpolates_and_handles_empty() -> None:
    assert percentile([1, 2, 3, 4], 50) == 2.5
    assert percentile([10], 99) == 10
    assert percentile(list(range(101)), 99) == 99
    assert math.isnan(percentile([], 50))


def test_summarize_converts_ns_to_ms() -> None:
    s = summarize_ns([1_000_000, 2_000_000, 3_000_000, 100_000_000])
    assert s.count == 4
    assert s.p50_ms == pytest.approx(2.5)
    assert s.max_ms == pytest.approx(100.0)
    assert s.mean_ms == pytest.approx(26.5)
    empty = summarize_ns([])
    assert empty.count == 0 and math.isnan(empty.p99_ms)


def test_all_members_takes_the_last_delivery_of_complete_messages() -> None:
    # message 0: three receivers, the last after 9 ms; message 1: one missing;
    # message 2: complete, last after 4 ms.
    idx = [0, 0, 0, 1, 1, 2, 2, 2]
    lat = [1, 9, 5, 2, 3, 4, 1, 2]
    am = all_members(idx, lat, sent=3, expected_per_message=3)
    assert am.complete == 2
    assert am.incomplete == 1
    assert am.duplicates == 0
    assert sorted(am.complete_latencies_ns.tolist()) == [4, 9]


def test_all_members_counts_never_delivered_and_duplicates() -> None:
    am = all_members([0, 0, 0], [5, 6, 7], sent=2, expected_per_message=2)
    assert am.complete == 1  # message 0 (with one duplicate)
    assert am.incomplete == 1  # message 1 never arrived
    assert am.duplicates == 1
    assert am.complete_latencies_ns.tolist() == [7]


def test_all_members_ignores_indices_outside_the_window() -> None:
    am = all_members([-1, 0, 5], [100, 1, 100], sent=1, expected_per_message=1)
    assert am.complete == 1 and am.complete_latencies_ns.tolist() == [1]


def test_all_members_of_nothing() -> None:
    am = all_members([], [], sent=0, expected_per_message=10)
    assert am.complete == am.incomplete == 0


def test_all_members_rejects_mismatched_arrays() -> None:
    with pytest.raises(ValueError):
        all_members([0, 1], [1], sent=2, expected_per_message=1)


def test_quantiles_for_cdf_plots() -> None:
    q = quantiles_ms(np.arange(0, 101) * 1_000_000, points=11)
    assert q[0] == 0 and q[-1] == 100 and q[5] == 50
    assert quantiles_ms([]) == []


def test_bench_content_is_sized_and_stamped() -> None:
    content = bench_content(42, 200, now_ns=1_700_000_000_123_456_789)
    assert len(content) == 200
    frame = b'{"type":"message","message":{"content":"' + content.encode() + b'"}}'
    assert parse_stamp(frame) == (42, 1_700_000_000_123_456_789)
    assert parse_stamp(b'{"type":"pong"}') is None


def test_slowest_per_message_in_sending_order() -> None:
    idx = [1, 0, 1, 3, 7, -1]
    lat = [2_000_000, 1_500_000, 9_040_000, 250_000, 1, 1]
    assert slowest_per_message_ms(idx, lat, sent=4) == [1.5, 9.0, None, 0.2]
    assert slowest_per_message_ms([], [], sent=0) == []
