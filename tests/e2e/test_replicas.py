"""Two `syncd run` replicas on one PostgreSQL database, sharing an amoCRM account and a helpdesk.

Leases already keep two replicas from sending the same delivery. What this checks
is what they must agree on through the database: together they stay under
amoCRM's limit of 7 requests in any second (the emulator refuses the 8th), and
only one of them polls the helpdesk, until it stops and the other takes over.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from syncd.emulators.amocrm import AmoState, create_amocrm_emulator
from syncd.emulators.serving import ServerThread
from syncd.emulators.zendesk_api import ZendeskState, create_zendesk_api

from .harness import HOOK_SECRET, Daemon

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

TICKETS = 40
AMO_TOKEN = "amo-replicas-token-8123"
ZD_EMAIL, ZD_TOKEN = "sync@acme.test", "zd-replicas-token"


@pytest.fixture
def amo() -> Iterator[tuple[ServerThread, AmoState]]:
    app, state = create_amocrm_emulator(long_lived_token=AMO_TOKEN, rate_limit=7.0)
    server = ServerThread(app).start()
    yield server, state
    server.stop()


@pytest.fixture
def zendesk() -> Iterator[tuple[ServerThread, ZendeskState]]:
    app, state = create_zendesk_api(ZD_EMAIL, ZD_TOKEN, recent_window_seconds=0)
    server = ServerThread(app).start()
    yield server, state
    server.stop()


def logged(d: Daemon, *names: str) -> int:
    """How many of this replica's log lines are one of these events."""
    count = 0
    for line in d.log().splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if record.get("event") in names:
            count += 1
    return count


def counted(d: Daemon) -> int | None:
    """The number of replicas this one last said it shares the CRM's limit with."""
    found = None
    for line in d.log().splitlines():
        if '"replicas_counted"' in line:
            found = int(json.loads(line)["replicas"])
    return found


def polls(d: Daemon) -> int:
    """How many polls of the helpdesk this replica ran (one log line each)."""
    return logged(d, "poll_done", "webhooks_missed", "poll_failed")


def test_two_replicas_share_the_crm_limit_and_one_polls(
    tmp_path: Path,
    pg_url: str,
    authed_sink: tuple[ServerThread, object],
    amo: tuple[ServerThread, AmoState],
    zendesk: tuple[ServerThread, ZendeskState],
) -> None:
    amo_server, amo_state = amo
    zd_server, _ = zendesk
    extra = f"""
[destinations.amo]
kind = "amocrm"
base_url = "{amo_server.url}"
access_token = "{AMO_TOKEN}"
[destinations.amo.mapping.pipelines.support]
id = "3383152"
initial_stage = "33929752"
[destinations.amo.mapping.pipelines.support.stages]
new = "33929752"
[[destinations.amo.mapping.rules]]
name = "all"
then.pipeline = "support"

[sources.zendesk]
kind = "zendesk"
signing_secret = "not-used-here"
base_url = "{zd_server.url}"
email = "{ZD_EMAIL}"
api_token = "{ZD_TOKEN}"
poll_interval_seconds = 0.5
"""
    replicas: list[Daemon] = []
    for n in range(2):
        workdir = tmp_path / f"replica{n}"
        workdir.mkdir()
        d = Daemon(workdir, authed_sink[0].url, concurrency=16, extra=extra)
        config = d.config.read_text().replace('url = "sqlite:///syncd.db"', f'url = "{pg_url}"')
        config = config.replace("[sources.helpdesk]", '[sources.helpdesk]\ndestinations = ["amo"]')
        d.config.write_text(config)
        replicas.append(d)
    first, second = replicas
    try:
        first.start()
        second.start()
        # Each has counted the other (the first one at its next heartbeat) before load.
        wait_until(lambda: all(counted(d) == 2 for d in replicas))
        assert "syncd_replicas_live 2.0" in httpx.get(f"{first.url}/metrics", timeout=10).text

        with httpx.Client(timeout=10) as client:
            for t in range(TICKETS):
                replica = replicas[t % 2]
                body = {
                    "event": "ticket_created",
                    "ticket_id": 9000 + t,
                    "subject": f"Ticket {t}",
                    "status": "new",
                    "client": {"name": f"Client {t}", "email": f"client{t}@example.com"},
                    "comment": {"id": f"{t}-0", "text": "Hello"},
                }
                answer = client.post(
                    f"{replica.url}/hooks/helpdesk",
                    json=body,
                    headers={"X-Syncd-Secret": HOOK_SECRET},
                )
                assert answer.status_code == 202, answer.text
        first.wait_for(lambda t: t.get("delivered", 0) + t.get("coalesced", 0) == TICKETS, 90)

        # Both replicas delivered, and together they never went over the account's limit.
        delivered = [logged(d, "delivered") for d in replicas]
        assert sum(delivered) == TICKETS and min(delivered) > 0, delivered
        assert amo_state.rate_limited == 0
        assert len(amo_state.leads) == TICKETS and len(amo_state.contacts) == TICKETS
        assert len(amo_state.notes) == TICKETS

        # One replica polls the helpdesk: the one started first.
        wait_until(lambda: polls(first) >= 3)
        assert polls(second) == 0
        # When it stops, the other takes over.
        assert first.terminate() == 0
        wait_until(lambda: polls(second) >= 2)
        live = [r for r in second.stats()["replicas"] if r["live"]]
        assert len(live) == 1
        assert "syncd_replicas_live 1.0" in httpx.get(f"{second.url}/metrics", timeout=10).text
    finally:
        for d in replicas:
            d.stop()


def wait_until(condition: Callable[[], bool], limit: float = 30) -> None:
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.05)
    raise AssertionError("condition not met in time")
