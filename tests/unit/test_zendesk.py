"""The Zendesk source: both webhook shapes, signatures, delivery ids and settings."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from syncd.emulators.zendesk_api import create_zendesk_api
from syncd.errors import AuthenticationFailed, InvalidPayload
from syncd.intake.base import RawRequest
from syncd.intake.signing import sign_zendesk
from syncd.intake.zendesk import TRIGGER_BODY_TEMPLATE, ZendeskSettings, ZendeskSource
from syncd.ticket import AuthorKind, Client, Comment, EventKind, Status, TicketEvent

SECRET = "dGhpcyBpcyBhIHNpZ25pbmcgc2VjcmV0"
STAMP = "2024-04-17T17:18:10Z"
NOW = datetime(2024, 4, 17, 17, 18, 10, tzinfo=UTC).timestamp()
UPDATED = datetime(2024, 4, 17, 17, 18, 8, tzinfo=UTC)


def source(**settings: Any) -> ZendeskSource:
    return ZendeskSource(
        "zd", ZendeskSettings.model_validate({"signing_secret": SECRET, **settings})
    )


def signed(
    body: dict[str, Any] | bytes,
    *,
    secret: str = SECRET,
    stamp: str = STAMP,
    received_at: float = NOW,
    invocation: str | None = "8350205582",
) -> RawRequest:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    headers = {
        "x-zendesk-webhook-signature": sign_zendesk(secret, stamp, raw),
        "x-zendesk-webhook-signature-timestamp": stamp,
    }
    if invocation is not None:
        headers["x-zendesk-webhook-invocation-id"] = invocation
    return RawRequest(body=raw, headers=headers, received_at=received_at)


def trigger_body(**overrides: Any) -> dict[str, Any]:
    """The documented template as Zendesk renders it for ticket 35436."""
    body: dict[str, Any] = {
        "event": "comment_added",
        "ticket_id": "35436",
        "subject": "Printer on fire",
        "status": "Open",
        "priority": "High",
        "via": "Web Form",
        "tags": "vip billing",
        "updated_at": "2024-04-17T17:18:08Z",
        "assignee_id": "7001",
        "group_id": "360001",
        "requester": {
            "id": "5001",
            "name": "Anna Petrova",
            "email": "Anna@Example.COM",
            "phone": "8 (999) 123-45-67",
        },
        "comment": {
            "id": "9001",
            "body": "It is still smoking.",
            "public": "true",
            "author_id": "5001",
        },
    }
    body.update(overrides)
    return body


def subscription_body(event_type: str, event: dict[str, Any], **detail: Any) -> dict[str, Any]:
    """An event-subscription envelope for the same ticket as :func:`trigger_body`."""
    base_detail: dict[str, Any] = {
        "actor_id": "5001",
        "assignee_id": "7001",
        "brand_id": "1",
        "created_at": "2024-04-17T17:00:00Z",
        "description": "My printer is on fire",
        "group_id": "360001",
        "id": "35436",
        "is_public": True,
        "priority": "HIGH",
        "requester_id": "5001",
        "status": "OPEN",
        "subject": "Printer on fire",
        "submitter_id": "5001",
        "tags": ["vip", "billing"],
        "updated_at": "2024-04-17T17:18:08Z",
        "via": {"channel": "web"},
    }
    base_detail.update(detail)
    return {
        "type": f"zen:event-type:ticket.{event_type}",
        "account_id": 88888888,
        "id": "01HNXXXX-CTEXAMPLE",
        "time": "2024-04-17T17:18:09Z",
        "zendesk_event_version": "2022-11-06",
        "subject": "zen:ticket:35436",
        "detail": base_detail,
        "event": event,
    }


COMMENT_EVENT = {
    "comment": {
        "id": "9001",
        "body": "It is still smoking.",
        "is_public": True,
        "author": {"id": "5001", "is_staff": False, "name": "Anna Petrova"},
    }
}


def parse_one(body: dict[str, Any], **kw: Any) -> TicketEvent:
    events = source().parse(signed(body, **kw))
    assert len(events) == 1
    return events[0]


# --- (a) the trigger body ----------------------------------------------------------


def test_trigger_body_parses_into_the_exact_event() -> None:
    assert parse_one(trigger_body()) == TicketEvent(
        source="zd",
        ticket_id="35436",
        kind=EventKind.COMMENT_ADDED,
        subject="Printer on fire",
        status=Status.OPEN,
        source_status="open",
        channel="web",
        priority="high",
        tags=("vip", "billing"),
        assignee_id="7001",
        group_id="360001",
        comment=Comment(
            id="9001",
            text="It is still smoking.",
            author=AuthorKind.CLIENT,
            author_id="5001",
            public=True,
        ),
        client=Client(
            source_id="5001",
            name="Anna Petrova",
            emails=("anna@example.com",),
            phones=("+79991234567",),
        ),
        occurred_at=UPDATED,
        # Keyed by the comment id (see test_comment_dedup_ignores_invocation_ids).
        delivery_id="comment:9001",
    )


def test_trigger_body_with_placeholders_rendered_empty() -> None:
    body = trigger_body(
        event="ticket_created",
        priority="",
        tags="",
        assignee_id="",
        group_id="",
        via="",
        requester={"id": "5001", "name": "", "email": "", "phone": ""},
    )
    event = parse_one(body)
    assert event.kind == EventKind.TICKET_CREATED
    assert (event.priority, event.tags, event.assignee_id, event.group_id) == (None, (), None, None)
    assert event.channel is None
    assert event.client == Client(source_id="5001")
    # Only comment_added carries the latest comment: on other triggers it is an old one.
    assert event.comment is None
    assert event.delivery_id == "8350205582"


def test_unrendered_placeholders_count_as_empty() -> None:
    event = parse_one(trigger_body(event="ticket_updated", group_id="{{ticket.group.id}}"))
    assert event.group_id is None
    with pytest.raises(InvalidPayload, match="ticket_id is empty or an unrendered placeholder"):
        source().parse(signed(trigger_body(ticket_id="{{ticket.id}}")))


def test_agent_reply_and_private_note_in_trigger_body() -> None:
    reply = parse_one(
        trigger_body(
            comment={"id": "9002", "body": "On it", "public": "false", "author_id": "7001"}
        )
    )
    assert reply.comment == Comment(
        id="9002", text="On it", author=AuthorKind.AGENT, author_id="7001", public=False
    )


def test_comment_added_without_a_comment_body_is_a_state_update() -> None:
    event = parse_one(trigger_body(comment={"id": "9003", "body": "", "public": "true"}))
    assert event.kind == EventKind.TICKET_UPDATED
    assert event.comment is None
    assert event.status == Status.OPEN


@pytest.mark.parametrize(
    ("event", "kind"),
    [("", EventKind.TICKET_UPDATED), ("Status_Changed", EventKind.STATUS_CHANGED)],
)
def test_trigger_event_names(event: str, kind: EventKind) -> None:
    assert parse_one(trigger_body(event=event)).kind == kind


def test_unknown_trigger_event_is_refused_with_the_known_names() -> None:
    with pytest.raises(InvalidPayload, match="'coment_added' is not one of ticket_created"):
        source().parse(signed(trigger_body(event="coment_added")))


# --- (b) event subscriptions -------------------------------------------------------


def test_subscription_comment_added_parses_into_the_exact_event() -> None:
    assert parse_one(subscription_body("comment_added", COMMENT_EVENT)) == TicketEvent(
        source="zd",
        ticket_id="35436",
        kind=EventKind.COMMENT_ADDED,
        subject="Printer on fire",
        status=Status.OPEN,
        source_status="open",
        channel="web",
        priority="high",
        tags=("vip", "billing"),
        assignee_id="7001",
        group_id="360001",
        comment=Comment(
            id="9001",
            text="It is still smoking.",
            author=AuthorKind.CLIENT,
            author_id="5001",
            public=True,
        ),
        client=Client(source_id="5001"),
        occurred_at=UPDATED,
        # The comment's own id, not the event's: the trigger and the poller key it the same.
        delivery_id="comment:9001",
    )


def test_subscription_status_changed_keeps_both_statuses() -> None:
    body = subscription_body(
        "status_changed", {"current": "SOLVED", "previous": "Open"}, status="SOLVED"
    )
    event = parse_one(body)
    assert (event.kind, event.status, event.previous_status, event.source_status) == (
        EventKind.STATUS_CHANGED,
        Status.SOLVED,
        Status.OPEN,
        "solved",
    )


def test_subscription_status_from_the_change_when_detail_has_none() -> None:
    body = subscription_body("status_changed", {"current": {"status": "hold"}}, status=None)
    event = parse_one(body)
    assert (event.status, event.source_status, event.previous_status) == (
        Status.PENDING,
        "hold",
        None,
    )


@pytest.mark.parametrize(
    ("event_type", "kind"),
    [
        ("created", EventKind.TICKET_CREATED),
        ("priority_changed", EventKind.TICKET_UPDATED),
        ("agent_assignment_changed", EventKind.TICKET_UPDATED),
        ("tags_changed", EventKind.TICKET_UPDATED),
    ],
)
def test_subscription_types(event_type: str, kind: EventKind) -> None:
    event = parse_one(subscription_body(event_type, {"current": "x", "previous": "y"}))
    assert event.kind == kind
    assert event.comment is None


def test_staff_comment_is_an_agent_comment() -> None:
    change = {
        "comment": {
            "id": 9876543210,
            "body": "Internal: call them",
            "is_public": False,
            "author": {"id": 8447388090495, "is_staff": True, "name": "Agent"},
        }
    }
    event = parse_one(subscription_body("comment_added", change))
    assert event.comment == Comment(
        id="9876543210",
        text="Internal: call them",
        author=AuthorKind.AGENT,
        author_id="8447388090495",
        public=False,
    )


def test_non_ticket_events_are_accepted_and_store_nothing() -> None:
    body = {"type": "zen:event-type:user.created", "id": "e1", "detail": {"id": "5001"}}
    assert source().parse(signed(body)) == []


def test_ticket_id_from_the_envelope_subject_when_detail_has_none() -> None:
    event = parse_one(subscription_body("created", {}, id=None))
    assert event.ticket_id == "35436"


# --- both shapes describe the same change equally ----------------------------------


@pytest.mark.parametrize(
    ("trigger_event", "subscription_type", "change"),
    [("comment_added", "comment_added", COMMENT_EVENT), ("ticket_created", "created", {})],
)
def test_trigger_and_subscription_bodies_give_equal_events(
    trigger_event: str, subscription_type: str, change: dict[str, Any]
) -> None:
    by_trigger = parse_one(trigger_body(event=trigger_event))
    by_event = parse_one(subscription_body(subscription_type, change))
    if trigger_event == "comment_added":
        # One comment, one key, whichever webhook brought it: a second copy is a duplicate.
        assert by_trigger.dedup_key() == by_event.dedup_key() == "id:comment:9001"
    else:
        assert by_trigger.delivery_id != by_event.delivery_id
    # Zendesk's event detail names the requester by id only; the trigger body adds contacts.
    assert by_trigger.client is not None and by_event.client is not None
    assert by_trigger.client.source_id == by_event.client.source_id == "5001"
    assert by_trigger.client.emails == ("anna@example.com",)
    same = {"delivery_id": None, "client": None}
    assert by_trigger.model_copy(update=same) == by_event.model_copy(update=same)


def test_emulator_renders_the_documented_template_into_parseable_webhooks() -> None:
    _, zd = create_zendesk_api("a@b.c", "tok", webhook_secret=SECRET, clock=lambda: NOW)
    agent = zd.add_user("Agent", role="agent")
    ticket = zd.create_ticket("Broken", 'Help "quoted"\nsecond line', tags=["a", "b"])
    zd.add_comment(ticket.id, "Looking", author_id=agent.id, public=False)
    zd.update_ticket(ticket.id, status="hold")
    src = source()
    events = [e for hook in zd.drain_webhooks() for e in src.parse(hook.raw())]
    assert [e.kind for e in events] == [
        EventKind.TICKET_CREATED,
        EventKind.COMMENT_ADDED,
        EventKind.COMMENT_ADDED,
        EventKind.STATUS_CHANGED,
    ]
    first, second = events[1].comment, events[2].comment
    assert first is not None and first.text == 'Help "quoted"\nsecond line'
    assert first.author == AuthorKind.CLIENT
    assert second is not None and (second.author, second.public) == (AuthorKind.AGENT, False)
    assert events[3].status == Status.PENDING and events[3].tags == ("a", "b")
    assert '"event": "comment_added"' in TRIGGER_BODY_TEMPLATE


def test_the_documented_body_is_the_template() -> None:
    doc = (Path(__file__).parents[2] / "docs" / "helpdesks" / "zendesk.md").read_text()
    block = doc.split("### The body to paste", 1)[1].split("```json\n", 1)[1].split("```", 1)[0]
    assert block == TRIGGER_BODY_TEMPLATE


def test_emulator_trigger_and_event_modes_agree() -> None:
    """The same changes, sent both ways, normalize to the same events (ids aside)."""
    parsed: dict[str, list[TicketEvent]] = {}
    for mode in ("trigger", "events"):
        _, zd = create_zendesk_api(
            "a@b.c", "tok", webhook_secret=SECRET, webhook_mode=mode, clock=lambda: NOW
        )
        customer = zd.add_user("Anna", email="anna@example.com")
        ticket = zd.create_ticket("Hi", requester_id=customer.id, priority="low", via="email")
        zd.update_ticket(ticket.id, status="open")
        parsed[mode] = [e for hook in zd.drain_webhooks() for e in source().parse(hook.raw())]
    strip = {"delivery_id": None, "client": None, "previous_status": None}
    assert [e.model_copy(update=strip) for e in parsed["trigger"]] == [
        e.model_copy(update=strip) for e in parsed["events"]
    ]
    assert [e.previous_status for e in parsed["events"]] == [None, None, Status.NEW]


# --- status words ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "status"),
    [
        ("New", Status.NEW),
        ("OPEN", Status.OPEN),
        ("pending", Status.PENDING),
        ("Hold", Status.PENDING),
        ("On-hold", Status.PENDING),
        ("Solved", Status.SOLVED),
        ("CLOSED", Status.CLOSED),
        ("deleted", None),
    ],
)
def test_status_words(raw: str, status: Status | None) -> None:
    event = parse_one(trigger_body(status=raw, event="ticket_updated"))
    assert event.status == status
    assert event.source_status == raw.lower()


def test_status_map_covers_custom_statuses() -> None:
    src = source(status_map={"Awaiting Parts": "pending"})
    event = src.parse(signed(trigger_body(status="awaiting parts")))[0]
    assert (event.status, event.source_status) == (Status.PENDING, "awaiting parts")


def test_channel_map_extends_via_names() -> None:
    src = source(channel_map={"Facebook Post": "facebook"})
    assert src.parse(signed(trigger_body(via="Facebook Post")))[0].channel == "facebook"
    assert src.parse(signed(trigger_body(via="Some New Channel")))[0].channel == "some_new_channel"


# --- bad shapes --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (b"not json", "not valid JSON"),
        (b"[1, 2]", "must be a JSON object"),
        (b'{"hello": "world"}', "expected syncd's Zendesk trigger body"),
        (
            json.dumps({"type": "zen:event-type:ticket.created", "detail": "x"}).encode(),
            "'detail' must be an object",
        ),
        (
            json.dumps({"type": "zen:event-type:ticket.created", "detail": {}}).encode(),
            "detail.id",
        ),
    ],
)
def test_bad_shapes_are_refused_with_a_reason(body: bytes, reason: str) -> None:
    with pytest.raises(InvalidPayload, match=reason):
        source().parse(signed(body))


# --- signatures --------------------------------------------------------------------


def test_valid_signature_is_accepted() -> None:
    source().authenticate(signed(trigger_body()))


def test_tampered_body_is_refused() -> None:
    request = signed(trigger_body())
    tampered = RawRequest(
        body=request.body.replace(b"35436", b"35437"),
        headers=request.headers,
        received_at=request.received_at,
    )
    with pytest.raises(AuthenticationFailed, match="does not match"):
        source().authenticate(tampered)


def test_wrong_secret_is_refused() -> None:
    with pytest.raises(AuthenticationFailed, match="does not match"):
        source().authenticate(signed(trigger_body(), secret="another-secret"))


@pytest.mark.parametrize("offset", [-301.0, 301.0])
def test_timestamp_outside_the_tolerance_is_refused(offset: float) -> None:
    """Signed too long ago (a replay) or too far ahead (a clock to fix): both refused."""
    with pytest.raises(AuthenticationFailed, match="tolerance is 300 s"):
        source().authenticate(signed(trigger_body(), received_at=NOW - offset))


@pytest.mark.parametrize("offset", [-299.0, 299.0])
def test_timestamp_inside_the_tolerance_is_accepted(offset: float) -> None:
    source().authenticate(signed(trigger_body(), received_at=NOW - offset))


def test_tolerance_is_configurable() -> None:
    with pytest.raises(AuthenticationFailed):
        source(tolerance_seconds=10).authenticate(signed(trigger_body(), received_at=NOW + 11))
    source(tolerance_seconds=10).authenticate(signed(trigger_body(), received_at=NOW + 9))


@pytest.mark.parametrize(
    "missing", ["x-zendesk-webhook-signature", "x-zendesk-webhook-signature-timestamp"]
)
def test_missing_signature_headers_are_refused(missing: str) -> None:
    request = signed(trigger_body())
    headers = {k: v for k, v in request.headers.items() if k != missing}
    with pytest.raises(AuthenticationFailed, match="missing"):
        source().authenticate(RawRequest(request.body, headers, received_at=NOW))


# --- delivery ids and dedup --------------------------------------------------------


def test_same_invocation_id_gives_the_same_dedup_key() -> None:
    body = trigger_body(event="ticket_updated")
    first = parse_one(body, invocation="inv-1")
    again = parse_one(body, invocation="inv-1")
    other = parse_one(body, invocation="inv-2")
    assert first.delivery_id == "inv-1"
    assert first.dedup_key() == again.dedup_key() == "id:inv-1"
    assert other.dedup_key() != first.dedup_key()


def test_comment_dedup_ignores_invocation_ids() -> None:
    """Zendesk may invoke a trigger twice for one comment; the comment id merges them."""
    first = parse_one(trigger_body(), invocation="inv-1")
    second = parse_one(trigger_body(), invocation="inv-2")
    assert first.dedup_key() == second.dedup_key() == "id:comment:9001"
    later = parse_one(trigger_body(comment={"id": "9004", "body": "More"}), invocation="inv-3")
    assert later.dedup_key() != first.dedup_key()


def test_subscription_delivery_id_is_the_event_id() -> None:
    body = subscription_body("created", {})
    first = parse_one(body, invocation="inv-1")
    second = parse_one(body, invocation="inv-2")
    assert first.delivery_id == second.delivery_id == "01HNXXXX-CTEXAMPLE"
    comment = parse_one(subscription_body("comment_added", COMMENT_EVENT), invocation="inv-4")
    assert comment.delivery_id == "comment:9001"
    del body["id"]
    assert parse_one(body, invocation="inv-3").delivery_id == "inv-3"


# --- settings ----------------------------------------------------------------------


def test_polling_is_on_when_credentials_are_set() -> None:
    settings = ZendeskSettings.model_validate(
        {"signing_secret": SECRET, "subdomain": "acme", "email": "a@b.c", "api_token": "t"}
    )
    assert settings.polling
    assert settings.api_base == "https://acme.zendesk.com"
    assert source().poller() is None
    assert source(poll=False, subdomain="acme", email="a@b.c", api_token="t").poller() is None


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"poll": True}, "polling needs email, api_token, subdomain or base_url"),
        ({"email": "a@b.c", "subdomain": "acme"}, "set both email and api_token"),
        ({"email": "a@b.c", "api_token": "t"}, "polling needs subdomain or base_url"),
        (
            {"subdomain": "acme", "base_url": "https://x.test", "poll": False},
            "subdomain or base_url, not both",
        ),
        ({"signing": "x"}, "Extra inputs are not permitted"),
    ],
)
def test_settings_problems(settings: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        ZendeskSettings.model_validate({"signing_secret": SECRET, **settings})
