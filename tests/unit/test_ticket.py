"""Normalization: phones to E.164, e-mails to lower case, stable dedup keys."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from syncd.ticket import (
    Comment,
    EventKind,
    TicketEvent,
    as_id,
    make_client,
    normalize_email,
    normalize_phone,
)


@pytest.mark.parametrize(
    ("raw", "region", "expected"),
    [
        ("+79991234567", "RU", "+79991234567"),
        ("8 (999) 123-45-67", "RU", "+79991234567"),
        ("89991234567", "RU", "+79991234567"),
        ("7 999 123 45 67", "RU", "+79991234567"),
        ("+7 (999) 123-45-67", "RU", "+79991234567"),
        ("999 123-45-67", "RU", "+79991234567"),
        ("+7 999 123-45-67 доб. 123", "RU", "+79991234567"),
        ("+1 (415) 555-2671 ext. 3", "RU", "+14155552671"),
        ("(415) 555-2671", "US", "+14155552671"),
        ("+44 20 7946 0958", "RU", "+442079460958"),
        ("  +7-999-123-45-67  ", "RU", "+79991234567"),
        ("12", "RU", None),
        ("not a phone", "RU", None),
        ("", "RU", None),
    ],
)
def test_phone_normalization(raw: str, region: str, expected: str | None) -> None:
    assert normalize_phone(raw, region) == expected


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("Jon@BonJovi.com", "jon@bonjovi.com"),
        ("  <support@example.ru> ", "support@example.ru"),
        ("no-at-sign", None),
        ("two words@x.ru", None),
        ("@x.ru", None),
    ],
)
def test_email_normalization(raw: str, expected: str | None) -> None:
    assert normalize_email(raw) == expected


def test_client_merges_spellings_of_the_same_contact() -> None:
    client = make_client(
        source_id="242630",
        name=" Ivan Petrov ",
        emails=["Ivan@Example.ru", "ivan@example.ru", "", None],
        phones=["8 (999) 123-45-67", "+79991234567", "ext", None],
    )
    assert client.source_id == "242630"
    assert client.name == "Ivan Petrov"
    assert client.emails == ("ivan@example.ru",)
    assert client.phones == ("+79991234567",)
    assert client.unparsed_phones == ("ext",)


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("2265179", "2265179"),
        (2265179, "2265179"),
        (12.0, "12"),
        ("0", None),
        (None, None),
        (True, None),
        (" 7 ", "7"),
    ],
)
def test_ids_are_strings(raw: object, expected: str | None) -> None:
    assert as_id(raw) == expected


def _event(**kw: object) -> TicketEvent:
    base: dict[str, object] = {"source": "ud", "ticket_id": "1", "kind": EventKind.COMMENT_ADDED}
    base.update(kw)
    return TicketEvent.model_validate(base)


def test_dedup_key_prefers_the_delivery_id() -> None:
    assert _event(delivery_id="inv-1").dedup_key() == "id:inv-1"


def test_dedup_key_is_stable_for_the_same_change_whatever_the_timezone() -> None:
    t = datetime(2026, 11, 25, 9, 0, tzinfo=UTC)
    a = _event(comment=Comment(id="5", text="hi"), occurred_at=t)
    b = _event(comment=Comment(id="5", text="hi, edited"), occurred_at=t.astimezone())
    assert a.dedup_key() == b.dedup_key() is not None
    assert a.dedup_key() != _event(comment=Comment(id="6", text="hi"), occurred_at=t).dedup_key()
    assert a.dedup_key() != _event(kind=EventKind.TICKET_UPDATED, occurred_at=t).dedup_key()


def test_no_dedup_without_time_or_comment_id() -> None:
    """The same "ok" written twice is two events, not one."""
    assert _event(comment=Comment(text="ok")).dedup_key() is None


def test_event_round_trips_through_json() -> None:
    event = _event(
        comment=Comment(id="5", text="hi"),
        client=make_client(emails=["a@b.ru"], phones=["89991234567"]),
        occurred_at=datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC),
        tags=("vip",),
    )
    assert TicketEvent.model_validate(event.model_dump(mode="json")) == event


@pytest.mark.parametrize(
    "raw",
    [-62135596801, 10**20, "99999999999999", "0001-01-01T00:00:00+05:00", "0001-01-01 00:00:00"],
)
def test_times_out_of_any_calendar_read_as_no_time(raw: object) -> None:
    """Found by hypothesis: such a value used to crash intake with a 500."""
    from zoneinfo import ZoneInfo

    from syncd.intake.generic import parse_time
    from syncd.intake.usedesk import parse_usedesk_time

    assert parse_time(raw) is None
    assert parse_usedesk_time(raw, ZoneInfo("Europe/Moscow")) is None
