"""Shared bulk writes: concurrent amoCRM deliveries' records in one request.

The connector runs against the emulator in-process (ASGI). A gate stands in
for the limiter: each ``release`` lets exactly one request through, so a test
decides when the request is built, after the deliveries it wants have queued.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from syncd.connectors.amocrm import AmoCrmConnector, AmoCrmSettings
from syncd.connectors.amocrm_bulk import MAX_CARRIES, SharedWrites
from syncd.connectors.base import DeliveryContext
from syncd.emulators.amocrm import STAGES, AmoState, create_amocrm_emulator
from syncd.errors import DeliveryError, Rejected
from syncd.mapping import AddNote, Plan, UpsertContact, UpsertDeal
from tests.helpers import MemoryLinks


class Gate:
    """A limiter that lets one request through per ``release`` (or all, while open)."""

    def __init__(self) -> None:
        self._slots = asyncio.Semaphore(0)
        self.open = True

    def release(self) -> None:
        self._slots.release()

    async def acquire(self) -> None:
        if not self.open:
            await self._slots.acquire()

    def exhaust(self) -> None:
        pass


async def until(condition: Callable[[], bool]) -> None:
    """Let other tasks run until ``condition`` holds (no wall-clock waiting)."""
    for _ in range(1000):
        if condition():
            return
        await asyncio.sleep(0)
    raise AssertionError("condition never held")


def setup() -> tuple[AmoCrmConnector, AmoState, Gate]:
    app, state = create_amocrm_emulator(long_lived_token="long-1", rate_limit=None)
    settings = AmoCrmSettings.model_validate(
        {"base_url": "https://example.amocrm.ru", "access_token": "long-1"}
    )
    c = AmoCrmConnector("crm", settings, timeout=2, transport=httpx.ASGITransport(app=app))
    gate = Gate()
    c.throttle = gate  # type: ignore[assignment]
    return c, state, gate


def ctx(links: MemoryLinks, delivery_id: int) -> DeliveryContext:
    return DeliveryContext(
        delivery_id=delivery_id, event_id=delivery_id, destination="crm", attempt=1, links=links
    )


def ticket(i: int) -> tuple[UpsertContact, UpsertDeal, AddNote]:
    contact = UpsertContact(
        key=f"hd:client:{i}",
        identities=(f"email:c{i}@example.com",),
        name=f"Client {i}",
        emails=(f"c{i}@example.com",),
    )
    deal = UpsertDeal(
        key=f"hd:ticket:{i}",
        title=f"Ticket {i}",
        stage_id=str(STAGES["new"]),
        contact_key=contact.key,
    )
    note = AddNote(key=f"hd:event:{i}-0", parent_key=deal.key, parent_entity="deal", text="hi")
    return contact, deal, note


def follow_up(i: int, **deal: Any) -> Plan:
    contact, _, _ = ticket(i)
    moved = UpsertDeal(
        key=f"hd:ticket:{i}",
        stage_id=str(STAGES["open"]),
        move_stage=True,
        contact_key=contact.key,
        **deal,
    )
    note = AddNote(
        key=f"hd:event:{i}-1", parent_key=moved.key, parent_entity="deal", text=f"reply {i}"
    )
    return Plan((contact, moved, note))


async def tickets(c: AmoCrmConnector, links: MemoryLinks, count: int) -> dict[int, int]:
    """``count`` tickets delivered one by one; their lead ids."""
    for i in range(count):
        await c.execute(Plan(ticket(i)), ctx(links, 100 + i))
    return {i: int(links.rows[("deal", f"hd:ticket:{i}")].crm_id or 0) for i in range(count)}


async def test_concurrent_follow_ups_share_one_patch_and_one_notes_request() -> None:
    c, state, gate = setup()
    links = MemoryLinks()
    leads = await tickets(c, links, 5)
    state.bulk_sizes.clear()
    before = len(state.requests)
    gate.open = False
    runs = [asyncio.create_task(c.execute(follow_up(i), ctx(links, i))) for i in range(5)]
    await until(lambda: c._bulk.queued("PATCH leads") == 5)
    gate.release()
    await until(lambda: c._bulk.queued("POST leads/notes") == 5)
    gate.release()
    await asyncio.gather(*runs)
    assert state.requests[before:] == [
        ("PATCH", "/api/v4/leads"),
        ("POST", "/api/v4/leads/notes"),
    ]
    assert state.bulk_sizes == {"PATCH /api/v4/leads": [5], "POST /api/v4/leads/notes": [5]}
    for i, lead_id in leads.items():
        assert state.leads[lead_id]["status_id"] == STAGES["open"]
        note_id = int(links.rows[("note", f"hd:event:{i}-1")].crm_id or 0)
        note = state.notes[note_id]
        # each delivery got the id of its own note, on its own lead
        assert note["entity_id"] == lead_id and note["params"]["text"].startswith(f"reply {i}")
    await c.aclose()


async def test_a_record_amocrm_refuses_fails_alone_and_the_others_are_sent_again() -> None:
    c, state, gate = setup()
    links = MemoryLinks()
    leads = await tickets(c, links, 3)
    state.bulk_sizes.clear()
    gate.open = False
    plans = [follow_up(0), follow_up(1, fields={"700999": "x"}), follow_up(2)]
    runs = [asyncio.create_task(c.execute(p, ctx(links, i))) for i, p in enumerate(plans)]
    await until(lambda: c._bulk.queued("PATCH leads") == 3)
    gate.release()
    await until(lambda: c._bulk.queued("PATCH leads") == 2)  # carried to the next request
    gate.release()
    await until(lambda: c._bulk.queued("POST leads/notes") == 2)
    gate.release()
    outcomes = await asyncio.gather(*runs, return_exceptions=True)
    assert outcomes[0] is None and outcomes[2] is None
    refused = outcomes[1]
    assert isinstance(refused, Rejected) and not refused.echo
    assert "custom_fields_values.0.field_id=700999" in str(refused)
    assert state.bulk_sizes["PATCH /api/v4/leads"] == [3, 2]
    assert state.leads[leads[0]]["status_id"] == STAGES["open"]
    assert state.leads[leads[1]]["status_id"] == STAGES["new"]  # nothing of it written
    assert state.leads[leads[2]]["status_id"] == STAGES["open"]
    assert ("note", "hd:event:1-1") not in links.rows
    await c.aclose()


@pytest.mark.parametrize("status", [503, 429])
async def test_a_failed_shared_request_fails_every_delivery_counted_once(status: int) -> None:
    c, state, gate = setup()
    links = MemoryLinks()
    await tickets(c, links, 3)
    gate.open = False
    runs = [asyncio.create_task(c.execute(follow_up(i), ctx(links, i))) for i in range(3)]
    await until(lambda: c._bulk.queued("PATCH leads") == 3)
    state.fail_next(1, status)
    gate.release()
    outcomes = await asyncio.gather(*runs, return_exceptions=True)
    assert all(isinstance(o, DeliveryError) and o.retriable for o in outcomes)
    errors = [o for o in outcomes if isinstance(o, DeliveryError)]
    assert [e.status_code for e in errors] == [status] * 3
    assert sorted(e.echo for e in errors) == [False, True, True]
    assert len({id(e) for e in errors}) == 3  # each delivery its own copy
    await c.aclose()


async def test_shared_complex_creates_map_back_by_request_id() -> None:
    c, state, _ = setup()
    bodies = []
    for i in range(3):
        contact, deal, _ = ticket(i)
        body = c._lead_body(deal, None, create=True)
        body["_embedded"]["contacts"] = [c._new_contact_body(contact)]
        bodies.append((f"rid-{i}", body))
    rows, refused = await c._write_shared("POST leads/complex", bodies)
    assert refused == {}
    for i in range(3):
        lead = state.leads[rows[i]["id"]]
        contact = state.contacts[rows[i]["contact_id"]]
        assert lead["name"] == f"Ticket {i}" and contact["name"] == f"Client {i}"
    assert state.bulk_sizes == {"POST /api/v4/leads/complex": [3]}
    await c.aclose()


async def test_the_bulk_notes_endpoint_checks_each_notes_lead() -> None:
    c, state, _ = setup()
    links = MemoryLinks()
    leads = await tickets(c, links, 1)
    notes = [
        ("a", {"entity_id": leads[0], "note_type": "common", "params": {"text": "ok"}}),
        ("b", {"entity_id": 1, "note_type": "common", "params": {"text": "lost"}}),
    ]
    count = len(state.notes)
    rows, refused = await c._write_shared("POST leads/notes", notes)
    assert rows == {} and list(refused) == [1]
    assert "entity_id=1: NotFound" in str(refused[1])
    assert len(state.notes) == count  # all or nothing, as amoCRM
    await c.aclose()


async def test_a_lone_record_goes_out_alone_and_cancelled_ones_are_dropped() -> None:
    sent: list[tuple[str, Any]] = []
    release = asyncio.Event()

    async def acquire() -> None:
        await release.wait()

    async def alone(endpoint: str, item: dict[str, Any]) -> dict[str, Any]:
        sent.append(("alone", item))
        return {"id": item["n"]}

    async def shared(endpoint: str, items: Any) -> Any:
        sent.append(("shared", [i for _, i in items]))
        return {}, {}

    bulk = SharedWrites(acquire=acquire, alone=alone, shared=shared)
    first = asyncio.create_task(bulk.submit("PATCH leads", "r1", {"n": 1}))
    gone = asyncio.create_task(bulk.submit("PATCH leads", "r2", {"n": 2}))
    await until(lambda: bulk.queued("PATCH leads") == 2)
    gone.cancel()
    release.set()
    assert await first == {"id": 1}
    assert sent == [("alone", {"n": 1})]
    assert bulk.requests == 1 and bulk.shared_requests == 0
    await bulk.aclose()


async def test_a_record_refused_with_others_too_often_gives_up_retriably() -> None:
    gate = Gate()
    gate.open = False

    async def alone(endpoint: str, item: dict[str, Any]) -> dict[str, Any]:
        raise AssertionError("never alone here")

    async def shared(endpoint: str, items: Any) -> Any:
        return {}, {i: Rejected("bad") for i, (rid, _) in enumerate(items) if rid != "keep"}

    bulk = SharedWrites(acquire=gate.acquire, alone=alone, shared=shared)
    keeps = asyncio.create_task(bulk.submit("PATCH leads", "keep", {}))
    rounds = 0
    while not keeps.done():
        bad = asyncio.create_task(bulk.submit("PATCH leads", f"bad{rounds}", {}))
        await until(lambda: bulk.queued("PATCH leads") == 2)
        gate.release()
        with pytest.raises(Rejected):
            await bad
        await until(lambda: keeps.done() or bulk.queued("PATCH leads") == 1)
        rounds += 1
    assert rounds == MAX_CARRIES + 1 and bulk.requests == rounds
    with pytest.raises(DeliveryError) as info:
        await keeps
    assert info.value.retriable and not isinstance(info.value, Rejected)
    await bulk.aclose()
