"""The generic REST connector: error classification (respx) and the look-before-create rule."""

from __future__ import annotations

import json

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


# --- per-entity templates ----------------------------------------------------------

CLIENT = UpsertContact(
    key="hd:client:7",
    identities=("email:anna@example.com",),
    name="Anna Petrova",
    emails=("anna@example.com",),
)
TICKET = UpsertDeal(
    key="hd:ticket:1", title="Order is late", stage_id="NEW", contact_key="hd:client:7"
)
MESSAGE = AddNote(key="hd:event:3", parent_key="hd:ticket:1", parent_entity="deal", text="hello")

ENTITIES: dict[str, object] = {
    "contact": {
        "create": {
            "path": "/v2/people",
            "body": {
                "name": "{{ fields.name }}",
                "emails": "{{ fields.emails }}",
                "phone": "{{ fields.phones[0] }}",
                "ref": "{{ external_key }}",
            },
        },
        "update": {"method": "PUT", "path": "/v2/people/{{ crm_id }}", "body": {"x": 1}},
        "lookup": {
            "method": "GET",
            "path": "/v2/people",
            "params": {"ref": "{{ external_key }}", "email": "{{ fields.emails[0] }}"},
            "id": "items.0.uid",
        },
        "id": "data.id",
    },
    "deal": {
        "create": {
            "path": "/v2/people/{{ contact.crm_id }}/deals",
            "body": {
                "title": "{{ fields.title }} [{{ external_key }}]",
                "person": "{{ contact.crm_id | int }}",
                "stage": "{{ fields.stage_id }}",
                "owner": "{{ fields.responsible_id }}",
            },
        },
        "update": {
            "method": "PATCH",
            "path": "/v2/deals/{{ crm_id }}",
            "body": {"title": "{{ fields.title }}", "stage": "{{ fields.stage_id }}"},
        },
        "lookup": {"method": "GET", "path": "/v2/deals/by-ref/{{ external_key }}"},
        "id": "result",
    },
    "note": {
        "create": {
            "path": "/v2/deals/{{ deal.crm_id }}/comments",
            "body": {"text": "{{ fields.text }}", "deal": "{{ deal.crm_id }}"},
        },
        "id": "comment.id",
    },
}


def templated(**extra: object) -> RestConnector:
    return connector(entities=ENTITIES, **extra)


@respx.mock
async def test_each_entity_uses_its_own_template_and_passes_its_id_on() -> None:
    import json

    respx.get(f"{BASE}/v2/people").mock(return_value=httpx.Response(200, json={"items": []}))
    person = respx.post(f"{BASE}/v2/people").mock(
        return_value=httpx.Response(201, json={"data": {"id": 501}})
    )
    deal = respx.post(f"{BASE}/v2/people/501/deals").mock(
        return_value=httpx.Response(201, json={"result": "D-9"})
    )
    note = respx.post(f"{BASE}/v2/deals/D-9/comments").mock(
        return_value=httpx.Response(201, json={"comment": {"id": 77}})
    )
    generic = respx.post(f"{BASE}/records").mock(return_value=httpx.Response(201, json={"id": 1}))
    links = MemoryLinks()
    await templated().execute(Plan((CLIENT, TICKET, MESSAGE)), ctx(links))

    assert generic.call_count == 0
    # a value that is one expression keeps its type; an undefined one is left out
    assert json.loads(person.calls[0].request.content) == {
        "name": "Anna Petrova",
        "emails": ["anna@example.com"],
        "ref": "hd:client:7",
    }
    assert json.loads(deal.calls[0].request.content) == {
        "title": "Order is late [hd:ticket:1]",
        "person": 501,
        "stage": "NEW",
    }
    assert json.loads(note.calls[0].request.content) == {"text": "hello", "deal": "D-9"}
    assert deal.calls[0].request.headers["idempotency-key"] == "syncd-ab12-7-1"
    assert links.rows[("contact", "hd:client:7")].crm_id == "501"
    assert links.rows[("deal", "hd:ticket:1")].crm_id == "D-9"
    assert links.rows[("note", "hd:event:3")].crm_id == "77"


