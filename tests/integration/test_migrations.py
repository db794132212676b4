"""Migrations build exactly the schema the models describe, and re-running them keeps data."""

from __future__ import annotations

from pathlib import Path

from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlmodel import SQLModel
from typer.testing import CliRunner

from syncd.cli import app
from syncd.events import IncomingEvent
from syncd.retry import outbox
from syncd.store import Store, head_revision


def test_migrated_schema_matches_models(store_url: str) -> None:
    store = Store(store_url)
    try:
        before, after = store.migrate()
        assert before is None and after == head_revision()
        with store.write_engine.connect() as conn:
            diff = compare_metadata(MigrationContext.configure(conn), SQLModel.metadata)
        assert diff == []
    finally:
        store.close()


def test_migrate_twice_keeps_data(store_url: str) -> None:
    store = Store(store_url)
    try:
        store.migrate()
        event = IncomingEvent(
            "hd", "1", "ticket_created", {"ticket_id": "1"}, destinations=("crm",)
        )
        store.write_sync(lambda c: outbox.enqueue(c, event, 1.0))
        install_id = store.install_id()
        assert store.migrate() == (head_revision(), head_revision())
        assert store.install_id() == install_id
        with store.read_engine.connect() as c:
            assert outbox.counts_by_state(c)["crm"]["pending"] == 1
        store.check_schema()
    finally:
        store.close()


def test_cli_migrate_and_refusal_on_old_schema(tmp_path: Path) -> None:
    cfg = tmp_path / "syncd.toml"
    cfg.write_text('[store]\nurl = "sqlite:///s.db"\n')
    runner = CliRunner()
    result = runner.invoke(app, ["stats", "-c", str(cfg)])
    assert result.exit_code == 1 and "run `syncd migrate`" in result.output
    result = runner.invoke(app, ["migrate", "-c", str(cfg)])
    assert result.exit_code == 0 and f"to {head_revision()}" in result.output
    result = runner.invoke(app, ["migrate", "-c", str(cfg)])
    assert "already at schema version" in result.output
    assert (tmp_path / "s.db").exists()


def test_upgrade_to_0004_keeps_rows_and_fills_the_monitor_columns(store_url: str) -> None:
    """A store made by the previous release: its events become searchable by client."""
    import json

    import sqlalchemy as sa
    from alembic import command

    from syncd.monitor import queries
    from syncd.store import _alembic_config

    store = Store(store_url)
    try:
        with store.write_engine.begin() as conn:
            command.upgrade(_alembic_config(conn), "0003")
        payloads = [
            {"source": "hd", "ticket_id": "7", "client": {"emails": ["ivan@example.ru"]}},
            {"source": "hd", "ticket_id": "7", "kind": "status_changed"},
            {"source": "hd", "ticket_id": "8", "client": {"phones": ["+79991234567"]}},
        ]
        with store.write_engine.begin() as conn:
            for n, payload in enumerate(payloads, start=1):
                conn.execute(
                    sa.text(
                        "INSERT INTO events (source, ticket_id, kind, payload, received_at, "
                        "recovered_by_poll) VALUES ('hd', :t, 'ticket_updated', :p, :n, false)"
                    ),
                    {"t": payload["ticket_id"], "p": json.dumps(payload), "n": float(n)},
                )
                conn.execute(
                    sa.text(
                        "INSERT INTO deliveries (event_id, destination, ordering_key, state, "
                        "attempts, outcome_unknown, created_at, updated_at) "
                        "VALUES (:n, 'crm', :k, 'failed', 1, false, :t, :t)"
                    ),
                    {"n": n, "k": f"hd:{payload['ticket_id']}", "t": float(n)},
                )
        before, after = store.migrate()
        assert (before, after) == ("0003", head_revision())
        with store.read_engine.connect() as conn:
            rows = conn.execute(
                sa.text("SELECT client_email, client_phone FROM events ORDER BY id")
            ).all()
            sources = conn.execute(sa.text("SELECT DISTINCT source FROM deliveries")).scalars()
            assert [tuple(r) for r in rows] == [
                ("ivan@example.ru", None),
                (None, None),
                (None, "+79991234567"),
            ]
            assert list(sources) == ["hd"]
            # and the monitor finds the old ticket by its client, status change included
            page = queries.list_deliveries(conn, queries.EventFilter(client="IVAN@example.ru"))
            assert [r.event_id for r in page.rows] == [2, 1]
    finally:
        store.close()
