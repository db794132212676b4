"""The outbox state machine, as SQL. Every function takes an open connection.

    pending ──lease──▶ in_flight ──ok──▶ delivered
       ▲                  │ ├─retriable──▶ retry_wait ──due──▶ (leased again)
       │                  │ ├─permanent──▶ failed
       └──lease expired───┘ └─window shut─▶ expired

    pending (folded into a carrier) ──carrier delivered──▶ coalesced

A delivery is leasable when ``next_attempt_at`` is due and no older delivery
of the same (destination, ordering_key) is still active, so one ticket's
events reach the CRM in order while other tickets flow past a ticket that
is waiting on a retry.

Coalescing: when the head of a ticket's queue is leased for its first attempt,
the pending deliveries waiting right behind it may be *folded* into it (up to
``coalesce_max`` in all). They stay ``pending`` with ``coalesced_into`` set to
the head (the *carrier*), and ordering keeps them from being leased on their
own. The carrier sends all of their changes in one go. Only when it is
delivered do they become ``coalesced``, each with an attempt row naming the
carrier. If the carrier fails or expires they are released (``coalesced_into``
cleared) and go out on their own later; a retry or a lost lease keeps the fold,
so every attempt of a carrier sends the same set.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass, replace
from functools import cache
from typing import Any

from sqlalchemy import Connection, and_, bindparam, delete, func, select, update

from syncd.events import IncomingEvent
from syncd.store.dialect import (
    fetch,
    ids_in_values_order,
    in_list,
    run,
    run_many,
    skip_locked,
    upsert,
)
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
class Folded:
    """A later event of the leased delivery's ticket, carried along with it."""

    delivery_id: int
    event_id: int
    kind: str
    payload: dict[str, Any]


@dataclass(frozen=True)
class _Waiting:
    id: int
    destination: str
    ordering_key: str
    state: str
    attempts: int
    outcome_unknown: bool
    coalesced_into: int | None


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
    #: Deliveries folded into this one (oldest first); its send carries their changes.
    folded: tuple[Folded, ...] = ()
    ordering_key: str = ""


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
    #: Deliveries this attempt carried (see :class:`Folded`).
    folded: tuple[int, ...] = ()
    #: Release the folded deliveries even though this one will be retried.
    unfold: bool = False

    @property
    def label(self) -> str:
        """What the attempt row and the log line call this outcome."""
        return {
            DeliveryState.DELIVERED: "delivered",
            DeliveryState.RETRY_WAIT: "retry_scheduled",
            DeliveryState.FAILED: "failed",
            DeliveryState.EXPIRED: "expired",
            DeliveryState.COALESCED: "coalesced",
        }.get(self.state, str(self.state))


# --- the hot paths, as prebuilt SQL (see syncd.store.dialect.fetch) --------------------------

_ACTIVE = "('pending', 'in_flight', 'retry_wait')"

_EVENT_COLUMNS = (
    "source, ticket_id, kind, dedup_key, payload, received_at, occurred_at,"
    " recovered_by_poll, client_email, client_phone"
)
_EVENT_ROW = "(?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
_DELIVERY_COLUMNS = (
    "event_id, destination, source, ordering_key, state, attempts,"
    " next_attempt_at, outcome_unknown, created_at, updated_at"
)
_DELIVERY_ROW = "(?, ?, ?, ?, 'pending', 0, ?, FALSE, ?, ?)"


@cache
def _insert_events(rows: int) -> str:
    return (
        f"INSERT INTO events ({_EVENT_COLUMNS}) VALUES "
        + ", ".join([_EVENT_ROW] * rows)
        + " ON CONFLICT (source, dedup_key) DO NOTHING"
    )


@cache
def _insert_deliveries(rows: int) -> str:
    return f"INSERT INTO deliveries ({_DELIVERY_COLUMNS}) VALUES " + ", ".join(
        [_DELIVERY_ROW] * rows
    )