@respx.mock
async def test_later_events_update_through_the_update_template_with_known_ids() -> None:
    import json

    links = MemoryLinks()
    await links.record("contact", "hd:client:7", "501", None)
    await links.record("deal", "hd:ticket:1", "D-9", None)
    person = respx.put(f"{BASE}/v2/people/501").mock(return_value=httpx.Response(200, json={}))
    deal = respx.patch(f"{BASE}/v2/deals/D-9").mock(return_value=httpx.Response(200, json={}))
    note = respx.post(f"{BASE}/v2/deals/D-9/comments").mock(
        return_value=httpx.Response(201, json={"comment": {"id": 78}})
    )
    solved = UpsertDeal(key="hd:ticket:1", stage_id="WON", contact_key="hd:client:7")
    await templated().execute(Plan((CLIENT, solved, MESSAGE)), ctx(links))
    # no title in this event: left out of the update, so the CRM keeps its own
    assert json.loads(deal.calls[0].request.content) == {"stage": "WON"}
    assert person.call_count == 1 and note.call_count == 1


@respx.mock
async def test_lookup_template_after_an_unknown_outcome() -> None:
    links = MemoryLinks()
    await links.intend("contact", "hd:client:7")  # a create whose answer was lost
    lookup = respx.get(f"{BASE}/v2/people").mock(
        return_value=httpx.Response(200, json={"items": [{"uid": "p-3"}]})
    )
    create = respx.post(f"{BASE}/v2/people").mock(return_value=httpx.Response(201, json={}))
    respx.put(f"{BASE}/v2/people/p-3").mock(return_value=httpx.Response(200, json={}))
    await templated().execute(Plan((CLIENT,)), ctx(links))
    assert create.call_count == 0 and links.rows[("contact", "hd:client:7")].crm_id == "p-3"
    sent = lookup.calls[0].request.url.params
    assert sent["ref"] == "hd:client:7" and sent["email"] == "anna@example.com"


@respx.mock
async def test_lookup_path_values_are_percent_encoded_and_404_means_absent() -> None:
    links = MemoryLinks()
    await links.record("contact", "hd:client:7", "501", None)
    await links.intend("deal", "hd:ticket:1")
    lookup = respx.get(f"{BASE}/v2/deals/by-ref/hd%3Aticket%3A1").mock(
        return_value=httpx.Response(404, json={"error": "no such deal"})
    )
    create = respx.post(f"{BASE}/v2/people/501/deals").mock(
        return_value=httpx.Response(201, json={"result": 12})
    )
    await templated().execute(Plan((TICKET,)), ctx(links))
    assert lookup.call_count == 1 and create.call_count == 1
    assert links.rows[("deal", "hd:ticket:1")].crm_id == "12"


@respx.mock
async def test_an_answer_without_the_id_at_its_path_is_rejected() -> None:
    respx.get(f"{BASE}/v2/people").mock(return_value=httpx.Response(200, json={"items": []}))
    respx.post(f"{BASE}/v2/people").mock(return_value=httpx.Response(201, json={"id": 5}))
    with pytest.raises(Rejected, match=r"contact create answered HTTP 201 without 'data\.id'"):
        await templated().execute(Plan((CLIENT,)), ctx(MemoryLinks()))


@respx.mock
async def test_a_template_that_cannot_render_names_its_key() -> None:
    entities = {"note": {"create": {"path": "/n", "body": {"t": "x {{ fields.nope }}"}}}}
    links = MemoryLinks()
    await links.record("deal", "hd:ticket:1", "4", None)
    route = respx.post(f"{BASE}/n").mock(return_value=httpx.Response(201, json={"id": 1}))
    with pytest.raises(Rejected, match=r"destinations\.crm\.entities\.note\.create\.body\.t"):
        await connector(entities=entities).execute(Plan((MESSAGE,)), ctx(links))
    assert route.call_count == 0


@respx.mock
async def test_entities_without_templates_keep_the_generic_form() -> None:
    import json

    links = MemoryLinks()
    await links.record("deal", "hd:ticket:1", "D-9", None)
    generic = respx.post(f"{BASE}/records").mock(return_value=httpx.Response(201, json={"id": 3}))
    only_deals = {"deal": ENTITIES["deal"]}
    await connector(entities=only_deals).execute(Plan((MESSAGE,)), ctx(links))
    assert json.loads(generic.calls[0].request.content)["parent_id"] == "D-9"


