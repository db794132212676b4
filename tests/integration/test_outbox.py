"""The outbox state machine against real SQLite and real PostgreSQL."""

from __future__ import annotations

import asyncio

from sqlalchemy import select

from syncd.events import IncomingEvent
from syncd.retry import outbox
from syncd.store import Store
from syncd.store.models import DeliveryState, attempts, deliveries

NOW = 1_700_000_000.0


def ev(
    ticket: str, kind: str = "ticket_updated", dests: tuple[str, ...] = ("crm",), **kw: object
) -> IncomingEvent:
    return IncomingEvent(
        source="hd",
        ticket_id=ticket,
        kind=kind,
        payload={"ticket_id": ticket},
        destinations=dests,
        **kw,
    )  # type: ignore[arg-type]


def put(store: Store, *events: IncomingEvent, now: float = NOW) -> list[outbox.Enqueued]:
    return [store.write_sync(lambda c, e=e: outbox.enqueue(c, e, now)) for e in events]


def lease(
    store: Store, now: float = NOW, limit: int = 100, owner: str = "w1", lease_s: float = 60
) -> list[outbox.Leased]:
    return store.write_sync(
        lambda c: outbox.lease(c, owner=owner, now=now, lease_seconds=lease_s, limit=limit)
    )


def done(
    store: Store, row: outbox.Leased, state: DeliveryState, owner: str = "w1", **kw: object
) -> int:
    o = outbox.Outcome(
        delivery_id=row.delivery_id,
        lease_owner=owner,
        attempt=row.attempt,
        state=state,
        started_at=NOW,
        duration_ms=1.0,
        **kw,  # type: ignore[arg-type]
    )
    return store.write_sync(lambda c: outbox.complete(c, [o], NOW))


def state_of(store: Store, delivery_id: int) -> str:
    with store.read_engine.connect() as c:
        return str(
            c.execute(select(deliveries.c.state).where(deliveries.c.id == delivery_id)).scalar_one()
        )


def test_one_delivery_per_destination(store: Store) -> None:
    [r] = put(store, ev("1", dests=("a", "b")))
    assert r.deliveries == 2 and not r.duplicate
    rows = lease(store)
    assert sorted(x.destination for x in rows) == ["a", "b"]
    assert all(x.attempt == 1 and x.payload == {"ticket_id": "1"} for x in rows)


def test_dedup_key_stores_once(store: Store) -> None:
    first, second = put(store, ev("1", dedup_key="k1"), ev("1", dedup_key="k1"))
    assert not first.duplicate and second.duplicate and second.event_id == first.event_id
    assert len(lease(store)) == 1


def test_same_ticket_in_order_other_tickets_flow(store: Store) -> None:
    put(store, ev("t1", "created"), ev("t1", "updated"), ev("t2", "created"))
    first = lease(store)
    assert [(r.ticket_id, r.kind) for r in first] == [("t1", "created"), ("t2", "created")]
    # t1's head is retrying: its second event must wait, but nothing else is blocked
    t1 = next(r for r in first if r.ticket_id == "t1")
    done(
        store,
        t1,
        DeliveryState.RETRY_WAIT,
        next_attempt_at=NOW + 100,
        first_failed_at=NOW,
        error="HTTP 503",
    )
    put(store, ev("t3", "created"))
    assert [(r.ticket_id, r.kind) for r in lease(store)] == [("t3", "created")]
    # once the retry is due it is leased again, then the queued event follows
    again = lease(store, now=NOW + 100)
    assert [(r.ticket_id, r.kind, r.attempt) for r in again] == [("t1", "created", 2)]
    done(store, again[0], DeliveryState.DELIVERED)
    assert [(r.ticket_id, r.kind) for r in lease(store, now=NOW + 100)] == [("t1", "updated")]


def test_failed_head_unblocks_the_ticket(store: Store) -> None:
    put(store, ev("t1", "a"), ev("t1", "b"))
    [head] = lease(store)
    done(store, head, DeliveryState.FAILED, error="HTTP 422")
    assert [r.kind for r in lease(store)] == ["b"]


def test_leased_rows_are_not_leased_twice(store: Store) -> None:
    put(store, *(ev(str(i)) for i in range(10)))
    a = lease(store, limit=4, owner="w1")
    b = lease(store, limit=100, owner="w2")
    assert len(a) == 4 and len(b) == 6
    assert not {r.delivery_id for r in a} & {r.delivery_id for r in b}
    assert lease(store, owner="w3") == []


