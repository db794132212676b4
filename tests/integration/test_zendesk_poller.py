"""The Zendesk poller against the emulated ticket export, over real HTTP."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import pytest
from sqlalchemy import select

from syncd.emulators.serving import ServerThread, free_port
from syncd.emulators.zendesk_api import SignedWebhook, ZendeskState, create_zendesk_api
from syncd.errors import AccessDenied, RateLimited, Rejected, ServerError, TransportError
from syncd.intake.base import PollPage
from syncd.intake.reconcile import PollReport, PollRunner
from syncd.intake.zendesk import ZendeskSettings, ZendeskSource
from syncd.intake.zendesk_poll import ZendeskPoller
from syncd.store.models import events
from syncd.ticket import AuthorKind, Client, Comment, EventKind, Status, TicketEvent

from .conftest import App

EMAIL = "sync@acme.test"
TOKEN = "zd-api-token"
T0 = 1_713_374_290.0
LOOKBACK = 3600.0


class Clock:
    """Shared by the emulator and the poller, so "a minute later" takes no time."""

    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock(T0)


@pytest.fixture
def zendesk(clock: Clock) -> Iterator[tuple[ServerThread, ZendeskState]]:
    app, state = create_zendesk_api(EMAIL, TOKEN, recent_window_seconds=0, clock=clock)
    server = ServerThread(app).start()
    yield server, state
    server.stop()


def make_poller(base_url: str, clock: Clock, **settings: Any) -> ZendeskPoller:
    config = {
        "signing_secret": "s",
        "base_url": base_url,
        "email": EMAIL,
        "api_token": TOKEN,
        "poll_lookback_seconds": LOOKBACK,
        "request_timeout_seconds": 5,
        **settings,
    }
    poller = ZendeskSource("zd", ZendeskSettings.model_validate(config)).poller()
    assert isinstance(poller, ZendeskPoller)
    poller.clock = clock
    return poller


@pytest.fixture
async def poller(
    zendesk: tuple[ServerThread, ZendeskState], clock: Clock
) -> AsyncIterator[ZendeskPoller]:
    """The ticket export alone (comments off): the comment events have their own tests."""
    p = make_poller(zendesk[0].url, clock, poll_comments=False)
    yield p
    await p.aclose()


def at(ts: float) -> datetime:
    return datetime.fromtimestamp(ts, tz=UTC)


async def test_pages_with_after_cursor_until_end_of_stream(
    zendesk: tuple[ServerThread, ZendeskState], poller: ZendeskPoller, clock: Clock
) -> None:
    _, state = zendesk
    state.page_size = 2
    customer = state.add_user("Anna", email="anna@example.com")
    created = []
    for n in range(5):
        clock.now = T0 + n
        created.append(
            state.create_ticket(
                f"Ticket {n}",
                requester_id=customer.id,
                priority="high",
                tags=["vip"],
                group_id=360001,
                assignee_id=7001,
            )
        )
    clock.now = T0 + 10

    pages = []
    cursor = None
    for _ in range(10):  # bounded: a cursor that never advances must fail, not hang
        page = await poller.fetch(cursor)
        pages.append(page)
        assert page.cursor is not None
        cursor = page.cursor
        if page.done:
            break
    assert [[t.ticket_id for t in p.tickets] for p in pages] == [
        [str(created[0].id), str(created[1].id)],
        [str(created[2].id), str(created[3].id)],
        [str(created[4].id)],
    ]
    assert [p.done for p in pages] == [False, False, True]
    assert state.export_calls[0] == {"start_time": str(int(T0 + 10 - LOOKBACK))}
    assert [set(call) for call in state.export_calls[1:]] == [{"cursor"}, {"cursor"}]

    first = pages[0].tickets[0]
    assert first.updated_at == at(T0)
    assert first.events == [
        TicketEvent(
            source="zd",
            ticket_id=str(created[0].id),
            kind=EventKind.TICKET_UPDATED,
            subject="Ticket 0",
            status=Status.NEW,
            source_status="new",
            channel="web",
            priority="high",
            tags=("vip",),
            assignee_id="7001",
            group_id="360001",
            client=Client(source_id=str(customer.id)),
            occurred_at=at(T0),
        )
    ]


async def test_a_later_update_shows_up_from_the_stored_cursor(
    zendesk: tuple[ServerThread, ZendeskState], poller: ZendeskPoller, clock: Clock
) -> None:
    _, state = zendesk
    quiet = state.create_ticket("Quiet")
    changed = state.create_ticket("Will change")
    clock.now = T0 + 5
    page = await poller.fetch(None)
    assert page.done and len(page.tickets) == 2
    stored = page.cursor

    nothing = await poller.fetch(stored)
    assert nothing.tickets == [] and nothing.done
    assert nothing.cursor is not None

    clock.now = T0 + 120
    state.update_ticket(changed.id, status="solved", priority="low")
    page = await poller.fetch(nothing.cursor)
    assert [t.ticket_id for t in page.tickets] == [str(changed.id)]
    event = page.tickets[0].events[0]
    assert (event.status, event.priority, event.occurred_at) == (
        Status.SOLVED,
        "low",
        at(T0 + 120),
    )
    assert str(quiet.id) not in {t.ticket_id for t in page.tickets}


async def test_first_poll_starts_at_the_look_back(
    zendesk: tuple[ServerThread, ZendeskState], poller: ZendeskPoller, clock: Clock
) -> None:
    _, state = zendesk
    state.create_ticket("Too old")
    clock.now = T0 + LOOKBACK + 60
    recent = state.create_ticket("Recent")
    page = await poller.fetch(None)
    assert [t.ticket_id for t in page.tickets] == [str(recent.id)]


async def test_tickets_changed_in_the_last_minute_wait_for_a_later_poll(
    zendesk: tuple[ServerThread, ZendeskState], poller: ZendeskPoller, clock: Clock
) -> None:
    _, state = zendesk
    state.recent_window_seconds = 60
    ticket = state.create_ticket("Just now")
    clock.now = T0 + 30
    early = await poller.fetch(None)
    assert early.tickets == [] and early.done
    clock.now = T0 + 61
    later = await poller.fetch(early.cursor)
    assert [t.ticket_id for t in later.tickets] == [str(ticket.id)]


async def test_429_is_rate_limited_with_retry_after(
    zendesk: tuple[ServerThread, ZendeskState], poller: ZendeskPoller
) -> None:
    _, state = zendesk
    state.create_ticket("Any")
    state.fail_next(1, status=429, retry_after=7)
    with pytest.raises(RateLimited) as caught:
        await poller.fetch(None)
    assert caught.value.retry_after == 7.0
    assert caught.value.status_code == 429
    assert len((await poller.fetch(None)).tickets) == 1


async def test_429_without_retry_after_waits_a_minute(
    zendesk: tuple[ServerThread, ZendeskState], poller: ZendeskPoller
) -> None:
    zendesk[1].fail_next(1, status=429)
    with pytest.raises(RateLimited) as caught:
        await poller.fetch(None)
    assert caught.value.retry_after == 60.0


async def test_the_per_minute_export_limit(
    zendesk: tuple[ServerThread, ZendeskState], poller: ZendeskPoller, clock: Clock
) -> None:
    _, state = zendesk
    state.rate_limit_per_minute = 2
    await poller.fetch(None)
    clock.now = T0 + 20
    await poller.fetch(None)
    with pytest.raises(RateLimited) as caught:
        await poller.fetch(None)
    assert caught.value.retry_after == 40.0
    clock.now = T0 + 60
    await poller.fetch(None)


async def test_bad_credentials_are_access_denied(
    zendesk: tuple[ServerThread, ZendeskState], clock: Clock
) -> None:
    server, state = zendesk
    wrong = make_poller(server.url, clock, api_token="not-the-token")
    try:
        with pytest.raises(AccessDenied) as caught:
            await wrong.fetch(None)
    finally:
        await wrong.aclose()
    assert caught.value.status_code == 401
    assert state.export_calls == []


async def test_server_errors_and_refused_connections_are_retriable(
    zendesk: tuple[ServerThread, ZendeskState], poller: ZendeskPoller, clock: Clock
) -> None:
    zendesk[1].fail_next(1, status=503)
    with pytest.raises(ServerError) as caught:
        await poller.fetch(None)
    assert caught.value.retriable and caught.value.status_code == 503

    nowhere = make_poller(f"http://127.0.0.1:{free_port()}", clock)
    try:
        with pytest.raises(TransportError) as refused:
            await nowhere.fetch(None)
    finally:
        await nowhere.aclose()
    assert refused.value.retriable


async def test_a_cursor_the_export_never_issued_is_rejected(poller: ZendeskPoller) -> None:
    with pytest.raises(Rejected) as caught:
        await poller.fetch("bm90LWEtY3Vyc29y")  # "not-a-cursor"
    assert caught.value.status_code == 400


@dataclass
class ThroughIntake:
    """The Zendesk emulator feeding an app's intake, and a poll as the daemon runs it."""

    app: App
    zd: ZendeskState
    clock: Clock

    def post(self, hook: SignedWebhook) -> Any:
        return self.app.client.post("/hooks/zendesk", content=hook.body, headers=hook.headers)

    def poll(self) -> PollReport:
        async def once() -> PollReport:
            poller = self.app.intake.sources["zendesk"].poller()
            assert poller is not None
            try:
                return await PollRunner(self.app.intake, "zendesk", poller).run_once()
            finally:
                await poller.aclose()

        return asyncio.run(once())

    def rows(self, *where: Any) -> list[Any]:
        query = select(events.c.kind, events.c.recovered_by_poll, events.c.payload)
        with self.app.store.read_engine.connect() as conn:
            return list(conn.execute(query.where(*where).order_by(events.c.id)))


