"""Intake as a service: the webhook route, re-ingest and the poller all store events here."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol, TypeVar

import structlog
from sqlalchemy import Connection
from sqlalchemy.exc import DBAPIError

from syncd.errors import InvalidPayload, StoreError, UnknownSource
from syncd.events import IncomingEvent
from syncd.intake import quarantine
from syncd.intake.base import RawRequest, WebhookSource
from syncd.retry import outbox
from syncd.store import Store
from syncd.store.models import QuarantineState
from syncd.store.writer import Grouped
from syncd.ticket import TicketEvent

_T = TypeVar("_T")
_ItemT = TypeVar("_ItemT")

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


def hold_requests(conn: Connection, items: Sequence[tuple[str, RawRequest, str]]) -> list[int]:
    """Unreadable webhooks (source, request, reason) kept in quarantine; their ids."""
    return [quarantine.hold(conn, source, request, reason) for source, request, reason in items]


def read_webhook(
    source: WebhookSource, request: RawRequest, destinations: tuple[str, ...]
) -> list[IncomingEvent]:
    """Authenticate (raises AuthenticationFailed), then parse (raises InvalidPayload)."""
    source.authenticate(request)
    return [IncomingEvent.from_ticket_event(e, destinations) for e in source.parse(request)]


@dataclass(frozen=True)
class Accepted:
    event_ids: list[int]
    duplicates: int
    deliveries: int

    @classmethod
    def of(cls, stored: Sequence[outbox.Enqueued]) -> Accepted:
        return cls(
            event_ids=[s.event_id for s in stored],
            duplicates=sum(1 for s in stored if s.duplicate),
            deliveries=sum(s.deliveries for s in stored),
        )


@dataclass(frozen=True)
class Quarantined:
    quarantine_id: int
    reason: str


class IntakeWriter(Protocol):
    """Where intake's writes happen: :class:`LocalWriter` in this process, or the
    intake writer process (syncd.intake.writer_process)."""

    @property
    def running(self) -> bool:
        """False while writes cannot be taken (the writer process is being restarted)."""

    async def store(self, events: list[IncomingEvent], now: float) -> list[outbox.Enqueued]:
        """Store ``events`` received at ``now``; returns once they are committed."""

    async def receive(self, source_name: str, request: RawRequest) -> Accepted | Quarantined:
        """Authenticate, parse, and store a webhook's events or quarantine its body."""


class LocalWriter:
    """Intake's writes on the store's writer thread (``store.intake_writer = "thread"``)."""

    def __init__(
        self,
        store: Store,
        sources: Mapping[str, WebhookSource],
        destinations: Mapping[str, tuple[str, ...]],
    ) -> None:
        self._store = store
        self._sources = sources
        self._destinations = destinations

    @property
    def running(self) -> bool:
        return True

    async def store(self, events: list[IncomingEvent], now: float) -> list[outbox.Enqueued]:
        return await self._write(store_requests, (events, now))

    async def receive(self, source_name: str, request: RawRequest) -> Accepted | Quarantined:
        dests = self._destinations.get(source_name, ())
        try:
            incoming = read_webhook(self._sources[source_name], request, dests)
        except InvalidPayload as exc:
            held = (source_name, request, exc.reason)
            return Quarantined(await self._write(hold_requests, held), exc.reason)
        return Accepted.of(await self.store(incoming, request.received_at or time.time()))

    async def _write(self, group: Grouped[_ItemT, _T], item: _ItemT) -> _T:
        """A grouped write; a database that fails it is a StoreError, as in the writer process."""
        try:
            return await self._store.writer.run_grouped(group, item)
        except DBAPIError as exc:
            raise StoreError(f"storing the webhook failed: {type(exc).__name__}: {exc}") from None


class Intake:
    def __init__(
        self,
        store: Store,
        sources: Mapping[str, WebhookSource],
        destinations: Mapping[str, tuple[str, ...]],
        *,
        on_stored: Callable[[], None] = lambda: None,
        writer: IntakeWriter | None = None,
    ) -> None:
        self.store = store
        self.sources = sources
        self.destinations = destinations
        self.on_stored = on_stored
        self.writer: IntakeWriter = writer or LocalWriter(store, sources, destinations)

    @property
    def accepting(self) -> bool:
        """False while the intake writer process is being started again."""
        return self.writer.running

    def source(self, name: str) -> WebhookSource:
        found = self.sources.get(name)
        if found is None:
            raise UnknownSource(f"no source named {name!r} is configured")
        return found

    async def receive(self, source_name: str, request: RawRequest) -> Accepted | Quarantined:
        """Authenticate (raises), parse, and store events or the raw body in quarantine."""
        self.source(source_name)
        outcome = await self.writer.receive(source_name, request)
        if isinstance(outcome, Quarantined):
            log.warning(
                "webhook_quarantined",
                source=source_name,
                quarantine_id=outcome.quarantine_id,
                reason=outcome.reason,
            )
        elif outcome.deliveries:
            self.on_stored()
        return outcome

    async def store_events(self, source_name: str, events: list[TicketEvent]) -> Accepted:
        dests = self.destinations.get(source_name, ())
        incoming = [IncomingEvent.from_ticket_event(e, dests) for e in events]
        accepted = Accepted.of(await self.writer.store(incoming, time.time()))
        if accepted.deliveries:
            self.on_stored()
        return accepted

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
