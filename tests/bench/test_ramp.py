"""The throughput scenario's rate ramp."""

from __future__ import annotations

from bench.ramp import RateRamp, StepResult


def step(rate: float, p99: float, fraction: float = 1.0) -> StepResult:
    return StepResult(rate, p99, fraction, rate * 1000 * fraction)


def test_climbs_geometrically_while_steps_pass() -> None:
    ramp = RateRamp(start=100, factor=2, limit_ms=100)
    assert ramp.first() == 100
    assert ramp.next(step(100, 20)) == 200
    assert ramp.next(step(200, 40)) == 400


def test_bisects_after_the_first_failure_then_stops() -> None:
    ramp = RateRamp(start=100, factor=2, limit_ms=100, refine_steps=2)
    ramp.next(step(100, 20))
    ramp.next(step(200, 40))
    assert ramp.next(step(400, 300)) == 300  # between best pass (200) and failure (400)
    assert ramp.next(step(300, 80)) == 350
    assert ramp.next(step(350, 120)) is None  # refinement budget spent
    assert ramp.best is not None and ramp.best.rate == 300


def test_incomplete_delivery_fails_a_step_even_with_low_latency() -> None:
    ramp = RateRamp(start=100, factor=2, limit_ms=100, min_fraction=0.999)
    ramp.next(step(100, 20))
    assert ramp.next(step(200, 10, fraction=0.9)) == 150
    assert ramp.best is not None and ramp.best.rate == 100


def test_goes_down_when_the_first_step_fails_twice() -> None:
    ramp = RateRamp(start=100, factor=2, limit_ms=100, min_rate=20)
    assert ramp.next(step(100, 500)) == 100  # tried once more
    assert ramp.next(step(100, 400)) == 50
    assert ramp.next(step(50, 300)) == 25
    assert ramp.next(step(25, 200)) is None  # 12.5 is under min_rate
    assert ramp.best is None


def test_a_first_step_that_passes_when_retried_does_not_cap_the_ramp() -> None:
    ramp = RateRamp(start=100, factor=2, limit_ms=100)
    assert ramp.next(step(100, 100.1)) == 100
    assert ramp.next(step(100, 30)) == 200  # climbing, the slow first try forgotten
    assert ramp.next(step(200, 40)) == 400
    assert [s.rate for s in ramp.retried] == [100]
    assert ramp.lowest_failure is None


def test_stops_at_the_maximum_rate_and_after_max_steps() -> None:
    ramp = RateRamp(start=100, factor=4, max_rate=300)
    assert ramp.next(step(100, 1)) == 300
    assert ramp.next(step(300, 1)) is None
    capped = RateRamp(start=1, factor=2, max_steps=3)
    assert capped.next(step(1, 1)) == 2
    assert capped.next(step(2, 1)) == 4
    assert capped.next(step(4, 1)) is None


def test_nan_latency_fails() -> None:
    assert not step(100, float("nan")).passes(100, 0.999)


def test_stops_when_bisection_would_not_move() -> None:
    ramp = RateRamp(start=100, factor=1.04, limit_ms=100)
    ramp.next(step(100, 10))
    assert ramp.next(step(104, 200)) is None