# --- auth and config errors ------------------------------------------------------------


def rest_config(destination: str) -> str:
    return f"""
[sources.helpdesk]
secret = "s"

[destinations.crm]
kind = "rest"
base_url = "http://crm.test"
{destination}
"""


def config_problems(destination: str) -> list[str]:
    from syncd.config import parse_config
    from syncd.errors import ConfigError

    with pytest.raises(ConfigError) as info:
        parse_config(rest_config(destination), "syncd.toml")
    return [f"{p.key}: {p.message}" for p in info.value.problems]


@pytest.mark.parametrize(
    ("auth", "header", "value"),
    [
        ('type = "bearer"\ntoken = "${CRM_TOKEN}"', "authorization", "Bearer t0k3n-from-env"),
        ('type = "header"\nheader = "X-Api-Key"\ntoken_file = "{file}"', "x-api-key", "k3y-file"),
    ],
)
@respx.mock
async def test_auth_comes_from_the_environment_or_a_file(
    auth: str,
    header: str,
    value: str,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: object,
) -> None:
    from pathlib import Path

    from syncd.config import parse_config
    from syncd.connectors import registry

    assert isinstance(tmp_path, Path)
    secret = tmp_path / "key"
    secret.write_text("k3y-file\n")
    monkeypatch.setenv("CRM_TOKEN", "t0k3n-from-env")
    text = rest_config("[destinations.crm.auth]\n" + auth.replace("{file}", str(secret)))
    config = parse_config(text, "syncd.toml")
    assert value.removeprefix("Bearer ") in config.secret_values()  # masked in logs
    c = registry.build("crm", config.destinations["crm"], timeout=2)
    route = respx.post(f"{BASE}/records").mock(return_value=httpx.Response(201, json={"id": 1}))
    await c.execute(Plan((DEAL,)), ctx(MemoryLinks()))
    assert route.calls[0].request.headers[header] == value
    await c.aclose()


def test_a_missing_token_variable_is_a_config_error() -> None:
    found = config_problems('[destinations.crm.auth]\ntoken = "${SYNCD_TEST_UNSET_TOKEN}"')
    assert (
        "destinations.crm.auth.token: environment variable SYNCD_TEST_UNSET_TOKEN is not set"
        in (found)
    )


def test_header_auth_needs_the_header_name() -> None:
    found = config_problems('[destinations.crm.auth]\ntype = "header"\ntoken = "x"')
    assert found == ['destinations.crm.auth.header: type = "header" needs the header name']


def test_bad_templates_and_id_paths_are_config_errors_naming_their_key() -> None:
    found = config_problems(
        """
[destinations.crm.entities.deal]
id = "data..id"
create = { path = "/deals/{{ crm_id", body = { title = "{{ fields.title }", n = ["{{ contcat.crm_id }}"] } }
lookup = { method = "GET", path = "/deals", params = { q = "{% if %}" }, id = ".id" }
[destinations.crm.entities.note]
create = { path = "/notes", body = { text = "{{ fields.text | nosuchfilter }}" } }
"""
    )
    joined = "\n".join(found)
    assert "destinations.crm.entities.deal.id: 'data..id' is not a dotted path" in joined
    assert "destinations.crm.entities.deal.create.path: template '/deals/{{ crm_id'" in joined
    assert "destinations.crm.entities.deal.create.body.title: template" in joined
    assert (
        "destinations.crm.entities.deal.create.body.n.0: template '{{ contcat.crm_id }}' "
        "uses unknown contcat" in joined
    )
    assert "destinations.crm.entities.deal.lookup.params.q: template" in joined
    assert "destinations.crm.entities.deal.lookup.id: '.id' is not a dotted path" in joined
    assert "destinations.crm.entities.note.create.body.text: template" in joined
    assert "nosuchfilter" in joined
    assert len(found) == 7


