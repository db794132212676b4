"""Monitor: searchable client columns, per-source delivery counts, audit log, resend jobs.

Revision ID: 0004
"""

from __future__ import annotations

import json

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

_BATCH = 5000


def _first(values: object) -> str | None:
    if isinstance(values, list) and values and isinstance(values[0], str):
        return values[0][:254]
    return None


def _backfill_clients(conn: sa.Connection) -> None:
    """Read the client's first e-mail and phone out of the stored payloads, in batches."""
    events = sa.table(
        "events",
        sa.column("id", sa.BigInteger),
        sa.column("payload", sa.Text),
        sa.column("client_email", sa.String),
        sa.column("client_phone", sa.String),
    )
    last = 0
    while True:
        rows = conn.execute(
            sa.select(events.c.id, events.c.payload)
            .where(events.c.id > last)
            .order_by(events.c.id)
            .limit(_BATCH)
        ).all()
        if not rows:
            return
        updates = []
        for row in rows:
            try:
                client = json.loads(row.payload).get("client") or {}
            except (ValueError, AttributeError):
                client = {}
            email, phone = _first(client.get("emails")), _first(client.get("phones"))
            if email or phone:
                updates.append({"b_id": row.id, "b_email": email, "b_phone": phone})
        if updates:
            conn.execute(
                events.update()
                .where(events.c.id == sa.bindparam("b_id"))
                .values(client_email=sa.bindparam("b_email"), client_phone=sa.bindparam("b_phone")),
                updates,
            )
        last = rows[-1].id


def upgrade() -> None:
    with op.batch_alter_table("events") as batch:
        batch.add_column(sa.Column("client_email", sa.String(254), nullable=True))
        batch.add_column(sa.Column("client_phone", sa.String(32), nullable=True))
    _backfill_clients(op.get_bind())
    op.create_index("ix_events_client_email", "events", ["client_email"])
    op.create_index("ix_events_client_phone", "events", ["client_phone"])
    op.create_index("ix_events_received", "events", ["received_at"])
    op.create_index("ix_events_ticket", "events", ["ticket_id"])

    with op.batch_alter_table("deliveries") as batch:
        batch.add_column(sa.Column("source", sa.String(64), nullable=False, server_default=""))
        batch.add_column(sa.Column("coalesced_into", sa.BigInteger(), nullable=True))
    op.execute(
        "UPDATE deliveries SET source = "
        "(SELECT events.source FROM events WHERE events.id = deliveries.event_id)"
    )
    op.create_index("ix_deliveries_counts", "deliveries", ["destination", "source", "state", "id"])
    op.create_index("ix_deliveries_created", "deliveries", ["created_at"])
    op.create_index("ix_deliveries_finished", "deliveries", ["finished_at", "state"])
    op.create_index("ix_deliveries_state_id", "deliveries", ["state", "id"])
    op.create_index(
        "ix_deliveries_errored",
        "deliveries",
        ["id"],
        sqlite_where=sa.text("last_error IS NOT NULL"),
        postgresql_where=sa.text("last_error IS NOT NULL"),
    )
    op.create_index("ix_links_delivery", "links", ["delivery_id"])

    op.create_table(
        "audit",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), primary_key=True),
        sa.Column("at", sa.Float(), nullable=False),
        sa.Column("actor", sa.String(128), nullable=False),
        sa.Column("action", sa.String(64), nullable=False),
        sa.Column("outcome", sa.String(16), nullable=False),
        sa.Column("count", sa.Integer(), nullable=True),
        sa.Column("detail", sa.Text(), nullable=False),
    )
    op.create_index("ix_audit_at", "audit", ["at"])
    op.create_table(
        "resend_jobs",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), primary_key=True),
        sa.Column("created_at", sa.Float(), nullable=False),
        sa.Column("actor", sa.String(128), nullable=False),
        sa.Column("filter", sa.Text(), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("total", sa.Integer(), nullable=False),
        sa.Column("done", sa.Integer(), nullable=False),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("finished_at", sa.Float(), nullable=True),
    )


def downgrade() -> None:
    op.drop_table("resend_jobs")
    op.drop_index("ix_audit_at", "audit")
    op.drop_table("audit")
    op.drop_index("ix_links_delivery", "links")
    op.drop_index("ix_deliveries_errored", "deliveries")
    op.drop_index("ix_deliveries_state_id", "deliveries")
    op.drop_index("ix_deliveries_finished", "deliveries")
    op.drop_index("ix_deliveries_created", "deliveries")
    op.drop_index("ix_deliveries_counts", "deliveries")
    with op.batch_alter_table("deliveries") as batch:
        batch.drop_column("coalesced_into")
        batch.drop_column("source")
    op.drop_index("ix_events_ticket", "events")
    op.drop_index("ix_events_received", "events")
    op.drop_index("ix_events_client_phone", "events")
    op.drop_index("ix_events_client_email", "events")
    with op.batch_alter_table("events") as batch:
        batch.drop_column("client_phone")
        batch.drop_column("client_email")
