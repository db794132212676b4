"""Through a real `syncd run` subprocess and a real HTTP receiver."""

from __future__ import annotations

from collections.abc import Callable

import httpx
import psutil
import pytest

from syncd.emulators.serving import ServerThread
from syncd.emulators.sink import Faults, SinkState

from .harness import CRM_TOKEN, HOOK_SECRET, Daemon

pytestmark = pytest.mark.e2e

Factory = Callable[..., Daemon]


def ticket(n: int, **extra: object) -> dict[str, object]:
    return {
        "event": "ticket_created",
        "ticket_id": n,
        "subject": f"Ticket {n}",
        "status": "open",
        **extra,
    }


def attempts_of(d: Daemon, event_id: int) -> list[tuple[str, int | None, str | None]]:
    with d.db() as conn:
        rows = conn.execute(
            "SELECT a.outcome, a.status_code, a.error FROM attempts a "
            "JOIN deliveries d ON d.id = a.delivery_id WHERE d.event_id = ? ORDER BY a.number",
            (event_id,),
        ).fetchall()
    return [(r["outcome"], r["status_code"], r["error"]) for r in rows]


def test_ticket_reaches_the_receiver(
    daemon_factory: Factory, authed_sink: tuple[ServerThread, SinkState]
) -> None:
    _, sink = authed_sink
    d = daemon_factory().start()
    response = d.post(ticket(501, comment="Hello, my order is late"))
    assert response.status_code == 202
    event_id = response.json()["event_id"]
    d.wait_for(lambda t: t["delivered"] == 1)
    deals = [r for r in sink.records.values() if r["entity"] == "deal"]
    notes = [r for r in sink.records.values() if r["entity"] == "note"]
    assert [r["fields"]["subject"] for r in deals] == ["Ticket 501"]
    assert [r["fields"]["text"] for r in notes] == ["Client: Hello, my order is late"]
    assert notes[0]["parent_id"] == deals[0]["id"]
    assert attempts_of(d, event_id) == [("delivered", None, None)]
    # a later event for the same ticket updates the same deal
    d.post({"event": "status_changed", "ticket_id": 501, "status": "solved"})
    d.wait_for(lambda t: t["delivered"] == 2)
    assert len([r for r in sink.records.values() if r["entity"] == "deal"]) == 1
    assert deals[0]["fields"]["status"] == "solved"
    # what happened is in the daemon's metrics: two timed attempts, two webhooks
    metrics = httpx.get(f"{d.url}/metrics", timeout=10).text
    assert 'syncd_attempt_duration_seconds_count{destination="crm",outcome="delivered"} 2.0' in (
        metrics
    )
    assert 'syncd_intake_requests_total{source="helpdesk",status="202"} 2.0' in metrics
    assert 'syncd_deliveries{destination="crm",state="delivered"} 2.0' in metrics


def test_failing_receiver_then_success_records_every_attempt(
    daemon_factory: Factory, authed_sink: tuple[ServerThread, SinkState]
) -> None:
    _, sink = authed_sink
    sink.faults = Faults(fail_count=3, fail_status=503)
    d = daemon_factory().start()
    event_id = d.post(ticket(502)).json()["event_id"]
    d.wait_for(lambda t: t["delivered"] == 1)
    history = attempts_of(d, event_id)
    assert [h[0] for h in history] == ["retry_scheduled"] * 3 + ["delivered"]
    assert [h[1] for h in history[:3]] == [503, 503, 503]
    assert "injected failure" in (history[0][2] or "")
    assert sum(1 for r in sink.records.values() if r["entity"] == "deal") == 1


def test_permanent_4xx_fails_and_keeps_the_error(
    daemon_factory: Factory, authed_sink: tuple[ServerThread, SinkState]
) -> None:
    _, sink = authed_sink
    sink.faults = Faults(
        fail_count=1, fail_status=422, fail_body='{"error": "PHONE is not a valid phone number"}'
    )
    d = daemon_factory().start()
    event_id = d.post(ticket(503)).json()["event_id"]
    d.wait_for(lambda t: t["failed"] == 1)
    assert attempts_of(d, event_id) == [
        ("failed", 422, 'HTTP 422: {"error": "PHONE is not a valid phone number"}')
    ]
    with d.db() as conn:
        row = conn.execute("SELECT state, last_error, next_attempt_at FROM deliveries").fetchone()
    assert (
        row["state"] == "failed" and "PHONE" in row["last_error"] and row["next_attempt_at"] is None
    )


def test_short_window_expires(
    daemon_factory: Factory, authed_sink: tuple[ServerThread, SinkState]
) -> None:
    _, sink = authed_sink
    sink.faults = Faults(fail_count=10_000, fail_status=503)
    d = daemon_factory(window=2.0, schedule="[0.5]").start()
    event_id = d.post(ticket(504)).json()["event_id"]
    d.wait_for(lambda t: t["expired"] == 1, limit=30)
    history = attempts_of(d, event_id)
    assert history[-1][0] == "expired" and "retry window" in (history[-1][2] or "")
    assert all(h[0] == "retry_scheduled" for h in history[:-1])
    assert 3 <= len(history) <= 8
    with d.db() as conn:
        row = conn.execute("SELECT first_failed_at, finished_at FROM deliveries").fetchone()
    # the final attempt happens when the window closes, not before
    assert row["finished_at"] - row["first_failed_at"] >= 2.0


