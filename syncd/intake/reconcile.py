"""The reconciler: polls a helpdesk and stores the changes whose webhooks never arrived.

Webhooks are fast but get lost (Usedesk documents no retries; Zendesk pauses
failing endpoints). For each ticket the helpdesk reports as changed, the
reconciler compares the change time with the newest event syncd holds for
that ticket; a change it never heard of becomes an event marked
``recovered_by_poll``. Comments are matched by their dedup key and by their
comment id, so a comment that did arrive by webhook is not stored twice, even
when the webhook was keyed differently (say, by an older version of syncd).
Polling errors back off and are recorded in ``poll_state``; they never stop
the daemon.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import structlog
from sqlalchemy import Connection, func, select, update

from syncd.errors import DeliveryError
from syncd.intake.base import PolledTicket, Poller
from syncd.intake.service import Intake
from syncd.logs import redactor
from syncd.store.models import events, poll_state
from syncd.ticket import EventKind, TicketEvent

log = structlog.get_logger("syncd.poller")

#: Two change times closer than this are the same change (sources round to the second).
_SAME_CHANGE_SECONDS = 1.0
_MAX_BACKOFF_SECONDS = 3600.0


@dataclass(frozen=True)
class PollReport:
    source: str
    pages: int = 0
    tickets: int = 0
    recovered: int = 0
    skipped: bool = False
    error: str | None = None


def _ensure_state(conn: Connection, source: str) -> None:
    exists = conn.execute(select(poll_state.c.source).where(poll_state.c.source == source)).first()
    if exists is None:
        conn.execute(
            poll_state.insert().values(
                source=source, consecutive_failures=0, polled_tickets=0, recovered_events=0
            )
        )


def _load(conn: Connection, source: str) -> tuple[str | None, float | None, int]:
    _ensure_state(conn, source)
    row = conn.execute(select(poll_state).where(poll_state.c.source == source)).one()
    return row.cursor, row.next_poll_at, int(row.consecutive_failures)


@dataclass(frozen=True)
class Known:
    """What syncd already holds about one ticket."""

    seen: bool
    newest: float | None = None
    #: The status of the most recent event that carried one.
    status: str | None = None
    #: The ids of the comments held for the ticket (read only when asked for).
    comment_ids: frozenset[str] = frozenset()


def _comment_ids(conn: Connection, source: str, ticket_id: str) -> frozenset[str]:
    payloads = conn.execute(
        select(events.c.payload).where(
            events.c.source == source,
            events.c.ticket_id == ticket_id,
            events.c.kind.in_([EventKind.COMMENT_ADDED.value, EventKind.TICKET_CREATED.value]),
        )
    ).scalars()
    ids = set()
    for payload in payloads:
        comment = json.loads(payload).get("comment")
        if isinstance(comment, dict) and comment.get("id"):
            ids.add(str(comment["id"]))
    return frozenset(ids)


def _known(conn: Connection, source: str, ticket_id: str, *, comments: bool = False) -> Known:
    row = conn.execute(
        select(func.count(), func.max(events.c.occurred_at)).where(
            events.c.source == source, events.c.ticket_id == ticket_id
        )
    ).one()
    if not row[0]:
        return Known(seen=False)
    status = None
    recent = conn.execute(
        select(events.c.payload)
        .where(events.c.source == source, events.c.ticket_id == ticket_id)
        .order_by(events.c.occurred_at.desc(), events.c.id.desc())
        .limit(20)
    ).scalars()
    for payload in recent:
        status = json.loads(payload).get("status")
        if status is not None:
            break
    return Known(
        seen=True,
        newest=None if row[1] is None else float(row[1]),
        status=status,
        comment_ids=_comment_ids(conn, source, ticket_id) if comments else frozenset(),
    )


class PollRunner:
    def __init__(
        self,
        intake: Intake,
        source: str,
        poller: Poller,
        *,
        max_pages: int = 20,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.intake = intake
        self.store = intake.store
        self.source = source
        self.poller = poller
        self.max_pages = max_pages
        self.clock = clock

    async def run_once(self, *, force: bool = False) -> PollReport:
        cursor, next_poll_at, failures = await self.store.writer.run(
            lambda conn: _load(conn, self.source)
        )
        now = self.clock()
        if not force and next_poll_at is not None and now < next_poll_at:
            return PollReport(self.source, skipped=True)
        pages = tickets = recovered = 0
        try:
            while pages < self.max_pages:
                page = await self.poller.fetch(cursor)
                pages += 1
                page_recovered = 0
                for ticket in page.tickets:
                    page_recovered += await self._reconcile(ticket)
                tickets += len(page.tickets)
                recovered += page_recovered
                if page.cursor is not None:
                    cursor = page.cursor
                await self.store.writer.run(
                    partial(
                        self._save_page,
                        cursor=cursor,
                        tickets=len(page.tickets),
                        recovered=page_recovered,
                    )
                )
                if page.done:
                    break
        except DeliveryError as exc:
            return await self._failed(exc, failures + 1, pages, tickets, recovered)
        await self.store.writer.run(lambda conn: self._save_success(conn))
        if recovered:
            log.warning("webhooks_missed", source=self.source, recovered=recovered, tickets=tickets)
        else:
            log.debug("poll_done", source=self.source, tickets=tickets, pages=pages)
        return PollReport(self.source, pages=pages, tickets=tickets, recovered=recovered)

    async def _reconcile(self, ticket: PolledTicket) -> int:
        comments = any(e.kind == EventKind.COMMENT_ADDED for e in ticket.events)
        known = await self.store.read(
            lambda conn: _known(conn, self.source, ticket.ticket_id, comments=comments)
        )
        changed_at = ticket.updated_at.timestamp()
        candidates: list[TicketEvent] = []
        for event in ticket.events:
            if event.kind == EventKind.COMMENT_ADDED:
                if event.comment is None or event.comment.id not in known.comment_ids:
                    candidates.append(event.model_copy(update={"recovered_by_poll": True}))
                continue
            same_status = event.status is None or event.status.value == known.status
            if (
                known.newest is not None
                and known.newest >= changed_at - _SAME_CHANGE_SECONDS
                and same_status
            ):
                continue  # a webhook told us about this change (or a later one)
            update: dict[str, object] = {
                "kind": EventKind.TICKET_UPDATED if known.seen else EventKind.TICKET_CREATED,
                "recovered_by_poll": True,
                "occurred_at": ticket.updated_at,
            }
            if known.seen:
                # The first message rides on the state event only for a ticket never seen.
                update["comment"] = None
            candidates.append(event.model_copy(update=update))
        if not candidates:
            return 0
        accepted = await self.intake.store_events(self.source, candidates)
        return len(candidates) - accepted.duplicates

    def _save_page(
        self, conn: Connection, *, cursor: str | None, tickets: int, recovered: int
    ) -> None:
        conn.execute(
            update(poll_state)
            .where(poll_state.c.source == self.source)
            .values(
                cursor=cursor,
                last_poll_at=self.clock(),
                polled_tickets=poll_state.c.polled_tickets + tickets,
                recovered_events=poll_state.c.recovered_events + recovered,
            )
        )

    def _save_success(self, conn: Connection) -> None:
        now = self.clock()
        conn.execute(
            update(poll_state)
            .where(poll_state.c.source == self.source)
            .values(
                last_poll_at=now,
                last_success_at=now,
                last_error=None,
                consecutive_failures=0,
                next_poll_at=None,
            )
        )

    async def _failed(
        self, exc: DeliveryError, failures: int, pages: int, tickets: int, recovered: int
    ) -> PollReport:
        base = max(self.poller.interval, 1.0)
        delay = min(base * 2 ** (failures - 1), _MAX_BACKOFF_SECONDS)
        if exc.retry_after is not None:
            delay = max(delay, exc.retry_after)
        now = self.clock()
        text = redactor.clean(str(exc))

        def _save(conn: Connection) -> None:
            conn.execute(
                update(poll_state)
                .where(poll_state.c.source == self.source)
                .values(
                    last_poll_at=now,
                    last_error=text,
                    consecutive_failures=failures,
                    next_poll_at=now + delay,
                )
            )

        await self.store.writer.run(_save)
        log.warning(
            "poll_failed",
            source=self.source,
            error=text,
            consecutive_failures=failures,
            next_poll_in_s=round(delay, 1),
        )
        return PollReport(self.source, pages, tickets, recovered, error=text)


def poll_states(conn: Connection) -> dict[str, dict[str, object]]:
    """Everything the monitor shows about pollers, per source."""
    out: dict[str, dict[str, object]] = {}
    for row in conn.execute(select(poll_state)):
        out[row.source] = {
            "last_poll_at": row.last_poll_at,
            "last_success_at": row.last_success_at,
            "last_error": row.last_error,
            "consecutive_failures": row.consecutive_failures,
            "next_poll_at": row.next_poll_at,
            "polled_tickets": row.polled_tickets,
            "recovered_events": row.recovered_events,
        }
    return out
