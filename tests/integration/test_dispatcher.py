"""The dispatcher with the real store, the REST connector and the bundled receiver over HTTP."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from functools import partial
from typing import Any

import pytest
from sqlalchemy import select

from syncd.connectors.base import Connector
from syncd.connectors.rest import RestConnector, RestSettings
from syncd.emulators.serving import ServerThread
from syncd.emulators.sink import Faults, SinkState, create_sink
from syncd.events import IncomingEvent
from syncd.mapping import MappingConfig
from syncd.retry import outbox
from syncd.retry.dispatcher import Dispatcher
from syncd.retry.links import drop_unused
from syncd.retry.policy import RetryPolicy
from syncd.store import Store
from syncd.store.models import attempts, deliveries
from syncd.ticket import Comment, EventKind, TicketEvent, make_client


@pytest.fixture
def sink() -> Iterator[tuple[ServerThread, SinkState]]:
    app, state = create_sink()
    server = ServerThread(app).start()
    yield server, state
    server.stop()


def new_ticket(ticket: str, client_id: str = "7") -> IncomingEvent:
    event = TicketEvent(
        source="hd",
        ticket_id=ticket,
        kind=EventKind.TICKET_CREATED,
        subject=f"Ticket {ticket}",
        client=make_client(
            source_id=client_id, name="Anna", emails=["anna@example.com"], phones=["+79991234567"]
        ),
    )
    return IncomingEvent.from_ticket_event(event, ("crm",))


async def run_until(
    dispatcher: Dispatcher,
    store: Store,
    *,
    count: int,
    state: str = "delivered",
    destination: str = "crm",
    limit: float = 20,
) -> dict[str, int]:
    """Run the dispatcher until ``count`` deliveries to ``destination`` are in ``state``."""
    task = asyncio.create_task(dispatcher.run())
    deadline = time.monotonic() + limit
    counts: dict[str, int] = {}
    try:
        while time.monotonic() < deadline:
            counts = await store.read(lambda c: outbox.counts_by_state(c).get(destination, {}))
            if counts.get(state, 0) >= count:
                return counts
            await asyncio.sleep(0.02)
        raise AssertionError(f"not {state} in time: {counts}")
    finally:
        await dispatcher.stop(5)
        await task


async def drain(
    dispatcher: Dispatcher, store: Store, expected: int, limit: float = 20
) -> dict[str, int]:
    return await run_until(dispatcher, store, count=expected, limit=limit)


async def test_two_tickets_of_one_new_client_make_one_contact(
    store: Store, sink: tuple[ServerThread, SinkState]
) -> None:
    server, state = sink
    state.faults = Faults(latency_seconds=0.05)  # both deliveries are in the air together
    for ticket in ("1", "2"):
        store.write_sync(lambda c, t=ticket: outbox.enqueue(c, new_ticket(t), time.time()))
    connector = RestConnector("crm", RestSettings(base_url=server.url), timeout=5)
    dispatcher = Dispatcher(
        store,
        {"crm": connector},
        RetryPolicy(schedule=(0.05,), jitter=0),
        concurrency=8,
        mappings={"crm": MappingConfig()},
        poll_interval=0.02,
    )
    await drain(dispatcher, store, expected=2)
    await connector.aclose()
    contacts = [r for r in state.records.values() if r["entity"] == "contact"]
    deals = [r for r in state.records.values() if r["entity"] == "deal"]
    assert len(contacts) == 1 and len(deals) == 2
    assert {d["parent_id"] for d in deals} == {contacts[0]["id"]}
    assert state.duplicate_creates() == {}
    with store.read_engine.connect() as conn:
        errors = list(
            conn.execute(
                select(attempts.c.error).where(attempts.c.outcome == "retry_scheduled")
            ).scalars()
        )
    # the race really happened: one delivery waited for the other's contact
    assert any("being created by another delivery" in (e or "") for e in errors)


async def test_unmatched_ticket_fails_with_the_reason(
    store: Store, sink: tuple[ServerThread, SinkState]
) -> None:
    server, state = sink
    store.write_sync(lambda c: outbox.enqueue(c, new_ticket("9"), time.time()))
    connector = RestConnector("crm", RestSettings(base_url=server.url), timeout=5)
    strict = MappingConfig.model_validate(
        {"rules": [{"name": "chat only", "when": {"channel": ["chat"]}}]}
    )
    dispatcher = Dispatcher(
        store, {"crm": connector}, RetryPolicy(), mappings={"crm": strict}, poll_interval=0.02
    )
    try:
        await run_until(dispatcher, store, count=1, state="failed")
    finally:
        await connector.aclose()
    with store.read_engine.connect() as conn:
        [error] = list(conn.execute(select(attempts.c.error)).scalars())
    assert error is not None and error.startswith(
        "no mapping rule matched: rule 'chat only' did not match"
    )
    assert state.records == {}


async def test_resend_maps_again_with_the_fixed_rules_and_never_duplicates(
    store: Store, sink: tuple[ServerThread, SinkState]
) -> None:
    server, state = sink
    store.write_sync(lambda c: outbox.enqueue(c, new_ticket("5"), time.time()))
    connector = RestConnector("crm", RestSettings(base_url=server.url), timeout=5)
    strict = MappingConfig.model_validate(
        {"rules": [{"name": "chat only", "when": {"channel": ["chat"]}}]}
    )
    first = Dispatcher(
        store, {"crm": connector}, RetryPolicy(), mappings={"crm": strict}, poll_interval=0.02
    )
    await run_until(first, store, count=1, state="failed")
    assert state.records == {}

    # the admin fixes the rules and resends what failed
    fixed = MappingConfig.model_validate(
        {
            "rules": [
                {"name": "everything", "then": {"deal_fields": {"subject": "{{ ticket.subject }}"}}}
            ]
        }
    )
    ids = store.write_sync(lambda c: outbox.select_deliveries(c, states=["failed"]))
    assert store.write_sync(lambda c: outbox.resend(c, ids, time.time())) == 1
    second = Dispatcher(
        store, {"crm": connector}, RetryPolicy(), mappings={"crm": fixed}, poll_interval=0.02
    )
    await drain(second, store, expected=1)
    assert [
        r["fields"].get("subject") for r in state.records.values() if r["entity"] == "deal"
    ] == ["Ticket 5"]

    # resending a delivered event updates the same records
    ids = store.write_sync(lambda c: outbox.select_deliveries(c, states=["delivered"]))
    store.write_sync(lambda c: outbox.resend(c, ids, time.time()))
    third = Dispatcher(
        store, {"crm": connector}, RetryPolicy(), mappings={"crm": fixed}, poll_interval=0.02
    )
    await drain(third, store, expected=1)
    await connector.aclose()
    assert state.duplicate_creates() == {}
    assert sorted(r["entity"] for r in state.records.values()) == ["contact", "deal"]
    assert state.updates >= 2


async def test_blocked_account_pauses_the_destination_and_loses_nothing(store: Store) -> None:
    from syncd.connectors.amocrm import AmoCrmConnector, AmoCrmSettings
    from syncd.emulators.amocrm import create_amocrm_emulator
    from syncd.retry.breaker import Breaker

    app, amo = create_amocrm_emulator(long_lived_token="tok-123456", rate_limit=None)
    server = ServerThread(app).start()
    amo.block_account(402)  # unpaid: every request is refused
    for ticket in ("1", "2", "3"):
        store.write_sync(
            lambda c, t=ticket: outbox.enqueue(c, new_ticket(t, client_id=t), time.time())
        )
    connector = AmoCrmConnector(
        "amo",
        AmoCrmSettings(
            base_url=server.url, access_token="tok-123456", rate_per_second=50, burst=50
        ),
        timeout=5,
    )
    breaker = Breaker(auth_pause=0.5)
    dispatcher = Dispatcher(
        store, {"amo": connector}, RetryPolicy(), mappings={}, breaker=breaker, poll_interval=0.02
    )
    # the events were queued for "crm"; point them at this destination
    from sqlalchemy import update

    from syncd.store.models import deliveries

    store.write_sync(lambda c: c.execute(update(deliveries).values(destination="amo")))
    task = asyncio.create_task(dispatcher.run())
    try:
        for _ in range(500):
            statuses = await store.read(outbox.destination_statuses)
            if "amo" in statuses:
                break
            await asyncio.sleep(0.01)
        assert (
            "402" in str(statuses["amo"]["problem"])
            or "blocked" in str(statuses["amo"]["problem"]).lower()
        )
        counts = await store.read(lambda c: outbox.counts_by_state(c)["amo"])
        assert counts["failed"] == 0  # nothing was given up on
        # one request per delivery already in the air when it tripped, then silence
        assert len(amo.requests) <= 3
        amo.unblock_account()
        for _ in range(1000):
            counts = await store.read(lambda c: outbox.counts_by_state(c)["amo"])
            if counts["delivered"] == 3:
                break
            await asyncio.sleep(0.01)
        assert counts["delivered"] == 3 and len(amo.leads) == 3
        assert (await store.read(outbox.destination_statuses)) == {}
    finally:
        await dispatcher.stop(5)
        await task
        await connector.aclose()
        server.stop()


def linked(store: Store) -> list[tuple[str, str | None]]:
    from syncd.store.models import links

    with store.read_engine.connect() as conn:
        return sorted((r.entity, r.crm_id) for r in conn.execute(select(links)))


async def test_intents_claimed_at_lease_but_never_used_are_dropped(
    store: Store, sink: tuple[ServerThread, SinkState]
) -> None:
    """The lease claims the intents of a whole plan at once. When the first request fails
    the other creates are never sent, and their intents go with the attempt's outcome."""
    server, state = sink
    ticket = TicketEvent.model_validate(new_ticket("3").payload).model_copy(
        update={"comment": Comment(text="hello")}
    )
    store.write_sync(
        lambda c: outbox.enqueue(c, IncomingEvent.from_ticket_event(ticket, ("crm",)), time.time())
    )
    connector = RestConnector("crm", RestSettings(base_url=server.url), timeout=5)
    now = [time.time()]
    dispatcher = Dispatcher(
        store,
        {"crm": connector},
        RetryPolicy(schedule=(5.0,), jitter=0, overload_floor=0),
        mappings={"crm": MappingConfig()},
        clock=lambda: now[0],
    )
    leased = store.write_sync(partial(dispatcher._lease, 10))
    assert linked(store) == [("contact", None), ("deal", None), ("note", None)]
    store.write_sync(
        lambda c: outbox.release(
            c, [r.delivery_id for r, _ in leased], owner=dispatcher.owner, now=now[0]
        )
    )
    store.write_sync(lambda c: drop_unused(c, [p.links for _, p in leased if p is not None]))
    assert linked(store) == []  # released unstarted: nothing was sent, nothing is claimed

    state.faults = Faults(fail_count=1, fail_status=503)  # the contact's look-up
    [first] = await dispatcher.run_once()
    assert state.records == {} and linked(store) == []

    now[0] += 10
    lookups = state.lookups
    [second] = await dispatcher.run_once()
    await connector.aclose()
    assert second.delivery_id == first.delivery_id and second.attempt == 2
    assert state.lookups - lookups == 1  # only the contact's usual look-up before creating
    assert sorted(r["entity"] for r in state.records.values()) == ["contact", "deal", "note"]
    assert state.duplicate_creates() == {}


