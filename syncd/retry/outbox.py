"""The outbox state machine, as SQL. Every function takes an open connection.

    pending ──lease──▶ in_flight ──ok──▶ delivered
       ▲                  │ ├─retriable──▶ retry_wait ──due──▶ (leased again)
       │                  │ ├─permanent──▶ failed
       └──lease expired───┘ └─window shut─▶ expired

A delivery is leasable when ``next_attempt_at`` is due and no older delivery
of the same (destination, ordering_key) is still active, so one ticket's
events reach the CRM in order while other tickets flow past a ticket that
is waiting on a retry.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection, and_, bindparam, delete, exists, func, select, update

from syncd.events import IncomingEvent
from syncd.store.dialect import insert_ignore_id, upsert
from syncd.store.models import (
    ACTIVE_STATES,
    TERMINAL_STATES,
    DeliveryState,
    attempts,
    deliveries,
    destination_status,
    events,
)


@dataclass(frozen=True)
class Enqueued:
    event_id: int
    deliveries: int
    duplicate: bool = False


@dataclass(frozen=True)
class Leased:
    delivery_id: int
    event_id: int
    destination: str
    attempt: int
    first_failed_at: float | None
    outcome_unknown: bool
    source: str
    ticket_id: str
    kind: str
    payload: dict[str, Any]


@dataclass(frozen=True)
class Outcome:
    """The result of one attempt, as the dispatcher reports it."""

    delivery_id: int
    lease_owner: str
    attempt: int
    state: DeliveryState
    started_at: float
    duration_ms: float
    status_code: int | None = None
    error: str | None = None
    next_attempt_at: float | None = None
    first_failed_at: float | None = None
    trigger: str = "scheduled"

    @property
    def label(self) -> str:
        """What the attempt row and the log line call this outcome."""
        return {
            DeliveryState.DELIVERED: "delivered",
            DeliveryState.RETRY_WAIT: "retry_scheduled",
            DeliveryState.FAILED: "failed",
            DeliveryState.EXPIRED: "expired",
        }.get(self.state, str(self.state))


def ordering_key(source: str, ticket_id: str) -> str:
    return f"{source}:{ticket_id}"


def enqueue(conn: Connection, event: IncomingEvent, now: float) -> Enqueued:
    """Store an event and one pending delivery per destination, unless already stored."""
    values = {
        "source": event.source,
        "ticket_id": event.ticket_id,
        "kind": event.kind,
        "dedup_key": event.dedup_key,
        "payload": json.dumps(event.payload, ensure_ascii=False, separators=(",", ":")),
        "received_at": now,
        "occurred_at": event.occurred_at,
        "recovered_by_poll": event.recovered_by_poll,
        "client_email": event.client_email,
        "client_phone": event.client_phone,
    }
    if event.dedup_key is None:
        key = conn.execute(events.insert().values(**values)).inserted_primary_key
        assert key is not None
        event_id = int(key[0])
    else:
        # One statement whether new or seen before (and safe against a replica racing us).
        new_id = insert_ignore_id(conn, events, values, ("source", "dedup_key"))
        if new_id is None:
            existing = _existing(conn, event.source, event.dedup_key)
            assert existing is not None
            return Enqueued(event_id=existing, deliveries=0, duplicate=True)
        event_id = new_id
    rows = [
        {
            "event_id": event_id,
            "destination": dest,
            "source": event.source,
            "ordering_key": ordering_key(event.source, event.ticket_id),
            "state": DeliveryState.PENDING.value,
            "attempts": 0,
            "next_attempt_at": now,
            "outcome_unknown": False,
            "created_at": now,
            "updated_at": now,
        }
        for dest in event.destinations
    ]
    if rows:
        conn.execute(deliveries.insert(), rows)
    return Enqueued(event_id=event_id, deliveries=len(rows))


def _existing(conn: Connection, source: str, dedup_key: str) -> int | None:
    found = conn.execute(
        select(events.c.id).where(events.c.source == source, events.c.dedup_key == dedup_key)
    ).scalar()
    return None if found is None else int(found)


def lease(
    conn: Connection,
    *,
    owner: str,
    now: float,
    lease_seconds: float,
    limit: int,
    exclude: Collection[str] = (),
) -> list[Leased]:
    """Claim up to ``limit`` due deliveries that head their ticket's queue."""
    d = deliveries
    earlier = deliveries.alias("earlier")
    blocked = exists().where(
        earlier.c.destination == d.c.destination,
        earlier.c.ordering_key == d.c.ordering_key,
        earlier.c.id < d.c.id,
        earlier.c.state.in_([s.value for s in ACTIVE_STATES]),
    )
    query = (
        select(d.c.id)
        .where(d.c.next_attempt_at <= now, ~blocked)
        .order_by(d.c.next_attempt_at, d.c.id)
        .limit(limit)
    )
    if exclude:
        # Destinations whose circuit breaker is open wait; the others flow past them.
        query = query.where(d.c.destination.not_in(list(exclude)))
    if conn.dialect.name == "postgresql":
        query = query.with_for_update(skip_locked=True, of=d)
    ids = list(conn.execute(query).scalars())
    if not ids:
        return []
    conn.execute(
        update(d)
        .where(d.c.id.in_(ids), d.c.next_attempt_at.is_not(None))
        .values(
            state=DeliveryState.IN_FLIGHT.value,
            attempts=d.c.attempts + 1,
            next_attempt_at=None,
            lease_owner=owner,
            lease_expires_at=now + lease_seconds,
            updated_at=now,
        )
    )
    rows = conn.execute(
        select(
            d.c.id,
            d.c.event_id,
            d.c.destination,
            d.c.attempts,
            d.c.first_failed_at,
            d.c.outcome_unknown,
            events.c.source,
            events.c.ticket_id,
            events.c.kind,
            events.c.payload,
        )
        .join(events, events.c.id == d.c.event_id)
        .where(d.c.id.in_(ids), d.c.lease_owner == owner)
        .order_by(d.c.id)
    )
    return [
        Leased(
            delivery_id=r.id,
            event_id=r.event_id,
            destination=r.destination,
            attempt=r.attempts,
            first_failed_at=r.first_failed_at,
            outcome_unknown=bool(r.outcome_unknown),
            source=r.source,
            ticket_id=r.ticket_id,
            kind=r.kind,
            payload=json.loads(r.payload),
        )
        for r in rows
    ]


