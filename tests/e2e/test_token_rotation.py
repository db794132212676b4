"""amoCRM refresh tokens are single-use: a crash right after a refresh must not strand syncd."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

import pytest

from syncd.emulators.amocrm import AmoState, create_amocrm_emulator
from syncd.emulators.serving import ServerThread

from .harness import Daemon

pytestmark = pytest.mark.e2e


@pytest.fixture
def amo() -> Iterator[tuple[ServerThread, AmoState]]:
    app, state = create_amocrm_emulator(rate_limit=None)
    server = ServerThread(app).start()
    yield server, state
    server.stop()


def ticket(n: int) -> dict[str, object]:
    return {
        "event": "ticket_created",
        "ticket_id": n,
        "subject": f"T{n}",
        "client": {"id": n, "email": f"c{n}@example.com"},
    }


def stored_refresh(d: Daemon) -> str | None:
    with d.db() as conn:
        row = conn.execute("SELECT data FROM credentials WHERE destination = 'amo'").fetchone()
    return None if row is None else str(row[0])


def test_sigkill_right_after_a_refresh_keeps_the_integration_alive(
    daemon_factory: Callable[..., Daemon], amo: tuple[ServerThread, AmoState]
) -> None:
    server, state = amo
    access, refresh = state.issue_tokens()
    d = daemon_factory(
        extra=f"""
[destinations.amo]
kind = "amocrm"
base_url = "{server.url}"
client_id = "{state.client_id}"
client_secret = "{state.client_secret}"
redirect_uri = "{state.redirect_uri}"
access_token = "{access}"
refresh_token = "{refresh}"
[[destinations.amo.mapping.rules]]
name = "plain"
"""
    )
    d.config.write_text(
        d.config.read_text().replace(
            "[sources.helpdesk]", '[sources.helpdesk]\ndestinations = ["amo"]'
        )
    )
    d.start()
    assert d.post(ticket(1)).status_code == 202
    d.wait_for(lambda t: t.get("delivered") == 1)

    state.expire_tokens()  # the next call gets 401: syncd refreshes with the configured token
    before = stored_refresh(d)
    assert d.post(ticket(2)).status_code == 202
    deadline = time.monotonic() + 30
    while stored_refresh(d) == before:  # the rotated pair is on disk ...
        assert time.monotonic() < deadline, "the refreshed tokens were never stored"
        time.sleep(0.01)
    d.kill()  # ... and the daemon dies right away
    assert state.refreshes == 1

    # The configured refresh token is spent now: only the stored pair can authenticate.
    d.start()
    assert d.post(ticket(3)).status_code == 202
    d.wait_for(lambda t: t.get("delivered") == 3, limit=60)
    assert len(state.leads) == 3 and len(state.contacts) == 3
    assert "credentials problem" not in d.log()
