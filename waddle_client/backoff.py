"""Exponential backoff with full jitter.

``delay = random() * min(cap, base * 2**attempt)``: the ceiling doubles with
each failed attempt up to ``cap``, and the actual wait is drawn uniformly
below it, so clients dropped at the same moment spread their reconnects.
``Backoff`` keeps the attempt counter and resets it once a connection has
stayed open for ``stable_after`` seconds.
"""

from __future__ import annotations

from collections.abc import Callable

__all__ = ["Backoff", "full_jitter_delay"]

# 2**64 is far beyond any sensible cap; bounding the exponent avoids huge ints.
_MAX_EXPONENT = 64


def full_jitter_delay(attempt: int, draw: float, *, base: float, cap: float) -> float:
    """The delay before retry ``attempt`` (0-based) for a uniform ``draw`` in [0, 1)."""
    if attempt < 0:
        raise ValueError("attempt must be >= 0")
    ceiling: float = min(cap, base * 2.0 ** min(attempt, _MAX_EXPONENT))
    return draw * ceiling


class Backoff:
    """The reconnect schedule of one client."""

    def __init__(
        self,
        *,
        base: float = 1.0,
        cap: float = 30.0,
        stable_after: float = 10.0,
        random: Callable[[], float],
    ) -> None:
        if base <= 0 or cap <= 0:
            raise ValueError("backoff base and cap must be positive")
        if stable_after < 0:
            raise ValueError("stable_after must be >= 0")
        self.base = base
        self.cap = cap
        self.stable_after = stable_after
        self._random = random
        self.attempt = 0

    def next_delay(self) -> tuple[int, float]:
        """Consume one attempt; return it and the delay to wait before it."""
        attempt = self.attempt
        self.attempt += 1
        return attempt, full_jitter_delay(attempt, self._random(), base=self.base, cap=self.cap)

    def connection_lasted(self, seconds: float) -> None:
        """A connection closed after being open ``seconds``: reset if it was stable."""
        if seconds >= self.stable_after:
            self.attempt = 0

    def reset(self) -> None:
        self.attempt = 0
