"""Intake over HTTP into a real store: auth, parsing, dedup, quarantine and re-ingest."""

from __future__ import annotations

import json
import time
from collections.abc import Callable

import pytest
from sqlalchemy import select

from syncd.intake.signing import sign_standard_webhook, standard_webhooks_key
from syncd.store.models import events, quarantine

from .conftest import App

SECRET = "s3cret-hook-value"
WHSEC = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"

CONFIG = f"""
[sources.plain]
kind = "generic"
secret = "{SECRET}"

[sources.nested]
kind = "generic"
secret = "{SECRET}"
status_map = {{ "in progress" = "open", "waiting on customer" = "pending" }}

[sources.nested.fields]
ticket_id = "ticket.id"
subject = "ticket.title"
status = "ticket.state"
client = "ticket.requester"
event_id = "meta.delivery"

[sources.signed]
kind = "generic"
signing = "standard_webhooks"
secret = "{WHSEC}"

[destinations.crm]
kind = "rest"
base_url = "http://127.0.0.1:9"
"""

Make = Callable[..., App]


def post(
    app: App, source: str, body: object, headers: dict[str, str] | None = None
) -> tuple[int, dict[str, object]]:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    r = app.client.post(
        f"/hooks/{source}",
        content=raw,
        headers={"content-type": "application/json", **(headers or {})},
    )
    return r.status_code, r.json()


def stored_payloads(app: App) -> list[dict[str, object]]:
    return [json.loads(r.payload) for r in app.rows(events)]


def test_generic_event_is_normalized_and_stored(make_app: Make) -> None:
    app = make_app(CONFIG)
    status, body = post(
        app,
        "plain",
        {
            "event": "ticket_created",
            "ticket_id": 42,
            "subject": "Late order",
            "status": "Open",
            "client": {"name": "Ivan", "email": "Ivan@Example.ru", "phone": "8 (999) 123-45-67"},
            "comment": {"id": 7, "text": "Where is my order?", "author": "client"},
        },
        {"X-Syncd-Secret": SECRET},
    )
    assert status == 202 and body["deliveries"] == 1
    [payload] = stored_payloads(app)
    assert payload["ticket_id"] == "42" and payload["kind"] == "ticket_created"
    assert payload["status"] == "open" and payload["source_status"] == "Open"
    assert payload["client"] == {
        "name": "Ivan",
        "emails": ["ivan@example.ru"],
        "phones": ["+79991234567"],
    }
    assert payload["comment"] == {"id": "7", "text": "Where is my order?"}


def test_field_paths_and_status_map(make_app: Make) -> None:
    app = make_app(CONFIG)
    body = {
        "meta": {"delivery": "d-1"},
        "ticket": {
            "id": "T-9",
            "title": "Hi",
            "state": "waiting on customer",
            "requester": {"id": 5, "phones": ["+7 999 000-11-22"]},
        },
    }
    assert post(app, "nested", body, {"X-Syncd-Secret": SECRET})[0] == 202
    status, again = post(app, "nested", body, {"X-Syncd-Secret": SECRET})
    assert status == 202 and again["duplicates"] == 1  # same delivery id: stored once
    [payload] = stored_payloads(app)
    assert payload["ticket_id"] == "T-9" and payload["status"] == "pending"
    assert payload["client"] == {"source_id": "5", "phones": ["+79990001122"]}
    assert payload["delivery_id"] == "d-1"


def _signed(
    body: bytes, msg_id: str = "msg_1", ts: int | None = None, secret: str = WHSEC
) -> dict[str, str]:
    ts = int(time.time()) if ts is None else ts
    sig = sign_standard_webhook(standard_webhooks_key(secret), msg_id, ts, body)
    return {
        "webhook-id": msg_id,
        "webhook-timestamp": str(ts),
        "webhook-signature": f"v1,bogus= {sig}",
    }


def test_standard_webhooks(make_app: Make) -> None:
    app = make_app(CONFIG)
    raw = json.dumps({"ticket_id": 1, "status": "solved"}).encode()
    assert post(app, "signed", raw, _signed(raw))[0] == 202
    assert post(app, "signed", raw, _signed(raw))[1]["duplicates"] == 1  # a retry of msg_1
    stale = post(app, "signed", raw, _signed(raw, "msg_2", ts=int(time.time()) - 301))
    future = post(app, "signed", raw, _signed(raw, "msg_3", ts=int(time.time()) + 301))
    tampered = post(app, "signed", raw.replace(b"solved", b"closed"), _signed(raw, "msg_4"))
    wrong_key = post(app, "signed", raw, _signed(raw, "msg_5", secret="whsec_" + "QUJD" * 8))
    for status, body in (stale, future, tampered, wrong_key):
        assert status == 401, body
    assert "tolerance" in str(stale[1]["error"]) and "does not match" in str(tampered[1]["error"])
    assert len(app.rows(events)) == 1 and app.rows(quarantine) == []