def test_an_unknown_entity_and_a_bad_generic_id_field_are_config_errors() -> None:
    found = config_problems(
        'id_field = "data id"\n[destinations.crm.entities.company]\ncreate = { path = "/c" }'
    )
    joined = "\n".join(found)
    assert "destinations.crm.entities.company: unknown entity (known: contact, deal, note)" in (
        joined
    )
    assert "destinations.crm.id_field: 'data id' is not a dotted path" in joined


def test_the_commented_templates_in_the_example_config_are_valid() -> None:
    """config/syncd.example.toml shows per-entity templates commented out: they must work."""
    import tomllib
    from pathlib import Path

    text = (Path(__file__).parents[2] / "config" / "syncd.example.toml").read_text()
    lines = text.splitlines()
    start = lines.index("# [destinations.crm.entities.contact]")
    block = []
    for line in lines[start:]:
        if not line.startswith("# "):
            break
        block.append(line[2:])
    entities = tomllib.loads("\n".join(block))["destinations"]["crm"]["entities"]
    settings = RestSettings.model_validate({"base_url": BASE, "entities": entities})
    assert set(settings.entities) == {"contact", "deal", "note"}


# --- the daemon's path: aiohttp directly, against a real local server ------------------
#
# The tests above go through httpx (respx patches it). The daemon gives the connector
# an AiohttpTransport, and then the connector sends through aiohttp itself. These
# check that path against a real HTTP server: the same requests on the wire as the
# httpx path, and the same classification of answers and failures.

TOKEN = "s3cret-t0ken"


class _Server:
    """A local aiohttp server that records every request and answers as told."""

    def __init__(self) -> None:
        self.seen: list[dict[str, object]] = []
        self.status = 201
        self.headers: dict[str, str] = {}
        self.text: str | None = None
        self.delay = 0.0
        self.runner: object = None
        self.url = ""

    async def __aenter__(self) -> _Server:
        import asyncio

        from aiohttp import web

        async def handle(request: web.Request) -> web.Response:
            body = await request.read()
            self.seen.append(
                {
                    "method": request.method,
                    "target": request.raw_path,
                    "body": body,
                    "headers": {k.lower(): v for k, v in request.headers.items()},
                }
            )
            if self.delay:
                await asyncio.sleep(self.delay)
            if self.text is not None:
                return web.Response(status=self.status, text=self.text, headers=self.headers)
            n = len(self.seen)
            path = request.path.removeprefix("/api")
            if request.method == "GET" and path == "/v2/people":
                return web.json_response({"items": []})
            if path == "/v2/people":
                return web.json_response({"data": {"id": 500 + n}}, status=201)
            if path.endswith("/deals"):
                return web.json_response({"result": f"D-{n}"}, status=201)
            if path.endswith("/comments"):
                return web.json_response({"comment": {"id": n}}, status=201)
            if request.method == "GET":
                return web.json_response([])
            return web.json_response({"id": n}, status=201 if request.method == "POST" else 200)

        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", handle)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        server = site._server
        assert server is not None
        port = server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.runner = runner
        self.url = f"http://127.0.0.1:{port}/api"
        return self

    async def __aexit__(self, *exc: object) -> None:
        from aiohttp import web

        assert isinstance(self.runner, web.AppRunner)
        await self.runner.cleanup()


def direct(url: str, timeout: float = 2, **settings: object) -> RestConnector:
    from syncd.connectors.transport import AiohttpTransport

    c = RestConnector(
        "crm",
        RestSettings.model_validate(
            {"base_url": url, "auth": {"type": "bearer", "token": TOKEN}, **settings}
        ),
        timeout=timeout,
        transport=AiohttpTransport(),
    )
    assert c._aiohttp is not None  # the direct path, not httpx over the transport
    return c


def _wire(seen: list[dict[str, object]]) -> list[tuple[object, ...]]:
    out: list[tuple[object, ...]] = []
    for r in seen:
        headers = r["headers"]
        assert isinstance(headers, dict)
        kept = {k: v for k, v in headers.items() if k not in ("host", "content-length")}
        out.append((r["method"], r["target"], r["body"], sorted(kept.items())))
    return out


class _ViaHttpx(httpx.AsyncBaseTransport):
    """The path before the direct one: httpx's client over the aiohttp transport."""

    def __init__(self) -> None:
        from syncd.connectors.transport import AiohttpTransport

        self.inner = AiohttpTransport()

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        return await self.inner.handle_async_request(request)

    async def aclose(self) -> None:
        await self.inner.aclose()


