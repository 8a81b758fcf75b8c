"""Per-connection budgets: token buckets for messages, typing and frames,
and the strike counter that turns sustained abuse into a 1008 close.

Pure: time is passed in, so tests drive it without sleeping.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(slots=True)
class TokenBucket:
    """``rate`` tokens a second, at most ``burst`` saved up."""

    rate: float
    burst: float
    tokens: float
    stamp: float

    @classmethod
    def full(cls, rate: float, burst: float, now: float) -> TokenBucket:
        return cls(rate, burst, burst, now)

    def refill(self, now: float) -> None:
        elapsed = now - self.stamp
        if elapsed > 0:
            self.tokens = min(self.burst, self.tokens + elapsed * self.rate)
            self.stamp = now

    def take(self, now: float, cost: float = 1.0) -> float:
        """Spend ``cost`` tokens; return 0.0 when allowed, else seconds to wait."""
        self.refill(now)
        if self.tokens >= cost:
            self.tokens -= cost
            return 0.0
        return (cost - self.tokens) / self.rate if self.rate > 0 else float("inf")

    def wait_for(self, now: float, cost: float = 1.0) -> float:
        """Seconds until ``cost`` tokens are saved up (0.0: now); spends nothing."""
        self.refill(now)
        return max(0.0, cost - self.tokens) / self.rate

    def charge(self, now: float, cost: float) -> None:
        """Spend ``cost`` tokens after the fact, going into debt if need be."""
        self.refill(now)
        self.tokens -= cost


@dataclass(frozen=True, slots=True)
class RateConfig:
    message_rate: float = 10.0
    message_burst: float = 30.0
    typing_rate: float = 4.0
    typing_burst: float = 10.0
    frame_rate: float = 50.0
    frame_burst: float = 100.0
    # Refused frames tolerated (refilling one a second) before the socket is
    # closed with 1008.
    abuse_burst: float = 20.0


@dataclass(slots=True)
class ConnectionBudget:
    frames: TokenBucket
    messages: TokenBucket
    typing: TokenBucket
    strikes: TokenBucket

    @classmethod
    def create(cls, config: RateConfig, now: float) -> ConnectionBudget:
        return cls(
            frames=TokenBucket.full(config.frame_rate, config.frame_burst, now),
            messages=TokenBucket.full(config.message_rate, config.message_burst, now),
            typing=TokenBucket.full(config.typing_rate, config.typing_burst, now),
            strikes=TokenBucket.full(1.0, config.abuse_burst, now),
        )

    def strike(self, now: float) -> bool:
        """Record a refused frame; True when the connection has used up its patience."""
        return self.strikes.take(now) > 0
