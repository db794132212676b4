"""Replicas share a CRM's rate limit: the throttles' shares and the census that sets them."""

from __future__ import annotations

import pytest

from syncd.connectors.throttle import SlidingWindow, TokenBucket
from syncd.replicas import Census, Replica

from .test_throttle_window import FakeTime, max_in_any_window


def replica(rid: str, started: float, *, live: bool = True) -> Replica:
    return Replica(rid, "host", 1, "0.1.0", started, started, live)


async def test_replicas_sharing_a_window_never_exceed_the_whole_limit() -> None:
    t = FakeTime()
    windows = [SlidingWindow(7, 1.0, clock=t, sleep=t.sleep) for _ in range(2)]
    for w in windows:
        w.share(0.5)
    assert [w.limit for w in windows] == [3, 3]  # rounded down: 6 of 7, never 8
    sent: list[float] = []
    for _ in range(6):
        for w in windows:  # the two replicas, each sending as fast as its part allows
            sent.append(t.now + w.reserve())
    assert max_in_any_window(sorted(sent), 1.0) == 6


def test_a_window_share_keeps_one_request_and_goes_back_to_the_whole() -> None:
    w = SlidingWindow(7, 1.0)
    w.share(1 / 10)
    assert w.limit == 1
    w.share(1 / 3)
    assert w.limit == 2
    w.share(1.0)
    assert w.limit == 7


def test_a_bucket_share_scales_rate_and_burst() -> None:
    t = FakeTime()
    bucket = TokenBucket(2.0, 40, clock=t, sleep=t.sleep)
    bucket.share(0.5)
    assert (bucket.rate, bucket.burst) == (1.0, 20)
    # A full bucket holds no more than the smaller burst: two replicas' bursts add up to 40.
    assert bucket.available == 20
    delays = [bucket.reserve() for _ in range(22)]
    assert delays[:20] == [0.0] * 20
    assert delays[20:] == pytest.approx([1.0, 2.0])
    bucket.share(1 / 3)
    assert (bucket.rate, bucket.burst) == (pytest.approx(2 / 3), 13)
    bucket.share(1.0)
    assert (bucket.rate, bucket.burst) == (2.0, 40)


def test_the_longest_running_live_replica_polls() -> None:
    seen = (replica("a", 10.0), replica("b", 20.0))
    assert Census("a", seen).leader and not Census("b", seen).leader
    assert Census("b", seen).count == 2 and Census("b", seen).share == 0.5


def test_a_dead_replica_counts_for_nothing() -> None:
    seen = (replica("b", 20.0), replica("a", 10.0, live=False))
    census = Census("b", seen)
    assert (census.count, census.share, census.leader) == (1, 1.0, True)


def test_before_the_first_heartbeat_a_replica_acts_alone() -> None:
    census = Census("me", ())
    assert (census.count, census.share, census.leader) == (1, 1.0, True)