def complete(conn: Connection, outcomes: Sequence[Outcome], now: float) -> int:
    """Record attempt outcomes. Returns how many deliveries were still ours to update.

    An update only lands while the lease is still held by the reporter, so a
    worker whose lease ran out cannot overwrite its successor's result.
    """
    if not outcomes:
        return 0
    conn.execute(
        attempts.insert(),
        [
            {
                "delivery_id": o.delivery_id,
                "number": o.attempt,
                "trigger": o.trigger,
                "started_at": o.started_at,
                "duration_ms": o.duration_ms,
                "status_code": o.status_code,
                "outcome": o.label,
                "error": o.error,
                "next_attempt_at": o.next_attempt_at,
            }
            for o in outcomes
        ],
    )
    stmt = (
        update(deliveries)
        .where(
            deliveries.c.id == bindparam("b_id"),
            deliveries.c.lease_owner == bindparam("b_owner"),
            deliveries.c.state == DeliveryState.IN_FLIGHT.value,
        )
        .values(
            state=bindparam("b_state"),
            next_attempt_at=bindparam("b_next"),
            first_failed_at=bindparam("b_first_failed"),
            last_error=bindparam("b_error"),
            last_status_code=bindparam("b_status"),
            finished_at=bindparam("b_finished"),
            outcome_unknown=bindparam("b_unknown"),
            lease_owner=None,
            lease_expires_at=None,
            updated_at=now,
        )
        .execution_options(synchronize_session=False)
    )
    params = [
        {
            "b_id": o.delivery_id,
            "b_owner": o.lease_owner,
            "b_state": o.state.value,
            "b_next": o.next_attempt_at if o.state == DeliveryState.RETRY_WAIT else None,
            "b_first_failed": o.first_failed_at,
            "b_error": o.error,
            "b_status": o.status_code,
            "b_finished": now
            if o.state in (DeliveryState.DELIVERED, DeliveryState.FAILED, DeliveryState.EXPIRED)
            else None,
            "b_unknown": False,
        }
        for o in outcomes
    ]
    result = conn.execute(stmt, params)
    return int(result.rowcount or 0)