@pytest.fixture
def through_intake(make_app: Callable[..., App]) -> Iterator[ThroughIntake]:
    secret = "zd-signing-secret"
    # The intake route checks signatures against the real time: 200 s ago is within
    # their tolerance, and leaves the emulator's clock room to move on.
    clock = Clock(time.time() - 200)
    api, zd = create_zendesk_api(
        EMAIL, TOKEN, webhook_secret=secret, recent_window_seconds=0, clock=clock
    )
    server = ServerThread(api).start()
    app = make_app(
        f"""
[sources.zendesk]
kind = "zendesk"
signing_secret = "{secret}"
base_url = "{server.url}"
email = "{EMAIL}"
api_token = "{TOKEN}"

[destinations.crm]
kind = "rest"
base_url = "http://127.0.0.1:9"
"""
    )
    yield ThroughIntake(app, zd, clock)
    server.stop()


def test_webhooks_through_intake_and_a_lost_one_recovered_by_polling(
    through_intake: ThroughIntake,
) -> None:
    """The whole Zendesk path: signed trigger webhooks, a second invocation, a lost one."""
    zd, clock = through_intake.zd, through_intake.clock
    customer = zd.add_user("Anna", email="anna@example.com", phone="+7 999 123-45-67")
    agent = zd.add_user("Bob", role="agent")
    ticket = zd.create_ticket("Broken", requester_id=customer.id)
    clock.now += 5
    zd.add_comment(ticket.id, "On it", author_id=agent.id)
    created, description, reply = zd.drain_webhooks()
    answers = [
        through_intake.post(hook) for hook in (created, description, reply, zd.reinvoke(reply))
    ]
    assert [a.status_code for a in answers] == [202, 202, 202, 202]
    assert [a.json()["duplicates"] for a in answers] == [0, 0, 0, 1]

    clock.now += 5
    zd.update_ticket(ticket.id, status="solved")
    (lost,) = zd.drain_webhooks()
    assert lost.event == "status_changed"

    report = through_intake.poll()
    assert (report.recovered, report.error) == (1, None)

    rows = through_intake.rows()
    assert [(r.kind, bool(r.recovered_by_poll)) for r in rows] == [
        ("ticket_created", False),
        ("comment_added", False),
        ("comment_added", False),
        ("ticket_updated", True),
    ]
    first = json.loads(rows[0].payload)
    assert first["client"]["emails"] == ["anna@example.com"]
    assert first["client"]["phones"] == ["+79991234567"]
    assert json.loads(rows[2].payload)["comment"]["author"] == "agent"
    assert json.loads(rows[3].payload)["status"] == "solved"


