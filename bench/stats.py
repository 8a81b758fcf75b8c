"""Pure statistics of a benchmark run: percentiles, per-delivery latency,
all-members latency, and the median with its min-max over repeated runs.

A *delivery* is one message frame arriving at one receiver. The load
generator records, for every delivery, the index of the message and its
latency (arrival time minus the send time stamped into the message, both
read from the same clock). *All-members latency* of one message is the
latency of its last delivery: the moment every member had it. It is only
defined for messages that reached every member; the others are counted as
incomplete.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

IntArray = npt.NDArray[np.int64]
FloatArray = npt.NDArray[np.float64]

PERCENTILES = (50.0, 90.0, 99.0)


def percentile(values: npt.ArrayLike, q: float) -> float:
    """The ``q``-th percentile (0-100, linear interpolation); NaN when empty."""
    arr = np.asarray(values, dtype=np.float64)
    if arr.size == 0:
        return float("nan")
    return float(np.percentile(arr, q))


@dataclass(frozen=True, slots=True)
class LatencySummary:
    """Latency distribution in milliseconds."""

    count: int
    p50_ms: float
    p90_ms: float
    p99_ms: float
    max_ms: float
    mean_ms: float

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def summarize_ns(latencies_ns: npt.ArrayLike) -> LatencySummary:
    """p50/p90/p99/max/mean of nanosecond latencies, in milliseconds."""
    arr = np.asarray(latencies_ns, dtype=np.float64) / 1e6
    if arr.size == 0:
        nan = float("nan")
        return LatencySummary(0, nan, nan, nan, nan, nan)
    p50, p90, p99 = (float(v) for v in np.percentile(arr, PERCENTILES))
    return LatencySummary(
        count=int(arr.size),
        p50_ms=p50,
        p90_ms=p90,
        p99_ms=p99,
        max_ms=float(arr.max()),
        mean_ms=float(arr.mean()),
    )


@dataclass(frozen=True, slots=True)
class AllMembers:
    """Per message: how many deliveries it got and its last delivery's latency."""

    complete_latencies_ns: IntArray  # one entry per message that reached every member
    complete: int
    incomplete: int
    duplicates: int  # deliveries beyond the expected count (should be 0)


def _slowest(
    message_idx: npt.ArrayLike, latency_ns: npt.ArrayLike, sent: int
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]:
    """The deliveries of messages ``0 .. sent - 1`` (their message indices) and
    each message's largest latency (``_NONE`` for a message nobody got)."""
    idx = np.asarray(message_idx, dtype=np.int64)
    lat = np.asarray(latency_ns, dtype=np.int64)
    if idx.shape != lat.shape:
        raise ValueError("message_idx and latency_ns differ in length")
    keep = (idx >= 0) & (idx < sent)
    idx, lat = idx[keep], lat[keep]
    last = np.full(max(sent, 0), _NONE, dtype=np.int64)
    np.maximum.at(last, idx, lat)
    return idx, last


_NONE = np.iinfo(np.int64).min


def slowest_per_message_ms(
    message_idx: npt.ArrayLike, latency_ns: npt.ArrayLike, *, sent: int
) -> list[float | None]:
    """Each message's slowest delivery (ms, 0.1 ms), in sending order; None for
    a message nobody got. With a steady sender, message ``i`` left at ``i /
    rate``: this is the window's latency over time."""
    _, last = _slowest(message_idx, latency_ns, sent)
    return [None if v == _NONE else round(v / 1e6, 1) for v in last.tolist()]