def release(conn: Connection, ids: list[int], *, owner: str, now: float) -> int:
    """Give back leased deliveries that were never attempted (the dispatcher is stopping)."""
    d = deliveries
    result = conn.execute(
        update(d)
        .where(
            d.c.id.in_(ids), d.c.lease_owner == owner, d.c.state == DeliveryState.IN_FLIGHT.value
        )
        .values(
            state=DeliveryState.PENDING.value,
            attempts=d.c.attempts - 1,
            next_attempt_at=now,
            lease_owner=None,
            lease_expires_at=None,
            updated_at=now,
        )
    )
    return int(result.rowcount or 0)


def resend(conn: Connection, delivery_ids: Sequence[int], now: float) -> int:
    """Queue finished deliveries again, with a fresh retry window.

    Mapping runs again when they are sent, so a rule fixed since they failed
    applies; links make a resent delivered event update, not duplicate.
    Deliveries still in the air are left alone.
    """
    if not delivery_ids:
        return 0
    d = deliveries
    result = conn.execute(
        update(d)
        .where(d.c.id.in_(list(delivery_ids)), d.c.state.in_([s.value for s in TERMINAL_STATES]))
        .values(
            state=DeliveryState.PENDING.value,
            next_attempt_at=now,
            first_failed_at=None,
            finished_at=None,
            lease_owner=None,
            lease_expires_at=None,
            updated_at=now,
        )
    )
    return int(result.rowcount or 0)


def select_deliveries(
    conn: Connection,
    *,
    states: Sequence[str] = (),
    destination: str | None = None,
    event_ids: Sequence[int] = (),
    since: float | None = None,
    limit: int = 100_000,
) -> list[int]:
    """Delivery ids matching a filter (for resend), oldest first."""
    query = select(deliveries.c.id).order_by(deliveries.c.id).limit(limit)
    if states:
        query = query.where(deliveries.c.state.in_(list(states)))
    if destination:
        query = query.where(deliveries.c.destination == destination)
    if event_ids:
        query = query.where(deliveries.c.event_id.in_(list(event_ids)))
    if since is not None:
        query = query.where(deliveries.c.created_at >= since)
    return [int(i) for i in conn.execute(query).scalars()]


def recover_leases(conn: Connection, now: float, *, all_leases: bool = False) -> int:
    """Return deliveries whose worker died to ``pending``, noting the lost attempt.

    ``all_leases`` reclaims every in-flight row regardless of expiry; only
    safe when this process holds the store's exclusive lock (SQLite).
    """
    d = deliveries
    cond = d.c.state == DeliveryState.IN_FLIGHT.value
    if not all_leases:
        cond = and_(cond, d.c.lease_expires_at < now)
    lost = conn.execute(select(d.c.id, d.c.attempts).where(cond)).all()
    if not lost:
        return 0
    conn.execute(
        attempts.insert(),
        [
            {
                "delivery_id": row.id,
                "number": row.attempts,
                "trigger": "scheduled",
                "started_at": now,
                "duration_ms": 0.0,
                "status_code": None,
                "outcome": "abandoned",
                "error": "the worker stopped before this attempt finished; outcome unknown",
                "next_attempt_at": now,
            }
            for row in lost
        ],
    )
    conn.execute(
        update(d)
        .where(d.c.id.in_([row.id for row in lost]), d.c.state == DeliveryState.IN_FLIGHT.value)
        .values(
            state=DeliveryState.PENDING.value,
            next_attempt_at=now,
            lease_owner=None,
            lease_expires_at=None,
            outcome_unknown=True,
            updated_at=now,
        )
    )
    return len(lost)


