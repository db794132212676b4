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
