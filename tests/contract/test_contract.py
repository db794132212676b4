"""The connector contract: every connector, against its emulator over real HTTP.

A connector is correct when, whatever the network does, each ticket ends up
as exactly one deal, each client as one contact, each message as one note.
"""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from syncd.connectors.base import DeliveryContext
from syncd.errors import DeliveryError, PermanentError, RateLimited, RetriableError, TransportError
from syncd.mapping import MappingConfig, Pipeline, Plan, Rule, Then, plan
from syncd.ticket import Comment, EventKind, Status, TicketEvent, make_client
from tests.helpers import MemoryCredentials, MemoryLinks

from .harness import CrmHarness

T0 = datetime(2026, 11, 25, 9, 0, tzinfo=UTC)


def mapping(crm: CrmHarness) -> MappingConfig:
    pipeline_id, stages = crm.pipeline()
    return MappingConfig(
        pipelines={"main": Pipeline(id=pipeline_id, stages=stages)},
        rules=[Rule(name="all", then=Then(pipeline="main"))],
    )


def ticket_plan(
    crm: CrmHarness,
    *,
    kind: EventKind = EventKind.TICKET_CREATED,
    status: Status = Status.NEW,
    comment: str | None = "My order is late",
    event_id: int = 1,
    ticket: str = "42",
) -> Plan:
    event = TicketEvent(
        source="hd",
        ticket_id=ticket,
        kind=kind,
        subject="Order 1001 is late" if kind == EventKind.TICKET_CREATED else None,
        status=status,
        comment=Comment(id=str(event_id), text=comment) if comment else None,
        client=make_client(
            source_id="7",
            name="Anna Petrova",
            emails=["anna@example.com"],
            phones=["8 (999) 123-45-67"],
        ),
        occurred_at=T0,
    )
    return plan(event, mapping(crm), event_id=event_id)


def ctx(links: MemoryLinks, delivery_id: int = 1) -> DeliveryContext:
    return DeliveryContext(
        delivery_id=delivery_id, event_id=delivery_id, destination="crm", attempt=1, links=links
    )


async def test_creates_contact_deal_and_note(crm: CrmHarness) -> None:
    connector = crm.connector(MemoryCredentials())
    links = MemoryLinks()
    await connector.execute(ticket_plan(crm), ctx(links))
    [contact] = crm.contacts()
    [deal] = crm.deals()
    [note] = crm.notes()
    assert contact["emails"] == ["anna@example.com"] and contact["phones"] == ["+79991234567"]
    assert deal["title"] == "Order 1001 is late" and deal["contact_ids"] == [contact["id"]]
    _, stages = crm.pipeline()
    assert deal["stage_id"] == stages[Status.NEW]
    assert note["parent_id"] == deal["id"] and "My order is late" in note["text"]
    assert links.rows[("deal", "hd:ticket:42")].crm_id == str(deal["id"])
    await connector.aclose()


async def test_resending_the_same_plan_creates_nothing_new(crm: CrmHarness) -> None:
    connector = crm.connector(MemoryCredentials())
    links = MemoryLinks()
    p = ticket_plan(crm)
    await connector.execute(p, ctx(links))
    await connector.execute(p, ctx(links))
    assert (len(crm.contacts()), len(crm.deals()), len(crm.notes())) == (1, 1, 1)
    await connector.aclose()


async def test_status_change_moves_the_stage_and_adds_the_next_note(crm: CrmHarness) -> None:
    connector = crm.connector(MemoryCredentials())
    links = MemoryLinks()
    await connector.execute(ticket_plan(crm), ctx(links))
    await connector.execute(
        ticket_plan(
            crm,
            kind=EventKind.STATUS_CHANGED,
            status=Status.SOLVED,
            comment="Thanks, solved",
            event_id=2,
        ),
        ctx(links, 2),
    )
    [deal] = crm.deals()
    _, stages = crm.pipeline()
    assert deal["stage_id"] == stages[Status.SOLVED] and deal["title"] == "Order 1001 is late"
    assert sorted("solved" in n["text"] for n in crm.notes()) == [False, True]
    assert len(crm.contacts()) == 1
    await connector.aclose()


async def test_unknown_outcome_is_looked_up_not_created_again(crm: CrmHarness) -> None:
    connector = crm.connector(MemoryCredentials())
    links = MemoryLinks()
    p = ticket_plan(crm)
    for _ in range(3):
        # each attempt gets one write further: it reaches the CRM, its answer never arrives
        crm.drop_after_commit(1)
        with pytest.raises(DeliveryError) as info:
            await connector.execute(p, ctx(links))
        assert info.value.retriable
    await connector.execute(p, ctx(links))
    assert (len(crm.contacts()), len(crm.deals()), len(crm.notes())) == (1, 1, 1)
    await connector.aclose()


@pytest.mark.parametrize("status", [429, 503])
async def test_overload_is_retriable(crm: CrmHarness, status: int) -> None:
    connector = crm.connector(MemoryCredentials())
    crm.fail_next(1, status)
    with pytest.raises(RetriableError) as info:
        await connector.execute(ticket_plan(crm), ctx(MemoryLinks()))
    assert not isinstance(info.value, TransportError)
    if status == 429:
        assert isinstance(info.value, RateLimited)
    await connector.aclose()


async def test_validation_error_is_permanent(crm: CrmHarness) -> None:
    connector = crm.connector(MemoryCredentials())
    crm.fail_next(1, 400)
    with pytest.raises(PermanentError) as info:
        await connector.execute(ticket_plan(crm), ctx(MemoryLinks()))
    assert str(info.value)
    await connector.aclose()


async def test_expired_token_is_refreshed_and_saved_first(crm: CrmHarness) -> None:
    credentials = MemoryCredentials()
    connector = crm.connector(credentials)
    links = MemoryLinks()
    await connector.execute(ticket_plan(crm), ctx(links))
    if not crm.expire_token():
        pytest.skip(f"{crm.name}: this auth mode has no expiring token")
    saved_before = len(credentials.saved)
    await connector.execute(
        ticket_plan(
            crm, kind=EventKind.COMMENT_ADDED, status=Status.OPEN, comment="second", event_id=2
        ),
        ctx(links, 2),
    )
    assert len(credentials.saved) > saved_before  # the rotated token was stored
    assert len(crm.notes()) == 2
    await connector.aclose()