def expire_overdue(conn: Connection, now: float, *, window: float, grace: float) -> int:
    """Expire retries whose window closed long ago (the daemon was down through it).

    Normally the final attempt at the window's end decides expiry; this is
    the safety net for deliveries that never got that final attempt.
    """
    d = deliveries
    result = conn.execute(
        update(d)
        .where(
            d.c.state == DeliveryState.RETRY_WAIT.value,
            d.c.first_failed_at.is_not(None),
            d.c.first_failed_at + window + grace < now,
        )
        .values(
            state=DeliveryState.EXPIRED.value,
            next_attempt_at=None,
            finished_at=now,
            updated_at=now,
        )
    )
    return int(result.rowcount or 0)


def purge_delivered(conn: Connection, before: float, *, limit: int = 5000) -> int:
    """Delete delivered rows older than ``before`` (and events left with no deliveries)."""
    d = deliveries
    ids = list(
        conn.execute(
            select(d.c.id)
            .where(d.c.state == DeliveryState.DELIVERED.value, d.c.finished_at < before)
            .limit(limit)
        ).scalars()
    )
    if not ids:
        return 0
    event_ids = set(conn.execute(select(d.c.event_id).where(d.c.id.in_(ids))).scalars())
    conn.execute(delete(attempts).where(attempts.c.delivery_id.in_(ids)))
    conn.execute(delete(d).where(d.c.id.in_(ids)))
    still_used = set(
        conn.execute(select(d.c.event_id).where(d.c.event_id.in_(event_ids))).scalars()
    )
    orphans = event_ids - still_used
    if orphans:
        conn.execute(delete(events).where(events.c.id.in_(orphans)))
    return len(ids)


def set_destination_status(
    conn: Connection,
    destination: str,
    *,
    paused_until: float | None,
    problem: str | None,
    now: float,
) -> None:
    upsert(
        conn,
        destination_status,
        {
            "destination": destination,
            "paused_until": paused_until,
            "problem": problem,
            "problem_at": now if problem else None,
            "updated_at": now,
        },
        ("destination",),
        ("paused_until", "problem", "problem_at", "updated_at"),
    )


def destination_statuses(conn: Connection) -> dict[str, dict[str, Any]]:
    return {
        row.destination: {
            "paused_until": row.paused_until,
            "problem": row.problem,
            "problem_at": row.problem_at,
        }
        for row in conn.execute(select(destination_status))
        if row.problem or row.paused_until
    }


def counts_by_state(conn: Connection) -> dict[str, dict[str, int]]:
    """{destination: {state: count}} with every state present."""
    out: dict[str, dict[str, int]] = defaultdict(lambda: {s.value: 0 for s in DeliveryState})
    rows = conn.execute(
        select(deliveries.c.destination, deliveries.c.state, func.count()).group_by(
            deliveries.c.destination, deliveries.c.state
        )
    )
    for dest, state, count in rows:
        out[dest][state] = int(count)
    return dict(out)


def oldest_pending_at(conn: Connection) -> float | None:
    value = conn.execute(
        select(func.min(deliveries.c.created_at)).where(
            deliveries.c.state.in_([s.value for s in ACTIVE_STATES])
        )
    ).scalar()
    return None if value is None else float(value)


def ids_of(rows: Iterable[Leased]) -> list[int]:
    return [r.delivery_id for r in rows]