async def test_intents_left_by_a_crash_make_the_retry_look_first(
    store: Store, sink: tuple[ServerThread, SinkState]
) -> None:
    """A lease whose worker dies keeps its claimed intents: the next attempt cannot know
    whether the creates went out, so it looks each record up before creating it."""
    server, state = sink
    ticket = TicketEvent.model_validate(new_ticket("4").payload).model_copy(
        update={"comment": Comment(text="hello")}
    )
    store.write_sync(
        lambda c: outbox.enqueue(c, IncomingEvent.from_ticket_event(ticket, ("crm",)), time.time())
    )
    connector = RestConnector("crm", RestSettings(base_url=server.url), timeout=5)
    now = [time.time()]
    dispatcher = Dispatcher(
        store,
        {"crm": connector},
        RetryPolicy(),
        mappings={"crm": MappingConfig()},
        lease_seconds=60,
        clock=lambda: now[0],
    )
    store.write_sync(partial(dispatcher._lease, 10))  # leased and claimed, then the crash
    now[0] += 61
    assert store.write_sync(lambda c: outbox.recover_leases(c, now[0])) == 1
    lookups = state.lookups
    [again] = await dispatcher.run_once()
    await connector.aclose()
    assert again.outcome_unknown and again.attempt == 2
    assert state.lookups - lookups == 3  # contact, deal and note each looked up first
    assert sorted(r["entity"] for r in state.records.values()) == ["contact", "deal", "note"]
    assert state.duplicate_creates() == {}
    assert all(crm_id is not None for _, crm_id in linked(store))


