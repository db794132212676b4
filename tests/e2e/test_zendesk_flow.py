"""Zendesk through `syncd run`: signed webhooks, a repeated invocation, lost ones found by polling."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import httpx
import pytest

from syncd.emulators.serving import ServerThread
from syncd.emulators.sink import SinkState
from syncd.emulators.zendesk_api import ZendeskState, create_zendesk_api

from .harness import Daemon

pytestmark = pytest.mark.e2e

SECRET = "zd-signing-secret-4f1e"
EMAIL = "admin@example.com"
TOKEN = "zd-api-token-77aa31"


@pytest.fixture
def zendesk() -> Iterator[tuple[ServerThread, ZendeskState]]:
    app, state = create_zendesk_api(EMAIL, TOKEN, webhook_secret=SECRET, recent_window_seconds=0)
    server = ServerThread(app).start()
    yield server, state
    server.stop()


def test_zendesk_webhooks_and_polling_through_the_daemon(
    daemon_factory: Callable[..., Daemon],
    authed_sink: tuple[ServerThread, SinkState],
    zendesk: tuple[ServerThread, ZendeskState],
) -> None:
    _, sink = authed_sink
    api, zd = zendesk
    d = daemon_factory(
        extra=f"""
[sources.zendesk]
kind = "zendesk"
signing_secret = "{SECRET}"
base_url = "{api.url}"
email = "{EMAIL}"
api_token = "{TOKEN}"
poll_interval_seconds = 1
"""
    ).start()

    def post(hook: object) -> httpx.Response:
        return httpx.post(
            f"{d.url}/hooks/zendesk", content=hook.body, headers=hook.headers, timeout=10
        )  # type: ignore[attr-defined]

    customer = zd.add_user("Anna", email="Anna@Example.com", phone="+7 999 123-45-67")
    ticket = zd.create_ticket("Broken kettle", requester_id=customer.id)
    hooks = zd.drain_webhooks()
    answers = [post(h) for h in hooks]
    assert all(a.status_code == 202 for a in answers)
    assert post(hooks[0]).json()["duplicates"] == 1  # a retried invocation is stored once
    tampered = hooks[0]
    bad = httpx.post(
        f"{d.url}/hooks/zendesk", content=tampered.body + b" ", headers=tampered.headers, timeout=10
    )
    assert bad.status_code == 401

    agent = zd.add_user("Bob", role="agent")
    zd.add_comment(ticket.id, "A new one is on its way", author_id=agent.id)
    zd.update_ticket(ticket.id, status="solved")
    assert len(zd.drain_webhooks()) == 2  # both webhooks are lost

    # The ticket export brings the status back, the ticket event export the comment.
    d.wait_for(lambda t: t.get("delivered", 0) + t.get("coalesced", 0) == len(hooks) + 2, limit=60)
    stats = d.stats()
    assert stats["pollers"]["zendesk"]["recovered_events"] == 2
    notes = sorted(r["fields"]["text"] for r in sink.records.values() if r["entity"] == "note")
    # The recovered comment is written as the agent's: the poller looked up the author's role.
    assert notes == [f"Agent {agent.id}: A new one is on its way", "Client: Hello, I need help."]
    deals = [r for r in sink.records.values() if r["entity"] == "deal"]
    assert len(deals) == 1 and deals[0]["fields"]["status"] == "solved"
    contacts = [r for r in sink.records.values() if r["entity"] == "contact"]
    assert len(contacts) == 1 and contacts[0]["fields"]["emails"] == ["anna@example.com"]
    assert sink.duplicate_creates() == {}
