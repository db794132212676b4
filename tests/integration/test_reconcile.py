"""The reconciler against a scripted poller and a real store."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from datetime import UTC, datetime

from sqlalchemy import select

from syncd.errors import RateLimited
from syncd.intake.base import PolledTicket, Poller, PollPage
from syncd.intake.reconcile import PollRunner, poll_states
from syncd.store.models import events
from syncd.ticket import Comment, EventKind, Status, TicketEvent

from .conftest import App

CONFIG = """
[sources.hd]
secret = "x-secret-value"

[destinations.crm]
kind = "rest"
base_url = "http://127.0.0.1:9"
"""

T1 = datetime(2026, 11, 25, 9, 0, tzinfo=UTC)
T2 = datetime(2026, 11, 25, 9, 5, tzinfo=UTC)


def state(ticket: str, at: datetime, status: Status = Status.OPEN) -> TicketEvent:
    return TicketEvent(
        source="hd", ticket_id=ticket, kind=EventKind.TICKET_UPDATED, status=status, occurred_at=at
    )


def comment(ticket: str, cid: str, at: datetime) -> TicketEvent:
    return TicketEvent(
        source="hd",
        ticket_id=ticket,
        kind=EventKind.COMMENT_ADDED,
        comment=Comment(id=cid, text=f"c{cid}"),
        occurred_at=at,
    )


class Scripted(Poller):
    interval = 60.0

    def __init__(self, pages: list[PollPage | Exception]) -> None:
        self.pages = pages
        self.cursors: list[str | None] = []

    async def fetch(self, cursor: str | None) -> PollPage:
        self.cursors.append(cursor)
        page = self.pages.pop(0)
        if isinstance(page, Exception):
            raise page
        return page


def stored(app: App) -> list[tuple[str, str, bool]]:
    with app.store.read_engine.connect() as conn:
        rows = conn.execute(
            select(events.c.ticket_id, events.c.kind, events.c.recovered_by_poll).order_by(
                events.c.id
            )
        )
        return [(r[0], r[1], bool(r[2])) for r in rows]


def test_missing_changes_are_recovered_and_known_ones_are_not(make_app: Callable[..., App]) -> None:
    app = make_app(CONFIG)
    # webhooks that did arrive: ticket 1's change at T1 and its comment c1
    asyncio.run(app.intake.store_events("hd", [state("1", T1), comment("1", "c1", T1)]))
    poller = Scripted(
        [
            PollPage(
                tickets=[
                    PolledTicket("1", T1, [state("1", T1), comment("1", "c1", T1)]),
                    PolledTicket("2", T2, [state("2", T2), comment("2", "c2", T2)]),
                ],
                cursor="page-2",
                done=False,
            ),
            PollPage(
                tickets=[
                    PolledTicket("1", T2, [state("1", T2, Status.SOLVED), comment("1", "c3", T2)])
                ],
                cursor="end",
                done=True,
            ),
        ]
    )
    runner = PollRunner(app.intake, "hd", poller)
    report = asyncio.run(runner.run_once())
    assert (report.pages, report.tickets, report.recovered, report.error) == (2, 3, 4, None)
    assert stored(app) == [
        ("1", "ticket_updated", False),
        ("1", "comment_added", False),
        ("2", "ticket_created", True),  # never heard of: created
        ("2", "comment_added", True),
        ("1", "ticket_updated", True),  # a later change of a known ticket
        ("1", "comment_added", True),
    ]
    assert poller.cursors == [None, "page-2"]

    # the next poll overlaps the last one: nothing is stored twice
    again = Scripted(
        [
            PollPage(
                tickets=[
                    PolledTicket("1", T2, [state("1", T2, Status.SOLVED), comment("1", "c3", T2)])
                ],
                cursor="end2",
                done=True,
            )
        ]
    )
    report = asyncio.run(PollRunner(app.intake, "hd", again).run_once())
    assert report.recovered == 0 and len(stored(app)) == 6
    assert again.cursors == ["end"]
    with app.store.read_engine.connect() as conn:
        st = poll_states(conn)["hd"]
    assert st["recovered_events"] == 4 and st["polled_tickets"] == 4 and st["last_error"] is None


def test_poll_errors_back_off_and_are_visible(make_app: Callable[..., App]) -> None:
    app = make_app(CONFIG)
    now = [1_000_000.0]
    poller = Scripted(
        [
            RateLimited("HTTP 429: too many", status_code=429, retry_after=120),
            PollPage([], "c", True),
        ]
    )
    runner = PollRunner(app.intake, "hd", poller, clock=lambda: now[0])
    report = asyncio.run(runner.run_once())
    assert report.error and "429" in report.error
    with app.store.read_engine.connect() as conn:
        st = poll_states(conn)["hd"]
    assert st["consecutive_failures"] == 1 and st["next_poll_at"] == now[0] + 120
    assert "too many" in str(st["last_error"])
    now[0] += 60
    assert asyncio.run(runner.run_once()).skipped  # still backing off
    now[0] += 61
    report = asyncio.run(runner.run_once())
    assert not report.skipped and report.error is None
    with app.store.read_engine.connect() as conn:
        st = poll_states(conn)["hd"]
    assert (
        st["consecutive_failures"] == 0 and st["next_poll_at"] is None and st["last_error"] is None
    )


def test_repeated_failures_grow_the_wait(make_app: Callable[..., App]) -> None:
    app = make_app(CONFIG)
    now = [0.0]
    poller = Scripted([RateLimited("down"), RateLimited("down"), RateLimited("down")])
    runner = PollRunner(app.intake, "hd", poller, clock=lambda: now[0])
    waits = []
    for _ in range(3):
        asyncio.run(runner.run_once(force=True))
        with app.store.read_engine.connect() as conn:
            waits.append(float(poll_states(conn)["hd"]["next_poll_at"]) - now[0])  # type: ignore[arg-type]
    assert waits == [60.0, 120.0, 240.0]