# --- comments, from the ticket event export --------------------------------------------


@pytest.fixture
async def comment_poller(
    zendesk: tuple[ServerThread, ZendeskState], clock: Clock
) -> AsyncIterator[ZendeskPoller]:
    p = make_poller(zendesk[0].url, clock)
    yield p
    await p.aclose()


async def poll_pages(poller: ZendeskPoller, cursor: str | None) -> tuple[list[PollPage], str]:
    """One poll as the runner does it: fetch until done (bounded, so a loop fails)."""
    pages = []
    for _ in range(10):
        page = await poller.fetch(cursor)
        pages.append(page)
        assert page.cursor is not None
        cursor = page.cursor
        if page.done:
            return pages, cursor
    raise AssertionError("the poll never finished")


async def test_a_poll_reads_the_ticket_export_then_the_comments(
    zendesk: tuple[ServerThread, ZendeskState], comment_poller: ZendeskPoller, clock: Clock
) -> None:
    _, state = zendesk
    customer = state.add_user("Anna", email="anna@example.com")
    agent = state.add_user("Bob", role="agent")
    ticket = state.create_ticket("Kettle", "It smokes", requester_id=customer.id)
    clock.now = T0 + 5
    reply = state.add_comment(ticket.id, "Unplug it", author_id=agent.id)
    clock.now = T0 + 9
    note = state.add_comment(ticket.id, "Known batch", author_id=agent.id, public=False)
    clock.now = T0 + 120

    (states, comments), cursor = await poll_pages(comment_poller, None)
    assert [t.ticket_id for t in states.tickets] == [str(ticket.id)]
    assert states.done is False
    (polled,) = comments.tickets
    assert polled.ticket_id == str(ticket.id)
    assert polled.updated_at == at(T0 + 9)
    first = ticket.comments[0]
    assert [(e.kind, e.delivery_id, e.occurred_at) for e in polled.events] == [
        (EventKind.COMMENT_ADDED, f"comment:{first.id}", at(T0)),
        (EventKind.COMMENT_ADDED, f"comment:{reply.id}", at(T0 + 5)),
        (EventKind.COMMENT_ADDED, f"comment:{note.id}", at(T0 + 9)),
    ]
    assert [e.comment for e in polled.events] == [
        Comment(
            id=str(first.id),
            text="It smokes",
            author=AuthorKind.CLIENT,
            author_id=str(customer.id),
        ),
        Comment(
            id=str(reply.id), text="Unplug it", author=AuthorKind.AGENT, author_id=str(agent.id)
        ),
        Comment(
            id=str(note.id),
            text="Known batch",
            author=AuthorKind.AGENT,
            author_id=str(agent.id),
            public=False,
        ),
    ]
    # The same dedup key as the comment_added webhook gives.
    assert polled.events[1].dedup_key() == f"id:comment:{reply.id}"
    assert state.event_export_calls == [
        {"start_time": str(int(T0 + 120 - LOOKBACK)), "include": "comment_events"}
    ]
    assert state.user_lookups == [f"{customer.id},{agent.id}"]

    # The next poll goes on from where the event export ended, and knows the roles.
    clock.now = T0 + 200
    later = state.add_comment(ticket.id, "Thanks!", author_id=customer.id)
    clock.now = T0 + 300
    (states, comments), _ = await poll_pages(comment_poller, cursor)
    assert [t.ticket_id for t in states.tickets] == [str(ticket.id)]
    assert [e.comment.id for t in comments.tickets for e in t.events if e.comment] == [
        str(note.id),  # the export starts at the second the last page ended on
        str(later.id),
    ]
    assert state.event_export_calls[-1]["start_time"] == str(int(T0 + 9))
    assert len(state.user_lookups) == 1


