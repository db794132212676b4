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

    @classmethod
    def from_ticket_event(cls, event: TicketEvent, destinations: tuple[str, ...]) -> IncomingEvent:
        return cls(
            source=event.source,
            ticket_id=event.ticket_id,
            kind=event.kind.value,
            payload=event.model_dump(mode="json", exclude_defaults=True),
            dedup_key=event.dedup_key(),
            destinations=destinations,
            occurred_at=event.occurred_ts(),
            recovered_by_poll=event.recovered_by_poll,
        )
