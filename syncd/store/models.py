"""The tables syncd keeps. Times are UTC epoch seconds (float): portable, cheap to compare.

An *event* is what a helpdesk sent us. A *delivery* is that event's journey to
one destination; it carries the outbox state machine. An *attempt* is one try
of a delivery. A *link* ties a helpdesk entity to the CRM record made for it,
and doubles as the "about to create" intent that makes retries safe.
"""

from __future__ import annotations

from enum import StrEnum

from sqlalchemy import (
    BigInteger,
    Column,
    Index,
    Integer,
    LargeBinary,
    Text,
    UniqueConstraint,
    text,
)
from sqlmodel import Field, SQLModel

# SQLite only aliases the rowid for INTEGER PRIMARY KEY; PostgreSQL wants BIGINT.
_ID = BigInteger().with_variant(Integer(), "sqlite")


class DeliveryState(StrEnum):
    PENDING = "pending"
    IN_FLIGHT = "in_flight"
    RETRY_WAIT = "retry_wait"
    DELIVERED = "delivered"
    FAILED = "failed"
    EXPIRED = "expired"
    #: Folded into a later delivery of the same ticket, which carried its changes.
    COALESCED = "coalesced"


#: States a delivery can still leave on its own.
ACTIVE_STATES = (DeliveryState.PENDING, DeliveryState.IN_FLIGHT, DeliveryState.RETRY_WAIT)
TERMINAL_STATES = (
    DeliveryState.DELIVERED,
    DeliveryState.FAILED,
    DeliveryState.EXPIRED,
    DeliveryState.COALESCED,
)


class Event(SQLModel, table=True):
    __tablename__ = "events"
    __table_args__ = (
        UniqueConstraint("source", "dedup_key", name="uq_events_source_dedup"),
        Index("ix_events_ticket_time", "source", "ticket_id", "occurred_at"),
        Index("ix_events_client_email", "client_email"),
        Index("ix_events_client_phone", "client_phone"),
        Index("ix_events_received", "received_at"),
        Index("ix_events_ticket", "ticket_id"),
    )

    id: int | None = Field(
        default=None, sa_column=Column(_ID, primary_key=True, autoincrement=True)
    )
    source: str = Field(max_length=64)
    ticket_id: str = Field(max_length=128)
    kind: str = Field(max_length=64)
    dedup_key: str | None = Field(default=None, max_length=200)
    payload: str = Field(sa_column=Column(Text, nullable=False))
    received_at: float
    #: When the change happened in the helpdesk (the reconciler compares on it).
    occurred_at: float | None = None
    recovered_by_poll: bool = False
    #: The client's first e-mail and phone, so the monitor can find a ticket by them.
    client_email: str | None = Field(default=None, max_length=254)
    client_phone: str | None = Field(default=None, max_length=32)


class Delivery(SQLModel, table=True):
    __tablename__ = "deliveries"
    __table_args__ = (
        Index("ix_deliveries_due", "next_attempt_at", "id"),
        Index("ix_deliveries_order", "destination", "ordering_key", "id"),
        Index("ix_deliveries_state", "state", "destination"),
        Index("ix_deliveries_event", "event_id"),
        # Overview counts (covering) and the monitor's list by destination + source + state.
        Index("ix_deliveries_counts", "destination", "source", "state", "id"),
        Index("ix_deliveries_created", "created_at"),
        Index("ix_deliveries_finished", "finished_at", "state"),
        # The monitor's list filtered by state alone, newest first, with no sort.
        Index("ix_deliveries_state_id", "state", "id"),
        # The monitor's search in error texts: only the rows that have one, in id order.
        Index(
            "ix_deliveries_errored",
            "id",
            sqlite_where=text("last_error IS NOT NULL"),
            postgresql_where=text("last_error IS NOT NULL"),
        ),
    )

    id: int | None = Field(
        default=None, sa_column=Column(_ID, primary_key=True, autoincrement=True)
    )
    event_id: int = Field(sa_column=Column(BigInteger, nullable=False))
    destination: str = Field(max_length=64)
    #: The event's source, copied so per-source counts need no join.
    source: str = Field(default="", max_length=64)
    #: Deliveries sharing (destination, ordering_key) go out strictly in id order.
    ordering_key: str = Field(max_length=200)
    state: str = Field(default=DeliveryState.PENDING, max_length=16)
    attempts: int = 0
    #: Set only while the delivery may be leased (pending / retry_wait); NULL otherwise.
    next_attempt_at: float | None = None
    first_failed_at: float | None = None
    lease_owner: str | None = Field(default=None, max_length=64)
    lease_expires_at: float | None = None
    #: A previous attempt may have reached the CRM without us learning the result.
    outcome_unknown: bool = False
    last_error: str | None = Field(default=None, sa_column=Column(Text, nullable=True))
    last_status_code: int | None = None
    created_at: float
    updated_at: float
    finished_at: float | None = None
    #: Set when this delivery was folded into a later one (state ``coalesced``).
    coalesced_into: int | None = Field(default=None, sa_column=Column(BigInteger, nullable=True))


class Attempt(SQLModel, table=True):
    __tablename__ = "attempts"
    __table_args__ = (Index("ix_attempts_delivery", "delivery_id", "number"),)

    id: int | None = Field(
        default=None, sa_column=Column(_ID, primary_key=True, autoincrement=True)
    )
    delivery_id: int = Field(sa_column=Column(BigInteger, nullable=False))
    number: int
    trigger: str = Field(default="scheduled", max_length=16)
    started_at: float
    duration_ms: float
    status_code: int | None = None
    outcome: str = Field(max_length=24)
    error: str | None = Field(default=None, sa_column=Column(Text, nullable=True))
    next_attempt_at: float | None = None


