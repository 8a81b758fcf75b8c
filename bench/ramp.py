"""The rate ramp of the throughput scenario (pure).

The ramp proposes publish rates one step at a time and is told how each
step went. It grows the rate geometrically while steps pass; after the
first failure it bisects between the best passing and the lowest failing
rate for a few steps; if the very first step fails it is tried once more
(one slow step right after the connections settle must not cap a run),
and if it fails again the ramp halves the rate until one passes (or the
floor is reached). The answer is the best passing step.

A step *passes* when its all-members p99 is within the limit and (almost)
every expected delivery arrived.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class StepResult:
    rate: float  # offered publishes per second
    all_members_p99_ms: float
    delivered_fraction: float  # deliveries received / deliveries expected
    deliveries_per_s: float

    def passes(self, limit_ms: float, min_fraction: float) -> bool:
        p99 = self.all_members_p99_ms
        return p99 == p99 and p99 <= limit_ms and self.delivered_fraction >= min_fraction


@dataclass(slots=True)
class RateRamp:
    start: float
    factor: float = 1.5
    limit_ms: float = 100.0
    min_fraction: float = 0.999
    max_rate: float = 10_000.0
    min_rate: float = 1.0
    refine_steps: int = 2
    max_steps: int = 12
    history: list[StepResult] = field(default_factory=list)
    retried: list[StepResult] = field(default_factory=list)  # first steps tried again
    _refined: int = 0

    def first(self) -> float:
        return self.start

    @property
    def best(self) -> StepResult | None:
        ok = [s for s in self.history if s.passes(self.limit_ms, self.min_fraction)]
        return max(ok, key=lambda s: s.deliveries_per_s) if ok else None

    @property
    def lowest_failure(self) -> StepResult | None:
        bad = [s for s in self.history if not s.passes(self.limit_ms, self.min_fraction)]
        return min(bad, key=lambda s: s.rate) if bad else None

    def next(self, result: StepResult) -> float | None:
        """Record ``result``; return the next rate to try, or None when done."""
        self.history.append(result)
        if len(self.history) >= self.max_steps:
            return None
        if (
            len(self.history) == 1
            and not self.retried
            and not result.passes(self.limit_ms, self.min_fraction)
        ):
            # Set aside: the retry decides whether this rate passes.
            self.retried.append(self.history.pop())
            return result.rate
        best, fail = self.best, self.lowest_failure
        if fail is None:
            # Still climbing.
            if result.rate >= self.max_rate:
                return None
            return min(result.rate * self.factor, self.max_rate)
        if best is None:
            # Nothing passed yet: go down.
            lower = result.rate / 2
            return lower if lower >= self.min_rate else None
        if best.rate > fail.rate:
            # A lower rate failed but a higher one passed (noise): stop with the best.
            return None
        if self._refined >= self.refine_steps:
            return None
        mid = (best.rate + fail.rate) / 2
        if mid - best.rate < 0.05 * best.rate:
            return None
        self._refined += 1
        return mid