_INSERT_EVENT = _insert_events(1) + " RETURNING id"
_EXISTING_EVENT = "SELECT id FROM events WHERE source = ? AND dedup_key = ?"
_INSERT_DELIVERY = _insert_deliveries(1)
#: Due deliveries that head their ticket's queue: no older one of the same
#: (destination, ordering_key) is still active.
_PICK = (
    "SELECT d.id FROM deliveries d WHERE d.next_attempt_at <= ?{exclude}"
    " AND NOT EXISTS (SELECT 1 FROM deliveries e WHERE e.destination = d.destination"
    " AND e.ordering_key = d.ordering_key AND e.id < d.id AND e.state IN " + _ACTIVE + ")"
    " ORDER BY d.next_attempt_at, d.id LIMIT ?{lock}"
)
_CLAIM = (
    "UPDATE deliveries SET state = 'in_flight', attempts = attempts + 1,"
    " next_attempt_at = NULL, lease_owner = ?, lease_expires_at = ?, coalesced_into = NULL,"
    " updated_at = ? WHERE id IN {ids} AND next_attempt_at IS NOT NULL"
)
_CLAIMED = (
    "SELECT d.id, d.event_id, d.destination, d.ordering_key, d.attempts, d.first_failed_at,"
    " d.outcome_unknown, e.source, e.ticket_id, e.kind, e.payload"
    " FROM deliveries d JOIN events e ON e.id = d.event_id"
    " WHERE d.id IN {ids} AND d.lease_owner = ? ORDER BY d.id"
)
#: The first ``most`` waiting deliveries of each of these tickets, by id.
_BEHIND = (
    "SELECT id, destination, ordering_key, state, attempts, outcome_unknown, coalesced_into"
    " FROM (SELECT id, destination, ordering_key, state, attempts, outcome_unknown,"
    " coalesced_into, ROW_NUMBER() OVER (PARTITION BY destination, ordering_key ORDER BY id)"
    " AS place FROM deliveries WHERE destination IN {dests} AND ordering_key IN {keys}"
    " AND id > ? AND state IN ('pending', 'retry_wait')) ranked"
    " WHERE place <= ? ORDER BY id"
)
_FOLDED = (
    "SELECT d.id, d.event_id, e.kind, e.payload FROM deliveries d"
    " JOIN events e ON e.id = d.event_id WHERE d.id IN {ids}"
)
_INSERT_ATTEMPT = (
    'INSERT INTO attempts (delivery_id, number, "trigger", started_at, duration_ms,'
    " status_code, outcome, error, next_attempt_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)"
)
#: Lands only while the reporter still holds the lease.
_FINISH = (
    "UPDATE deliveries SET state = ?, next_attempt_at = ?, first_failed_at = ?, last_error = ?,"
    " last_status_code = ?, finished_at = ?, outcome_unknown = FALSE, lease_owner = NULL,"
    " lease_expires_at = NULL, updated_at = ? WHERE id = ? AND lease_owner = ?"
    " AND state = 'in_flight'"
)
_FINISHED = (DeliveryState.DELIVERED, DeliveryState.FAILED, DeliveryState.EXPIRED)


def ordering_key(source: str, ticket_id: str) -> str:
    return f"{source}:{ticket_id}"


def enqueue(conn: Connection, event: IncomingEvent, now: float) -> Enqueued:
    """Store an event and one pending delivery per destination, unless already stored.

    One statement whether the event is new or seen before (a NULL ``dedup_key``
    never conflicts), and safe against a replica storing the same event at once.
    """
    inserted = fetch(conn, _INSERT_EVENT, _event_values(event, now))
    if not inserted:
        [(existing,)] = fetch(conn, _EXISTING_EVENT, (event.source, event.dedup_key))
        return Enqueued(event_id=int(existing), deliveries=0, duplicate=True)
    event_id = int(inserted[0][0])
    key = ordering_key(event.source, event.ticket_id)
    rows = [(event_id, dest, event.source, key, now, now, now) for dest in event.destinations]
    if len(rows) == 1:
        run(conn, _INSERT_DELIVERY, rows[0])
    else:
        run_many(conn, _INSERT_DELIVERY, rows)
    return Enqueued(event_id=event_id, deliveries=len(rows))


#: Rows per multi-row INSERT: a batch is cut into these sizes, largest first, so the
#: driver's statement cache holds every shape and 64 rows stay far below any
#: parameter limit (10 per event).
_CHUNKS = (64, 32, 16, 8, 4, 2, 1)
_MAX_ROWID = 2**63 - 1


def _chunks(count: int) -> list[tuple[int, int]]:
    """(start, size) pieces of ``count`` rows, each size one of ``_CHUNKS``."""
    pieces, start = [], 0
    for size in _CHUNKS:
        while count - start >= size:
            pieces.append((start, size))
            start += size
    return pieces


