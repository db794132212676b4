"""PostgreSQL goes away under a running `syncd run`, then comes back: nothing is lost.

The outage refuses new connections to the test's database and ends the open ones
(ALTER DATABASE ... ALLOW_CONNECTIONS false, pg_terminate_backend), so the other
databases on the server are untouched.
"""

from __future__ import annotations

import time
from pathlib import Path

import psycopg
import pytest

from syncd.emulators.serving import ServerThread
from syncd.emulators.sink import SinkState

from ..conftest import PG_ADMIN_DSN
from .harness import Daemon

pytestmark = [pytest.mark.e2e]


def set_outage(database: str, *, down: bool) -> None:
    allow = "false" if down else "true"
    with psycopg.connect(PG_ADMIN_DSN, autocommit=True) as conn:
        conn.execute(f'ALTER DATABASE "{database}" ALLOW_CONNECTIONS {allow}')
        if down:
            conn.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s",
                (database,),
            )


@pytest.mark.parametrize("writer", ["process", "thread"])
def test_a_store_outage_answers_503_and_loses_nothing(
    tmp_path: Path, pg_url: str, authed_sink: tuple[ServerThread, SinkState], writer: str
) -> None:
    _, sink = authed_sink
    database = pg_url.rsplit("/", 1)[1]
    d = Daemon(tmp_path, authed_sink[0].url)
    d.config.write_text(
        d.config.read_text().replace(
            'url = "sqlite:///syncd.db"', f'url = "{pg_url}"\nintake_writer = "{writer}"'
        )
    )
    d.start()

    def ticket(n: int) -> dict[str, object]:
        return {"event": "ticket_created", "ticket_id": n, "subject": f"Ticket {n}"}

    try:
        assert [d.post(ticket(n)).status_code for n in (1, 2, 3)] == [202] * 3
        set_outage(database, down=True)
        refused = [d.post(ticket(n)) for n in (4, 5)]
        # The periodic jobs (lease recovery runs every second here) fail meanwhile.
        deadline = time.monotonic() + 15
        while '"job_failed"' not in d.log():
            assert time.monotonic() < deadline, d.log()[-3000:]
            time.sleep(0.1)
        set_outage(database, down=False)
        for answer in refused:
            assert answer.status_code == 503, answer.text
            assert answer.headers["retry-after"] == "5"
            assert "nothing was stored" in answer.json()["error"]
        # The helpdesk sends them again once the store is back; so do new ones.
        deadline = time.monotonic() + 30
        while d.post(ticket(4)).status_code != 202:
            assert time.monotonic() < deadline, d.log()[-3000:]
            time.sleep(0.2)
        assert [d.post(ticket(n)).status_code for n in (5, 6)] == [202, 202]
        d.wait_for(lambda t: t.get("delivered", 0) == 6, limit=60)
    finally:
        set_outage(database, down=False)
        d.stop()
    log = d.log()
    assert '"webhook_not_stored"' in log
    assert "Traceback" not in log  # readable warnings, not crash reports, all along
    deals = sorted(
        int(r["fields"]["ticket_id"]) for r in sink.records.values() if r["entity"] == "deal"
    )
    assert deals == [1, 2, 3, 4, 5, 6]
    assert sink.duplicate_creates() == {}
