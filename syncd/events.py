"""What intake hands to the outbox: one event from one source about one ticket."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class IncomingEvent:
    source: str
    ticket_id: str
    kind: str
    payload: dict[str, Any]
    #: The source's own delivery id, or a stable hash; the same key is stored once.
    dedup_key: str | None = None
    destinations: tuple[str, ...] = field(default=())
