"""The generic REST connector: error classification (respx) and the look-before-create rule."""

from __future__ import annotations

import httpx
import pytest
import respx

from syncd.connectors.base import DeliveryContext, LinkRef
from syncd.connectors.http import parse_retry_after
from syncd.connectors.rest import RestConnector, RestSettings
from syncd.errors import (
    AccessDenied,
    DeliveryError,
    NotFound,
    RateLimited,
    Rejected,
    ServerError,
    TransportError,
)
from syncd.mapping import AddNote, Plan, UpsertContact, UpsertDeal
from tests.helpers import MemoryLinks

BASE = "http://crm.test"


def connector(**settings: object) -> RestConnector:
    return RestConnector(
        "crm", RestSettings.model_validate({"base_url": BASE, **settings}), timeout=2
    )


def ctx(links: MemoryLinks, delivery_id: int = 7) -> DeliveryContext:
    return DeliveryContext(
        delivery_id=delivery_id,
        event_id=3,
        destination="crm",
        attempt=1,
        links=links,
        install_id="ab12",
    )


DEAL = UpsertDeal(key="hd:ticket:1", title="Hi", fields={"subject": "Hi", "n": 5})
NOTE = AddNote(key="hd:event:3", parent_key="hd:ticket:1", parent_entity="deal", text="hello")


@respx.mock
async def test_create_then_update_with_idempotency_keys() -> None:
    create = respx.post(f"{BASE}/records").mock(
        side_effect=[httpx.Response(201, json={"id": 41}), httpx.Response(201, json={"id": 42})]
    )
    update = respx.patch(f"{BASE}/records/41").mock(return_value=httpx.Response(200, json={}))
    links = MemoryLinks()
    c = connector(record_url="https://crm.test/$entity/$id")
    await c.execute(Plan((DEAL, NOTE)), ctx(links))
    assert create.call_count == 2
    first, second = (call.request for call in create.calls)
    assert first.headers["idempotency-key"] == "syncd-ab12-7-0"
    assert second.headers["idempotency-key"] == "syncd-ab12-7-1"
    import json

    assert json.loads(first.content) == {
        "entity": "deal",
        "external_key": "hd:ticket:1",
        "parent_id": None,
        "fields": {"title": "Hi", "subject": "Hi", "n": 5},
    }
    assert json.loads(second.content)["parent_id"] == "41"
    assert links.rows[("deal", "hd:ticket:1")] == LinkRef("41", "https://crm.test/deal/41")
    assert links.log[0] == "intend deal:hd:ticket:1"  # intent is written before the create
    # a second event for the same ticket updates; the note (create_only) is not rewritten
    await c.execute(Plan((DEAL, NOTE)), ctx(links, delivery_id=8))
    assert update.call_count == 1 and create.call_count == 2
    await c.aclose()


@respx.mock
async def test_unknown_outcome_looks_up_before_creating() -> None:
    """A create whose answer was lost: the retry finds the record instead of making a second."""
    create = respx.post(f"{BASE}/records").mock(side_effect=httpx.ReadTimeout("slow"))
    links = MemoryLinks()
    c = connector()
    with pytest.raises(TransportError) as info:
        await c.execute(Plan((DEAL,)), ctx(links))
    assert info.value.outcome_unknown
    assert links.rows[("deal", "hd:ticket:1")].crm_id is None  # intent left behind
    lookup = respx.get(
        f"{BASE}/records", params={"entity": "deal", "external_key": "hd:ticket:1"}
    ).mock(return_value=httpx.Response(200, json=[{"id": "99"}]))
    respx.patch(f"{BASE}/records/99").mock(return_value=httpx.Response(200, json={}))
    await c.execute(Plan((DEAL,)), ctx(links))
    assert lookup.call_count == 1 and create.call_count == 1
    assert links.rows[("deal", "hd:ticket:1")].crm_id == "99"


@respx.mock
async def test_lookup_finds_nothing_then_creates() -> None:
    links = MemoryLinks()
    await links.intend("deal", "hd:ticket:1")
    respx.get(f"{BASE}/records").mock(return_value=httpx.Response(200, json=[]))
    create = respx.post(f"{BASE}/records").mock(return_value=httpx.Response(201, json={"id": "5"}))
    await connector().execute(Plan((DEAL,)), ctx(links))
    assert create.call_count == 1 and links.rows[("deal", "hd:ticket:1")].crm_id == "5"