def test_bad_requests_get_clear_4xx(daemon_factory: Factory) -> None:
    d = daemon_factory().start()
    assert d.post(ticket(1), secret="wrong").status_code == 401
    import httpx

    r = httpx.post(
        f"{d.url}/hooks/helpdesk", content=b"{not json", headers={"X-Syncd-Secret": HOOK_SECRET}
    )
    assert r.status_code == 422 and "not valid JSON" in r.json()["error"]
    r = httpx.post(
        f"{d.url}/hooks/helpdesk",
        json={"subject": "no id"},
        headers={"X-Syncd-Secret": HOOK_SECRET},
    )
    assert r.status_code == 422 and "ticket_id" in r.json()["error"]
    r = httpx.post(f"{d.url}/hooks/nosuch", json=ticket(1), headers={"X-Syncd-Secret": HOOK_SECRET})
    assert r.status_code == 404
    r = httpx.post(
        f"{d.url}/hooks/helpdesk",
        content=b"x" * (2 * 1024 * 1024),
        headers={"X-Syncd-Secret": HOOK_SECRET},
    )
    assert r.status_code == 413
    assert sum(d.stats()["totals"].values()) == 0


def test_sigterm_exits_cleanly_and_restart_resumes(
    daemon_factory: Factory, authed_sink: tuple[ServerThread, SinkState]
) -> None:
    _, sink = authed_sink
    sink.faults = Faults(fail_count=10_000, fail_status=503)
    d = daemon_factory(schedule="[0.3]").start()
    for n in range(5):
        assert d.post(ticket(600 + n)).status_code == 202
    d.wait_for(lambda t: t["retry_wait"] + t["in_flight"] == 5)
    [writer] = writer_children(d)
    assert d.terminate() == 0
    assert '"syncd_stopped"' in d.log()
    writer.wait(10)  # the intake writer process stops with the daemon
    sink.faults = Faults()
    d.start()
    d.wait_for(lambda t: t["delivered"] == 5)
    assert len(sink.duplicate_creates()) == 0


def writer_children(d: Daemon) -> list[psutil.Process]:
    """The daemon's only child is its intake writer process."""
    assert d.proc is not None
    return list(psutil.Process(d.proc.pid).children())


def test_a_killed_intake_writer_loses_nothing(
    daemon_factory: Factory, authed_sink: tuple[ServerThread, SinkState]
) -> None:
    """Webhooks keep flowing while the writer child is killed and started again; a
    sender that got 503 sends again, as helpdesks do, and every ticket arrives once."""
    _, sink = authed_sink
    d = daemon_factory().start()
    [writer] = writer_children(d)
    # The first writer is a fork of the daemon (sharing its memory); its replacement
    # is a fresh interpreter, since the daemon has threads by then.
    assert writer.cmdline() == psutil.Process(d.proc.pid).cmdline()  # type: ignore[union-attr]
    answers: list[int] = []
    for n in range(40):
        if n == 15:
            writer.kill()
        while (status := d.post(ticket(800 + n)).status_code) == 503:
            answers.append(status)
        answers.append(status)
    assert answers.count(202) == 40
    assert set(answers) <= {202, 503}
    d.wait_for(lambda t: t["delivered"] >= 40)
    deals = [r for r in sink.records.values() if r["entity"] == "deal"]
    assert sorted(r["fields"]["subject"] for r in deals) == sorted(
        f"Ticket {800 + n}" for n in range(40)
    )
    assert len(sink.duplicate_creates()) == 0
    [again] = writer_children(d)
    assert again.pid != writer.pid
    assert again.cmdline()[-2:] == ["-m", "syncd.intake.writer_process"]
    assert '"intake_writer_exited"' in d.log() and '"intake_writer_restarted"' in d.log()
    metrics = httpx.get(f"{d.url}/metrics", timeout=10).text
    assert "syncd_intake_writer_crashes_total 1.0" in metrics


def test_secrets_never_reach_logs_or_store(
    daemon_factory: Factory, authed_sink: tuple[ServerThread, SinkState]
) -> None:
    """The CRM echoes our token in an error: neither the log nor the attempt row may keep it."""
    _, sink = authed_sink
    sink.faults = Faults(
        fail_count=2, fail_status=500, fail_body=f'{{"error": "token {CRM_TOKEN} rejected"}}'
    )
    d = daemon_factory().start()
    event_id = d.post(ticket(700)).json()["event_id"]
    d.wait_for(lambda t: t["delivered"] == 1)
    d.post(ticket(701), secret=HOOK_SECRET + "x")
    assert d.terminate() == 0
    log = d.log()
    history = attempts_of(d, event_id)
    assert "rejected" in log and "rejected" in (history[0][2] or "")  # the error itself is kept ...
    assert CRM_TOKEN not in log and HOOK_SECRET not in log  # ... with the secret masked
    assert all(CRM_TOKEN not in (h[2] or "") for h in history)
    assert "***" in (history[0][2] or "")
