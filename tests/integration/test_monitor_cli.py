"""`syncd status`, `syncd events list`, `syncd resend` and `syncd hash-password`: on the store directly."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from sqlalchemy import select, update
from typer.testing import CliRunner

from syncd.cli import app as cli
from syncd.events import IncomingEvent
from syncd.monitor.passwords import verify_password
from syncd.retry import outbox
from syncd.store import Store
from syncd.store.models import audit, deliveries

CONFIG = """
[store]
url = "sqlite:///syncd.db"

[sources.hd]
secret = "x-secret-value"

[destinations.b24]
kind = "rest"
base_url = "http://127.0.0.1:9"
[destinations.amo]
kind = "rest"
base_url = "http://127.0.0.1:9"
"""


@pytest.fixture
def cfg(tmp_path: Path) -> Path:
    path = tmp_path / "syncd.toml"
    path.write_text(CONFIG)
    store = Store(f"sqlite:///{tmp_path}/syncd.db")
    store.migrate()
    now = time.time()
    for ticket, email, dests in (
        ("1", "ivan@example.ru", ("b24", "amo")),
        ("2", "olga@example.ru", ("b24",)),
        ("3", None, ("amo",)),
    ):
        event = IncomingEvent(
            source="hd",
            ticket_id=ticket,
            kind="ticket_created",
            payload={"source": "hd", "ticket_id": ticket, "kind": "ticket_created"},
            destinations=dests,
            client_email=email,
        )
        store.write_sync(lambda c, e=event: outbox.enqueue(c, e, now))
    # ticket 2 went missing in b24; ticket 1 reached b24 but failed in amo
    store.write_sync(
        lambda c: c.execute(
            update(deliveries)
            .where(deliveries.c.event_id == 2)
            .values(state="expired", next_attempt_at=None, last_error="HTTP 503 for 24 h")
        )
    )
    store.write_sync(
        lambda c: c.execute(
            update(deliveries)
            .where(deliveries.c.event_id == 1)
            .values(state="delivered", next_attempt_at=None, finished_at=now)
        )
    )
    store.close()
    return path


def run(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(cli, list(args))
    return result.exit_code, result.output


def test_status_counts_per_destination(cfg: Path) -> None:
    code, out = run("status", "-c", str(cfg), "--json")
    assert code == 0, out
    data = json.loads(out)
    assert data["totals"]["delivered"] == 2 and data["totals"]["expired"] == 1
    by = {(r["destination"], r["source"]): r["counts"] for r in data["by_destination_and_source"]}
    assert by[("amo", "hd")]["pending"] == 1
    code, out = run("status", "-c", str(cfg))
    assert code == 0 and "missing" in out and "b24" in out


def test_events_list_filters_like_the_ui(cfg: Path) -> None:
    code, out = run("events", "list", "-c", str(cfg), "--client", "IVAN@example.ru", "--json")
    assert code == 0, out
    rows = [json.loads(line) for line in out.splitlines()]
    assert {(r["ticket_id"], r["destination"]) for r in rows} == {("1", "b24"), ("1", "amo")}
    code, out = run("events", "list", "-c", str(cfg), "--state", "missing")
    assert code == 0 and "HTTP 503 for 24 h" in out and out.count("\n") == 1
    code, out = run("events", "list", "-c", str(cfg), "--state", "lost")
    assert code == 2 and "unknown state 'lost'" in out


def test_resend_by_filter_from_the_cli_is_audited(cfg: Path) -> None:
    code, out = run("resend", "-c", str(cfg), "--state", "missing", "--destination", "b24", "--yes")
    assert code == 0 and "queued 1 deliveries again" in out, out
    store = Store(f"sqlite:///{cfg.parent}/syncd.db")
    try:
        with store.read_engine.connect() as c:
            state = c.execute(
                select(deliveries.c.state).where(deliveries.c.event_id == 2)
            ).scalar_one()
            [entry] = list(c.execute(select(audit)))
    finally:
        store.close()
    assert state == "pending"
    assert entry.actor.startswith("cli:") and entry.action == "resend_filter" and entry.count == 1
    assert json.loads(entry.detail)["filter"]["destination"] == "b24"
    # nothing left to resend
    code, out = run("resend", "-c", str(cfg), "--state", "missing", "--yes")
    assert code == 0 and "nothing matches" in out


def test_resend_needs_a_filter(cfg: Path) -> None:
    code, out = run("resend", "-c", str(cfg), "--yes")
    assert code == 2 and "say what to resend" in out


def test_hash_password_makes_a_verifiable_hash() -> None:
    result = CliRunner().invoke(cli, ["hash-password", "--stdin"], input="correct horse\n")
    assert result.exit_code == 0, result.output
    hashed = result.output.strip()
    assert verify_password("correct horse", hashed) and not verify_password("wrong", hashed)
    assert "correct horse" not in hashed
    short = CliRunner().invoke(cli, ["hash-password", "--stdin"], input="abc\n")
    assert short.exit_code == 2
