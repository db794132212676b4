"""The retry policy, as a table: error kind x failures x elapsed -> decision."""

from __future__ import annotations

import itertools
import random

import pytest

from syncd.errors import (
    AccessDenied,
    DeliveryError,
    NotFound,
    RateLimited,
    Rejected,
    ServerError,
    TransportError,
)
from syncd.retry.policy import Expire, Fail, Retry, RetryPolicy

H = 3600.0
POLICY = RetryPolicy(
    schedule=(10, 60, 300, 1800, 3600, 7200, 14400, 28800),
    window=24 * H,
    jitter=0.0,
    max_step=8 * H,
    overload_floor=30,
)
T0 = 1_000_000.0


RETRY, FINAL, EXPIRE, FAIL = "retry", "final", "expire", "fail"


@pytest.mark.parametrize(
    ("error", "failures", "elapsed", "kind", "delay"),
    [
        # retriable errors follow the schedule
        (ServerError("HTTP 503", status_code=503), 1, 0, RETRY, 10),
        (ServerError("HTTP 500", status_code=500), 2, 10, RETRY, 60),
        (ServerError("HTTP 502", status_code=502), 4, 400, RETRY, 1800),
        # past the end of the schedule the last step repeats
        (ServerError("HTTP 503", status_code=503), 20, 2 * H, RETRY, 8 * H),
        # rate limits and timeouts wait at least the overload floor
        (RateLimited("HTTP 429", status_code=429), 1, 0, RETRY, 30),
        (TransportError("timed out"), 1, 0, RETRY, 30),
        # Retry-After wins when longer than the schedule ...
        (RateLimited("HTTP 429", status_code=429, retry_after=120), 1, 0, RETRY, 120),
        (ServerError("HTTP 503", retry_after=5), 3, 100, RETRY, 300),
        # ... but is capped per step
        (ServerError("HTTP 503", retry_after=20 * H), 1, 0, RETRY, 8 * H),
        # a retry that would land past the window becomes the final attempt at its end
        (ServerError("HTTP 503"), 8, 20 * H, FINAL, 4 * H),
        # failing again at (or after) the window's end: expired, not retried
        (ServerError("HTTP 503"), 9, 24 * H, EXPIRE, None),
        (TransportError("reset"), 3, 30 * H, EXPIRE, None),
        # permanent errors fail at once, whatever the history
        (Rejected("HTTP 422: bad phone", status_code=422), 1, 0, FAIL, None),
        (NotFound("HTTP 404", status_code=404), 5, 5 * H, FAIL, None),
        (AccessDenied("HTTP 403", status_code=403), 1, 0, FAIL, None),
        # an unclassified DeliveryError is treated as retriable
        (DeliveryError("unexpected KeyError"), 1, 0, RETRY, 10),
    ],
)
def test_decision_table(
    error: DeliveryError, failures: int, elapsed: float, kind: str, delay: float | None
) -> None:
    now = T0 + elapsed
    decision = POLICY.decide(error, failures=failures, first_failed_at=T0, now=now)
    if kind in (RETRY, FINAL):
        assert isinstance(decision, Retry)
        assert decision.final is (kind == FINAL)
        assert decision.at == pytest.approx(now + (delay or 0))
    elif kind == EXPIRE:
        assert isinstance(decision, Expire)
    else:
        assert isinstance(decision, Fail)


def test_permanent_error_message_is_kept() -> None:
    decision = POLICY.decide(
        Rejected("HTTP 400: field PHONE is invalid"), failures=1, first_failed_at=T0, now=T0
    )
    assert isinstance(decision, Fail)
    assert "PHONE is invalid" in decision.reason


def test_expiry_reason_names_the_window() -> None:
    decision = POLICY.decide(
        ServerError("HTTP 503"), failures=9, first_failed_at=T0, now=T0 + 24 * H
    )
    assert isinstance(decision, Expire)
    assert "24 h" in decision.reason and "HTTP 503" in decision.reason


def test_jitter_stays_within_bounds_and_varies() -> None:
    policy = RetryPolicy(schedule=(100,), jitter=0.2, window=10 * H)
    rng = random.Random(1)
    delays = {
        policy.decide(ServerError("x"), failures=1, first_failed_at=T0, now=T0, rng=rng).at - T0  # type: ignore[union-attr]
        for _ in range(200)
    }
    assert min(delays) >= 80 and max(delays) <= 120
    assert len(delays) > 50


def test_full_window_is_used_then_expires() -> None:
    """Simulate a CRM that never recovers: attempts until exactly the window end, then expiry."""
    now = T0
    first = T0
    failures = 0
    times = [now]
    while True:
        failures += 1
        decision = POLICY.decide(
            ServerError("down"), failures=failures, first_failed_at=first, now=now
        )
        if isinstance(decision, Expire):
            break
        assert isinstance(decision, Retry)
        now = decision.at
        times.append(now)
    assert times[-1] == pytest.approx(T0 + 24 * H)
    assert all(b > a for a, b in itertools.pairwise(times))
    assert 8 <= len(times) <= 12
