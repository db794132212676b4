"""Usedesk through `syncd run`: webhooks for speed, polling for what they lost."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator

import pytest

from syncd.emulators.serving import ServerThread
from syncd.emulators.sink import SinkState
from syncd.emulators.usedesk_api import UsedeskState, create_usedesk_api, encode_webhook

from .harness import Daemon

pytestmark = pytest.mark.e2e

USEDESK_SECRET = "usedesk-channel-secret-91ab"


@pytest.fixture
def usedesk() -> Iterator[tuple[ServerThread, UsedeskState]]:
    app, state = create_usedesk_api(USEDESK_SECRET)
    server = ServerThread(app).start()
    yield server, state
    server.stop()


def test_lost_webhook_is_recovered_by_polling_and_nothing_is_doubled(
    daemon_factory: Callable[..., Daemon],
    authed_sink: tuple[ServerThread, SinkState],
    usedesk: tuple[ServerThread, UsedeskState],
) -> None:
    _, sink = authed_sink
    api, ud = usedesk
    d = daemon_factory(
        extra=f"""
[sources.usedesk]
kind = "usedesk"
secret = "{USEDESK_SECRET}"
api_url = "{api.url}"
poll_interval_seconds = 1
poll_lookback_seconds = 3600
"""
    ).start()

    def deliver(webhooks: list[dict[str, object]]) -> None:
        for body in webhooks:
            raw, ctype = encode_webhook(body)
            assert d.post_raw("usedesk", raw, ctype).status_code == 202

    anna = ud.add_client("Anna", ["Anna@Example.com"], [("8 (999) 123-45-67", "mobile")])
    a = ud.create_ticket("Refund please", "Order 1 arrived broken", client_id=anna)
    deliver(ud.take_webhooks())  # ticket A: its webhook arrives
    b = ud.create_ticket("Invoice", "Send me an invoice")
    ud.add_comment(b, "For company Romashka", sender="client")
    ud.take_webhooks()  # ticket B: both webhooks are lost
    ud.advance(5)
    ud.add_comment(a, "Replacement is on its way", sender="user", user_id=545)
    deliver(ud.take_webhooks())

    # A: created (with first message) + comment; B recovered: created (first message) + comment
    # (several events of one ticket may go out as one delivery: "coalesced")
    d.wait_for(lambda t: t.get("delivered", 0) + t.get("coalesced", 0) == 4, limit=60)
    stats = d.stats()
    assert stats["pollers"]["usedesk"]["recovered_events"] == 2
    assert stats["pollers"]["usedesk"]["last_error"] is None

    with d.db() as conn:
        rows = conn.execute(
            "SELECT ticket_id, kind, recovered_by_poll FROM events ORDER BY id"
        ).fetchall()
    assert [(r[0], r[1], bool(r[2])) for r in rows] == [
        (str(a), "ticket_created", False),
        (str(a), "comment_added", False),
        (str(b), "ticket_created", True),
        (str(b), "comment_added", True),
    ]
    deals = {r["fields"]["ticket_id"]: r for r in sink.records.values() if r["entity"] == "deal"}
    assert set(deals) == {str(a), str(b)}
    contacts = [r for r in sink.records.values() if r["entity"] == "contact"]
    anna_contact = [c for c in contacts if c["fields"].get("phones") == ["+79991234567"]]
    assert len(anna_contact) == 1 and deals[str(a)]["parent_id"] == anna_contact[0]["id"]
    notes = sorted(r["fields"]["text"] for r in sink.records.values() if r["entity"] == "note")
    assert notes == [
        "Agent 545: Replacement is on its way",
        "Client: For company Romashka",
        "Client: Order 1 arrived broken",
        "Client: Send me an invoice",
    ]
    assert sink.duplicate_creates() == {}

    # later polls overlap the earlier ones: still nothing new
    calls_before = sum(1 for path, _ in ud.calls if path == "/tickets")
    while sum(1 for path, _ in ud.calls if path == "/tickets") < calls_before + 2:
        d.wait_for(lambda t: True, limit=1)
    assert sum(d.stats()["totals"].values()) == 4
    assert json.loads(json.dumps(d.stats()["pollers"]["usedesk"]))["recovered_events"] == 2
