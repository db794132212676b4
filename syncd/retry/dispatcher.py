"""The dispatcher: leases due deliveries, runs them with bounded concurrency, records outcomes.

It never sleeps on a retry: a failed delivery goes back to the store with
its next attempt time and the loop moves on. A burst of events of one ticket
waiting behind each other is sent as one delivery (``syncd.retry.coalesce``).
Stopping is graceful: leasing stops at once, running deliveries get ``grace``
seconds to finish, and anything still running after that keeps its lease and
is reclaimed on the next start.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import socket
import time
import uuid
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from functools import partial

import structlog
from pydantic import ValidationError
from sqlalchemy import Connection

from syncd.connectors.base import Connector, DeliveryContext, RecordConnector
from syncd.errors import AccessDenied, DeliveryError, MappingError, PermanentError
from syncd.logs import redactor
from syncd.mapping import MappingConfig, Plan, Upsert, UpsertContact, contact_keys, plan
from syncd.retry import outbox
from syncd.retry.breaker import Breaker
from syncd.retry.coalesce import merge_plans
from syncd.retry.links import StoreLinkBook, claim_links, drop_unused, flush_all
from syncd.retry.policy import Fail, Retry, RetryPolicy
from syncd.store import Store
from syncd.store.models import DeliveryState
from syncd.ticket import TicketEvent

log = structlog.get_logger("syncd.dispatcher")


@dataclass(frozen=True)
class _Prepared:
    """A leased row's plan and link book, made in the lease's transaction."""

    plan: Plan
    links: StoreLinkBook


_Leased = tuple[outbox.Leased, _Prepared | None]


def _asks_client(mapping: MappingConfig) -> bool:
    """Whether a rule matches on the client being known, which costs a look-up."""
    return any(rule.when.client != "any" for rule in mapping.rules)


def load_event(payload: Mapping[str, object]) -> TicketEvent:
    try:
        return TicketEvent.model_validate(payload)
    except ValidationError as exc:
        raise MappingError(f"stored event does not fit the ticket model: {exc}") from None


class Dispatcher:
    def __init__(
        self,
        store: Store,
        connectors: Mapping[str, Connector],
        policy: RetryPolicy,
        *,
        concurrency: int = 16,
        batch_size: int = 100,
        lease_seconds: float = 120.0,
        poll_interval: float = 0.5,
        install_id: str = "0",
        mappings: Mapping[str, MappingConfig] | None = None,
        breaker: Breaker | None = None,
        clock: Callable[[], float] = time.time,
        coalesce: bool = True,
        coalesce_max: int = 20,
        on_attempt: Callable[[str, str, float], None] | None = None,
    ) -> None:
        self.store = store
        self.connectors = connectors
        self.policy = policy
        self.concurrency = concurrency
        self.batch_size = batch_size
        self.lease_seconds = lease_seconds
        self.poll_interval = poll_interval
        self.install_id = install_id
        self.mappings = mappings or {}
        self.clock = clock
        #: Most events one send may carry (1: every event goes out on its own).
        self.coalesce_max = coalesce_max if coalesce else 1
        #: Told (destination, outcome, seconds) after every attempt: the metrics' histogram.
        self.on_attempt = on_attempt
        self.owner = f"{socket.gethostname()[:30]}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self._wake = asyncio.Event()
        self._stopping = asyncio.Event()
        self._running: set[asyncio.Task[None]] = set()
        #: Leased deliveries not yet finished with (queued or running): their leases are renewed.
        self._held: set[int] = set()
        self._outcomes: list[tuple[outbox.Outcome, StoreLinkBook | None, asyncio.Future[None]]] = []
        self._rng = random.Random()
        self.breaker = breaker or Breaker(clock=clock)
        #: Destinations with a problem in destination_status, whoever recorded it: read at
        #: each lease (rebound by the writer thread) and added to at a trip here. A success
        #: to one of them clears its problem.
        self._stored_problems: frozenset[str] = frozenset()

    def wake(self) -> None:
        """New work may be due: skip the rest of the poll interval."""
        self._wake.set()

    async def run(self) -> None:
        """Lease in batches into a small local queue; start deliveries as slots free up.

        Leasing one row per free slot would cost a lease query per delivery;
        a batch is leased only once at least half the concurrency is free, and
        at most twice the concurrency is held at a time, so leased rows never
        wait long enough for their lease to run out.
        """
        ready: deque[_Leased] = deque()
        renewer = asyncio.create_task(self._renew_leases(), name="lease_renewal")
        try:
            while not self._stopping.is_set():
                while ready and len(self._running) < self.concurrency:
                    self._start(*ready.popleft())
                room = 2 * self.concurrency - len(ready) - len(self._running)
                if room >= max(1, self.concurrency // 2):
                    self._wake.clear()
                    try:
                        leased = await self.store.writer.run(
                            partial(self._lease, min(room, self.batch_size))
                        )
                    except Exception as exc:
                        log.error("lease_failed", error=redactor.clean(str(exc)))
                        await self._idle()
                        continue
                    ready.extend(leased)
                    self._held.update(row.delivery_id for row, _ in leased)
                    if leased:
                        continue
                if self._running:
                    await self._wait_any()
                else:
                    await self._idle()
        finally:
            renewer.cancel()
            if ready:
                # Leased but never started: hand them back rather than let the lease run out.
                ids = [row.delivery_id for row, _ in ready]
                self._held.difference_update(ids)
                books = [prepared.links for _, prepared in ready if prepared is not None]

                def _release(conn: Connection) -> None:
                    drop_unused(conn, books)
                    outbox.release(conn, ids, owner=self.owner, now=self.clock())

                await self.store.writer.run(_release)

    async def _renew_leases(self) -> None:
        """Every third of a lease, extend the leases this dispatcher holds (outbox.renew_leases).

        Runs as long as :meth:`run`; a failed renewal is logged and tried again
        at the next turn, well before the lease runs out.
        """
        every = self.lease_seconds / 3
        while True:
            await asyncio.sleep(every)
            if not self._held:
                continue
            try:
                await self.store.writer.run(
                    partial(
                        outbox.renew_leases,
                        ids=frozenset(self._held),
                        owner=self.owner,
                        now=self.clock(),
                        lease_seconds=self.lease_seconds,
                    )
                )
            except Exception as exc:
                log.error("lease_renewal_failed", error=redactor.clean(str(exc)))

    async def run_once(self, limit: int | None = None) -> list[outbox.Leased]:
        """Lease one batch and deliver all of it; returns once every outcome is committed.

        For tests and one-shot tools; :meth:`run` is the daemon's loop.
        """
        leased = await self.store.writer.run(partial(self._lease, limit or self.batch_size))
        slots = asyncio.Semaphore(self.concurrency)

        async def one(row: outbox.Leased, prepared: _Prepared | None) -> None:
            async with slots:
                await self._deliver(row, prepared)

        await asyncio.gather(*(one(row, prepared) for row, prepared in leased))
        return [row for row, _ in leased]

    def _start(self, row: outbox.Leased, prepared: _Prepared | None) -> None:
        task = asyncio.create_task(self._deliver(row, prepared))
        self._running.add(task)
        task.add_done_callback(self._running.discard)
        # Done with, whatever the outcome: if it could not be recorded, the lease must run out.
        task.add_done_callback(lambda _: self._held.discard(row.delivery_id))

    async def _wait_any(self) -> None:
        """Until a delivery finishes, new work is announced, or we are told to stop."""
        self._wake.clear()
        waiters = {
            asyncio.ensure_future(self._wake.wait()),
            asyncio.ensure_future(self._stopping.wait()),
        }
        try:
            await asyncio.wait({*self._running, *waiters}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for w in waiters:
                w.cancel()

    def _lease(self, limit: int, conn: Connection) -> list[_Leased]:
        """Lease a batch and, in the same transaction, prepare what can be prepared.

        For record connectors and rules that need no look-up to match, each row
        is mapped here and its links are read and its intents claimed at once
        (:func:`~syncd.retry.links.claim_links`), so a delivery goes straight to
        its HTTP requests: one commit for the whole batch instead of two writer
        round trips per delivery. Anything else is mapped when it is delivered.
        """
        now = self.clock()
        # A pause recorded by any replica holds here too: when one trips its breaker, the
        # others stop sending as well, instead of each finding out with its own failures.
        stored = outbox.destination_statuses(conn)
        self._stored_problems = frozenset(stored)
        paused_elsewhere = {
            name for name, st in stored.items() if (st["paused_until"] or 0.0) > now
        }
        rows = outbox.lease(
            conn,
            owner=self.owner,
            now=now,
            lease_seconds=self.lease_seconds,
            limit=limit,
            exclude=self.breaker.paused() | paused_elsewhere,
            coalesce_max=self.coalesce_max,
        )
        plans: dict[int, Plan] = {}
        for row in rows:
            connector = self.connectors.get(row.destination)
            mapping = self.mappings.get(row.destination, MappingConfig())
            if not isinstance(connector, RecordConnector) or _asks_client(mapping):
                continue
            found: Plan | None = None
            with contextlib.suppress(Exception):
                # On an error the row is mapped again when delivered, and the error is
                # recorded as the attempt's outcome; here it must not sink the whole lease.
                found = self._plan_now(row, mapping)
            if found is not None and found.matched:
                plans[row.delivery_id] = found
        if not plans:
            return [(row, None) for row in rows]
        books = claim_links(
            conn,
            self.store,
            [
                (r.delivery_id, r.destination, plans[r.delivery_id].records())
                for r in rows
                if r.delivery_id in plans
            ],
        )
        return [
            (row, _Prepared(plans[row.delivery_id], books[row.delivery_id]))
            if row.delivery_id in plans
            else (row, None)
            for row in rows
        ]

    async def _watch_health(self, destination: str, error: DeliveryError | None) -> None:
        """Feed the breaker; show a trip (or the end of a problem) in destination_status.

        The first success after a problem clears it, on whichever replica it happens.
        """
        trip = self.breaker.record(destination, error)
        now = self.clock()
        if trip is not None:
            self._stored_problems = self._stored_problems | {destination}
            log.warning(
                "destination_paused",
                destination=destination,
                paused_for_s=round(trip.paused_until - now, 1),
                problem=redactor.clean(trip.problem),
            )
            problem = redactor.clean(trip.problem)
            await self.store.writer.run(
                lambda conn: outbox.set_destination_status(
                    conn, destination, paused_until=trip.paused_until, problem=problem, now=now
                )
            )
        elif error is None and destination in self._stored_problems:
            self._stored_problems = self._stored_problems - {destination}
            log.info("destination_recovered", destination=destination)
            await self.store.writer.run(
                lambda conn: outbox.set_destination_status(
                    conn, destination, paused_until=None, problem=None, now=now
                )
            )

    async def _idle(self) -> None:
        waiters = [
            asyncio.ensure_future(self._wake.wait()),
            asyncio.ensure_future(self._stopping.wait()),
        ]
        try:
            await asyncio.wait(
                waiters, timeout=self.poll_interval, return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            for w in waiters:
                w.cancel()

    async def stop(self, grace: float) -> int:
        """Stop leasing; give running deliveries ``grace`` s. Returns how many were cut off."""
        self._stopping.set()
        if not self._running:
            return 0
        _done, pending = await asyncio.wait(set(self._running), timeout=grace)
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.wait(pending, timeout=1.0)
        return len(pending)

    async def _deliver(self, row: outbox.Leased, prepared: _Prepared | None = None) -> None:
        bound = log.bind(
            event_id=row.event_id,
            delivery_id=row.delivery_id,
            ticket_id=row.ticket_id,
            destination=row.destination,
            attempt=row.attempt,
        )
        if row.folded:
            bound = bound.bind(carries=[f.delivery_id for f in row.folded])
        started = self.clock()
        t0 = time.perf_counter()
        error: DeliveryError | None = None
        links: StoreLinkBook | None = None
        try:
            connector = self.connectors.get(row.destination)
            if connector is None:
                raise PermanentError(f"destination {row.destination!r} is not configured")
            if prepared is not None:
                links, plan = prepared.links, prepared.plan
            else:
                links = StoreLinkBook(self.store, row.destination, row.delivery_id)
                try:
                    plan = await self._plan(row, connector, links)
                except MappingError as exc:
                    raise PermanentError(f"mapping failed: {exc}") from None
            if not plan.matched:
                mapping = self.mappings.get(row.destination, MappingConfig())
                if mapping.unmatched == "fail":
                    raise PermanentError("no mapping rule matched: " + " | ".join(plan.reasons))
                bound.info("no_rule_matched", reasons=list(plan.reasons))
            ctx = DeliveryContext(
                delivery_id=row.delivery_id,
                event_id=row.event_id,
                destination=row.destination,
                attempt=row.attempt,
                links=links,
                install_id=self.install_id,
            )
            await connector.execute(plan, ctx)
        except DeliveryError as exc:
            error = exc
        except asyncio.CancelledError:
            raise  # shutdown past the grace period: the lease will be reclaimed
        except Exception as exc:  # a connector bug must not kill the dispatcher
            error = DeliveryError(f"unexpected {type(exc).__name__}: {exc}")
            bound.exception("connector_crashed")
        duration_ms = (time.perf_counter() - t0) * 1000
        await self._watch_health(row.destination, error)
        outcome = self._outcome(row, error, started, duration_ms)
        if self.on_attempt is not None:
            self.on_attempt(row.destination, outcome.label, duration_ms / 1000)
        try:
            await self._record(outcome, links)
        except Exception as exc:
            # The lease stays; recovery will hand it out again. Nothing is lost.
            bound.error("outcome_not_recorded", error=redactor.clean(str(exc)))
            return
        fields: dict[str, object] = {"duration_ms": round(duration_ms, 1)}
        if outcome.status_code is not None:
            fields["status_code"] = outcome.status_code
        if outcome.error:
            fields["error"] = outcome.error
        if outcome.next_attempt_at is not None:
            fields["next_attempt_in_s"] = round(outcome.next_attempt_at - self.clock(), 1)
        level = "info" if outcome.state == DeliveryState.DELIVERED else "warning"
        getattr(bound, level)(outcome.label, **fields)
        self.wake()  # the next event of this ticket may now be due

    async def _record(self, outcome: outbox.Outcome, links: StoreLinkBook | None) -> None:
        """Queue the outcome (with the delivery's held-back links) for the next shared write."""
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._outcomes.append((outcome, links, future))
        if len(self._outcomes) == 1:
            asyncio.get_running_loop().create_task(self._flush_outcomes())
        await future

    async def _flush_outcomes(self) -> None:
        batch, self._outcomes = self._outcomes, []

        def _write(conn: Connection) -> int:
            flush_all(conn, [links for _, links, _ in batch if links is not None])
            return outbox.complete(conn, [o for o, _, _ in batch], self.clock())

        try:
            await self.store.writer.run(_write)
        except Exception as exc:
            for _, _, future in batch:
                if not future.done():
                    future.set_exception(exc)
            return
        for _, _, future in batch:
            if not future.done():
                future.set_result(None)

    async def _plan(self, row: outbox.Leased, connector: Connector, links: StoreLinkBook) -> Plan:
        """Map with the current config, so a fixed rule applies to a resent event.

        A carrier maps each of its events on its own, as if they went out one by
        one, then folds the plans into one.
        """
        mapping = self.mappings.get(row.destination, MappingConfig())
        if not _asks_client(mapping):
            return self._plan_now(row, mapping)
        items = [(row.event_id, row.payload), *((f.event_id, f.payload) for f in row.folded)]
        plans: list[Plan] = []
        contacts: set[str] = set()  # made or updated by an earlier event of this send
        for event_id, payload in items:
            event = load_event(payload)
            key, _ = contact_keys(event)
            if key is not None and key in contacts:
                client_exists = True
            else:
                client_exists = await self._client_exists(event, connector, links)
            one = plan(event, mapping, event_id=event_id, client_exists=client_exists)
            if row.folded and not one.matched and mapping.unmatched == "fail":
                raise PermanentError(
                    f"no mapping rule matched event {event_id}: " + " | ".join(one.reasons)
                )
            contacts.update(op.key for op in one.operations if isinstance(op, UpsertContact))
            plans.append(one)
        return merge_plans(plans)

    def _plan_now(self, row: outbox.Leased, mapping: MappingConfig) -> Plan:
        """:meth:`_plan` for rules that need no look-up to match: pure, runs anywhere."""
        plans: list[Plan] = []
        items = [(row.event_id, row.payload), *((f.event_id, f.payload) for f in row.folded)]
        for event_id, payload in items:
            one = plan(load_event(payload), mapping, event_id=event_id)
            if row.folded and not one.matched and mapping.unmatched == "fail":
                raise PermanentError(
                    f"no mapping rule matched event {event_id}: " + " | ".join(one.reasons)
                )
            plans.append(one)
        return merge_plans(plans)

    async def _client_exists(
        self, event: TicketEvent, connector: Connector, links: StoreLinkBook
    ) -> bool:
        key, identities = contact_keys(event)
        if key is None or event.client is None:
            return False
        for candidate in (key, *identities):
            ref = await links.get("contact", candidate)
            if ref is not None and ref.crm_id is not None:
                return True
        probe = Upsert(
            "contact",
            key,
            {
                "name": event.client.name,
                "emails": list(event.client.emails),
                "phones": list(event.client.phones),
            },
            identities=identities,
        )
        return await connector.find(probe, None) is not None

    def _outcome(
        self, row: outbox.Leased, error: DeliveryError | None, started: float, duration_ms: float
    ) -> outbox.Outcome:
        base = outbox.Outcome(
            delivery_id=row.delivery_id,
            lease_owner=self.owner,
            attempt=row.attempt,
            state=DeliveryState.DELIVERED,
            started_at=started,
            duration_ms=duration_ms,
            first_failed_at=row.first_failed_at,
            folded=tuple(f.delivery_id for f in row.folded),
        )
        if error is None:
            return base
        now = self.clock()
        first_failed_at = row.first_failed_at if row.first_failed_at is not None else now
        decision = self.policy.decide(
            error, failures=row.attempt, first_failed_at=first_failed_at, now=now, rng=self._rng
        )
        failed = replace(base, status_code=error.status_code, first_failed_at=first_failed_at)
        paused_until = self.breaker.paused_until(row.destination)
        if isinstance(error, AccessDenied) and paused_until is not None:
            # Refused credentials or a blocked account: not this event's fault. It waits
            # with the rest of the destination, inside its retry window.
            deadline = first_failed_at + self.policy.window
            if now < deadline:
                decision = Retry(at=min(paused_until, deadline))
        if isinstance(decision, Fail) and row.folded:
            # Refused, but maybe for one of the events it carried. Blame none of them:
            # this one is tried again on its own at once, the others go back to the queue.
            return replace(
                failed,
                state=DeliveryState.RETRY_WAIT,
                error=redactor.clean(
                    f"{error} (sent together with {len(row.folded)} later event(s) of the "
                    "ticket; now tried alone, and those go out after it)"
                ),
                next_attempt_at=now,
                unfold=True,
            )
        if isinstance(decision, Retry):
            return replace(
                failed,
                state=DeliveryState.RETRY_WAIT,
                error=redactor.clean(str(error)),
                next_attempt_at=decision.at,
            )
        state = DeliveryState.FAILED if isinstance(decision, Fail) else DeliveryState.EXPIRED
        return replace(failed, state=state, error=redactor.clean(decision.reason))
