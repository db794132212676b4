"""What intake hands to the outbox: one event from one source about one ticket."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from syncd.ticket import TicketEvent


@dataclass(frozen=True)
class IncomingEvent:
    source: str
    ticket_id: str
    kind: str
    payload: dict[str, Any]
    #: The source's own delivery id, or a stable hash; the same key is stored once.
    dedup_key: str | None = None
    destinations: tuple[str, ...] = field(default=())
    occurred_at: float | None = None
    recovered_by_poll: bool = False
    client_email: str | None = None
    client_phone: str | None = None

    @classmethod
    def from_ticket_event(cls, event: TicketEvent, destinations: tuple[str, ...]) -> IncomingEvent:
        client = event.client
        return cls(
            source=event.source,
            ticket_id=event.ticket_id,
            kind=event.kind.value,
            payload=event.model_dump(mode="json", exclude_defaults=True),
            dedup_key=event.dedup_key(),
            destinations=destinations,
            occurred_at=event.occurred_ts(),
            recovered_by_poll=event.recovered_by_poll,
            client_email=client.emails[0] if client and client.emails else None,
            client_phone=client.phones[0] if client and client.phones else None,
        )