async def test_a_row_that_cannot_be_mapped_does_not_stop_its_batch(
    store: Store, sink: tuple[ServerThread, SinkState], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Mapping runs inside the lease's transaction; a row whose mapping blows up (a bug,
    not a rule) must not sink the lease of the rows leased with it."""
    server, state = sink
    for ticket in ("good", "bad"):
        store.write_sync(
            lambda c, t=ticket: outbox.enqueue(c, new_ticket(t, client_id=t), time.time())
        )
    connector = RestConnector("crm", RestSettings(base_url=server.url), timeout=5)
    dispatcher = Dispatcher(
        store, {"crm": connector}, RetryPolicy(), mappings={"crm": MappingConfig()}
    )
    real = dispatcher._plan_now

    def flaky(row: outbox.Leased, mapping: MappingConfig) -> Any:
        if row.ticket_id == "bad":
            raise RuntimeError("bug in a template filter")
        return real(row, mapping)

    monkeypatch.setattr(dispatcher, "_plan_now", flaky)
    leased = await dispatcher.run_once()
    await connector.aclose()
    assert sorted(r.ticket_id for r in leased) == ["bad", "good"]
    with store.read_engine.connect() as conn:
        by_ticket = {
            r.ordering_key: (r.state, r.last_error)
            for r in conn.execute(
                select(deliveries.c.ordering_key, deliveries.c.state, deliveries.c.last_error)
            )
        }
    assert by_ticket["hd:good"] == ("delivered", None)
    state_bad, error = by_ticket["hd:bad"]
    assert state_bad == "retry_wait" and "RuntimeError: bug in a template filter" in error
    assert [r["external_key"] for r in state.records.values() if r["entity"] == "deal"] == [
        "hd:ticket:good"
    ]


def test_link_look_up_reads_only_the_links_it_asks_for(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Reading the links a batch needs goes straight to them through the unique index,
    however many links the destination has (it used to read all of them each lease)."""
    from syncd.retry import links
    from syncd.store.dialect import fetch

    now = time.time()
    rows = [("crm", "deal", f"hd:{i}", str(i), None, None, now, now) for i in range(2000)]
    rows += [
        ("crm", "contact", f"email:c{i}@x.test", f"c{i}", None, None, now, now) for i in range(2000)
    ]
    store.write_sync(lambda c: links.record_many(c, rows))
    wanted = {("deal", "hd:7"), ("contact", "email:c7@x.test"), ("deal", "hd:missing")}
    statements: list[tuple[str, tuple[Any, ...]]] = []

    def recording(conn: Any, sql: str, params: Any = ()) -> Any:
        statements.append((sql, tuple(params)))
        return fetch(conn, sql, params)

    monkeypatch.setattr(links, "fetch", recording)
    found = store.write_sync(lambda c: links._stored_links(c, "crm", wanted))
    assert found == {
        ("deal", "hd:7"): ("7", None, None),
        ("contact", "email:c7@x.test"): ("c7", None, None),
    }
    [(sql, params)] = statements
    with store.read_engine.connect() as c:
        if store.is_sqlite:
            plan = " ".join(
                str(r[-1]) for r in c.exec_driver_sql("EXPLAIN QUERY PLAN " + sql, params)
            )
            assert "entity=? AND external_key=?" in plan, plan
        else:
            c.exec_driver_sql("ANALYZE links")
            plan = " ".join(
                str(r[0]) for r in c.exec_driver_sql("EXPLAIN " + sql.replace("?", "%s"), params)
            )
            assert "Index Cond" in plan and "external_key)::text = ANY" in plan, plan
            assert "Filter" not in plan, plan