class Link(SQLModel, table=True):
    __tablename__ = "links"
    __table_args__ = (
        UniqueConstraint("destination", "entity", "external_key", name="uq_links_key"),
        # A ticket trace finds the links its deliveries made.
        Index("ix_links_delivery", "delivery_id"),
    )

    id: int | None = Field(
        default=None, sa_column=Column(_ID, primary_key=True, autoincrement=True)
    )
    destination: str = Field(max_length=64)
    entity: str = Field(max_length=32)
    external_key: str = Field(max_length=200)
    #: NULL while a create is in the air: the intent that forces a look-up on retry.
    crm_id: str | None = Field(default=None, max_length=64)
    url: str | None = Field(default=None, max_length=500)
    delivery_id: int | None = Field(default=None, sa_column=Column(BigInteger, nullable=True))
    created_at: float
    updated_at: float


class QuarantineState(StrEnum):
    HELD = "held"
    REINGESTED = "reingested"
    DISCARDED = "discarded"


class Quarantined(SQLModel, table=True):
    """A webhook that passed authentication but could not be read: kept for a human."""

    __tablename__ = "quarantine"
    __table_args__ = (Index("ix_quarantine_state", "state", "id"),)

    id: int | None = Field(
        default=None, sa_column=Column(_ID, primary_key=True, autoincrement=True)
    )
    source: str = Field(max_length=64)
    received_at: float
    reason: str = Field(sa_column=Column(Text, nullable=False))
    body: bytes = Field(sa_column=Column(LargeBinary, nullable=False))
    #: Request headers with credentials removed, as JSON.
    headers: str = Field(sa_column=Column(Text, nullable=False))
    query: str = Field(sa_column=Column(Text, nullable=False))
    state: str = Field(default=QuarantineState.HELD, max_length=16)
    event_ids: str | None = Field(default=None, max_length=500)
    updated_at: float


class PollState(SQLModel, table=True):
    """Where each poller stands, and how it has been doing."""

    __tablename__ = "poll_state"

    source: str = Field(primary_key=True, max_length=64)
    cursor: str | None = Field(default=None, max_length=500)
    last_poll_at: float | None = None
    last_success_at: float | None = None
    last_error: str | None = Field(default=None, sa_column=Column(Text, nullable=True))
    consecutive_failures: int = 0
    next_poll_at: float | None = None
    polled_tickets: int = 0
    recovered_events: int = 0


class Credential(SQLModel, table=True):
    """Tokens a connector rotates (OAuth refresh tokens), saved before they are used."""

    __tablename__ = "credentials"

    destination: str = Field(primary_key=True, max_length=64)
    data: str = Field(sa_column=Column(Text, nullable=False))
    updated_at: float


class DestinationStatus(SQLModel, table=True):
    """A destination-wide problem: credentials rejected, account blocked, circuit open."""

    __tablename__ = "destination_status"

    destination: str = Field(primary_key=True, max_length=64)
    #: No deliveries are sent before this time (a blocked account, an open breaker).
    paused_until: float | None = None
    problem: str | None = Field(default=None, sa_column=Column(Text, nullable=True))
    problem_at: float | None = None
    updated_at: float


class Replica(SQLModel, table=True):
    """A running daemon on this store, and when it last said so (see syncd.replicas)."""

    __tablename__ = "replicas"

    id: str = Field(primary_key=True, max_length=64)
    host: str = Field(max_length=255)
    pid: int
    version: str = Field(max_length=32)
    started_at: float
    seen_at: float


class AuditEntry(SQLModel, table=True):
    """Who did what from the monitor or the CLI: resends, re-ingests, refused attempts."""

    __tablename__ = "audit"
    __table_args__ = (Index("ix_audit_at", "at"),)

    id: int | None = Field(
        default=None, sa_column=Column(_ID, primary_key=True, autoincrement=True)
    )
    at: float
    actor: str = Field(max_length=128)
    action: str = Field(max_length=64)
    #: ``ok``, ``denied`` or ``error``.
    outcome: str = Field(max_length=16)
    count: int | None = None
    #: JSON: the filter, the ids, the reason.
    detail: str = Field(sa_column=Column(Text, nullable=False))


class ResendJob(SQLModel, table=True):
    """A resend by filter, run in the background so the page can show its progress."""

    __tablename__ = "resend_jobs"

    id: int | None = Field(
        default=None, sa_column=Column(_ID, primary_key=True, autoincrement=True)
    )
    created_at: float
    actor: str = Field(max_length=128)
    filter: str = Field(sa_column=Column(Text, nullable=False))
    #: ``running``, ``done`` or ``failed``.
    state: str = Field(max_length=16)
    total: int
    done: int
    error: str | None = Field(default=None, sa_column=Column(Text, nullable=True))
    finished_at: float | None = None


class Meta(SQLModel, table=True):
    __tablename__ = "meta"

    key: str = Field(primary_key=True, max_length=64)
    value: str = Field(max_length=500)


events = Event.__table__  # type: ignore[attr-defined]
deliveries = Delivery.__table__  # type: ignore[attr-defined]
attempts = Attempt.__table__  # type: ignore[attr-defined]
links = Link.__table__  # type: ignore[attr-defined]
meta = Meta.__table__  # type: ignore[attr-defined]
quarantine = Quarantined.__table__  # type: ignore[attr-defined]
poll_state = PollState.__table__  # type: ignore[attr-defined]
credentials = Credential.__table__  # type: ignore[attr-defined]
destination_status = DestinationStatus.__table__  # type: ignore[attr-defined]
replicas = Replica.__table__  # type: ignore[attr-defined]
audit = AuditEntry.__table__  # type: ignore[attr-defined]
resend_jobs = ResendJob.__table__  # type: ignore[attr-defined]