def test_wrong_secret_stores_nothing(make_app: Make) -> None:
    app = make_app(CONFIG)
    for headers in ({}, {"X-Syncd-Secret": "nope"}, {"X-Syncd-Secret": SECRET + "x"}):
        status, body = post(app, "plain", {"ticket_id": 1}, headers)
        assert status == 401 and "X-Syncd-Secret" in str(body["error"])
    assert post(app, "plain", b"garbage", {})[0] == 401
    assert app.rows(events) == [] and app.rows(quarantine) == []


def test_unknown_source_and_oversized_body(make_app: Make) -> None:
    app = make_app(CONFIG + "\n[server]\nmax_body_bytes = 100\n")
    assert post(app, "nosuch", {"ticket_id": 1}, {"X-Syncd-Secret": SECRET})[0] == 404
    status, body = post(
        app, "plain", {"ticket_id": 1, "pad": "x" * 200}, {"X-Syncd-Secret": SECRET}
    )
    assert status == 413 and "limit is 100" in str(body["error"])


def test_unreadable_payload_is_quarantined_then_reingested(make_app: Make) -> None:
    app = make_app(CONFIG)
    status, body = post(
        app, "plain", {"ticket": {"id": 77}, "subject": "wrong place"}, {"X-Syncd-Secret": SECRET}
    )
    assert status == 422 and "ticket_id" in str(body["error"])
    [held] = app.rows(quarantine)
    assert held.id == body["quarantine_id"] and held.state == "held" and held.source == "plain"
    assert json.loads(held.body) == {"ticket": {"id": 77}, "subject": "wrong place"}
    assert SECRET not in held.headers and json.loads(held.headers)["x-syncd-secret"] == "***"
    status, body = post(app, "plain", b"\xff\xfe not json", {"X-Syncd-Secret": SECRET})
    assert status == 422 and "UTF-8" in str(body["error"])
    assert len(app.rows(quarantine)) == 2 and app.rows(events) == []

    # the admin fixes the config: the ticket id lives at ticket.id for this sender
    fixed = make_app(
        CONFIG.replace(
            '[sources.plain]\nkind = "generic"',
            '[sources.plain]\nkind = "generic"\nfields = { ticket_id = "ticket.id" }',
        ),
        store=app.store,
    )
    import asyncio

    outcome = asyncio.run(fixed.intake.reingest(held.id))
    assert getattr(outcome, "event_ids", None)
    [payload] = stored_payloads(fixed)
    assert payload["ticket_id"] == "77" and payload["subject"] == "wrong place"
    states = {r.id: r.state for r in fixed.rows(quarantine)}
    assert states[held.id] == "reingested"
    with pytest.raises(ValueError, match="reingested, not held"):
        asyncio.run(fixed.intake.reingest(held.id))


def test_quarantine_masks_secrets_inside_the_body(make_app: Make) -> None:
    """Usedesk-style senders put the secret in the body; it must not sit in the quarantine."""
    from syncd import logs

    logs.redactor.add([SECRET])
    app = make_app(CONFIG)
    status, _ = post(app, "plain", {"secret": SECRET, "no": "ticket"}, {"X-Syncd-Secret": SECRET})
    assert status == 422
    [held] = app.rows(quarantine)
    assert SECRET.encode() not in held.body and b"***" in held.body


def test_source_order_is_kept_per_ticket(make_app: Make) -> None:
    app = make_app(CONFIG)
    for i in range(3):
        post(
            app,
            "plain",
            {"ticket_id": 5, "event": "comment_added", "comment": f"c{i}"},
            {"X-Syncd-Secret": SECRET},
        )
    with app.store.read_engine.connect() as conn:
        ids = list(conn.execute(select(events.c.id).order_by(events.c.id)).scalars())
    assert [p["comment"]["text"] for p in stored_payloads(app)] == ["c0", "c1", "c2"]
    assert ids == sorted(ids)
