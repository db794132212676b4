"""Read-only questions the monitor asks the store: shared by the web UI, the JSON API and the CLI.

Every list is keyset-paginated on the delivery id (newest first), so page 10,000
costs what page 1 costs; an offset would make SQLite count its way there.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from typing import Any, Protocol

from sqlalchemy import Connection, Select, and_, false, func, or_, select, tuple_

from syncd.store.models import (
    ACTIVE_STATES,
    DeliveryState,
    attempts,
    audit,
    deliveries,
    events,
    links,
    resend_jobs,
)
from syncd.ticket import normalize_email, normalize_phone

#: What the UI and the API call the states; ``missing`` is the product's word for ``expired``.
STATE_ALIASES = {"missing": DeliveryState.EXPIRED.value, "retrying": DeliveryState.RETRY_WAIT.value}
ALL_STATES = tuple(s.value for s in DeliveryState)
MAX_PAGE = 500


def parse_time(value: str | float | None) -> float | None:
    """Epoch seconds from an ISO date/time (naive means UTC) or from a number."""
    if value is None or value == "":
        return None
    if isinstance(value, int | float):
        return float(value)
    text = value.strip()
    try:
        return float(text)
    except ValueError:
        pass
    try:
        moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError as exc:
        raise ValueError(f"not a date/time: {text!r} (use e.g. 2026-11-24T18:00)") from exc
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.timestamp()


def iso(ts: float | None) -> str | None:
    if ts is None:
        return None
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class MultiParams(Protocol):
    """A query string that may repeat a key (Starlette's ``QueryParams``)."""

    def __iter__(self) -> Iterator[str]: ...

    def getlist(self, key: str) -> list[str]: ...


@dataclass(frozen=True)
class EventFilter:
    """The filter of the events list; also what a resend by filter resends."""

    states: tuple[str, ...] = ()
    destination: str | None = None
    source: str | None = None
    ticket_id: str | None = None
    #: A client's e-mail or phone, in any spelling the intake would normalize.
    client: str | None = None
    #: A piece of the last error's text (case-insensitive).
    error: str | None = None
    since: float | None = None
    until: float | None = None
    event_id: int | None = None

    @classmethod
    def from_query(cls, params: Mapping[str, Any]) -> EventFilter:
        """Read the filter from URL query parameters (``state`` may repeat or be comma-joined)."""
        raw_states: list[str] = []
        value = params.get("state")
        if isinstance(value, list | tuple):
            raw_states = [str(v) for v in value]
        elif value:
            raw_states = [str(value)]
        states: list[str] = []
        for item in ",".join(raw_states).split(","):
            name = STATE_ALIASES.get(item.strip(), item.strip())
            if not name:
                continue
            if name not in ALL_STATES:
                raise ValueError(
                    f"unknown state {item.strip()!r}; use one of "
                    + ", ".join((*ALL_STATES, *STATE_ALIASES))
                )
            if name not in states:
                states.append(name)

        def text(key: str) -> str | None:
            v = params.get(key)
            if isinstance(v, list | tuple):
                v = v[0] if v else None
            return str(v).strip() or None if v is not None else None

        event_id = text("event_id")
        return cls(
            states=tuple(states),
            destination=text("destination"),
            source=text("source"),
            ticket_id=text("ticket"),
            client=text("client"),
            error=text("error"),
            since=parse_time(text("since")),
            until=parse_time(text("until")),
            event_id=int(event_id) if event_id and event_id.isdigit() else None,
        )

    @classmethod
    def from_url(cls, params: MultiParams) -> EventFilter:
        """From a URL's query string, where ``state`` may repeat and the last value wins."""
        return cls.from_query(
            {k: params.getlist(k) if k == "state" else params.getlist(k)[-1] for k in params}
        )

    def to_query(self) -> dict[str, str]:
        """The URL query that reproduces this filter (shareable links)."""
        out: dict[str, str] = {}
        if self.states:
            out["state"] = ",".join(self.states)
        for key, value in (
            ("destination", self.destination),
            ("source", self.source),
            ("ticket", self.ticket_id),
            ("client", self.client),
            ("error", self.error),
        ):
            if value:
                out[key] = value
        if self.since is not None:
            out["since"] = iso(self.since) or ""
        if self.until is not None:
            out["until"] = iso(self.until) or ""
        if self.event_id is not None:
            out["event_id"] = str(self.event_id)
        return out

    def describe(self) -> dict[str, Any]:
        """For the audit log: only what was set."""
        return {k: v for k, v in asdict(self).items() if v not in (None, ())}

    def is_empty(self) -> bool:
        return not self.describe()


def client_values(client: str) -> tuple[str | None, str | None]:
    """The e-mail and the phone a search string could be, normalized as intake stores them."""
    email = normalize_email(client) if "@" in client else None
    phone = None if "@" in client else normalize_phone(client)
    return email, phone


def _filtered(query: Select[Any], flt: EventFilter) -> Select[Any]:
    d, e = deliveries, events
    if flt.states:
        query = query.where(d.c.state.in_(flt.states))
    if flt.destination:
        query = query.where(d.c.destination == flt.destination)
    if flt.source:
        query = query.where(d.c.source == flt.source)
    if flt.event_id is not None:
        query = query.where(d.c.event_id == flt.event_id)
    if flt.ticket_id:
        query = query.where(e.c.ticket_id == flt.ticket_id)
    if flt.client:
        email, phone = client_values(flt.client)
        if email is None and phone is None:
            # Nothing the intake could have stored matches: say so with an empty result.
            return query.where(false())
        by = e.c.client_email == email if email else e.c.client_phone == phone
        # Later events of a ticket (a status change) may not repeat the client: match the ticket.
        tickets = select(e.c.source, e.c.ticket_id).where(by).distinct()
        query = query.where(tuple_(e.c.source, e.c.ticket_id).in_(tickets))
    if flt.error:
        # The IS NOT NULL lets the planner walk ix_deliveries_errored (only the rows that
        # have an error, in id order) instead of every delivery when the text is rare.
        query = query.where(d.c.last_error.is_not(None), d.c.last_error.ilike(f"%{flt.error}%"))
    if flt.since is not None:
        query = query.where(d.c.created_at >= flt.since)
    if flt.until is not None:
        query = query.where(d.c.created_at < flt.until)
    return query


@dataclass(frozen=True)
class Row:
    """One line of the events list: one event on its way to one destination."""

    delivery_id: int
    event_id: int
    destination: str
    source: str
    ticket_id: str
    kind: str
    state: str
    attempts: int
    received_at: float
    updated_at: float
    next_attempt_at: float | None
    last_error: str | None
    last_status_code: int | None
    client_email: str | None
    client_phone: str | None
    recovered_by_poll: bool

    def as_json(self) -> dict[str, Any]:
        out = asdict(self)
        for key in ("received_at", "updated_at", "next_attempt_at"):
            out[key] = iso(out[key])
        return out


@dataclass(frozen=True)
class Page:
    rows: list[Row]
    #: Pass as ``before`` for the next (older) page; None on the last page.
    next_cursor: int | None
    #: Pass as ``after`` for the previous (newer) page; None on the first page.
    prev_cursor: int | None


_ROW_COLUMNS = (
    deliveries.c.id,
    deliveries.c.event_id,
    deliveries.c.destination,
    deliveries.c.source,
    events.c.ticket_id,
    events.c.kind,
    deliveries.c.state,
    deliveries.c.attempts,
    deliveries.c.created_at,
    deliveries.c.updated_at,
    deliveries.c.next_attempt_at,
    deliveries.c.last_error,
    deliveries.c.last_status_code,
    events.c.client_email,
    events.c.client_phone,
    events.c.recovered_by_poll,
)


def _row(r: Any) -> Row:
    return Row(
        delivery_id=int(r[0]),
        event_id=int(r[1]),
        destination=r[2],
        source=r[3],
        ticket_id=r[4],
        kind=r[5],
        state=r[6],
        attempts=int(r[7]),
        received_at=float(r[8]),
        updated_at=float(r[9]),
        next_attempt_at=r[10],
        last_error=r[11],
        last_status_code=r[12],
        client_email=r[13],
        client_phone=r[14],
        recovered_by_poll=bool(r[15]),
    )


def _joined() -> Select[Any]:
    return select(*_ROW_COLUMNS).select_from(
        deliveries.join(events, events.c.id == deliveries.c.event_id)
    )


def _by_state(flt: EventFilter) -> list[EventFilter]:
    """The filter as one filter per state, when that is what keeps a page cheap.

    With only broad conditions (states, destination, source, time), one query per
    state reads each state's rows straight off an index in id order (``(state, id)``,
    ``(state, destination)``, ``(destination, source, state, id)``) and stops after a
    page; the pages are merged here. As one query, the database would have to pick
    between an index on the conditions and the id order, and SQLite (no statistics)
    picks the index and then sorts every matching row: half a million for one
    destination. A narrow condition (ticket, client, event, error) needs no help.
    """
    narrow = flt.ticket_id or flt.client or flt.event_id is not None or flt.error
    if narrow or len(flt.states) == 1:
        return [flt]
    if not flt.states and not flt.destination and not flt.source:
        return [flt]
    return [replace(flt, states=(s,)) for s in flt.states or ALL_STATES]


def _page_rows(
    conn: Connection, flt: EventFilter, cursor: Any, *, ascending: bool, limit: int
) -> list[Any]:
    d = deliveries
    rows: list[Any] = []
    for part in _by_state(flt):
        query = _filtered(_joined(), part)
        if cursor is not None:
            query = query.where(cursor)
        order = d.c.id.asc() if ascending else d.c.id.desc()
        rows.extend(conn.execute(query.order_by(order).limit(limit)))
    rows.sort(key=lambda r: int(r[0]), reverse=not ascending)
    return rows[:limit]


def list_deliveries(
    conn: Connection,
    flt: EventFilter,
    *,
    before: int | None = None,
    after: int | None = None,
    limit: int = 50,
) -> Page:
    """One page of the events list, newest first."""
    limit = max(1, min(limit, MAX_PAGE))
    d = deliveries
    if after is not None:
        rows = _page_rows(conn, flt, d.c.id > after, ascending=True, limit=limit + 1)
        more_newer = len(rows) > limit
        rows = rows[:limit][::-1]
        page = [_row(r) for r in rows]
        return Page(
            rows=page,
            next_cursor=page[-1].delivery_id if page else None,
            prev_cursor=page[0].delivery_id if page and more_newer else None,
        )
    cursor = d.c.id < before if before is not None else None
    rows = _page_rows(conn, flt, cursor, ascending=False, limit=limit + 1)
    page = [_row(r) for r in rows[:limit]]
    return Page(
        rows=page,
        next_cursor=page[-1].delivery_id if len(rows) > limit and page else None,
        prev_cursor=page[0].delivery_id if before is not None and page else None,
    )


def count_deliveries(conn: Connection, flt: EventFilter) -> int:
    query = _filtered(
        select(func.count()).select_from(
            deliveries.join(events, events.c.id == deliveries.c.event_id)
        ),
        flt,
    )
    return int(conn.execute(query).scalar() or 0)


def delivery_ids_after(
    conn: Connection, flt: EventFilter, *, after: int, upto: int | None, limit: int
) -> list[int]:
    """The next ``limit`` matching delivery ids above ``after``, oldest first."""
    d = deliveries
    query = _filtered(
        select(d.c.id).select_from(d.join(events, events.c.id == d.c.event_id)), flt
    ).where(d.c.id > after)
    if upto is not None:
        query = query.where(d.c.id <= upto)
    return [int(i) for i in conn.execute(query.order_by(d.c.id).limit(limit)).scalars()]


def iter_delivery_ids(
    conn: Connection, flt: EventFilter, *, chunk: int = 1000, upto: int | None = None
) -> Iterator[list[int]]:
    """Every matching delivery id, oldest first, in chunks (resend by filter walks this).

    ``upto`` freezes the set: deliveries that arrive while a resend runs are not part of it.
    """
    last = 0
    while ids := delivery_ids_after(conn, flt, after=last, upto=upto, limit=chunk):
        yield ids
        last = ids[-1]


def max_delivery_id(conn: Connection) -> int:
    return int(conn.execute(select(func.max(deliveries.c.id))).scalar() or 0)


# --- overview -----------------------------------------------------------------------


@dataclass
class Overview:
    #: {(destination, source): {state: count}} with every state present.
    counts: dict[tuple[str, str], dict[str, int]]
    totals: dict[str, int]
    #: 24 hourly buckets, oldest first: {"hour": epoch, "delivered": n, "failed": n, "expired": n}.
    hourly: list[dict[str, float]]
    oldest_pending_at: float | None
    #: Median seconds from receipt to delivery over the most recent deliveries (LAG_SAMPLE).
    lag_seconds: float | None
    generated_at: float = field(default_factory=time.time)


#: The lag is the median over the newest ``LAG_SAMPLE`` deliveries among the newest
#: ``LAG_WINDOW`` finished ones (failures in between do not count).
LAG_SAMPLE = 200
LAG_WINDOW = 1000


def overview(conn: Connection, now: float | None = None) -> Overview:
    now = time.time() if now is None else now
    d = deliveries
    counts: dict[tuple[str, str], dict[str, int]] = {}
    totals = {s: 0 for s in ALL_STATES}
    for dest, source, state, n in conn.execute(
        select(d.c.destination, d.c.source, d.c.state, func.count()).group_by(
            d.c.destination, d.c.source, d.c.state
        )
    ):
        bucket = counts.setdefault((dest, source), {s: 0 for s in ALL_STATES})
        bucket[state] = bucket.get(state, 0) + int(n)
        totals[state] = totals.get(state, 0) + int(n)

    start = (now // 3600) * 3600 - 23 * 3600
    hourly = [
        {"hour": start + i * 3600, "delivered": 0, "failed": 0, "expired": 0} for i in range(24)
    ]
    hour = func.floor((d.c.finished_at - start) / 3600)
    # No condition on the state here: with one, SQLite (no statistics) walks the state
    # index through every delivered row; without, the range on finished_at is read from
    # the covering ix_deliveries_finished, and other states are dropped below.
    for slot, state, n in conn.execute(
        select(hour, d.c.state, func.count())
        .where(d.c.finished_at >= start)
        .group_by(hour, d.c.state)
    ):
        i = int(slot)
        if 0 <= i < 24 and state in hourly[i]:
            hourly[i][state] = int(n)

    oldest = conn.execute(
        select(func.min(d.c.created_at)).where(d.c.state.in_([s.value for s in ACTIVE_STATES]))
    ).scalar()
    # The newest finished rows, newest first, straight off ix_deliveries_finished; the
    # delivered ones among them give the lag. (Asking for state = 'delivered' in SQL makes
    # SQLite sort every delivered row by finished_at first.)
    recent = [
        float(lag)
        for lag, state in conn.execute(
            select(d.c.finished_at - d.c.created_at, d.c.state)
            .where(d.c.finished_at.is_not(None))
            .order_by(d.c.finished_at.desc())
            .limit(LAG_WINDOW)
        )
        if state == DeliveryState.DELIVERED.value
    ][:LAG_SAMPLE]
    recent.sort()
    return Overview(
        counts=counts,
        totals=totals,
        hourly=hourly,
        oldest_pending_at=float(oldest) if oldest is not None else None,
        lag_seconds=recent[len(recent) // 2] if recent else None,
        generated_at=now,
    )


# --- one event, one ticket -----------------------------------------------------------


@dataclass(frozen=True)
class AttemptRow:
    number: int
    trigger: str
    started_at: float
    duration_ms: float
    status_code: int | None
    outcome: str
    error: str | None
    next_attempt_at: float | None


@dataclass(frozen=True)
class DeliveryDetail:
    id: int
    destination: str
    state: str
    attempts: int
    next_attempt_at: float | None
    first_failed_at: float | None
    last_error: str | None
    last_status_code: int | None
    created_at: float
    finished_at: float | None
    coalesced_into: int | None
    tries: list[AttemptRow]


@dataclass(frozen=True)
class EventDetail:
    id: int
    source: str
    ticket_id: str
    kind: str
    dedup_key: str | None
    received_at: float
    occurred_at: float | None
    recovered_by_poll: bool
    client_email: str | None
    client_phone: str | None
    payload: dict[str, Any]
    deliveries: list[DeliveryDetail]


def _attempts_of(conn: Connection, ids: list[int]) -> dict[int, list[AttemptRow]]:
    out: dict[int, list[AttemptRow]] = {i: [] for i in ids}
    if not ids:
        return out
    a = attempts
    for r in conn.execute(
        select(a).where(a.c.delivery_id.in_(ids)).order_by(a.c.delivery_id, a.c.number, a.c.id)
    ):
        out[int(r.delivery_id)].append(
            AttemptRow(
                number=int(r.number),
                trigger=r.trigger,
                started_at=float(r.started_at),
                duration_ms=float(r.duration_ms),
                status_code=r.status_code,
                outcome=r.outcome,
                error=r.error,
                next_attempt_at=r.next_attempt_at,
            )
        )
    return out


def _events_detail(conn: Connection, event_rows: list[Any]) -> list[EventDetail]:
    ids = [int(r.id) for r in event_rows]
    if not ids:
        return []
    d = deliveries
    drows = list(conn.execute(select(d).where(d.c.event_id.in_(ids)).order_by(d.c.id)))
    tries = _attempts_of(conn, [int(r.id) for r in drows])
    by_event: dict[int, list[DeliveryDetail]] = {i: [] for i in ids}
    for r in drows:
        by_event[int(r.event_id)].append(
            DeliveryDetail(
                id=int(r.id),
                destination=r.destination,
                state=r.state,
                attempts=int(r.attempts),
                next_attempt_at=r.next_attempt_at,
                first_failed_at=r.first_failed_at,
                last_error=r.last_error,
                last_status_code=r.last_status_code,
                created_at=float(r.created_at),
                finished_at=r.finished_at,
                coalesced_into=r.coalesced_into,
                tries=tries[int(r.id)],
            )
        )
    out = []
    for r in event_rows:
        try:
            payload = json.loads(r.payload)
        except ValueError:
            payload = {"unreadable": r.payload[:2000]}
        out.append(
            EventDetail(
                id=int(r.id),
                source=r.source,
                ticket_id=r.ticket_id,
                kind=r.kind,
                dedup_key=r.dedup_key,
                received_at=float(r.received_at),
                occurred_at=r.occurred_at,
                recovered_by_poll=bool(r.recovered_by_poll),
                client_email=r.client_email,
                client_phone=r.client_phone,
                payload=payload,
                deliveries=by_event[int(r.id)],
            )
        )
    return out


def event_detail(conn: Connection, event_id: int) -> EventDetail | None:
    row = conn.execute(select(events).where(events.c.id == event_id)).first()
    if row is None:
        return None
    return _events_detail(conn, [row])[0]


@dataclass(frozen=True)
class LinkRow:
    destination: str
    entity: str
    external_key: str
    crm_id: str | None
    url: str | None


@dataclass(frozen=True)
class TicketTrace:
    source: str
    ticket_id: str
    events: list[EventDetail]
    links: list[LinkRow]


#: A long-lived ticket is traced through its most recent events; older ones stay in the list.
TRACE_LIMIT = 500


def ticket_trace(
    conn: Connection, source: str, ticket_id: str, extra_keys: Mapping[str, list[tuple[str, str]]]
) -> TicketTrace | None:
    """Every event of one ticket, its deliveries and attempts, and where it landed in each CRM.

    ``extra_keys`` are ``{destination: [(entity, external_key)]}`` from the current
    plan: a contact made for an earlier ticket of the same client is found that way.
    """
    e = events
    rows = list(
        conn.execute(
            select(e)
            .where(e.c.source == source, e.c.ticket_id == ticket_id)
            .order_by(e.c.id.desc())
            .limit(TRACE_LIMIT)
        )
    )
    if not rows:
        return None
    detail = _events_detail(conn, rows[::-1])
    delivery_ids = [dd.id for ev in detail for dd in ev.deliveries]
    conditions = []
    if delivery_ids:
        conditions.append(links.c.delivery_id.in_(delivery_ids))
    for dest, keys in extra_keys.items():
        for entity, key in keys:
            conditions.append(
                and_(
                    links.c.destination == dest,
                    links.c.entity == entity,
                    links.c.external_key == key,
                )
            )
    found: dict[tuple[str, str, str], LinkRow] = {}
    if conditions:
        for r in conn.execute(
            select(links).where(or_(*conditions)).order_by(links.c.destination, links.c.id)
        ):
            if r.entity == "note":
                continue
            found[(r.destination, r.entity, r.external_key)] = LinkRow(
                destination=r.destination,
                entity=r.entity,
                external_key=r.external_key,
                crm_id=r.crm_id,
                url=r.url,
            )
    return TicketTrace(
        source=source, ticket_id=ticket_id, events=detail, links=list(found.values())
    )


# --- audit and resend jobs ---------------------------------------------------------


@dataclass(frozen=True)
class AuditRow:
    id: int
    at: float
    actor: str
    action: str
    outcome: str
    count: int | None
    detail: dict[str, Any]


def audit_log(conn: Connection, *, before: int | None = None, limit: int = 100) -> list[AuditRow]:
    query = select(audit).order_by(audit.c.id.desc()).limit(max(1, min(limit, MAX_PAGE)))
    if before is not None:
        query = query.where(audit.c.id < before)
    out = []
    for r in conn.execute(query):
        try:
            detail = json.loads(r.detail)
        except ValueError:
            detail = {"text": r.detail}
        out.append(
            AuditRow(
                id=int(r.id),
                at=float(r.at),
                actor=r.actor,
                action=r.action,
                outcome=r.outcome,
                count=r._mapping["count"],
                detail=detail,
            )
        )
    return out


@dataclass(frozen=True)
class ResendJobRow:
    id: int
    created_at: float
    actor: str
    filter: dict[str, Any]
    state: str
    total: int
    done: int
    error: str | None
    finished_at: float | None


def resend_job(conn: Connection, job_id: int) -> ResendJobRow | None:
    r = conn.execute(select(resend_jobs).where(resend_jobs.c.id == job_id)).first()
    if r is None:
        return None
    return ResendJobRow(
        id=int(r.id),
        created_at=float(r.created_at),
        actor=r.actor,
        filter=json.loads(r.filter),
        state=r.state,
        total=int(r.total),
        done=int(r.done),
        error=r.error,
        finished_at=r.finished_at,
    )