class SlowConnector(Connector):
    """Takes ``seconds`` per delivery, as one waiting for a CRM's rate limit would."""

    kind = "slow"
    settings_model = RestSettings

    def __init__(self, seconds: float) -> None:
        super().__init__("crm", RestSettings(base_url="http://127.0.0.1:9"))
        self.seconds = seconds
        self.sent: list[str] = []
        self.started = asyncio.Event()

    async def execute(self, plan: Any, ctx: Any) -> None:
        self.started.set()
        await asyncio.sleep(self.seconds)
        self.sent.append(ctx.idempotency_key(0))

    async def find(self, op: Any, parent_id: str | None) -> None:
        return None


async def test_a_slow_delivery_keeps_its_lease_while_its_worker_lives(store: Store) -> None:
    store.write_sync(lambda c: outbox.enqueue(c, new_ticket("1"), time.time()))
    connector = SlowConnector(seconds=2.0)
    dispatcher = Dispatcher(
        store, {"crm": connector}, RetryPolicy(), lease_seconds=0.6, poll_interval=0.02
    )
    task = asyncio.create_task(dispatcher.run())
    reclaimed = 0
    try:
        await asyncio.wait_for(connector.started.wait(), 10)
        # Lease recovery runs meanwhile, as the daemon's job (or another replica) would.
        while not connector.sent:
            reclaimed += await store.writer.run(lambda c: outbox.recover_leases(c, time.time()))
            await asyncio.sleep(0.1)
        counts = await run_until_state(store, "delivered")
    finally:
        await dispatcher.stop(5)
        await task
    assert reclaimed == 0  # 2 s in the air with a 0.6 s lease, renewed all along
    assert counts == {"delivered": 1}
    assert len(connector.sent) == 1


