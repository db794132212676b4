"""The Usedesk poller against the Usedesk emulator, served over real HTTP."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest

from syncd.emulators.serving import ServerThread
from syncd.emulators.usedesk_api import UsedeskState, create_usedesk_api, encode_webhook
from syncd.errors import AccessDenied, RateLimited, ServerError
from syncd.intake.base import PollPage, RawRequest
from syncd.intake.usedesk import UsedeskPoller, UsedeskSettings, UsedeskSource
from syncd.ticket import AuthorKind, EventKind, Status, TicketEvent

TOKEN = "0e8f678d8327eb3292a28c8165957b282a1b2f8b"
ZONE = "Europe/Moscow"


@pytest.fixture
def usedesk() -> Iterator[tuple[str, UsedeskState]]:
    app, state = create_usedesk_api(TOKEN, timezone=ZONE)
    server = ServerThread(app).start()
    yield server.url, state
    server.stop()


def make_source(url: str, **settings: Any) -> UsedeskSource:
    values = {"secret": TOKEN, "api_url": url, "timezone": ZONE, **settings}
    return UsedeskSource("ud", UsedeskSettings.model_validate(values), default_region="RU")


@pytest.fixture
async def poller(usedesk: tuple[str, UsedeskState]) -> AsyncIterator[UsedeskPoller]:
    made = make_source(usedesk[0]).poller()
    assert made is not None
    yield made
    await made.aclose()


async def poll_pass(poller: UsedeskPoller, cursor: str | None) -> tuple[list[PollPage], str]:
    """Fetch pages until the pass is done; return them and the cursor to keep."""
    pages: list[PollPage] = []
    while True:
        page = await poller.fetch(cursor)
        pages.append(page)
        assert page.cursor is not None
        cursor = page.cursor
        if page.done:
            return pages, cursor
        assert len(pages) < 50, "the pass never ends"


def ids(pages: list[PollPage]) -> list[str]:
    return [t.ticket_id for page in pages for t in page.tickets]


def webhook_events(source: UsedeskSource, body: dict[str, Any], *, form: bool = False) -> Any:
    content, _ = encode_webhook(body, form=form)
    raw = RawRequest(body=content)
    source.authenticate(raw)
    return source.parse(raw)


async def test_pages_cover_every_ticket_exactly_once(
    usedesk: tuple[str, UsedeskState], poller: UsedeskPoller
) -> None:
    _, state = usedesk
    created = {str(state.create_ticket(f"Order {n}", "Where is it?")) for n in range(250)}
    pages, _ = await poll_pass(poller, None)
    assert [len(p.tickets) for p in pages] == [100, 100, 50]
    assert [p.done for p in pages] == [False, False, True]
    seen = ids(pages)
    assert len(seen) == len(set(seen)) == 250
    assert set(seen) == created
    listed = [body for path, body in state.calls if path == "/tickets"]
    assert [body["offset"] for body in listed] == [0, 1, 2]
    assert len({body["updated_after"] for body in listed}) == 1
    assert sum(1 for path, _ in state.calls if path == "/ticket") == 250


async def test_a_ticket_holds_its_state_then_its_comments_oldest_first(
    usedesk: tuple[str, UsedeskState], poller: UsedeskPoller
) -> None:
    _, state = usedesk
    client = state.add_client("Anna", ["Anna@Example.com"], [("8 (999) 123-45-67", "mobile")])
    ticket = state.create_ticket("Refund", "Please refund", client_id=client, tags=["vip"])
    state.advance(30)
    state.add_comment(ticket, "Done", sender="user", user_id=545, public=False)
    state.advance(30)
    state.set_status(ticket, 2)
    pages, _ = await poll_pass(poller, None)
    [polled] = pages[0].tickets
    state_event, *comments = polled.events
    assert state_event.kind is EventKind.TICKET_UPDATED
    assert (state_event.subject, state_event.status, state_event.source_status) == (
        "Refund",
        Status.SOLVED,
        "2",
    )
    assert state_event.tags == ("vip",)
    assert state_event.client is not None
    assert state_event.client.source_id == str(client)
    assert state_event.client.emails == ("anna@example.com",)
    assert state_event.occurred_at == polled.updated_at
    # the first message rides on the state event (the ticket-created webhook carries it
    # without an id, so a separate comment event would write it twice)
    assert state_event.comment is not None and state_event.comment.text == "Please refund"
    assert [(c.kind, c.comment and c.comment.text) for c in comments] == [
        (EventKind.COMMENT_ADDED, "Done"),
    ]
    agent = comments[0].comment
    assert agent is not None
    assert (agent.author, agent.author_id, agent.public) == (AuthorKind.AGENT, "545", False)
    assert all(e.recovered_by_poll for e in polled.events)
    assert comments[0].occurred_at is not None and polled.updated_at is not None
    assert (polled.updated_at - comments[0].occurred_at).total_seconds() == 30


async def test_next_pass_returns_a_ticket_changed_after_the_first(
    usedesk: tuple[str, UsedeskState], poller: UsedeskPoller
) -> None:
    _, state = usedesk
    quiet, busy = state.create_ticket("Quiet", "hi"), state.create_ticket("Busy", "hello")
    _, cursor = await poll_pass(poller, None)

    state.advance(3600)
    comment_id = state.add_comment(busy, "Still waiting")
    pages, cursor = await poll_pass(poller, cursor)
    # The window starts the overlap before the newest change already seen, so the
    # quiet ticket comes back once more; the busy one brings its new comment.
    assert sorted(ids(pages)) == sorted([str(quiet), str(busy)])
    busy_events = next(t for p in pages for t in p.tickets if t.ticket_id == str(busy)).events
    assert str(comment_id) in {e.comment.id for e in busy_events if e.comment}

    state.advance(3600)
    pages, _ = await poll_pass(poller, cursor)
    assert ids(pages) == [str(busy)]


async def test_overlap_catches_a_change_stamped_before_the_newest_seen(
    usedesk: tuple[str, UsedeskState], poller: UsedeskPoller
) -> None:
    _, state = usedesk
    state.create_ticket("First", "a")
    state.advance(3600)
    state.create_ticket("Newest", "b")
    _, cursor = await poll_pass(poller, None)
    # A ticket whose change time lies 5 minutes before the newest one seen, but
    # that Usedesk only lists now (late indexing, a clock step): inside the overlap.
    state.advance(-300)
    late = state.create_ticket("Late", "c")
    pages, _ = await poll_pass(poller, cursor)
    assert str(late) in ids(pages)


async def test_polled_comment_has_the_dedup_key_of_its_webhook(
    usedesk: tuple[str, UsedeskState], poller: UsedeskPoller
) -> None:
    url, state = usedesk
    source = make_source(url)
    ticket = state.create_ticket("Broken", "It broke")
    state.advance(5)
    comment_id = state.add_comment(ticket, "Photo attached")
    state.advance(5)
    agent_reply = state.add_comment(ticket, "We are on it", sender="user", user_id=7)
    hooks = state.take_webhooks()
    assert [next(k for k in ("ticket", "comment") if k in h) for h in hooks] == [
        "ticket",
        "comment",
        "comment",
    ]
    from_webhooks: dict[str | None, TicketEvent] = {}
    for hook in hooks[1:]:
        for form in (False, True):
            [event] = webhook_events(source, hook, form=form)
            assert event.comment is not None
            from_webhooks[event.comment.id] = event
    assert set(from_webhooks) == {str(comment_id), str(agent_reply)}

    pages, _ = await poll_pass(poller, None)
    polled = [e for e in pages[0].tickets[0].events if e.kind is EventKind.COMMENT_ADDED]
    by_id = {e.comment.id: e for e in polled if e.comment}
    for cid, hooked in from_webhooks.items():
        assert by_id[cid].dedup_key() == hooked.dedup_key()
        assert by_id[cid].comment == hooked.comment
        assert by_id[cid].occurred_at == hooked.occurred_at


async def test_webhooks_from_the_emulator_parse(usedesk: tuple[str, UsedeskState]) -> None:
    url, state = usedesk
    source = make_source(url)
    ticket = state.create_ticket("Late parcel", "Where is it?")
    state.set_status(ticket, 6)
    state.add_tags(ticket, "vip")
    state.rate(ticket, "5", "thanks")
    kinds = [webhook_events(source, hook)[0].kind for hook in state.take_webhooks()]
    assert kinds == [
        EventKind.TICKET_CREATED,
        EventKind.STATUS_CHANGED,
        EventKind.TICKET_UPDATED,
        EventKind.RATING,
    ]
    assert state.take_webhooks() == []


async def test_rate_limit_is_raised_with_retry_after_and_the_cursor_is_reusable(
    usedesk: tuple[str, UsedeskState], poller: UsedeskPoller
) -> None:
    _, state = usedesk
    state.create_ticket("One", "x")
    state.fail_next(1, 429, retry_after=7, body={"error": "Too Many Requests"})
    with pytest.raises(RateLimited) as caught:
        await poller.fetch(None)
    assert caught.value.retry_after == 7
    assert caught.value.status_code == 429
    page = await poller.fetch(None)
    assert len(page.tickets) == 1


async def test_failure_on_a_ticket_read_fails_the_page(
    usedesk: tuple[str, UsedeskState], poller: UsedeskPoller
) -> None:
    _, state = usedesk
    state.create_ticket("One", "x")
    state.fail_next(1, 502, path="/ticket")
    with pytest.raises(ServerError):
        await poller.fetch(None)


async def test_error_body_with_http_200_is_an_error(
    usedesk: tuple[str, UsedeskState], poller: UsedeskPoller
) -> None:
    _, state = usedesk
    state.fail_next(1, 200, body={"error": "Internal error", "code": 500})
    with pytest.raises(ServerError):
        await poller.fetch(None)


async def test_ticket_gone_before_it_is_read_keeps_its_list_state(
    usedesk: tuple[str, UsedeskState], poller: UsedeskPoller
) -> None:
    _, state = usedesk
    ticket = state.create_ticket("Deleted soon", "x")
    state.fail_next(1, 404, path="/ticket", body={"error": "Ticket not found"})
    page = await poller.fetch(None)
    [polled] = page.tickets
    assert polled.ticket_id == str(ticket)
    assert [e.kind for e in polled.events] == [EventKind.TICKET_UPDATED]
    assert polled.events[0].subject == "Deleted soon"


async def test_wrong_token_is_access_denied(usedesk: tuple[str, UsedeskState]) -> None:
    url, state = usedesk
    state.create_ticket("One", "x")
    poller = make_source(url, api_token="not-the-token").poller()
    assert poller is not None
    try:
        with pytest.raises(AccessDenied) as caught:
            await poller.fetch(None)
        assert "not-the-token" not in str(caught.value)
    finally:
        await poller.aclose()


async def test_channel_filter_and_token_are_sent(usedesk: tuple[str, UsedeskState]) -> None:
    url, state = usedesk
    state.create_ticket("Mail", "x", channel_id=1)
    wanted = state.create_ticket("Chat", "y", channel_id=2)
    poller = make_source(url, api_token=None, channel_ids=[2, 3]).poller()
    assert poller is not None
    try:
        page = await poller.fetch(None)
    finally:
        await poller.aclose()
    assert [t.ticket_id for t in page.tickets] == [str(wanted)]
    assert state.calls[0][1]["fchannel"] == "2,3"


async def test_unreadable_cursor_starts_from_the_look_back(
    usedesk: tuple[str, UsedeskState], poller: UsedeskPoller
) -> None:
    _, state = usedesk
    ticket = state.create_ticket("One", "x")
    page = await poller.fetch("not a cursor")
    assert [t.ticket_id for t in page.tickets] == [str(ticket)]
    assert page.cursor is not None and len(page.cursor) < 500
    assert set(json.loads(page.cursor)) == {"v", "since", "page", "newest"}