def _event_values(event: IncomingEvent, now: float) -> tuple[Any, ...]:
    payload = json.dumps(event.payload, ensure_ascii=False, separators=(",", ":"))
    return (
        event.source,
        event.ticket_id,
        event.kind,
        event.dedup_key,
        payload,
        now,
        event.occurred_at,
        event.recovered_by_poll,
        event.client_email,
        event.client_phone,
    )


def enqueue_many(conn: Connection, items: Sequence[tuple[IncomingEvent, float]]) -> list[Enqueued]:
    """:func:`enqueue` for many events (each with its receive time), in a few statements.

    Why: the writer thread gives up the GIL on every statement and may wait for the
    event loop to hand it back, so under load the number of statements per commit,
    not the SQL, sets how long intake waits. On SQLite this writes a whole batch with
    one look at the newest id, one multi-row insert per chunk of events and one per
    chunk of deliveries. A batch in which any event was stored before (or repeats
    another) takes the one-by-one path, which handles duplicates exactly; so does
    PostgreSQL, where other replicas take ids from the same sequence meanwhile.
    """

    def one_by_one() -> list[Enqueued]:
        return [enqueue(conn, event, now) for event, now in items]

    keys = [(e.source, e.dedup_key) for e, _ in items if e.dedup_key is not None]
    if not ids_in_values_order(conn) or len(items) < 2 or len(set(keys)) != len(keys):
        return one_by_one()
    # No one else inserts until commit, and each new row gets the largest id so far
    # plus one, in the order of the VALUES (see ids_in_values_order); checked below.
    [(newest,)] = fetch(conn, "SELECT coalesce(max(id), 0) FROM events")
    if int(newest) + len(items) >= _MAX_ROWID:
        return one_by_one()
    values = [_event_values(event, now) for event, now in items]
    stored = 0
    for start, size in _chunks(len(values)):
        flat = [v for row in values[start : start + size] for v in row]
        stored += run(conn, _insert_events(size), flat)
    [(last,)] = fetch(conn, "SELECT max(id) FROM events")
    if stored != len(values) or int(last) != int(newest) + len(values):
        # Some were stored before (or ids were not handed out as expected):
        # undo this batch's rows and go one by one.
        run(conn, "DELETE FROM events WHERE id > ?", (int(newest),))
        return one_by_one()
    result: list[Enqueued] = []
    rows: list[tuple[Any, ...]] = []
    for offset, (event, now) in enumerate(items):
        event_id = int(newest) + 1 + offset
        key = ordering_key(event.source, event.ticket_id)
        rows.extend((event_id, d, event.source, key, now, now, now) for d in event.destinations)
        result.append(Enqueued(event_id=event_id, deliveries=len(event.destinations)))
    for start, size in _chunks(len(rows)):
        run(conn, _insert_deliveries(size), [v for row in rows[start : start + size] for v in row])
    return result


def lease(
    conn: Connection,
    *,
    owner: str,
    now: float,
    lease_seconds: float,
    limit: int,
    exclude: Collection[str] = (),
    coalesce_max: int = 1,
) -> list[Leased]:
    """Claim up to ``limit`` due deliveries that head their ticket's queue.

    With ``coalesce_max`` > 1, each may carry pending deliveries of its ticket
    (up to ``coalesce_max`` events in all; see the module docstring).
    """
    exclude_sql, exclude_params = "", list[str]()
    if exclude:
        # Destinations whose circuit breaker is open wait; the others flow past them.
        marks_sql, exclude_params = in_list(sorted(exclude))
        exclude_sql = f" AND d.destination NOT IN {marks_sql}"
    pick = _PICK.format(exclude=exclude_sql, lock=skip_locked(conn, "d"))
    ids = [r[0] for r in fetch(conn, pick, (now, *exclude_params, limit))]
    if not ids:
        return []
    marks_sql, id_params = in_list(ids)
    run(conn, _CLAIM.format(ids=marks_sql), (owner, now + lease_seconds, now, *id_params))
    rows = fetch(conn, _CLAIMED.format(ids=marks_sql), (*id_params, owner))
    heads = [
        Leased(
            delivery_id=did,
            event_id=event_id,
            destination=dest,
            attempt=tries,
            first_failed_at=first_failed_at,
            outcome_unknown=bool(unknown),
            source=source,
            ticket_id=ticket_id,
            kind=kind,
            payload=json.loads(payload),
            ordering_key=okey,
        )
        for (
            did,
            event_id,
            dest,
            okey,
            tries,
            first_failed_at,
            unknown,
            source,
            ticket_id,
            kind,
            payload,
        ) in rows
    ]
    if coalesce_max > 1:
        heads = _fold(conn, heads, most=coalesce_max - 1)
    return heads