async def test_the_event_export_is_never_asked_from_less_than_a_minute_ago(
    zendesk: tuple[ServerThread, ZendeskState], comment_poller: ZendeskPoller, clock: Clock
) -> None:
    """Zendesk refuses a newer start_time; the last minute is read again instead."""
    _, state = zendesk
    ticket = state.create_ticket("Fresh")
    clock.now = T0 + 10
    _, cursor = await poll_pages(comment_poller, None)
    clock.now = T0 + 30
    reply = state.add_comment(ticket.id, "More", author_id=ticket.requester_id)
    clock.now = T0 + 40
    (_, comments), cursor = await poll_pages(comment_poller, cursor)
    assert [e.comment.id for t in comments.tickets for e in t.events if e.comment] == [
        str(ticket.comments[0].id),  # read again, and known by its id downstream
        str(reply.id),
    ]
    assert [c["start_time"] for c in state.event_export_calls] == [
        str(int(T0 + 10 - LOOKBACK)),
        str(int(T0 + 40 - 60)),
    ]
    clock.now = T0 + 200
    await poll_pages(comment_poller, cursor)
    assert state.event_export_calls[-1]["start_time"] == str(int(T0 + 30))


async def test_a_cursor_stored_before_comments_were_polled_is_read_as_the_ticket_cursor(
    zendesk: tuple[ServerThread, ZendeskState], clock: Clock, comment_poller: ZendeskPoller
) -> None:
    _, state = zendesk
    state.create_ticket("Old")
    clock.now = T0 + 100
    old = make_poller(zendesk[0].url, clock, poll_comments=False)
    try:
        page = await old.fetch(None)
    finally:
        await old.aclose()
    legacy = json.loads(page.cursor or "")["tickets"]  # what an older syncd stored
    clock.now = T0 + 200
    new = state.create_ticket("New")
    clock.now = T0 + 300
    (states, _), _ = await poll_pages(comment_poller, legacy)
    assert [t.ticket_id for t in states.tickets] == [str(new.id)]
    assert state.export_calls[-1] == {"cursor": legacy}
    assert state.event_export_calls[0]["start_time"] == str(int(T0 + 300 - LOOKBACK))


