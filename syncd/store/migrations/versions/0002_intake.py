"""Intake: event change time and poll recovery flag, quarantine, poller state.

Revision ID: 0002
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    with op.batch_alter_table("events") as batch:
        batch.add_column(sa.Column("occurred_at", sa.Float(), nullable=True))
        batch.add_column(
            sa.Column("recovered_by_poll", sa.Boolean(), nullable=False, server_default=sa.false())
        )
        batch.drop_index("ix_events_ticket")
        batch.create_index("ix_events_ticket_time", ["source", "ticket_id", "occurred_at"])
    with op.batch_alter_table("events") as batch:
        batch.alter_column("recovered_by_poll", server_default=None)

    op.create_table(
        "quarantine",
        sa.Column("id", _ID, primary_key=True, autoincrement=True),
        sa.Column("source", sa.String(64), nullable=False),
        sa.Column("received_at", sa.Float(), nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("body", sa.LargeBinary(), nullable=False),
        sa.Column("headers", sa.Text(), nullable=False),
        sa.Column("query", sa.Text(), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("event_ids", sa.String(500), nullable=True),
        sa.Column("updated_at", sa.Float(), nullable=False),
    )
    op.create_index("ix_quarantine_state", "quarantine", ["state", "id"])

    op.create_table(
        "poll_state",
        sa.Column("source", sa.String(64), primary_key=True),
        sa.Column("cursor", sa.String(500), nullable=True),
        sa.Column("last_poll_at", sa.Float(), nullable=True),
        sa.Column("last_success_at", sa.Float(), nullable=True),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.Column("consecutive_failures", sa.Integer(), nullable=False),
        sa.Column("next_poll_at", sa.Float(), nullable=True),
        sa.Column("polled_tickets", sa.Integer(), nullable=False),
        sa.Column("recovered_events", sa.Integer(), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("poll_state")
    op.drop_index("ix_quarantine_state", "quarantine")
    op.drop_table("quarantine")
    with op.batch_alter_table("events") as batch:
        batch.drop_index("ix_events_ticket_time")
        batch.create_index("ix_events_ticket", ["source", "ticket_id"])
        batch.drop_column("recovered_by_poll")
        batch.drop_column("occurred_at")
