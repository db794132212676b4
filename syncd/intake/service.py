"""Intake as a service: the webhook route, re-ingest and the poller all store events here."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass

import structlog
from sqlalchemy import Connection

from syncd.errors import InvalidPayload, UnknownSource
from syncd.events import IncomingEvent
from syncd.intake import quarantine
from syncd.intake.base import RawRequest, WebhookSource
from syncd.retry import outbox
from syncd.store import Store
from syncd.store.models import QuarantineState
from syncd.ticket import TicketEvent

log = structlog.get_logger("syncd.intake")


def store_requests(
    conn: Connection, requests: Sequence[tuple[list[IncomingEvent], float]]
) -> list[list[outbox.Enqueued]]:
    """The events of many requests stored by one ``enqueue_many``; each request's share back."""
    stored = outbox.enqueue_many(conn, [(e, now) for events, now in requests for e in events])
    shares, start = [], 0
    for events, _ in requests:
        shares.append(stored[start : start + len(events)])
        start += len(events)
    return shares


#: Stores one request's events (received at the given time); returns once committed.
SaveEvents = Callable[[list[IncomingEvent], float], Awaitable[list[outbox.Enqueued]]]


@dataclass(frozen=True)
class Accepted:
    event_ids: list[int]
    duplicates: int
    deliveries: int


@dataclass(frozen=True)
class Quarantined:
    quarantine_id: int
    reason: str


class Intake:
    def __init__(
        self,
        store: Store,
        sources: Mapping[str, WebhookSource],
        destinations: Mapping[str, tuple[str, ...]],
        *,
        on_stored: Callable[[], None] = lambda: None,
        save: SaveEvents | None = None,
    ) -> None:
        self.store = store
        self.sources = sources
        self.destinations = destinations
        self.on_stored = on_stored
        #: Where events are written: the store's writer thread unless told otherwise
        #: (the daemon hands them to its writer process, syncd.intake.writer_process).
        self.save: SaveEvents = save or self._save_here

    async def _save_here(self, events: list[IncomingEvent], now: float) -> list[outbox.Enqueued]:
        return await self.store.writer.run_grouped(store_requests, (events, now))

    def source(self, name: str) -> WebhookSource:
        found = self.sources.get(name)
        if found is None:
            raise UnknownSource(f"no source named {name!r} is configured")
        return found

    async def receive(self, source_name: str, request: RawRequest) -> Accepted | Quarantined:
        """Authenticate (raises), parse, and store events or the raw body in quarantine."""
        source = self.source(source_name)
        source.authenticate(request)
        try:
            events = source.parse(request)
        except InvalidPayload as exc:
            reason = exc.reason
            item_id = await self.store.writer.run(
                lambda conn: quarantine.hold(conn, source_name, request, reason)
            )
            log.warning(
                "webhook_quarantined", source=source_name, quarantine_id=item_id, reason=reason
            )
            return Quarantined(item_id, reason)
        return await self.store_events(source_name, events)

    async def store_events(self, source_name: str, events: list[TicketEvent]) -> Accepted:
        dests = self.destinations.get(source_name, ())
        incoming = [IncomingEvent.from_ticket_event(e, dests) for e in events]
        stored = await self.save(incoming, time.time())
        if any(s.deliveries for s in stored):
            self.on_stored()
        return Accepted(
            event_ids=[s.event_id for s in stored],
            duplicates=sum(1 for s in stored if s.duplicate),
            deliveries=sum(s.deliveries for s in stored),
        )

    async def reingest(self, item_id: int) -> Accepted | Quarantined:
        """Parse a quarantined body again with the current config."""
        held = await self.store.read(lambda conn: quarantine.get(conn, item_id))
        if held is None:
            raise KeyError(item_id)
        if held.state != QuarantineState.HELD.value:
            raise ValueError(f"quarantine item {item_id} is {held.state}, not held")
        source = self.source(held.source)
        try:
            events = source.parse(held.as_request())
        except InvalidPayload as exc:
            reason = exc.reason
            await self.store.writer.run(
                lambda conn: quarantine.mark(
                    conn, item_id, state=QuarantineState.HELD, reason=reason
                )
            )
            return Quarantined(item_id, reason)
        accepted = await self.store_events(held.source, events)
        await self.store.writer.run(
            lambda conn: quarantine.mark(
                conn, item_id, state=QuarantineState.REINGESTED, event_ids=accepted.event_ids
            )
        )
        log.info("quarantine_reingested", quarantine_id=item_id, event_ids=accepted.event_ids)
        return accepted