async def test_a_rate_limited_event_export_keeps_the_ticket_progress(
    zendesk: tuple[ServerThread, ZendeskState], comment_poller: ZendeskPoller, clock: Clock
) -> None:
    _, state = zendesk
    state.create_ticket("Any")
    clock.now = T0 + 100
    states = await comment_poller.fetch(None)
    state.fail_next(1, status=429, retry_after=12)
    with pytest.raises(RateLimited) as caught:
        await comment_poller.fetch(states.cursor)
    assert caught.value.retry_after == 12.0
    # The runner stored the first page's cursor: the next poll asks for comments straight away.
    comments = await comment_poller.fetch(states.cursor)
    assert comments.done and len(comments.tickets) == 1


def test_a_lost_comment_is_recovered_once_and_its_late_webhook_is_a_duplicate(
    through_intake: ThroughIntake,
) -> None:
    zd, clock = through_intake.zd, through_intake.clock
    customer = zd.add_user("Anna", email="anna@example.com")
    agent = zd.add_user("Bob", role="agent")
    ticket = zd.create_ticket("Broken", requester_id=customer.id)
    for hook in zd.drain_webhooks():
        assert through_intake.post(hook).status_code == 202
    clock.now += 5
    zd.add_comment(ticket.id, "Send it back", author_id=agent.id)
    (lost,) = zd.drain_webhooks()
    clock.now += 5
    old = zd.add_comment(ticket.id, "Label attached", author_id=agent.id)
    zd.drain_webhooks()
    # This one reached an older syncd, which keyed trigger comments by a hash of the
    # body: the poller must know it by its comment id.
    held = TicketEvent(
        source="zendesk",
        ticket_id=str(ticket.id),
        kind=EventKind.COMMENT_ADDED,
        comment=Comment(id=str(old.id), text="Label attached", author=AuthorKind.AGENT),
        occurred_at=at(clock.now),
    )
    assert held.dedup_key() != f"id:comment:{old.id}"
    asyncio.run(through_intake.app.intake.store_events("zendesk", [held]))
    clock.now += 120

    report = through_intake.poll()
    assert (report.recovered, report.error) == (1, None)
    assert through_intake.poll().recovered == 0  # a second poll finds nothing new

    # Zendesk retries the lost webhook after all (its signature, made then, is still
    # within tolerance): it is the comment already recovered.
    late = through_intake.post(lost)
    assert (late.status_code, late.json()["duplicates"]) == (202, 1)

    rows = through_intake.rows(events.c.kind == "comment_added")
    texts = [(json.loads(r.payload)["comment"]["text"], bool(r.recovered_by_poll)) for r in rows]
    assert texts == [
        ("Hello, I need help.", False),
        ("Label attached", False),
        ("Send it back", True),
    ]
    recovered = json.loads(rows[-1].payload)["comment"]
    assert (recovered["author"], recovered["author_id"]) == ("agent", str(agent.id))