@pytest.mark.parametrize("form", ["generic", "templated"])
async def test_direct_path_sends_what_the_httpx_path_sends(form: str) -> None:
    """Same plans through httpx's client over aiohttp and through aiohttp alone: same requests."""
    plans = [Plan((CLIENT, TICKET, MESSAGE)), Plan((CLIENT, TICKET, MESSAGE))]
    extra: dict[str, object] = {"entities": ENTITIES} if form == "templated" else {}
    extra["headers"] = {"X-Tenant": "t-1"}
    results = []
    for path in ("httpx", "aiohttp"):
        async with _Server() as server:
            if path == "aiohttp":
                c = direct(server.url, **extra)
            else:
                c = RestConnector(
                    "crm",
                    RestSettings.model_validate(
                        {"base_url": server.url, "auth": {"type": "bearer", "token": TOKEN}} | extra
                    ),
                    timeout=2,
                    transport=_ViaHttpx(),
                )
                assert c._aiohttp is None
            links = MemoryLinks()
            for i, plan in enumerate(plans):
                await c.execute(plan, ctx(links, delivery_id=10 + i))
            await c.aclose()
            results.append((_wire(server.seen), dict(links.rows)))
    for a, b in zip(results[0][0], results[1][0], strict=True):
        assert a == b
    assert results[0] == results[1]
    wire = results[1][0]
    # the idempotency key, auth and JSON body are on the wire
    _, target, body, headers = next(w for w in wire if w[0] == "POST")
    assert isinstance(body, bytes) and json.loads(body)
    assert dict(headers)["idempotency-key"] == "syncd-ab12-10-0"  # type: ignore[arg-type]
    assert dict(headers)["authorization"] == f"Bearer {TOKEN}"  # type: ignore[arg-type]
    assert dict(headers)["content-type"] == "application/json"  # type: ignore[arg-type]
    assert str(target).startswith("/api/")
    if form == "templated":
        lookups = [w[1] for w in wire if w[0] == "GET"]
        assert "/api/v2/people?ref=hd:client:7&email=anna@example.com" in lookups


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
async def test_direct_path_status_classification(
    status: int, headers: dict[str, str], error_type: type[DeliveryError], retry_after: float | None
) -> None:
    async with _Server() as server:
        server.status, server.headers, server.text = status, headers, "nope"
        c = direct(server.url)
        with pytest.raises(error_type) as info:
            await c.execute(Plan((DEAL,)), ctx(MemoryLinks()))
        await c.aclose()
    assert info.value.status_code == status
    assert info.value.retry_after == retry_after
    assert f"HTTP {status}: nope" in str(info.value)
    assert TOKEN not in str(info.value)


async def test_direct_path_timeout_is_retriable_with_unknown_outcome() -> None:
    async with _Server() as server:
        server.delay = 1.0
        c = direct(server.url, timeout=0.2)
        links = MemoryLinks()
        with pytest.raises(TransportError) as info:
            await c.execute(Plan((DEAL,)), ctx(links))
        await c.aclose()
    assert info.value.retriable and info.value.outcome_unknown
    assert links.rows[("deal", "hd:ticket:1")].crm_id is None  # intent left behind
    assert TOKEN not in str(info.value)


async def test_direct_path_connection_refused_is_retriable_and_known_unsent() -> None:
    from syncd.emulators.serving import free_port

    c = direct(f"http://127.0.0.1:{free_port('127.0.0.1')}")
    with pytest.raises(TransportError) as info:
        await c.execute(Plan((DEAL,)), ctx(MemoryLinks()))
    await c.aclose()
    assert info.value.retriable and not info.value.outcome_unknown
    assert TOKEN not in str(info.value)


async def test_direct_path_create_without_id_is_rejected() -> None:
    async with _Server() as server:
        server.text = '{"ok": true}'
        c = direct(server.url)
        with pytest.raises(Rejected, match="without 'id'"):
            await c.execute(Plan((DEAL,)), ctx(MemoryLinks()))
        await c.aclose()