def _fold(conn: Connection, heads: list[Leased], *, most: int) -> list[Leased]:
    """Attach to each leased head the waiting deliveries of its ticket that it carries.

    A head on its first attempt takes the unbroken run of fresh pending
    deliveries right behind it (up to ``most``) and marks them with
    ``coalesced_into``. A head tried before carries exactly what it already
    marked, so every attempt of a carrier sends the same operations under the
    same idempotency keys.
    """
    d = deliveries
    dests_sql, dests = in_list(sorted({h.destination for h in heads}))
    keys_sql, keys = in_list(sorted({h.ordering_key for h in heads}))
    behind: dict[tuple[str, str], list[_Waiting]] = defaultdict(list)
    for row in fetch(
        conn,
        _BEHIND.format(dests=dests_sql, keys=keys_sql),
        (*dests, *keys, min(h.delivery_id for h in heads), most),
    ):
        waiting = _Waiting(*row)
        behind[(waiting.destination, waiting.ordering_key)].append(waiting)
    if not behind:
        return heads

    claims: list[dict[str, int]] = []
    carried: dict[int, list[int]] = {}
    for head in heads:
        fresh = head.attempt == 1 and not head.outcome_unknown
        ids: list[int] = []
        for r in behind.get((head.destination, head.ordering_key), ()):
            if r.id < head.delivery_id:
                continue
            ours = r.coalesced_into == head.delivery_id
            free = fresh and r.coalesced_into is None
            usable = r.state == DeliveryState.PENDING.value and r.attempts == 0
            if not usable or r.outcome_unknown or not (ours or free):
                break  # the run ends: what follows waits for its own turn
            ids.append(r.id)
            if not ours:
                claims.append({"b_id": r.id, "b_into": head.delivery_id})
        if ids:
            carried[head.delivery_id] = ids
    if not carried:
        return heads
    if claims:
        conn.execute(
            update(d)
            .where(
                d.c.id == bindparam("b_id"),
                d.c.state == DeliveryState.PENDING.value,
                d.c.coalesced_into.is_(None),
            )
            .values(coalesced_into=bindparam("b_into"))
            .execution_options(synchronize_session=False),
            claims,
        )
    ids_sql, all_ids = in_list([i for ids in carried.values() for i in ids])
    found = {
        did: Folded(delivery_id=did, event_id=event_id, kind=kind, payload=json.loads(payload))
        for did, event_id, kind, payload in fetch(conn, _FOLDED.format(ids=ids_sql), all_ids)
    }
    return [
        replace(h, folded=tuple(found[i] for i in carried[h.delivery_id] if i in found))
        if h.delivery_id in carried
        else h
        for h in heads
    ]


def complete(conn: Connection, outcomes: Sequence[Outcome], now: float) -> int:
    """Record attempt outcomes. Returns how many deliveries were still ours to update.

    An update only lands while the lease is still held by the reporter, so a
    worker whose lease ran out cannot overwrite its successor's result.
    """
    if not outcomes:
        return 0
    run_many(
        conn,
        _INSERT_ATTEMPT,
        [
            (
                o.delivery_id,
                o.attempt,
                o.trigger,
                o.started_at,
                o.duration_ms,
                o.status_code,
                o.label,
                o.error,
                o.next_attempt_at,
            )
            for o in outcomes
        ],
    )
    params = [
        (
            o.state.value,
            o.next_attempt_at if o.state == DeliveryState.RETRY_WAIT else None,
            o.first_failed_at,
            o.error,
            o.status_code,
            now if o.state in _FINISHED else None,
            now,
            o.delivery_id,
            o.lease_owner,
        )
        for o in outcomes
    ]
    plain = [p for p, o in zip(params, outcomes, strict=True) if not o.folded]
    landed = run_many(conn, _FINISH, plain)
    for p, o in zip(params, outcomes, strict=True):
        # One at a time: what happens to the folded rows depends on this one landing.
        if o.folded and run(conn, _FINISH, p):
            landed += 1
            _settle_folded(conn, o, now)
    return landed


