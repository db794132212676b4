"""Usedesk webhooks: authentication, the four shapes (and ping, chat, form bodies, garbage).

Bodies follow the documented examples, including ids sent as strings.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlencode

import pytest
from pydantic import ValidationError

from syncd.errors import AuthenticationFailed, InvalidPayload
from syncd.intake.base import RawRequest
from syncd.intake.registry import source_class
from syncd.intake.usedesk import (
    UsedeskPoller,
    UsedeskSettings,
    UsedeskSource,
    parse_usedesk_time,
    usedesk_status,
)
from syncd.ticket import AuthorKind, Client, Comment, EventKind, Rating, Status, TicketEvent

SECRET = "0e8f678d8327eb3292a28c8165957b282a1b2f8b"


def make_source(**settings: Any) -> UsedeskSource:
    return UsedeskSource(
        "ud", UsedeskSettings.model_validate({"secret": SECRET, **settings}), default_region="RU"
    )


def request(body: dict[str, Any] | bytes, **query: str) -> RawRequest:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    return RawRequest(body=raw, headers={"content-type": "application/json"}, query=query)


def client_body() -> dict[str, Any]:
    return {
        "id": 242630,
        "name": " Jon Bon Jovi ",
        "note": None,
        "emails": [{"email": "Jon@BonJovi.com "}, {"email": "jon@bonjovi.com"}],
        "phones": [
            {"phone": "8 (999) 123-45-67", "type": "mobile"},
            {"phone": "+7 999 123 45 67", "type": "home"},
            {"phone": "12", "type": "other"},
        ],
        "additional_ids": [{"value": "crm-77"}],
    }


JON = Client(
    source_id="242630",
    name="Jon Bon Jovi",
    emails=("jon@bonjovi.com",),
    phones=("+79991234567",),
    unparsed_phones=("12",),
)


def ticket_created() -> dict[str, Any]:
    return {
        "secret": SECRET,
        "ticket": {
            "id": "2261907",
            "status_id": "1",
            "subject": "First msg",
            "client_id": "242630",
            "assignee_id": None,
            "group": "0",
            "last_updated_at": "2016-12-17 14:07:33",
            "channel_id": "63818",
            "email": "jon@bonjovi.com",
            "published_at": "2016-12-17 14:07:33",
            "company_id": "153561",
            "additional_id": "123Ca344",
            "message": "My order has not arrived",
            "custom_fields": [{"id": 54, "name": "new item 2", "value": None}],
            "custom_blocks": [{"name": "Test", "url": "test", "secret_key": "x"}],
        },
        "client": client_body(),
    }


def comment_created(**comment: Any) -> dict[str, Any]:
    return {
        "secret": SECRET,
        "comment": {
            "id": 2658290,
            "ticket_id": 2261907,
            "message": "Any news?",
            "from": "client",
            "type": "public",
            "user_id": None,
            "client_id": 242630,
            "is_first": 0,
            "published_at": "2016-12-17 15:00:01",
            "files": [],
            **comment,
        },
        "client": client_body(),
        "custom_fields": [],
        "assignee_id": "545",
    }


def ticket_changed(**trigger: Any) -> dict[str, Any]:
    return {
        "secret": SECRET,
        "trigger": {
            "id": 991,
            "trigger_id": None,
            "user_id": 545,
            "ticket_id": "2261907",
            "data": [{"target": "status_id", "value": 3, "old_value": 1}],
            "changed_at": "2017-03-01 14:30:49",
            "old_status": 1,
            "new_status": 3,
            "company_id": 153561,
            **trigger,
        },
        "client": client_body(),
        "custom_fields": [{"id": 54, "name": "order", "value": "A-17"}],
        "assignee_id": 545,
    }


def parse_one(body: dict[str, Any] | bytes, source: UsedeskSource | None = None) -> TicketEvent:
    events = (source or make_source()).parse(request(body))
    assert len(events) == 1
    return events[0]


# --- the four shapes ------------------------------------------------------------------


def test_ticket_created() -> None:
    assert parse_one(ticket_created()) == TicketEvent(
        source="ud",
        ticket_id="2261907",
        kind=EventKind.TICKET_CREATED,
        subject="First msg",
        status=Status.OPEN,
        source_status="1",
        channel="63818",
        custom_fields={"54": None},
        comment=Comment(text="My order has not arrived", author_id="242630"),
        client=JON,
        occurred_at=datetime(2016, 12, 17, 14, 7, 33, tzinfo=UTC),
    )


def test_ticket_created_without_message_or_client_object() -> None:
    body = ticket_created()
    del body["client"]
    del body["ticket"]["message"]
    event = parse_one(body)
    assert event.comment is None
    assert event.client == Client(source_id="242630", emails=("jon@bonjovi.com",))


def test_naive_times_are_read_in_the_configured_zone() -> None:
    event = parse_one(ticket_created(), make_source(timezone="Europe/Moscow"))
    assert event.occurred_at == datetime(2016, 12, 17, 11, 7, 33, tzinfo=UTC)


def test_comment_from_client() -> None:
    assert parse_one(comment_created()) == TicketEvent(
        source="ud",
        ticket_id="2261907",
        kind=EventKind.COMMENT_ADDED,
        assignee_id="545",
        comment=Comment(
            id="2658290", text="Any news?", author=AuthorKind.CLIENT, author_id="242630"
        ),
        client=JON,
        occurred_at=datetime(2016, 12, 17, 15, 0, 1, tzinfo=UTC),
    )


@pytest.mark.parametrize(
    ("sender", "extra", "author", "author_id"),
    [
        ("user", {"user_id": "545", "client_id": None}, AuthorKind.AGENT, "545"),
        ("trigger", {"trigger_id": 12, "client_id": None}, AuthorKind.SYSTEM, "12"),
        ("client", {}, AuthorKind.CLIENT, "242630"),
        (None, {"user_id": 545}, AuthorKind.AGENT, "545"),
    ],
)
def test_comment_author(
    sender: str | None, extra: dict[str, Any], author: AuthorKind, author_id: str
) -> None:
    event = parse_one(comment_created(**{"from": sender, **extra}))
    assert event.comment is not None
    assert (event.comment.author, event.comment.author_id) == (author, author_id)


def test_private_comment_and_string_ids() -> None:
    event = parse_one(comment_created(id="2658290", ticket_id="2261907", type="private"))
    assert event.comment is not None
    assert event.comment.public is False
    assert (event.ticket_id, event.comment.id) == ("2261907", "2658290")


def test_same_comment_with_numbers_or_strings_has_one_dedup_key() -> None:
    as_numbers = parse_one(comment_created())
    as_strings = parse_one(comment_created(id="2658290", ticket_id="2261907", client_id="242630"))
    assert as_numbers.dedup_key() is not None
    assert as_numbers.dedup_key() == as_strings.dedup_key()


def test_status_change() -> None:
    assert parse_one(ticket_changed()) == TicketEvent(
        source="ud",
        ticket_id="2261907",
        kind=EventKind.STATUS_CHANGED,
        status=Status.CLOSED,
        source_status="3",
        previous_status=Status.OPEN,
        assignee_id="545",
        custom_fields={"54": "A-17"},
        client=JON,
        occurred_at=datetime(2017, 3, 1, 14, 30, 49, tzinfo=UTC),
        delivery_id="change:991",
    )


def test_status_change_seen_only_in_old_and_new_status() -> None:
    event = parse_one(ticket_changed(data=[], old_status="8", new_status="5"))
    assert event.kind is EventKind.STATUS_CHANGED
    assert (event.status, event.previous_status, event.source_status) == (
        Status.PENDING,
        Status.NEW,
        "5",
    )


def test_change_without_status_move_is_an_update_with_new_tags() -> None:
    data = [
        {"target": "new_tags", "value": "vip, delivery", "old_value": None},
        {"target": "new_tags", "value": "vip"},
        {"target": "removed_tags", "value": "spam"},
        {"target": "subject", "value": "Order A-17", "old_value": "First msg"},
        {"target": "assignee_id", "value": "77", "old_value": "545"},
    ]
    event = parse_one(ticket_changed(data=data, old_status=1, new_status=1))
    assert event.kind is EventKind.TICKET_UPDATED
    assert event.tags == ("vip", "delivery")
    assert event.subject == "Order A-17"
    assert event.assignee_id == "77"
    assert (event.status, event.previous_status) == (Status.OPEN, None)


def test_change_fields_at_the_top_level_as_documented() -> None:
    flat = {"secret": SECRET, **ticket_changed()["trigger"]}
    assert parse_one(flat) == parse_one(ticket_changed()).model_copy(
        update={"client": None, "assignee_id": None, "custom_fields": {}}
    )


def test_two_changes_in_one_second_keep_their_own_keys() -> None:
    tags = [{"target": "new_tags", "value": "vip"}]
    subject = [{"target": "subject", "value": "Order A-17"}]
    first = parse_one(ticket_changed(id=991, data=tags, old_status=1, new_status=1))
    second = parse_one(ticket_changed(id=992, data=subject, old_status=1, new_status=1))
    assert first.dedup_key() != second.dedup_key()
    assert first.dedup_key() == parse_one(ticket_changed(id=991, data=tags)).dedup_key()


def test_csat_rating() -> None:
    body = {
        "secret": SECRET,
        "csi": {"ticket_id": "2261907", "rating": "5", "comment": "Quick, thanks"},
        "client": client_body(),
    }
    assert parse_one(body) == TicketEvent(
        source="ud",
        ticket_id="2261907",
        kind=EventKind.RATING,
        rating=Rating(value="5", comment="Quick, thanks"),
        client=JON,
    )


def test_ping_and_chat_bodies_give_no_events() -> None:
    source = make_source()
    assert source.parse(request({"secret": SECRET, "ping": True})) == []
    chat = {"secret": SECRET, "chat_id": 5, "text": "hi", "ticket": {"id": "2261907"}}
    assert source.parse(request(chat)) == []


def test_form_encoded_body_reads_like_json() -> None:
    pairs = [
        ("secret", SECRET),
        ("comment[id]", "2658290"),
        ("comment[ticket_id]", "2261907"),
        ("comment[message]", "Any news?"),
        ("comment[from]", "client"),
        ("comment[type]", "public"),
        ("comment[user_id]", ""),
        ("comment[client_id]", "242630"),
        ("comment[published_at]", "2016-12-17 15:00:01"),
        ("client[id]", "242630"),
        ("client[name]", "Jon Bon Jovi"),
        ("client[emails][0][email]", "jon@bonjovi.com"),
        ("client[phones][0][phone]", "8 (999) 123-45-67"),
        ("client[phones][0][type]", "mobile"),
        ("client[phones][1][phone]", "12"),
        ("assignee_id", "545"),
    ]
    body = urlencode(pairs).encode()
    source = make_source()
    source.authenticate(RawRequest(body=body))
    assert parse_one(body, source) == parse_one(comment_created())


def test_form_encoded_list_with_empty_brackets() -> None:
    pairs = [("secret", SECRET), ("csi[ticket_id]", "7"), ("csi[rating]", "4")]
    pairs += [("client[emails][]", "a@b.ru"), ("client[emails][]", "C@d.ru")]
    event = parse_one(urlencode(pairs).encode())
    assert event.client is not None
    assert event.client.emails == ("a@b.ru", "c@d.ru")


# --- bodies that cannot be read ------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (b"\xff\xfe", "UTF-8"),
        (b"hello there", "neither a JSON object nor form-encoded"),
        (b'{"ticket": ', "not valid JSON"),
        (b"[1, 2]", "must be a JSON object"),
        (b'{"secret": "x", "order": {"id": 1}}', "expected one of the keys 'ticket', 'comment'"),
        (b'{"ticket": "2261907"}', "'ticket' must be an object"),
        (b'{"ticket": {"subject": "no id"}}', "ticket.id must hold the ticket id"),
        (b'{"comment": {"id": 1, "message": "x"}}', "comment.ticket_id"),
        (b'{"trigger": {"ticket_id": true, "changed_at": "x"}}', "trigger.ticket_id"),
        (b'{"csi": {"ticket_id": 5}}', "csi.rating is missing"),
    ],
)
def test_unreadable_bodies_are_refused_with_a_reason(body: bytes, reason: str) -> None:
    with pytest.raises(InvalidPayload) as caught:
        make_source().parse(request(body))
    assert reason in caught.value.reason


def test_reason_for_unknown_shape_names_the_keys_but_not_the_secret() -> None:
    with pytest.raises(InvalidPayload) as caught:
        make_source().parse(request({"secret": SECRET, "order": 1}))
    assert "'order'" in caught.value.reason
    assert SECRET not in caught.value.reason


# --- authentication --------------------------------------------------------------------


def test_secret_in_body_is_accepted() -> None:
    make_source().authenticate(request(ticket_created()))


def test_token_in_url_is_accepted_without_a_body_secret() -> None:
    body = ticket_created()
    del body["secret"]
    make_source().authenticate(request(body, token=SECRET))
    make_source().authenticate(request(b"not even json", token=SECRET))


def test_wrong_url_token_falls_back_to_the_body_secret() -> None:
    make_source().authenticate(request(ticket_created(), token="wrong"))


@pytest.mark.parametrize(
    "body",
    [
        {**ticket_created(), "secret": SECRET[:-1]},
        {**ticket_created(), "secret": ""},
        {k: v for k, v in ticket_created().items() if k != "secret"},
        {**ticket_created(), "secret": {"value": SECRET}},
        b"not json and not a form",
        b"\xff\xfe",
    ],
)
def test_missing_or_wrong_secret_is_refused(body: dict[str, Any] | bytes) -> None:
    with pytest.raises(AuthenticationFailed) as caught:
        make_source().authenticate(request(body))
    assert "secret" in caught.value.reason
    assert caught.value.status_code == 401


def test_wrong_url_token_and_no_body_secret_is_refused() -> None:
    with pytest.raises(AuthenticationFailed):
        make_source().authenticate(request({"ping": 1}, token=SECRET + "x"))


# --- statuses, times, settings --------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "status"),
    [
        ("1", Status.OPEN),
        ("2", Status.SOLVED),
        ("3", Status.CLOSED),
        ("4", Status.CLOSED),
        ("5", Status.PENDING),
        ("6", Status.PENDING),
        ("7", Status.SPAM),
        ("8", Status.NEW),
        ("9", Status.OPEN),
        ("10", Status.CLOSED),
        ("42", None),
    ],
)
def test_status_table(raw: str, status: Status | None) -> None:
    for form in (raw, int(raw), {"id": int(raw), "name": "x"}, {"id": raw}):
        assert usedesk_status(form) == (status, raw)


def test_status_absent() -> None:
    assert usedesk_status(None) == (None, None)
    assert usedesk_status({"name": "Open"}) == (None, None)


def test_raw_status_is_kept_next_to_the_mapped_one() -> None:
    body = ticket_created()
    body["ticket"]["status_id"] = {"id": "10"}
    event = parse_one(body)
    assert (event.status, event.source_status) == (Status.CLOSED, "10")


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("2017-03-01 14:30:49", datetime(2017, 3, 1, 11, 30, 49, tzinfo=UTC)),
        ("2017-03-01 14:30", datetime(2017, 3, 1, 11, 30, tzinfo=UTC)),
        ("2017-03-01T14:30:49+00:00", datetime(2017, 3, 1, 14, 30, 49, tzinfo=UTC)),
        (1488378649, datetime(2017, 3, 1, 14, 30, 49, tzinfo=UTC)),
        ("0000-00-00 00:00:00", None),
        ("yesterday", None),
        ("", None),
        (None, None),
    ],
)
def test_time_parsing(value: object, expected: datetime | None) -> None:
    from zoneinfo import ZoneInfo

    assert parse_usedesk_time(value, ZoneInfo("Europe/Moscow")) == expected


@pytest.mark.parametrize(
    ("settings", "key"),
    [
        ({"timezone": "Mars/Olympus"}, "timezone"),
        ({"secret": "  "}, "secret"),
        ({"api_token": ""}, "api_token"),
        ({"api_url": "api.usedesk.ru"}, "api_url"),
        ({"poll_interval_seconds": 0}, "poll_interval_seconds"),
        ({"channel_ids": ["x"]}, "channel_ids"),
        ({"webhook_secret": "x"}, "webhook_secret"),
    ],
)
def test_bad_settings_name_the_key(settings: dict[str, Any], key: str) -> None:
    with pytest.raises(ValidationError) as caught:
        UsedeskSettings.model_validate({"secret": SECRET, **settings})
    assert key in {str(err["loc"][0]) for err in caught.value.errors()}


def test_api_token_defaults_to_the_channel_secret() -> None:
    assert UsedeskSettings.model_validate({"secret": SECRET}).token() == SECRET
    other = UsedeskSettings.model_validate({"secret": SECRET, "api_token": "t0ken"})
    assert other.token() == "t0ken"
    assert "t0ken" not in repr(other) and SECRET not in repr(other)


async def test_poller_is_off_when_polling_is_disabled() -> None:
    assert make_source(poll=False).poller() is None
    poller = make_source(poll_interval_seconds=60).poller()
    assert isinstance(poller, UsedeskPoller)
    assert poller.interval == 60
    await poller.aclose()


def test_registry_finds_the_usedesk_source() -> None:
    assert source_class("usedesk") is UsedeskSource
