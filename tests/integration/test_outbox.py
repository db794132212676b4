"""The outbox state machine against real SQLite and real PostgreSQL."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from sqlalchemy import select

from syncd.events import IncomingEvent
from syncd.retry import outbox
from syncd.store import Store
from syncd.store.models import DeliveryState, attempts, deliveries, events

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


def _stored(store: Store) -> dict[int, tuple[str, str | None]]:
    """Event id -> (ticket, dedup key), and every delivery's ordering key checked against it."""
    with store.read_engine.connect() as c:
        rows = {
            int(r.id): (r.ticket_id, r.dedup_key)
            for r in c.execute(select(events.c.id, events.c.ticket_id, events.c.dedup_key))
        }
        for d in c.execute(select(deliveries.c.event_id, deliveries.c.ordering_key)):
            assert d.ordering_key == outbox.ordering_key("hd", rows[d.event_id][0])
    return rows


def test_enqueue_many_maps_each_event_to_its_own_row(store: Store) -> None:
    """A batch of 100 (cut into 64+32+4 rows per statement): each event gets its own id."""
    put(store, ev("before"))
    batch = [
        (ev(f"m{i}", dests=("crm", "erp") if i % 3 == 0 else ("crm",)), NOW + i) for i in range(100)
    ]
    result = store.write_sync(lambda c: outbox.enqueue_many(c, batch))
    rows = _stored(store)
    assert [rows[r.event_id][0] for r in result] == [f"m{i}" for i in range(100)]
    assert [r.deliveries for r in result] == [2 if i % 3 == 0 else 1 for i in range(100)]
    assert not any(r.duplicate for r in result)
    assert len(lease(store, now=NOW + 200, limit=500)) == 1 + sum(r.deliveries for r in result)


def test_enqueue_many_with_duplicates_stores_each_change_once(store: Store) -> None:
    """A key stored earlier, and one repeated inside the batch: stored once, reported as such."""
    [first] = put(store, ev("d0", dedup_key="k0"))
    batch = [
        (ev("d1", dedup_key="k1"), NOW),
        (ev("d0", dedup_key="k0"), NOW),  # stored before this batch
        (ev("d2"), NOW),  # no key: never merged
        (ev("d1", dedup_key="k1"), NOW),  # repeats the first of this batch
    ]
    result = store.write_sync(lambda c: outbox.enqueue_many(c, batch))
    assert [r.duplicate for r in result] == [False, True, False, True]
    assert result[1].event_id == first.event_id and result[3].event_id == result[0].event_id
    assert [r.deliveries for r in result] == [1, 0, 1, 0]
    rows = _stored(store)
    assert sorted(t for t, _ in rows.values()) == ["d0", "d1", "d2"]
    assert len(lease(store)) == 3


async def test_grouped_writes_share_one_call(store: Store) -> None:
    """Concurrent grouped jobs reach the group function together; plain jobs keep their place."""
    calls: list[int] = []

    def group(conn: object, items: list[str]) -> list[outbox.Enqueued]:
        calls.append(len(items))
        return outbox.enqueue_many(conn, [(ev(t), NOW) for t in items])  # type: ignore[arg-type]

    jobs = [store.writer.run_grouped(group, f"g{i}") for i in range(40)]
    plain = store.writer.run(lambda c: outbox.enqueue(c, ev("plain"), NOW))
    results = await asyncio.gather(*jobs[:20], plain, *jobs[20:])
    assert sum(calls) == 40 and max(calls) > 1
    rows = _stored(store)
    tickets = [rows[r.event_id][0] for r in results]
    assert tickets == [f"g{i}" for i in range(20)] + ["plain"] + [f"g{i}" for i in range(20, 40)]


async def test_grouped_write_failing_fails_alone(store: Store) -> None:
    """One bad item sinks the shared call; each item is then written on its own."""

    def group(conn: object, items: list[str]) -> list[outbox.Enqueued]:
        if "bad" in items:
            raise ValueError("bad item")
        return outbox.enqueue_many(conn, [(ev(t), NOW) for t in items])  # type: ignore[arg-type]

    names = [f"h{i}" for i in range(10)] + ["bad"] + [f"h{i}" for i in range(10, 20)]
    results = await asyncio.gather(
        *(store.writer.run_grouped(group, n) for n in names), return_exceptions=True
    )
    errors = [r for r in results if isinstance(r, Exception)]
    assert len(errors) == 1 and str(errors[0]) == "bad item"
    assert sorted(t for t, _ in _stored(store).values()) == sorted(n for n in names if n != "bad")


async def test_writer_replaces_a_connection_the_server_dropped(pg_url: str) -> None:
    """The writer keeps its connection between commits. If PostgreSQL drops it (a
    restart, an idle timeout): a batch that finds it dead fails and is not run again
    (its commit might have happened), and the next batch gets a fresh connection;
    a connection that sat idle is checked before use, so that batch does not fail."""
    import psycopg
    from sqlalchemy.exc import DBAPIError

    from syncd.store.writer import StoreWriter
    from tests.conftest import PG_ADMIN_DSN

    def backend_pid(c: Any) -> int:
        return int(c.exec_driver_sql("SELECT pg_backend_pid()").scalar_one())

    def kill(pid: int) -> None:
        with psycopg.connect(PG_ADMIN_DSN, autocommit=True) as admin:
            admin.execute("SELECT pg_terminate_backend(%s)", (pid,))

    store = Store(pg_url)
    store.migrate()
    store.start()
    checked = StoreWriter(store.write_engine, idle_check_seconds=0.0)
    checked.start()
    try:
        pid = await store.writer.run(backend_pid)
        kill(pid)
        with pytest.raises(DBAPIError):
            await store.writer.run(lambda c: outbox.enqueue(c, ev("lost"), NOW))
        await store.writer.run(lambda c: outbox.enqueue(c, ev("after"), NOW))
        assert await store.writer.run(backend_pid) != pid

        pid = await checked.run(backend_pid)
        kill(pid)
        await checked.run(lambda c: outbox.enqueue(c, ev("checked"), NOW))
        assert await checked.run(backend_pid) != pid
        with store.read_engine.connect() as c:
            tickets = sorted(r[0] for r in c.execute(select(events.c.ticket_id)))
        assert tickets == ["after", "checked"]
    finally:
        checked.close()
        store.close()