@pytest.mark.parametrize(
    ("status", "headers", "error_type", "retry_after"),
    [
        (429, {"Retry-After": "17"}, RateLimited, 17.0),
        (503, {}, ServerError, None),
        (500, {}, ServerError, None),
        (408, {}, ServerError, None),
        (400, {}, Rejected, None),
        (422, {}, Rejected, None),
        (401, {}, AccessDenied, None),
        (403, {}, AccessDenied, None),
        (404, {}, NotFound, None),
    ],
)
@respx.mock
async def test_status_classification(
    status: int, headers: dict[str, str], error_type: type[DeliveryError], retry_after: float | None
) -> None:
    respx.post(f"{BASE}/records").mock(
        return_value=httpx.Response(status, headers=headers, text="nope")
    )
    with pytest.raises(error_type) as info:
        await connector().execute(Plan((DEAL,)), ctx(MemoryLinks()))
    assert info.value.status_code == status
    assert info.value.retry_after == retry_after
    assert f"HTTP {status}: nope" in str(info.value)


@respx.mock
async def test_connection_refused_is_retriable_and_known_unsent() -> None:
    respx.post(f"{BASE}/records").mock(side_effect=httpx.ConnectError("refused"))
    with pytest.raises(TransportError) as info:
        await connector().execute(Plan((DEAL,)), ctx(MemoryLinks()))
    assert info.value.retriable and not info.value.outcome_unknown


@respx.mock
async def test_create_without_id_is_rejected() -> None:
    respx.post(f"{BASE}/records").mock(return_value=httpx.Response(201, json={"ok": True}))
    with pytest.raises(Rejected, match="without 'id'"):
        await connector().execute(Plan((DEAL,)), ctx(MemoryLinks()))


@respx.mock
async def test_custom_templates_and_nested_id() -> None:
    route = respx.put(f"{BASE}/v2/deals/hd%3Aticket%3A1").mock(
        return_value=httpx.Response(200, json={"data": {"id": 7}})
    )
    c = connector(
        create={
            "method": "PUT",
            "path": "/v2/deals/$external_key",
            "body": {"title": "Ticket: $subject", "n": "$n"},
        },
        id_field="data.id",
    )
    links = MemoryLinks()
    await c.execute(Plan((DEAL,)), ctx(links))
    import json

    assert json.loads(route.calls[0].request.content) == {"title": "Ticket: Hi", "n": 5}
    assert links.rows[("deal", "hd:ticket:1")].crm_id == "7"


def test_retry_after_parsing() -> None:
    assert parse_retry_after("120") == 120.0
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT", now=1445412470.0) == pytest.approx(
        10.0
    )
    assert parse_retry_after("soon") is None
    assert parse_retry_after(None) is None


CONTACT = UpsertContact(
    key="hd:client:7",
    identities=("email:anna@example.com", "phone:+79991234567"),
    name="Anna",
    emails=("anna@example.com",),
    phones=("+79991234567",),
)


@respx.mock
async def test_contact_is_searched_before_create_and_found_again_by_phone() -> None:
    lookup = respx.get(f"{BASE}/records").mock(return_value=httpx.Response(200, json=[]))
    create = respx.post(f"{BASE}/records").mock(return_value=httpx.Response(201, json={"id": "c1"}))
    patch = respx.patch(f"{BASE}/records/c1").mock(return_value=httpx.Response(200, json={}))
    links = MemoryLinks()
    await connector().execute(Plan((CONTACT,)), ctx(links))
    assert lookup.call_count == 1 and create.call_count == 1  # looked before creating
    assert links.rows[("contact", "phone:+79991234567")].crm_id == "c1"
    # the same person from another helpdesk, e-mail changed, same phone: same contact
    other = UpsertContact(
        key="zd:client:99", identities=("email:new@example.com", "phone:+79991234567"), name="Anna"
    )
    await connector().execute(Plan((other,)), ctx(links, delivery_id=9))
    assert create.call_count == 1 and patch.call_count == 1
    assert links.rows[("contact", "zd:client:99")].crm_id == "c1"


@respx.mock
async def test_existing_contact_in_the_crm_is_reused() -> None:
    respx.get(f"{BASE}/records").mock(return_value=httpx.Response(200, json=[{"id": "old-5"}]))
    create = respx.post(f"{BASE}/records").mock(
        return_value=httpx.Response(201, json={"id": "new"})
    )
    respx.patch(f"{BASE}/records/old-5").mock(return_value=httpx.Response(200, json={}))
    links = MemoryLinks()
    await connector().execute(Plan((CONTACT,)), ctx(links))
    assert create.call_count == 0 and links.rows[("contact", "hd:client:7")].crm_id == "old-5"


async def test_a_create_in_flight_elsewhere_is_waited_for() -> None:
    from syncd.errors import Contended

    links = MemoryLinks()
    links.rows[("contact", "hd:client:7")] = LinkRef(crm_id=None, owner_busy=True)
    with pytest.raises(Contended) as info:
        await connector().execute(Plan((CONTACT,)), ctx(links))
    assert info.value.retriable and info.value.retry_after == 1.0
