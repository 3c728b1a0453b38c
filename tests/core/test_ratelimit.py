"""app/core/ratelimit.py: a token bucket driven by a clock the test holds."""

from __future__ import annotations

import pytest

from app.core.ratelimit import TokenBucket


@pytest.mark.parametrize(("rate", "burst"), [(1.0, 1), (10.0, 5), (0.5, 3), (1000.0, 1000)])
def test_a_burst_is_taken_at_once_then_the_next_waits_one_token(rate: float, burst: int) -> None:
    bucket = TokenBucket(rate, burst, now=100.0)
    assert bucket.full(100.0)
    assert [bucket.take(100.0) for _ in range(burst)] == [0.0] * burst
    assert not bucket.full(100.0)
    assert bucket.take(100.0) == pytest.approx(1 / rate)
    # A refusal takes nothing: asking again says the same.
    assert bucket.take(100.0) == pytest.approx(1 / rate)


@pytest.mark.parametrize(
    ("steps", "expected"),
    [
        # (time, what take() answers): rate 2 a second, burst 2.
        ([(0.0, 0.0), (0.0, 0.0), (0.0, 0.5)], "burst, then half a second"),
        ([(0.0, 0.0), (0.0, 0.0), (0.25, 0.25), (0.5, 0.0), (0.5, 0.5)], "refill by halves"),
        ([(0.0, 0.0), (0.0, 0.0), (10.0, 0.0), (10.0, 0.0), (10.0, 0.5)], "saves up burst only"),
        ([(0.0, 0.0), (0.1, 0.0), (0.2, 0.3), (0.6, 0.0), (0.6, 0.4)], "refill between takes"),
    ],
)
def test_refill_and_retry_after(steps: list[tuple[float, float]], expected: str) -> None:
    bucket = TokenBucket(2.0, 2, now=0.0)
    answers = [(t, bucket.take(t)) for t, _ in steps]
    assert answers == [(t, pytest.approx(w)) for t, w in steps], expected


def test_retry_after_is_exactly_when_the_next_token_is_there() -> None:
    bucket = TokenBucket(4.0, 1, now=0.0)
    assert bucket.take(0.0) == 0.0
    wait_s = bucket.take(0.1)
    assert wait_s == pytest.approx(0.15)
    assert bucket.take(0.1 + wait_s * 0.9) > 0.0
    assert bucket.take(0.1 + wait_s + 1e-9) == 0.0


def test_full_once_refilled() -> None:
    bucket = TokenBucket(2.0, 4, now=0.0)
    for _ in range(4):
        bucket.take(0.0)
    assert not bucket.full(0.0)
    assert not bucket.full(1.99)
    assert bucket.full(2.0)
    assert bucket.full(100.0)
    bucket.take(100.0)
    assert not bucket.full(100.0)
    assert bucket.full(100.5)


@pytest.mark.parametrize(("rate", "burst"), [(0.0, 1), (-1.0, 1), (1.0, 0), (1.0, -5)])
def test_a_bucket_needs_a_rate_and_a_burst(rate: float, burst: int) -> None:
    with pytest.raises(ValueError, match="rate > 0 and burst >= 1"):
        TokenBucket(rate, burst, now=0.0)
