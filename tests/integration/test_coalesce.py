"""Coalescing: a burst of events of one ticket goes out as one delivery.

On real SQLite and PostgreSQL, with the REST connector talking HTTP to the
bundled receiver. The dispatcher is driven with ``run_once`` (lease one batch,
deliver it, return when the outcomes are committed) and a clock the test moves,
so nothing here waits on wall-clock time.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import select, update

from syncd.connectors.rest import RestConnector, RestSettings
from syncd.emulators.serving import ServerThread
from syncd.emulators.sink import Faults, SinkState
from syncd.events import IncomingEvent
from syncd.mapping import AddNote, MappingConfig, Plan, UpsertContact, UpsertDeal, plan
from syncd.retry import outbox
from syncd.retry.coalesce import merge_plans
from syncd.retry.dispatcher import Dispatcher
from syncd.retry.policy import RetryPolicy
from syncd.store import Store
from syncd.store.models import DeliveryState, attempts, deliveries
from syncd.ticket import AuthorKind, Comment, EventKind, Status, TicketEvent, make_client

STAGES = {
    "new": "S-NEW",
    "open": "S-OPEN",
    "pending": "S-PENDING",
    "solved": "S-SOLVED",
    "closed": "S-CLOSED",
}
MAPPING = MappingConfig.model_validate(
    {
        "pipelines": {"support": {"id": "7", "stages": STAGES, "initial_stage": "S-NEW"}},
        "rules": [{"name": "all", "then": {"pipeline": "support", "timeline": "all"}}],
    }
)
NOW = 1_700_000_000.0


class Clock:
    def __init__(self) -> None:
        self.now = NOW

    def __call__(self) -> float:
        return self.now


def ticket_event(ticket: str, kind: EventKind, **fields: Any) -> TicketEvent:
    return TicketEvent(source="hd", ticket_id=ticket, kind=kind, **fields)


def created(ticket: str) -> TicketEvent:
    return ticket_event(ticket, EventKind.TICKET_CREATED, subject=f"Ticket {ticket}")


def moved(ticket: str, status: str) -> TicketEvent:
    return ticket_event(ticket, EventKind.STATUS_CHANGED, status=Status(status))


def said(ticket: str, text: str) -> TicketEvent:
    return ticket_event(
        ticket,
        EventKind.COMMENT_ADDED,
        comment=Comment(text=text, author=AuthorKind.CLIENT),
    )


def put(store: Store, *items: TicketEvent, dests: tuple[str, ...] = ("crm",)) -> list[int]:
    """Enqueue events; returns their delivery ids, oldest first."""
    for item in items:
        incoming = IncomingEvent.from_ticket_event(item, dests)
        store.write_sync(lambda c, e=incoming: outbox.enqueue(c, e, NOW))
    with store.read_engine.connect() as conn:
        return list(conn.execute(select(deliveries.c.id).order_by(deliveries.c.id)).scalars())


def rows(store: Store) -> dict[int, Any]:
    with store.read_engine.connect() as conn:
        return {r.id: r for r in conn.execute(select(deliveries).order_by(deliveries.c.id))}


def attempt_rows(store: Store, delivery_id: int) -> list[Any]:
    with store.read_engine.connect() as conn:
        return list(
            conn.execute(
                select(attempts)
                .where(attempts.c.delivery_id == delivery_id)
                .order_by(attempts.c.id)
            )
        )


def records(state: SinkState, entity: str) -> list[dict[str, Any]]:
    found = [r for r in state.records.values() if r["entity"] == entity]
    return sorted(found, key=lambda r: int(r["id"]))


@pytest.fixture
def crm(sink: tuple[ServerThread, SinkState]) -> Iterator[tuple[RestConnector, SinkState]]:
    server, state = sink
    connector = RestConnector("crm", RestSettings(base_url=server.url), timeout=5)
    yield connector, state


def dispatcher(
    store: Store,
    connector: RestConnector,
    clock: Clock,
    *,
    coalesce_max: int = 20,
    coalesce: bool = True,
) -> Dispatcher:
    return Dispatcher(
        store,
        {"crm": connector},
        RetryPolicy(schedule=(10.0,), jitter=0, overload_floor=0),
        mappings={"crm": MAPPING},
        clock=clock,
        coalesce=coalesce,
        coalesce_max=coalesce_max,
    )


# --- through the dispatcher and the receiver ------------------------------------------------


async def test_a_burst_of_status_changes_is_one_update_with_the_last_stage(
    store: Store, crm: tuple[RestConnector, SinkState]
) -> None:
    connector, sink = crm
    clock = Clock()
    d = dispatcher(store, connector, clock)
    put(store, created("1"))
    await d.run_once()
    [deal] = records(sink, "deal")
    assert deal["fields"]["stage_id"] == "S-NEW" and sink.updates == 0
    requests_before = sink.requests

    statuses = ["open", "pending", "open", "pending", "solved", "closed"]
    ids = put(store, *(moved("1", s) for s in statuses))[1:]
    [carrier] = await d.run_once()
    await connector.aclose()

    assert carrier.delivery_id == ids[0]
    assert [f.delivery_id for f in carrier.folded] == ids[1:]
    assert sink.requests - requests_before == 1 and sink.updates == 1
    assert records(sink, "deal") == [deal] and deal["fields"]["stage_id"] == "S-CLOSED"
    state = rows(store)
    assert state[ids[0]].state == "delivered" and state[ids[0]].coalesced_into is None
    for folded in ids[1:]:
        assert state[folded].state == "coalesced"
        assert state[folded].coalesced_into == ids[0]
        assert state[folded].finished_at is not None
        [note] = attempt_rows(store, folded)
        assert note.outcome == "coalesced"
        assert note.error == f"carried by delivery {ids[0]} (its attempt 1)"
    with store.read_engine.connect() as conn:
        counts = outbox.counts_by_state(conn)["crm"]
    assert counts["delivered"] == 2 and counts["coalesced"] == 5 and counts["pending"] == 0


async def test_every_comment_of_a_burst_is_its_own_note(
    store: Store, crm: tuple[RestConnector, SinkState]
) -> None:
    connector, sink = crm
    d = dispatcher(store, connector, Clock())
    put(store, created("1"))
    await d.run_once()
    [deal] = records(sink, "deal")

    burst = [
        said("1", "where is my order?"),
        moved("1", "open"),
        said("1", "and the invoice"),
        said("1", "hello?"),
        moved("1", "solved"),
    ]
    put(store, *burst)
    [carrier] = await d.run_once()
    await connector.aclose()

    assert len(carrier.folded) == 4
    assert sink.updates == 1 and deal["fields"]["stage_id"] == "S-SOLVED"
    notes = records(sink, "note")
    assert [n["fields"]["text"] for n in notes] == [
        "Client: where is my order?",
        "Client: and the invoice",
        "Client: hello?",
    ]
    assert {n["parent_id"] for n in notes} == {deal["id"]}
    assert sink.duplicate_creates() == {}


async def test_coalesce_max_bounds_a_send_and_off_sends_one_by_one(
    store: Store, crm: tuple[RestConnector, SinkState]
) -> None:
    connector, sink = crm
    put(store, created("1"), created("2"))
    await dispatcher(store, connector, Clock()).run_once()

    # at most 2 events per send
    put(store, *(moved("1", s) for s in ["open", "pending", "open", "pending", "solved"]))
    capped = dispatcher(store, connector, Clock(), coalesce_max=2)
    sizes = []
    for _ in range(4):
        sizes += [len(r.folded) + 1 for r in await capped.run_once()]
    assert sizes == [2, 2, 1]
    # coalescing off: one send per event
    put(store, *(moved("2", s) for s in ["open", "pending", "solved"]))
    off = dispatcher(store, connector, Clock(), coalesce=False)
    sizes = []
    for _ in range(4):
        sizes += [len(r.folded) + 1 for r in await off.run_once()]
    await connector.aclose()
    assert sizes == [1, 1, 1]
    assert sink.updates == 6
    stages = {d["external_key"]: d["fields"]["stage_id"] for d in records(sink, "deal")}
    assert stages == {"hd:ticket:1": "S-SOLVED", "hd:ticket:2": "S-SOLVED"}


async def test_tickets_fold_only_their_own_events_and_keep_their_order(
    store: Store, crm: tuple[RestConnector, SinkState]
) -> None:
    connector, sink = crm
    d = dispatcher(store, connector, Clock())
    # Interleaved, as a helpdesk would send them; the client makes a contact per ticket.
    a_client = make_client(source_id="10", name="Anna", emails=["anna@example.com"])
    b_client = make_client(source_id="20", name="Boris", emails=["boris@example.com"])
    ids = put(
        store,
        ticket_event("A", EventKind.TICKET_CREATED, subject="A", client=a_client),
        ticket_event("B", EventKind.TICKET_CREATED, subject="B", client=b_client),
        moved("A", "open"),
        said("B", "b1"),
        said("A", "a1"),
        moved("B", "pending"),
        moved("A", "solved"),
        said("B", "b2"),
    )
    leased = await d.run_once()
    await connector.aclose()

    carried = {r.ticket_id: [f.delivery_id for f in r.folded] for r in leased}
    assert carried == {"A": [ids[2], ids[4], ids[6]], "B": [ids[3], ids[5], ids[7]]}
    state = rows(store)
    assert {state[i].coalesced_into for i in carried["A"]} == {ids[0]}
    assert {state[i].coalesced_into for i in carried["B"]} == {ids[1]}
    deals = {r["external_key"]: r for r in records(sink, "deal")}
    contacts = {r["external_key"]: r["id"] for r in records(sink, "contact")}
    assert deals["hd:ticket:A"]["fields"]["stage_id"] == "S-SOLVED"
    assert deals["hd:ticket:B"]["fields"]["stage_id"] == "S-PENDING"
    assert deals["hd:ticket:A"]["parent_id"] == contacts["hd:client:10"]
    assert deals["hd:ticket:B"]["parent_id"] == contacts["hd:client:20"]
    notes = {n["fields"]["text"]: n["parent_id"] for n in records(sink, "note")}
    assert notes == {
        "Client: a1": deals["hd:ticket:A"]["id"],
        "Client: b1": deals["hd:ticket:B"]["id"],
        "Client: b2": deals["hd:ticket:B"]["id"],
    }
    # B's notes in B's order
    assert [
        n["fields"]["text"]
        for n in records(sink, "note")
        if n["parent_id"] == deals["hd:ticket:B"]["id"]
    ] == ["Client: b1", "Client: b2"]
    assert sink.duplicate_creates() == {}


async def test_a_retried_carrier_sends_the_same_events_and_loses_none(
    store: Store, crm: tuple[RestConnector, SinkState]
) -> None:
    connector, sink = crm
    clock = Clock()
    d = dispatcher(store, connector, clock)
    put(store, created("1"))
    await d.run_once()
    ids = put(store, said("1", "one"), moved("1", "open"), said("1", "two"))[1:]

    sink.faults = Faults(fail_count=1, fail_status=503)  # the deal update fails
    [first] = await d.run_once()
    assert [f.delivery_id for f in first.folded] == ids[1:]
    state = rows(store)
    assert state[ids[0]].state == "retry_wait"
    assert [(state[i].state, state[i].coalesced_into) for i in ids[1:]] == [
        ("pending", ids[0]),
        ("pending", ids[0]),
    ]
    # a new event arriving meanwhile is not added to a carrier that was already tried
    late = put(store, said("1", "three"))[-1]
    assert await d.run_once() == []  # nothing due: the ticket waits on its retry

    clock.now += 10
    [second] = await d.run_once()
    assert second.delivery_id == ids[0] and second.attempt == 2
    assert [f.delivery_id for f in second.folded] == ids[1:]
    [third] = await d.run_once()
    await connector.aclose()
    assert third.delivery_id == late and third.folded == ()

    state = rows(store)
    assert [state[i].state for i in (*ids, late)] == [
        "delivered",
        "coalesced",
        "coalesced",
        "delivered",
    ]
    texts = [n["fields"]["text"] for n in records(sink, "note")]
    assert texts == ["Client: one", "Client: two", "Client: three"]
    assert records(sink, "deal")[0]["fields"]["stage_id"] == "S-OPEN"
    assert sink.duplicate_creates() == {}


async def test_a_refused_carrier_is_tried_alone_and_the_rest_go_out_after_it(
    store: Store, crm: tuple[RestConnector, SinkState]
) -> None:
    connector, sink = crm
    clock = Clock()
    d = dispatcher(store, connector, clock)
    put(store, created("1"))
    await d.run_once()
    ids = put(store, said("1", "one"), said("1", "two"), moved("1", "closed"))[1:]

    sink.faults = Faults(fail_count=1, fail_status=422)  # a permanent refusal
    [first] = await d.run_once()
    assert len(first.folded) == 2
    state = rows(store)
    assert state[ids[0]].state == "retry_wait" and state[ids[0]].next_attempt_at == clock.now
    for i in ids[1:]:
        assert state[i].state == "pending" and state[i].coalesced_into is None
        assert "returned to the queue" in state[i].last_error
    [error] = [a.error for a in attempt_rows(store, ids[0])]
    assert "HTTP 422" in error and "now tried alone" in error

    [alone] = await d.run_once()
    assert alone.delivery_id == ids[0] and alone.folded == ()
    [rest] = await d.run_once()
    await connector.aclose()
    assert rest.delivery_id == ids[1] and [f.delivery_id for f in rest.folded] == [ids[2]]
    state = rows(store)
    assert [state[i].state for i in ids] == ["delivered", "delivered", "coalesced"]
    assert state[ids[2]].coalesced_into == ids[1]
    assert [n["fields"]["text"] for n in records(sink, "note")] == ["Client: one", "Client: two"]
    assert records(sink, "deal")[0]["fields"]["stage_id"] == "S-CLOSED"
    assert sink.duplicate_creates() == {}


async def test_a_carrier_whose_outcome_is_unknown_never_duplicates_a_note(
    store: Store, sink: tuple[ServerThread, SinkState]
) -> None:
    server, state = sink
    connector = RestConnector("crm", RestSettings(base_url=server.url), timeout=0.5)
    clock = Clock()
    d = dispatcher(store, connector, clock)
    put(store, created("1"))
    await d.run_once()
    put(store, said("1", "one"), said("1", "two"), moved("1", "solved"))

    # the first note is stored by the CRM, but its answer never arrives
    state.faults = Faults(hang_count=1, hang_seconds=3)
    [first] = await d.run_once()
    assert len(first.folded) == 2
    clock.now += 10
    [second] = await d.run_once()
    await connector.aclose()
    assert second.delivery_id == first.delivery_id and len(second.folded) == 2
    assert [n["fields"]["text"] for n in records(state, "note")] == [
        "Client: one",
        "Client: two",
    ]
    assert state.duplicate_creates() == {} and state.lookups >= 1


async def test_rules_on_the_client_see_it_as_the_events_would_one_by_one(
    store: Store, crm: tuple[RestConnector, SinkState]
) -> None:
    """A rule asking whether the client is new: the first event of the burst finds a new
    client, and every later one the client that event creates, as if sent one by one."""
    connector, sink = crm
    by_client = MappingConfig.model_validate(
        {
            "pipelines": {
                "sales": {"id": "1", "stages": STAGES},
                "support": {"id": "7", "stages": STAGES},
            },
            "rules": [
                {"name": "new", "when": {"client": "new"}, "then": {"pipeline": "sales"}},
                {"name": "known", "then": {"pipeline": "support"}},
            ],
        }
    )
    d = Dispatcher(
        store,
        {"crm": connector},
        RetryPolicy(),
        mappings={"crm": by_client},
        clock=Clock(),
    )
    anna = make_client(source_id="7", name="Anna", emails=["anna@example.com"])
    put(
        store,
        ticket_event("1", EventKind.TICKET_CREATED, subject="One", client=anna),
        ticket_event("1", EventKind.STATUS_CHANGED, status=Status.OPEN, client=anna),
    )
    [carrier] = await d.run_once()
    await connector.aclose()
    assert len(carrier.folded) == 1
    [deal] = records(sink, "deal")
    # the created ticket went to sales, the status change (client now known) to support
    assert deal["fields"]["pipeline"] == "support" and deal["fields"]["stage_id"] == "S-OPEN"
    assert len(records(sink, "contact")) == 1 and sink.duplicate_creates() == {}


# --- the outbox alone ------------------------------------------------------------------------


def lease(store: Store, now: float = NOW, most: int = 20, owner: str = "w1") -> list[Any]:
    return store.write_sync(
        lambda c: outbox.lease(
            c, owner=owner, now=now, lease_seconds=60, limit=100, coalesce_max=most
        )
    )


def outcome(row: Any, state: DeliveryState, **kw: Any) -> outbox.Outcome:
    return outbox.Outcome(
        delivery_id=row.delivery_id,
        lease_owner="w1",
        attempt=row.attempt,
        state=state,
        started_at=NOW,
        duration_ms=1.0,
        folded=tuple(f.delivery_id for f in row.folded),
        **kw,
    )


def test_a_lost_lease_carries_the_same_set_again(store: Store) -> None:
    ids = put(store, *(moved("1", "open") for _ in range(4)))
    [head] = lease(store, most=3)
    assert [f.delivery_id for f in head.folded] == ids[1:3]
    put(store, moved("1", "solved"))
    assert store.write_sync(lambda c: outbox.recover_leases(c, NOW + 61)) == 1
    [again] = lease(store, now=NOW + 61, most=3)
    assert again.delivery_id == ids[0] and again.outcome_unknown
    assert [f.delivery_id for f in again.folded] == ids[1:3]


def test_only_the_unbroken_run_of_fresh_events_is_folded(store: Store) -> None:
    ids = put(store, *(moved("1", "open") for _ in range(5)))
    # the fourth was tried on its own before (an earlier head that was resent)
    store.write_sync(
        lambda c: c.execute(update(deliveries).where(deliveries.c.id == ids[3]).values(attempts=1))
    )
    [head] = lease(store)
    assert [f.delivery_id for f in head.folded] == ids[1:3]
    store.write_sync(lambda c: outbox.complete(c, [outcome(head, DeliveryState.DELIVERED)], NOW))
    [nxt] = lease(store)
    assert nxt.delivery_id == ids[3] and nxt.attempt == 2 and nxt.folded == ()


def test_a_waiting_ticket_does_not_hold_back_another_tickets_burst(store: Store) -> None:
    put(store, moved("A", "open"), moved("A", "pending"))
    [a] = lease(store)
    store.write_sync(
        lambda c: outbox.complete(
            c,
            [
                outcome(
                    a,
                    DeliveryState.RETRY_WAIT,
                    next_attempt_at=NOW + 100,
                    first_failed_at=NOW,
                    error="HTTP 503",
                )
            ],
            NOW,
        )
    )
    ids = put(store, moved("B", "open"), moved("B", "solved"), moved("A", "solved"))
    [b] = lease(store)
    assert b.ticket_id == "B" and [f.delivery_id for f in b.folded] == [ids[-2]]
    # A's new event waits for A's retry, and is not folded into a carrier already tried
    [a2] = lease(store, now=NOW + 100)
    assert a2.delivery_id == a.delivery_id and [f.delivery_id for f in a2.folded] == [ids[1]]


def test_an_expired_carrier_releases_what_it_carried(store: Store) -> None:
    ids = put(store, moved("1", "open"), moved("1", "solved"))
    [head] = lease(store)
    store.write_sync(
        lambda c: outbox.complete(
            c,
            [outcome(head, DeliveryState.RETRY_WAIT, next_attempt_at=NOW + 5, first_failed_at=NOW)],
            NOW,
        )
    )
    assert rows(store)[ids[1]].coalesced_into == ids[0]
    expired = store.write_sync(lambda c: outbox.expire_overdue(c, NOW + 200, window=50, grace=100))
    assert expired == 1
    state = rows(store)
    assert state[ids[0]].state == "expired"
    assert state[ids[1]].state == "pending" and state[ids[1]].coalesced_into is None
    [alone] = lease(store, now=NOW + 200)
    assert alone.delivery_id == ids[1]


def test_a_late_report_from_a_lost_lease_settles_nothing(store: Store) -> None:
    ids = put(store, moved("1", "open"), moved("1", "solved"))
    [head] = lease(store)
    store.write_sync(lambda c: outbox.recover_leases(c, NOW + 61))
    [again] = lease(store, now=NOW + 61, owner="w2")
    late = outcome(head, DeliveryState.DELIVERED)
    assert store.write_sync(lambda c: outbox.complete(c, [late], NOW + 62)) == 0
    state = rows(store)
    assert state[ids[1]].state == "pending" and state[ids[1]].coalesced_into == ids[0]
    assert attempt_rows(store, ids[1]) == []
    mine = outbox.Outcome(
        delivery_id=again.delivery_id,
        lease_owner="w2",
        attempt=again.attempt,
        state=DeliveryState.DELIVERED,
        started_at=NOW,
        duration_ms=1.0,
        folded=(ids[1],),
    )
    assert store.write_sync(lambda c: outbox.complete(c, [mine], NOW + 63)) == 1
    assert rows(store)[ids[1]].state == "coalesced"


def test_purge_takes_coalesced_rows_with_their_carrier(store: Store) -> None:
    put(store, moved("1", "open"), moved("1", "solved"))
    [head] = lease(store)
    store.write_sync(lambda c: outbox.complete(c, [outcome(head, DeliveryState.DELIVERED)], NOW))
    assert store.write_sync(lambda c: outbox.purge_delivered(c, NOW + 1)) == 2
    assert rows(store) == {}


def test_resending_a_coalesced_delivery_sends_it_on_its_own(store: Store) -> None:
    ids = put(store, moved("1", "open"), moved("1", "solved"))
    [head] = lease(store)
    store.write_sync(lambda c: outbox.complete(c, [outcome(head, DeliveryState.DELIVERED)], NOW))
    assert store.write_sync(lambda c: outbox.resend(c, [ids[1]], NOW + 1)) == 1
    assert rows(store)[ids[1]].coalesced_into is None
    [again] = lease(store, now=NOW + 1)
    assert again.delivery_id == ids[1] and again.attempt == 2


# --- the merge itself (pure) -----------------------------------------------------------------


def plans_of(*items: TicketEvent) -> list[Plan]:
    return [plan(e, MAPPING, event_id=i + 1) for i, e in enumerate(items)]


def test_merge_keeps_the_latest_state_and_every_note() -> None:
    anna = make_client(source_id="7", name="Anna", emails=["anna@example.com"])
    anna_phone = make_client(source_id="7", phones=["+79991234567"])
    merged = merge_plans(
        plans_of(
            ticket_event("1", EventKind.TICKET_CREATED, subject="Late order", client=anna),
            ticket_event(
                "1",
                EventKind.COMMENT_ADDED,
                client=anna_phone,
                comment=Comment(text="hi", author=AuthorKind.CLIENT),
            ),
            moved("1", "pending"),
            ticket_event("1", EventKind.TICKET_UPDATED, subject="Very late order"),
            said("1", "still?"),
        )
    )
    kinds = [type(op) for op in merged.operations]
    assert kinds == [UpsertContact, UpsertDeal, AddNote, AddNote]
    contact, deal, *notes = merged.operations
    assert isinstance(contact, UpsertContact) and isinstance(deal, UpsertDeal)
    assert contact.name == "Anna" and contact.emails == ("anna@example.com",)
    assert contact.phones == ("+79991234567",)
    assert set(contact.identities) == {"email:anna@example.com", "phone:+79991234567"}
    assert deal.title == "Very late order"
    assert deal.stage_id == "S-PENDING" and deal.move_stage
    assert deal.contact_key == "hd:client:7" and deal.pipeline_id == "7"
    assert [n.key for n in notes if isinstance(n, AddNote)] == ["hd:event:2", "hd:event:5"]


def test_merge_without_a_status_move_keeps_the_created_stage() -> None:
    merged = merge_plans(plans_of(created("1"), said("1", "a")))
    deal = merged.operations[0]
    assert isinstance(deal, UpsertDeal)
    assert deal.stage_id == "S-NEW" and not deal.move_stage and deal.title == "Ticket 1"


def test_merging_one_plan_changes_nothing() -> None:
    [only] = plans_of(moved("1", "open"))
    assert merge_plans([only]) is only


def test_config_defaults_and_bounds() -> None:
    from syncd.config import DeliveryConfig

    assert DeliveryConfig().coalesce is True and DeliveryConfig().coalesce_max == 20
    with pytest.raises(ValueError):
        DeliveryConfig(coalesce_max=0)