def _settle_folded(conn: Connection, carrier: Outcome, now: float) -> None:
    """The carrier's attempt is recorded; now its folded deliveries follow it."""
    d = deliveries
    reserved = and_(
        d.c.coalesced_into == carrier.delivery_id, d.c.state == DeliveryState.PENDING.value
    )
    if carrier.state == DeliveryState.DELIVERED:
        rows = conn.execute(
            select(d.c.id, d.c.attempts).where(reserved, d.c.id.in_(carrier.folded))
        ).all()
        if not rows:
            return
        conn.execute(
            update(d)
            .where(reserved, d.c.id.in_([r.id for r in rows]))
            .values(
                state=DeliveryState.COALESCED.value,
                attempts=d.c.attempts + 1,
                next_attempt_at=None,
                last_error=None,
                last_status_code=carrier.status_code,
                finished_at=now,
                updated_at=now,
            )
        )
        note = f"carried by delivery {carrier.delivery_id} (its attempt {carrier.attempt})"
        conn.execute(
            attempts.insert(),
            [
                {
                    "delivery_id": r.id,
                    "number": r.attempts + 1,
                    "trigger": carrier.trigger,
                    "started_at": carrier.started_at,
                    "duration_ms": carrier.duration_ms,
                    "status_code": carrier.status_code,
                    "outcome": "coalesced",
                    "error": note,
                    "next_attempt_at": None,
                }
                for r in rows
            ],
        )
    elif carrier.state != DeliveryState.RETRY_WAIT or carrier.unfold:
        why = {
            DeliveryState.FAILED: "failed",
            DeliveryState.EXPIRED: "expired",
        }.get(carrier.state, "was refused and is tried again on its own")
        _release_folded(conn, [carrier.delivery_id], now, why)


def _release_folded(conn: Connection, carriers: Sequence[int], now: float, why: str) -> int:
    """Return the deliveries folded into ``carriers`` to the queue, to go out on their own."""
    d = deliveries
    result = conn.execute(
        update(d)
        .where(d.c.coalesced_into.in_(list(carriers)), d.c.state == DeliveryState.PENDING.value)
        .values(
            coalesced_into=None,
            last_error=f"returned to the queue: the delivery that carried it {why}",
            updated_at=now,
        )
    )
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


def renew_leases(
    conn: Connection, ids: Collection[int], *, owner: str, now: float, lease_seconds: float
) -> int:
    """Extend the leases of deliveries ``owner`` is still working on: alive, only slow.

    A delivery may wait for a CRM's rate limit longer than its lease (more so
    with several replicas sharing the limit). Without renewal its lease would
    run out mid-send, and recovery would hand it to another worker, which
    would send it again. Only ``ids`` are renewed: a delivery whose outcome
    could not be written (the database was away) is no longer worked on, and
    its lease must run out so that recovery hands it out again. A worker that
    dies stops renewing, so its leases run out within ``lease_seconds``.
    """
    if not ids:
        return 0
    d = deliveries
    result = conn.execute(
        update(d)
        .where(
            d.c.id.in_(sorted(ids)),
            d.c.state == DeliveryState.IN_FLIGHT.value,
            d.c.lease_owner == owner,
        )
        .values(lease_expires_at=now + lease_seconds)
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
            coalesced_into=None,
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
    overdue = and_(
        d.c.state == DeliveryState.RETRY_WAIT.value,
        d.c.first_failed_at.is_not(None),
        d.c.first_failed_at + window + grace < now,
    )
    ids = list(conn.execute(select(d.c.id).where(overdue)).scalars())
    if not ids:
        return 0
    result = conn.execute(
        update(d)
        .where(d.c.id.in_(ids), overdue)
        .values(
            state=DeliveryState.EXPIRED.value,
            next_attempt_at=None,
            finished_at=now,
            updated_at=now,
        )
    )
    _release_folded(conn, ids, now, "expired")
    return int(result.rowcount or 0)


def purge_delivered(conn: Connection, before: float, *, limit: int = 5000) -> int:
    """Delete delivered (and coalesced) rows older than ``before``, and orphaned events."""
    d = deliveries
    done = [DeliveryState.DELIVERED.value, DeliveryState.COALESCED.value]
    ids = list(
        conn.execute(
            select(d.c.id).where(d.c.state.in_(done), d.c.finished_at < before).limit(limit)
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