def test_expired_lease_is_recovered_with_an_abandoned_attempt(store: Store) -> None:
    put(store, ev("1"))
    [row] = lease(store, lease_s=30)
    assert store.write_sync(lambda c: outbox.recover_leases(c, NOW + 10)) == 0
    assert store.write_sync(lambda c: outbox.recover_leases(c, NOW + 31)) == 1
    assert state_of(store, row.delivery_id) == "pending"
    [again] = lease(store, now=NOW + 31, owner="w2")
    assert again.attempt == 2 and again.outcome_unknown
    # the first worker's late report must not overwrite the new owner's lease
    assert done(store, row, DeliveryState.DELIVERED, owner="w1") == 0
    assert state_of(store, row.delivery_id) == "in_flight"
    assert done(store, again, DeliveryState.DELIVERED, owner="w2") == 1
    with store.read_engine.connect() as c:
        outcomes = list(
            c.execute(
                select(attempts.c.outcome)
                .where(attempts.c.delivery_id == row.delivery_id)
                .order_by(attempts.c.id)
            ).scalars()
        )
    assert outcomes == ["abandoned", "delivered", "delivered"]


def test_recover_all_leases_on_exclusive_start(store: Store) -> None:
    put(store, ev("1"), ev("2"))
    lease(store, lease_s=3600)
    assert store.write_sync(lambda c: outbox.recover_leases(c, NOW, all_leases=True)) == 2


def test_terminal_states_and_counts(store: Store) -> None:
    put(store, ev("1"), ev("2"), ev("3"), ev("4"))
    r1, r2, r3, r4 = lease(store)
    done(store, r1, DeliveryState.DELIVERED)
    done(store, r2, DeliveryState.FAILED, error="HTTP 400: bad", status_code=400)
    done(store, r3, DeliveryState.EXPIRED, error="window", first_failed_at=NOW - 86400)
    done(store, r4, DeliveryState.RETRY_WAIT, next_attempt_at=NOW + 5, first_failed_at=NOW)
    with store.read_engine.connect() as c:
        counts = outbox.counts_by_state(c)
        row = c.execute(select(deliveries).where(deliveries.c.id == r2.delivery_id)).one()
    assert counts["crm"] == {
        "pending": 0,
        "in_flight": 0,
        "retry_wait": 1,
        "delivered": 1,
        "failed": 1,
        "expired": 1,
        "coalesced": 0,
    }
    assert (
        row.last_error == "HTTP 400: bad"
        and row.last_status_code == 400
        and row.next_attempt_at is None
    )


def test_expire_overdue_only_after_window_and_grace(store: Store) -> None:
    put(store, ev("1"))
    [row] = lease(store)
    done(store, row, DeliveryState.RETRY_WAIT, next_attempt_at=NOW + 10, first_failed_at=NOW)
    assert (
        store.write_sync(lambda c: outbox.expire_overdue(c, NOW + 100, window=50, grace=100)) == 0
    )
    assert (
        store.write_sync(lambda c: outbox.expire_overdue(c, NOW + 151, window=50, grace=100)) == 1
    )
    assert state_of(store, row.delivery_id) == "expired"


def test_purge_keeps_failed_and_recent(store: Store) -> None:
    put(store, ev("1"), ev("2"))
    r1, r2 = lease(store)
    done(store, r1, DeliveryState.DELIVERED)
    done(store, r2, DeliveryState.FAILED)
    assert store.write_sync(lambda c: outbox.purge_delivered(c, NOW - 1)) == 0
    assert store.write_sync(lambda c: outbox.purge_delivered(c, NOW + 1)) == 1
    with store.read_engine.connect() as c:
        assert outbox.counts_by_state(c)["crm"]["failed"] == 1
        assert outbox.counts_by_state(c)["crm"]["delivered"] == 0


async def test_writer_batches_and_isolates_failures(store: Store) -> None:
    """Concurrent writes commit together; one failing job does not sink the others."""

    def boom(_c: object) -> None:
        raise ValueError("bad job")

    jobs = [store.writer.run(lambda c, i=i: outbox.enqueue(c, ev(f"w{i}"), NOW)) for i in range(50)]
    results = await asyncio.gather(
        *jobs[:25], store.writer.run(boom), *jobs[25:], return_exceptions=True
    )
    errors = [r for r in results if isinstance(r, Exception)]
    assert len(errors) == 1 and str(errors[0]) == "bad job"
    assert len(lease(store)) == 50
