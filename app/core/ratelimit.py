"""A token bucket: ``rate`` tokens a second, at most ``burst`` saved up. Pure: the caller
passes the time, so tests drive it with no clock."""

from __future__ import annotations


class TokenBucket:
    __slots__ = ("_at", "_tokens", "burst", "rate")

    def __init__(self, rate: float, burst: int, now: float) -> None:
        if rate <= 0 or burst < 1:
            raise ValueError("a token bucket needs rate > 0 and burst >= 1")
        self.rate = rate
        self.burst = burst
        self._tokens = float(burst)
        self._at = now

    def take(self, now: float) -> float:
        """Take one token. Returns 0.0 when one was there, else the seconds until one is
        (nothing is taken then)."""
        tokens = min(self.burst, self._tokens + (now - self._at) * self.rate)
        self._at = now
        if tokens >= 1.0:
            self._tokens = tokens - 1.0
            return 0.0
        self._tokens = tokens
        return (1.0 - tokens) / self.rate

    def full(self, now: float) -> bool:
        """True when the bucket has refilled: forgetting it changes nothing."""
        return self._tokens + (now - self._at) * self.rate >= self.burst