def all_members(
    message_idx: npt.ArrayLike,
    latency_ns: npt.ArrayLike,
    *,
    sent: int,
    expected_per_message: int,
) -> AllMembers:
    """Aggregate deliveries per message.

    ``message_idx[i]`` and ``latency_ns[i]`` describe delivery ``i``; messages
    are numbered ``0 .. sent - 1``. A message is complete when it got at
    least ``expected_per_message`` deliveries; its all-members latency is the
    largest latency among its deliveries.
    """
    idx, last = _slowest(message_idx, latency_ns, sent)
    if sent <= 0:
        return AllMembers(np.zeros(0, dtype=np.int64), 0, 0, 0)
    counts = np.bincount(idx, minlength=sent)
    done = counts >= expected_per_message
    extra = np.clip(counts - expected_per_message, 0, None)
    return AllMembers(
        complete_latencies_ns=last[done],
        complete=int(done.sum()),
        incomplete=int(sent - done.sum()),
        duplicates=int(extra.sum()),
    )


def quantiles_ms(latencies_ns: npt.ArrayLike, points: int = 101) -> list[float]:
    """``points`` evenly spaced quantiles (0..100 %) in ms, for CDF plots."""
    arr = np.asarray(latencies_ns, dtype=np.float64) / 1e6
    if arr.size == 0:
        return []
    return [round(float(v), 3) for v in np.percentile(arr, np.linspace(0, 100, points))]


def rate(count: int, seconds: float) -> float:
    """Events per second; 0 for an empty interval."""
    return count / seconds if seconds > 0 else 0.0


# -- repeated runs -------------------------------------------------------------------


class Spread(float):
    """A median over runs that remembers its min, max and number of runs.

    It is a ``float`` (the median), so tables and ratios use it like one;
    scaling it by a plain number scales the spread too.
    """

    lo: float
    hi: float
    n: int

    def __new__(cls, values: Sequence[float]) -> Spread:
        if not values:
            raise ValueError("a spread of no values")
        self = super().__new__(cls, statistics.median(values))
        self.lo, self.hi, self.n = float(min(values)), float(max(values)), len(values)
        return self

    def _scaled(self, k: float) -> Spread:
        out = Spread([float(self) * k])
        out.lo, out.hi = sorted((self.lo * k, self.hi * k))
        out.n = self.n
        return out

    def __mul__(self, other: float) -> float:
        if not isinstance(other, Spread):
            return self._scaled(float(other))
        return float(self) * float(other)

    __rmul__ = __mul__

    def as_dict(self) -> dict[str, float]:
        return {"median": float(self), "min": self.lo, "max": self.hi, "runs": self.n}


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def merge_runs(runs: Sequence[Any]) -> Any:
    """One view of several runs of the same structure.

    Numbers become a ``Spread`` (median, min, max) over the runs that have
    them (NaN left out); dicts merge key by key (a key missing from some
    runs is merged over the others); lists, strings and the rest come from
    the first run that has them (a ramp's steps differ from run to run).
    """
    present = [r for r in runs if r is not None]
    if not present:
        return None
    first = present[0]
    if isinstance(first, dict):
        keys: list[str] = []
        for r in present:
            if isinstance(r, dict):
                keys += [k for k in r if k not in keys]
        return {
            k: merge_runs([r.get(k) for r in present if isinstance(r, dict) and k in r])
            for k in keys
        }
    if _number(first):
        nums = [float(r) for r in present if _number(r) and r == r]
        return Spread(nums) if nums else float("nan")
    return first


def plain(view: Any, *, spread: bool = False) -> Any:
    """A merged view as JSON: each ``Spread`` as its median, or as its ``as_dict``."""
    if isinstance(view, Spread):
        return view.as_dict() if spread else float(view)
    if isinstance(view, dict):
        return {k: plain(v, spread=spread) for k, v in view.items()}
    if isinstance(view, list):
        return [plain(v, spread=spread) for v in view]
    return view


def cpu_us_per_delivery(step: dict[str, Any]) -> float | None:
    """Server CPU (every server process, load generator excluded) per delivery, in µs."""
    cpu = step.get("cpu_percent") or {}
    window = step.get("window_s")
    deliveries = step.get("deliveries")
    if not cpu or not window or not deliveries:
        return None
    busy = sum(float(v) for k, v in cpu.items() if not k.startswith("loadgen") and v == v)
    return busy / 100.0 * float(window) / float(deliveries) * 1e6
