"""Heartbeats of several replicas on one store (SQLite and PostgreSQL)."""

from __future__ import annotations

from syncd.replicas import FORGET_AFTER_SECONDS, MISSED_BEATS, Replicas
from syncd.store import Store


class Clock:
    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


async def test_replicas_count_each_other_and_the_oldest_polls(store: Store) -> None:
    clock = Clock()
    first = Replicas(store, 2.0, clock=clock)
    clock.now += 5
    second = Replicas(store, 2.0, clock=clock)

    alone = await first.beat()
    assert (alone.count, alone.share, alone.leader) == (1, 1.0, True)
    both = await second.beat()
    assert (both.count, both.share, both.leader) == (2, 0.5, False)
    assert [r.id for r in both.live] == [first.id, second.id]
    assert {r.pid for r in both.live} == {first.pid}  # same process here; its own row each
    assert (await first.beat()).count == 2

    # The first stops cleanly: the second takes the whole limit and the polling at once.
    await first.leave()
    after = await second.beat()
    assert (after.count, after.share, after.leader) == (1, 1.0, True)


async def test_a_replica_that_stops_beating_is_no_longer_counted_then_forgotten(
    store: Store,
) -> None:
    clock = Clock()
    alive = Replicas(store, 2.0, clock=clock)
    clock.now += 1
    dead = Replicas(store, 2.0, clock=clock)
    await dead.beat()
    assert (await alive.beat()).count == 2

    clock.now += MISSED_BEATS * 2.0 - 0.5
    assert (await alive.beat()).count == 2  # late, but within the beats it may miss
    clock.now += 1.0
    census = await alive.beat()
    assert (census.count, census.leader) == (1, True)
    assert [r.id for r in census.replicas if not r.live] == [dead.id]  # still shown

    clock.now += FORGET_AFTER_SECONDS
    assert [r.id for r in (await alive.beat()).replicas] == [alive.id]

    # A replica that was only paused (not dead) comes back into the count with its next beat.
    back = await dead.beat()
    assert back.count == 2 and not back.leader  # the other one has been running longer