async def run_until_state(store: Store, state: str, limit: float = 10) -> dict[str, int]:
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        counts = await store.read(lambda c: outbox.counts_by_state(c).get("crm", {}))
        if counts.get(state):
            return {k: v for k, v in counts.items() if v}
        await asyncio.sleep(0.02)
    raise AssertionError(f"nothing {state} in time")


async def test_a_pause_recorded_by_one_replica_holds_for_the_others(store: Store) -> None:
    from sqlalchemy import update

    from syncd.connectors.amocrm import AmoCrmConnector, AmoCrmSettings
    from syncd.emulators.amocrm import create_amocrm_emulator
    from syncd.retry.breaker import Breaker

    app, amo = create_amocrm_emulator(long_lived_token="tok-123456", rate_limit=None)
    server = ServerThread(app).start()
    amo.block_account(402)
    for ticket in ("1", "2", "3"):
        store.write_sync(
            lambda c, t=ticket: outbox.enqueue(c, new_ticket(t, client_id=t), time.time())
        )
    store.write_sync(lambda c: c.execute(update(deliveries).values(destination="amo")))
    settings = AmoCrmSettings(
        base_url=server.url, access_token="tok-123456", rate_per_second=50, burst=50
    )

    def replica() -> tuple[Dispatcher, AmoCrmConnector]:
        connector = AmoCrmConnector("amo", settings, timeout=5)
        dispatcher = Dispatcher(
            store,
            {"amo": connector},
            RetryPolicy(),
            mappings={},
            breaker=Breaker(auth_pause=1.5),
            poll_interval=0.02,
        )
        return dispatcher, connector

    async def status() -> dict[str, Any]:
        return await store.read(outbox.destination_statuses)

    first, first_connector = replica()
    task = asyncio.create_task(first.run())
    try:
        for _ in range(500):
            if "amo" in await status():
                break
            await asyncio.sleep(0.01)
        assert "amo" in await status()
    finally:
        await first.stop(5)
        await task
        await first_connector.aclose()
    refused = len(amo.requests)
    # Due again at once: only the recorded pause can keep the second replica from sending.
    store.write_sync(
        lambda c: c.execute(
            update(deliveries)
            .where(deliveries.c.state == "retry_wait")
            .values(next_attempt_at=time.time())
        )
    )

    # A second replica, whose own breaker has seen nothing, holds off while the pause lasts.
    second, second_connector = replica()
    task = asyncio.create_task(second.run())
    try:
        await asyncio.sleep(0.5)
        assert len(amo.requests) == refused
        amo.unblock_account()
        for _ in range(1000):
            counts = await store.read(lambda c: outbox.counts_by_state(c)["amo"])
            if counts["delivered"] == 3:
                break
            await asyncio.sleep(0.01)
        assert counts["delivered"] == 3
        # Its success clears the problem the first one recorded.
        assert await status() == {}
    finally:
        await second.stop(5)
        await task
        await second_connector.aclose()
        server.stop()
