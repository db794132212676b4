"""The amoCRM connector: error mapping, token rotation, exact matching, request shapes, pacing.

respx stands in for amoCRM where a test needs one exact answer; the last
tests run the connector against the emulator in-process (ASGI) with one
fake clock shared by both, so pacing is checked without sleeping.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import httpx
import pytest
import respx
from pydantic import ValidationError

from syncd.connectors.amocrm import AmoCrmConnector, AmoCrmSettings
from syncd.connectors.base import DeliveryContext, LinkRef
from syncd.connectors.throttle import SlidingWindow, TokenBucket
from syncd.emulators.amocrm import PIPELINE_ID, STAGES, create_amocrm_emulator
from syncd.errors import (
    AccessDenied,
    DeliveryError,
    NotFound,
    RateLimited,
    Rejected,
    ServerError,
    TransportError,
)
from syncd.mapping import AddNote, Plan, Upsert, UpsertContact, UpsertDeal
from tests.helpers import MemoryCredentials, MemoryLinks

BASE = "https://example.amocrm.ru"
API = f"{BASE}/api/v4"
TOKEN_URL = f"{BASE}/oauth2/access_token"

CONTACT = UpsertContact(
    key="hd:client:7",
    identities=("email:anna@example.com", "phone:+79991234567"),
    name="Anna Petrova",
    emails=("anna@example.com",),
    phones=("+79991234567",),
)
DEAL = UpsertDeal(
    key="hd:ticket:1",
    title="Order 1001 is late",
    pipeline_id=str(PIPELINE_ID),
    stage_id=str(STAGES["new"]),
    responsible_id="504141",
    fields={"700103": "email"},
    contact_key="hd:client:7",
)
NOTE = AddNote(key="hd:event:1", parent_key="hd:ticket:1", parent_entity="deal", text="hello")
PROBE = Upsert("contact", "hd:client:7", {"emails": ["anna@example.com"], "phones": []})


def oauth_settings(**extra: Any) -> AmoCrmSettings:
    return AmoCrmSettings.model_validate(
        {
            "base_url": BASE,
            "client_id": "client-1",
            "client_secret": "secret-1",
            "redirect_uri": "https://syncd.example/cb",
            "access_token": "access-1",
            "refresh_token": "refresh-1",
            **extra,
        }
    )


def token_settings(**extra: Any) -> AmoCrmSettings:
    return AmoCrmSettings.model_validate({"base_url": BASE, "access_token": "long-1", **extra})


def connector(
    settings: AmoCrmSettings | None = None,
    credentials: Any = None,
    clock: Any = None,
    transport: httpx.AsyncBaseTransport | None = None,
) -> AmoCrmConnector:
    extra = {"clock": clock} if clock is not None else {}
    c = AmoCrmConnector(
        "crm",
        settings or token_settings(),
        timeout=2,
        credentials=credentials,
        transport=transport,
        **extra,
    )
    c.throttle = TokenBucket(10_000, 10_000)  # pacing has its own tests below
    return c


def ctx(links: MemoryLinks, delivery_id: int = 7) -> DeliveryContext:
    return DeliveryContext(
        delivery_id=delivery_id, event_id=3, destination="crm", attempt=1, links=links
    )


def sent(route: respx.Route, index: int = 0) -> Any:
    return json.loads(route.calls[index].request.content)


def contact_json(
    contact_id: int, *, emails: tuple[str, ...] = (), phones: tuple[str, ...] = ()
) -> dict[str, Any]:
    fields = []
    if phones:
        fields.append(
            {
                "field_id": 3,
                "field_code": "PHONE",
                "values": [{"value": p, "enum_id": 1, "enum_code": "WORK"} for p in phones],
            }
        )
    if emails:
        fields.append(
            {
                "field_id": 5,
                "field_code": "EMAIL",
                "values": [{"value": e, "enum_id": 7, "enum_code": "WORK"} for e in emails],
            }
        )
    return {"id": contact_id, "name": "Someone", "custom_fields_values": fields or None}


def hal(key: str, items: list[Any]) -> dict[str, Any]:
    return {"_page": 1, "_links": {"self": {"href": f"{API}/{key}"}}, "_embedded": {key: items}}


# --- settings -------------------------------------------------------------------------


def test_settings_take_exactly_one_auth_mode() -> None:
    assert not token_settings().oauth and oauth_settings().oauth
    with pytest.raises(ValidationError, match="set access_token"):
        AmoCrmSettings.model_validate({"base_url": BASE})
    with pytest.raises(ValidationError) as info:
        AmoCrmSettings.model_validate(
            {"base_url": BASE, "client_id": "x", "refresh_token": "r", "access_token": "a"}
        )
    # each missing key is named, so check-config points at the line to fix
    assert [e["loc"] for e in info.value.errors()] == [("client_secret",), ("redirect_uri",)]
    with pytest.raises(ValidationError, match="Extra inputs"):
        token_settings(subdomain="example")
    with pytest.raises(ValidationError):
        token_settings(base_url="https://example.amocrm.ru/api/v4")


def test_record_urls_point_at_the_account() -> None:
    c = connector()
    assert c.record_url("deal", "5") == f"{BASE}/leads/detail/5"
    assert c.record_url("contact", "6") == f"{BASE}/contacts/detail/6"
    assert c.record_url("note", "7") is None


# --- error mapping --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("response", "error_type", "words"),
    [
        (
            httpx.Response(429, json={"title": "Too Many Requests", "retry_after": 300}),
            RateLimited,
            ["rate limit", "429"],
        ),
        (
            httpx.Response(402, json={"title": "Payment Required", "detail": "Payment required"}),
            AccessDenied,
            ["blocked", "payment required", "pause the destination"],
        ),
        (
            httpx.Response(402, text="<html><body>402 Payment Required</body></html>"),
            AccessDenied,
            ["blocked", "payment required"],
        ),
        (
            httpx.Response(403, text="<html><center><h1>403 Forbidden</h1></center></html>"),
            AccessDenied,
            ["blocked", "403", "pause the destination"],
        ),
        (httpx.Response(404, json={"title": "Not Found"}), NotFound, ["404"]),
        (httpx.Response(500, json={"title": "ErrInternalServer"}), ServerError, ["500"]),
        (httpx.Response(503, text="<html>503</html>"), ServerError, ["503"]),
        (
            httpx.Response(
                400, json={"title": "Bad Request", "detail": "Request data can not be empty"}
            ),
            Rejected,
            ["can not be empty"],
        ),
    ],
)
@respx.mock
async def test_answers_map_to_one_error_class(
    response: httpx.Response, error_type: type[DeliveryError], words: list[str]
) -> None:
    route = respx.get(f"{API}/contacts").mock(return_value=response)
    with pytest.raises(error_type) as info:
        await connector().find(PROBE, None)
    text = str(info.value).lower()
    assert all(w in text for w in words), text
    assert "<html" not in text  # an nginx page is described, not pasted
    assert info.value.status_code == response.status_code
    assert route.call_count == 1  # classified once, not retried here


@respx.mock
async def test_rate_limit_honours_header_then_body_and_drains_the_bucket() -> None:
    respx.get(f"{API}/contacts").mock(
        side_effect=[
            httpx.Response(429, headers={"Retry-After": "7"}, json={"retry_after": 300}),
            httpx.Response(429, json={"retry_after": 300}),
            httpx.Response(429, text="Too Many Requests"),
        ]
    )
    c = connector()
    retry_afters = []
    for _ in range(3):
        with pytest.raises(RateLimited) as info:
            await c.find(PROBE, None)
        retry_afters.append(info.value.retry_after)
        assert c.throttle.available <= 1.0  # our own pacing restarts from empty
    assert retry_afters == [7.0, 300.0, None]


@respx.mock
async def test_validation_errors_name_the_field_and_the_value_sent() -> None:
    body = {
        "validation-errors": [
            {
                "request_id": "syncd-0-7-0",
                "errors": [
                    {
                        "code": "NotSupportedChoice",
                        "path": "custom_fields_values.2.field_id",
                        "detail": "The value you selected is not a valid choice.",
                    }
                ],
            }
        ],
        "title": "Bad Request",
        "type": "https://httpstatus.es/400",
        "status": 400,
        "detail": "Request validation failed",
    }
    respx.post(f"{API}/contacts").mock(return_value=httpx.Response(400, json=body))
    contact = Upsert(
        "contact", "k", {"name": "A", "emails": ["a@b.ru"], "phones": ["+79991234567"], "999": "x"}
    )
    with pytest.raises(Rejected) as info:
        await connector().create(contact, None, "syncd-0-7-0")
    text = str(info.value)
    assert "custom_fields_values.2.field_id=999" in text
    assert "NotSupportedChoice (The value you selected is not a valid choice.)" in text
    assert not info.value.retriable


@pytest.mark.parametrize(("write", "unknown"), [(True, True), (False, False)])
@respx.mock
async def test_a_gateway_timeout_on_a_write_leaves_the_outcome_unknown(
    write: bool, unknown: bool
) -> None:
    respx.post(f"{API}/contacts").mock(return_value=httpx.Response(504, text="<html>504</html>"))
    respx.get(f"{API}/contacts").mock(return_value=httpx.Response(504, text="<html>504</html>"))
    c = connector()
    with pytest.raises(ServerError) as info:
        if write:
            await c.create(PROBE, None, "k")
        else:
            await c.find(PROBE, None)
    assert info.value.outcome_unknown is unknown


@pytest.mark.parametrize(
    ("exc", "unknown"), [(httpx.ConnectError("refused"), False), (httpx.ReadTimeout("slow"), True)]
)
@respx.mock
async def test_transport_failures_are_retriable(exc: Exception, unknown: bool) -> None:
    respx.post(f"{API}/contacts").mock(side_effect=exc)
    with pytest.raises(TransportError) as info:
        await connector().create(PROBE, None, "k")
    assert info.value.retriable and info.value.outcome_unknown is unknown


@respx.mock
async def test_no_content_is_an_empty_list() -> None:
    respx.get(f"{API}/contacts").mock(return_value=httpx.Response(204))
    assert await connector().find(PROBE, None) is None


@respx.mock
async def test_tokens_never_reach_error_texts() -> None:
    respx.get(f"{API}/contacts").mock(
        return_value=httpx.Response(
            400, json={"title": "Bad Request", "detail": "token long-1 is odd"}
        )
    )
    with pytest.raises(Rejected) as info:
        await connector().find(PROBE, None)
    assert "long-1" not in str(info.value) and "***" in str(info.value)


@respx.mock
async def test_a_refused_long_lived_token_is_a_credentials_problem() -> None:
    api = respx.get(f"{API}/contacts").mock(return_value=httpx.Response(401, json={}))
    token = respx.post(TOKEN_URL)
    with pytest.raises(AccessDenied, match="long-lived access_token"):
        await connector().find(PROBE, None)
    assert api.call_count == 1 and token.call_count == 0


# --- OAuth refresh --------------------------------------------------------------------


class OrderedCredentials(MemoryCredentials):
    """Records saves in a log shared with the fake API, to check what happened first."""

    def __init__(self, log: list[str], initial: dict[str, object] | None = None) -> None:
        super().__init__(initial)
        self.log = log
        self.fail_saves = 0

    async def save(self, data: dict[str, object]) -> None:
        if self.fail_saves:
            self.fail_saves -= 1
            raise OSError("disk full")
        self.log.append(f"save {data['access_token']}/{data['refresh_token']}")
        await super().save(data)


def api_seeing(log: list[str], valid: set[str]) -> Any:
    def handler(request: httpx.Request) -> httpx.Response:
        token = request.headers["authorization"].removeprefix("Bearer ")
        log.append(f"api {token}")
        if token not in valid:
            return httpx.Response(401, json={"title": "Unauthorized"})
        return httpx.Response(204)

    return handler


def token_answer(access: str, refresh: str) -> httpx.Response:
    return httpx.Response(
        200,
        json={
            "token_type": "Bearer",
            "expires_in": 86400,
            "access_token": access,
            "refresh_token": refresh,
        },
    )


@respx.mock
async def test_a_401_rotates_the_pair_and_saves_it_before_using_it() -> None:
    log: list[str] = []
    respx.get(f"{API}/contacts").mock(side_effect=api_seeing(log, {"access-2"}))
    token = respx.post(TOKEN_URL).mock(return_value=token_answer("access-2", "refresh-2"))
    credentials = OrderedCredentials(log)
    c = connector(oauth_settings(), credentials)
    assert await c.find(PROBE, None) is None
    assert log == ["api access-1", "save access-2/refresh-2", "api access-2"]
    assert sent(token) == {
        "client_id": "client-1",
        "client_secret": "secret-1",
        "grant_type": "refresh_token",
        "refresh_token": "refresh-1",
        "redirect_uri": "https://syncd.example/cb",
    }
    stored = credentials.saved[-1]
    assert stored["refresh_token"] == "refresh-2" and stored["expires_at"] is not None


@respx.mock
async def test_a_reused_refresh_token_is_refused_once_and_never_sent_again() -> None:
    respx.get(f"{API}/contacts").mock(return_value=httpx.Response(401, json={}))
    token = respx.post(TOKEN_URL).mock(
        return_value=httpx.Response(
            400,
            json={
                "hint": "Token has been revoked",
                "title": "Bad request",
                "type": "https://developers.amocrm.ru/v3/errors/OAuthProblemJson",
                "status": 400,
            },
        )
    )
    c = connector(oauth_settings(), MemoryCredentials())
    for _ in range(3):
        with pytest.raises(AccessDenied) as info:
            await c.find(PROBE, None)
        assert "credentials problem" in str(info.value)
        assert "Token has been revoked" in str(info.value)
        assert not info.value.retriable
        assert "refresh-1" not in str(info.value) and "secret-1" not in str(info.value)
    assert token.call_count == 1


@respx.mock
async def test_client_rejected_by_the_token_endpoint_is_access_denied() -> None:
    respx.get(f"{API}/contacts").mock(return_value=httpx.Response(401, json={}))
    respx.post(TOKEN_URL).mock(
        return_value=httpx.Response(401, json={"hint": "Client authentication failed"})
    )
    with pytest.raises(AccessDenied, match="credentials problem"):
        await connector(oauth_settings()).find(PROBE, None)


@respx.mock
async def test_a_second_401_after_refreshing_is_not_refreshed_again() -> None:
    api = respx.get(f"{API}/contacts").mock(return_value=httpx.Response(401, json={}))
    token = respx.post(TOKEN_URL).mock(return_value=token_answer("access-2", "refresh-2"))
    with pytest.raises(AccessDenied, match="authorize it again"):
        await connector(oauth_settings(), MemoryCredentials()).find(PROBE, None)
    assert api.call_count == 2 and token.call_count == 1


@respx.mock
async def test_stored_tokens_win_over_configured_ones() -> None:
    log: list[str] = []
    respx.get(f"{API}/contacts").mock(side_effect=api_seeing(log, {"stored-access"}))
    first = connector(oauth_settings(), MemoryCredentials())
    seed = first._seed  # what a running syncd would have stored alongside its rotated pair
    stored: dict[str, object] = {
        "access_token": "stored-access",
        "refresh_token": "stored-r",
        "seed": seed,
    }
    await connector(oauth_settings(), MemoryCredentials(stored)).find(PROBE, None)
    assert log == ["api stored-access"]


@respx.mock
async def test_a_replaced_configured_pair_wins_over_stale_stored_tokens() -> None:
    log: list[str] = []
    respx.get(f"{API}/contacts").mock(side_effect=api_seeing(log, {"access-1"}))
    stored: dict[str, object] = {
        "access_token": "old",
        "refresh_token": "old-r",
        "seed": "from-an-older-pair",
    }
    await connector(oauth_settings(), MemoryCredentials(stored)).find(PROBE, None)
    assert log == ["api access-1"]


@respx.mock
async def test_a_known_expiry_refreshes_before_the_request() -> None:
    log: list[str] = []
    respx.get(f"{API}/contacts").mock(side_effect=api_seeing(log, {"access-2"}))
    respx.post(TOKEN_URL).mock(return_value=token_answer("access-2", "refresh-2"))
    now = 1_000_000.0
    c = connector(oauth_settings(), clock=lambda: now)
    expired = {"access_token": "access-1", "refresh_token": "refresh-1", "expires_at": now - 5}
    c.credentials = OrderedCredentials(log, {**expired, "seed": c._seed})
    await c.find(PROBE, None)
    assert log == ["save access-2/refresh-2", "api access-2"]  # no wasted 401


@respx.mock
async def test_concurrent_401s_refresh_once() -> None:
    log: list[str] = []
    respx.get(f"{API}/contacts").mock(side_effect=api_seeing(log, {"access-2"}))
    token = respx.post(TOKEN_URL).mock(return_value=token_answer("access-2", "refresh-2"))
    c = connector(oauth_settings(), MemoryCredentials())
    await asyncio.gather(*(c.find(PROBE, None) for _ in range(4)))
    assert token.call_count == 1


@respx.mock
async def test_a_failed_save_is_retried_before_the_new_token_is_used() -> None:
    log: list[str] = []
    respx.get(f"{API}/contacts").mock(side_effect=api_seeing(log, {"access-2"}))
    token = respx.post(TOKEN_URL).mock(return_value=token_answer("access-2", "refresh-2"))
    credentials = OrderedCredentials(log)
    credentials.fail_saves = 1
    c = connector(oauth_settings(), credentials)
    with pytest.raises(OSError):
        await c.find(PROBE, None)
    await c.find(PROBE, None)
    # the old refresh token is spent: the pair is saved, not fetched again
    assert token.call_count == 1
    assert log == ["api access-1", "save access-2/refresh-2", "api access-2"]


# --- contacts: exact matching ---------------------------------------------------------


@respx.mock
async def test_a_substring_hit_is_not_a_match() -> None:
    respx.get(f"{API}/contacts", params={"query": "anna@example.com"}).mock(
        return_value=httpx.Response(
            200, json=hal("contacts", [contact_json(11, emails=("joanna@example.com",))])
        )
    )
    respx.get(f"{API}/contacts", params={"query": "9991234567"}).mock(
        return_value=httpx.Response(
            200, json=hal("contacts", [contact_json(12, phones=("+7 999 123-45-678",))])
        )
    )
    assert (
        await connector().find(
            Upsert("contact", "k", {"emails": ["anna@example.com"], "phones": ["+79991234567"]}),
            None,
        )
        is None
    )


@respx.mock
async def test_phones_match_across_national_and_international_forms() -> None:
    route = respx.get(f"{API}/contacts").mock(
        return_value=httpx.Response(
            200, json=hal("contacts", [contact_json(21, phones=("8 (999) 123-45-67",))])
        )
    )
    found = await connector().find(Upsert("contact", "k", {"phones": ["+79991234567"]}), None)
    assert found == LinkRef(crm_id="21", url=f"{BASE}/contacts/detail/21")
    assert route.calls[0].request.url.params["query"] == "9991234567"


@respx.mock
async def test_emails_match_case_insensitively_and_the_oldest_contact_wins() -> None:
    respx.get(f"{API}/contacts").mock(
        return_value=httpx.Response(
            200,
            json=hal(
                "contacts",
                [
                    contact_json(40, emails=("Anna@Example.com",)),
                    contact_json(31, emails=("anna@example.com ",)),
                ],
            ),
        )
    )
    found = await connector().find(PROBE, None)
    assert found is not None and found.crm_id == "31"


@respx.mock
async def test_updating_a_contact_adds_values_and_keeps_the_managers() -> None:
    respx.get(f"{API}/contacts/21").mock(
        return_value=httpx.Response(
            200, json=contact_json(21, emails=("work@example.com",), phones=("8 (999) 123-45-67",))
        )
    )
    patch = respx.patch(f"{API}/contacts").mock(return_value=httpx.Response(200, json={}))
    c = connector()
    await c.update(
        Upsert("contact", "k", {"emails": ["anna@example.com"], "phones": ["+79991234567"]}),
        "21",
        None,
        "k",
    )
    [item] = sent(patch)
    assert item["id"] == 21 and "name" not in item  # a manager's name stays
    [emails] = item["custom_fields_values"]  # the phone is there already
    assert emails == {
        "field_code": "EMAIL",
        "values": [
            {"value": "work@example.com", "enum_id": 7},
            {"value": "anna@example.com", "enum_code": "WORK"},
        ],
    }
    # nothing new: no write at all
    await c.update(Upsert("contact", "k", {"emails": ["work@example.com"]}), "21", None, "k")
    assert patch.call_count == 1


@respx.mock
async def test_a_deleted_contact_is_reported_not_recreated_silently() -> None:
    respx.get(f"{API}/contacts/21").mock(return_value=httpx.Response(204))
    with pytest.raises(NotFound, match="no longer exists"):
        await connector().update(Upsert("contact", "k", {"emails": ["a@b.ru"]}), "21", None, "k")


# --- request shapes -------------------------------------------------------------------


@respx.mock
async def test_a_new_lead_with_a_new_contact_is_one_complex_call_after_both_intents() -> None:
    respx.get(f"{API}/contacts").mock(return_value=httpx.Response(204))
    complex_ = respx.post(f"{API}/leads/complex").mock(
        return_value=httpx.Response(
            200,
            json=[
                {
                    "id": 900,
                    "contact_id": 800,
                    "company_id": None,
                    "request_id": ["x"],
                    "merged": False,
                }
            ],
        )
    )
    note = respx.post(f"{API}/leads/900/notes").mock(
        return_value=httpx.Response(
            200, json={"_embedded": {"notes": [{"id": 1000, "entity_id": 900}]}}
        )
    )
    links = MemoryLinks()
    await connector().execute(Plan((CONTACT, DEAL, NOTE)), ctx(links))
    assert links.log[:3] == [
        "intend contact:hd:client:7",
        "intend deal:hd:ticket:1",
        "record deal:hd:ticket:1=900",
    ]
    assert links.rows[("contact", "hd:client:7")].crm_id == "800"
    assert links.rows[("contact", "email:anna@example.com")].crm_id == "800"
    assert links.rows[("note", "hd:event:1")].crm_id == "1000"
    [lead] = sent(complex_)
    assert lead == {
        "name": "Order 1001 is late",
        "status_id": STAGES["new"],
        "pipeline_id": PIPELINE_ID,
        "responsible_user_id": 504141,
        "custom_fields_values": [{"field_id": 700103, "values": [{"value": "email"}]}],
        "_embedded": {
            "tags": [{"name": "syncd:hd:ticket:1"}],
            "contacts": [
                {
                    "name": "Anna Petrova",
                    "custom_fields_values": [
                        {
                            "field_code": "EMAIL",
                            "values": [{"value": "anna@example.com", "enum_code": "WORK"}],
                        },
                        {
                            "field_code": "PHONE",
                            "values": [{"value": "+79991234567", "enum_code": "WORK"}],
                        },
                    ],
                }
            ],
        },
        "request_id": "syncd-0-7-0",
    }
    assert sent(note) == [
        {
            "note_type": "common",
            "params": {"text": "hello\n\n[syncd hd:event:1]"},
            "request_id": "syncd-0-7-2",
        }
    ]


@respx.mock
async def test_an_existing_contact_gets_a_plain_lead_linked_to_it() -> None:
    respx.get(f"{API}/contacts").mock(
        return_value=httpx.Response(
            200, json=hal("contacts", [contact_json(31, emails=("anna@example.com",))])
        )
    )
    respx.get(f"{API}/contacts/31").mock(
        return_value=httpx.Response(
            200, json=contact_json(31, emails=("anna@example.com",), phones=("+79991234567",))
        )
    )
    complex_ = respx.post(f"{API}/leads/complex")
    leads = respx.post(f"{API}/leads").mock(
        return_value=httpx.Response(
            200, json={"_embedded": {"leads": [{"id": 901, "request_id": "0"}]}}
        )
    )
    links = MemoryLinks()
    settings = token_settings(external_key_field_id=700101)
    await connector(settings).execute(Plan((CONTACT, DEAL)), ctx(links))
    assert complex_.call_count == 0 and links.rows[("deal", "hd:ticket:1")].crm_id == "901"
    [lead] = sent(leads)
    assert lead["_embedded"] == {"contacts": [{"id": 31, "is_main": True}]}  # no tag in field mode
    assert lead["custom_fields_values"] == [
        {"field_id": 700103, "values": [{"value": "email"}]},
        {"field_id": 700101, "values": [{"value": "hd:ticket:1"}]},
    ]


@pytest.mark.parametrize("move", [True, False])
@respx.mock
async def test_an_update_moves_the_stage_only_when_asked(move: bool) -> None:
    patch = respx.patch(f"{API}/leads").mock(return_value=httpx.Response(200, json={}))
    op = UpsertDeal(
        key="hd:ticket:1", title=None, pipeline_id=str(PIPELINE_ID), stage_id="142", move_stage=move
    )
    links = MemoryLinks()
    links.rows[("deal", "hd:ticket:1")] = LinkRef("900")
    await connector().execute(Plan((op,)), ctx(links))
    if move:
        assert sent(patch) == [{"status_id": 142, "pipeline_id": PIPELINE_ID, "id": 900}]
    else:
        assert patch.call_count == 0  # nothing to say: no request


@respx.mock
async def test_a_non_numeric_stage_is_a_config_mistake() -> None:
    op = UpsertDeal(key="hd:ticket:1", title="x", stage_id="NEW")
    with pytest.raises(Rejected, match="numeric id"):
        await connector().execute(Plan((op,)), ctx(MemoryLinks()))


@respx.mock
async def test_a_lead_is_found_again_by_its_key_field() -> None:
    lead = {
        "id": 905,
        "custom_fields_values": [{"field_id": 700101, "values": [{"value": "hd:ticket:1"}]}],
        "_embedded": {"tags": [], "companies": []},
    }
    near = {
        **lead,
        "id": 904,
        "custom_fields_values": [{"field_id": 700101, "values": [{"value": "hd:ticket:10"}]}],
    }
    route = respx.get(f"{API}/leads").mock(
        return_value=httpx.Response(200, json=hal("leads", [near, lead]))
    )
    c = connector(token_settings(external_key_field_id=700101))
    found = await c.find(Upsert("deal", "hd:ticket:1"), None)
    assert found == LinkRef("905", f"{BASE}/leads/detail/905")
    assert route.calls[0].request.url.params["query"] == "hd:ticket:1"


@respx.mock
async def test_a_tagged_lead_is_found_through_the_contacts_leads() -> None:
    respx.get(f"{API}/leads", params={"query": "hd:ticket:1"}).mock(
        return_value=httpx.Response(204)
    )
    respx.get(f"{API}/contacts/31").mock(
        return_value=httpx.Response(
            200, json={"id": 31, "_embedded": {"leads": [{"id": 904}, {"id": 905}]}}
        )
    )
    by_id = respx.get(f"{API}/leads", params={"filter[id][]": ["904", "905"]}).mock(
        return_value=httpx.Response(
            200,
            json=hal(
                "leads",
                [
                    {"id": 904, "_embedded": {"tags": [{"id": 1, "name": "syncd:hd:ticket:10"}]}},
                    {"id": 905, "_embedded": {"tags": [{"id": 2, "name": "syncd:hd:ticket:1"}]}},
                ],
            ),
        )
    )
    found = await connector().find(Upsert("deal", "hd:ticket:1", parent="hd:client:7"), "31")
    assert found is not None and found.crm_id == "905" and by_id.call_count == 1


@respx.mock
async def test_a_note_is_found_by_its_exact_marker_line() -> None:
    notes = [
        {"id": 3, "note_type": "common", "params": {"text": "hi\n\n[syncd hd:event:12]"}},
        {"id": 2, "note_type": "common", "params": []},
        {"id": 1, "note_type": "common", "params": {"text": "hello\n\n[syncd hd:event:1]"}},
    ]
    route = respx.get(f"{API}/leads/900/notes").mock(
        return_value=httpx.Response(200, json=hal("notes", notes))
    )
    found = await connector().find(
        Upsert("note", "hd:event:1", create_only=True, parent="hd:ticket:1"), "900"
    )
    assert found is not None and found.crm_id == "1"
    params = route.calls[0].request.url.params
    assert params["filter[note_type]"] == "common" and params["order[id]"] == "desc"


@respx.mock
async def test_contact_notes_go_to_the_contact() -> None:
    route = respx.post(f"{API}/contacts/31/notes").mock(
        return_value=httpx.Response(200, json={"_embedded": {"notes": [{"id": 5}]}})
    )
    note = AddNote(key="hd:event:2", parent_key="hd:client:7", parent_entity="contact", text="hi")
    links = MemoryLinks()
    links.rows[("contact", "hd:client:7")] = LinkRef("31")
    await connector().execute(Plan((note,)), ctx(links))
    assert route.call_count == 1


# --- pacing ---------------------------------------------------------------------------


class FakeTime:
    """One clock for the connector's bucket and the emulator's window; sleeping advances it."""

    def __init__(self) -> None:
        self.now = 1_000.0
        self.slept: list[float] = []

    def __call__(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds


def test_defaults_stay_inside_amocrms_seven_per_second() -> None:
    c = AmoCrmConnector("crm", token_settings(), timeout=1)
    assert isinstance(c.throttle, SlidingWindow)
    assert c.throttle.limit == 7 and c.throttle.window > 1.0


@pytest.mark.parametrize(
    ("extra", "limit"),
    [
        ({}, 7),  # the old defaults, 6/s + 1, meant 7 in a second
        ({"rate_per_second": 4, "burst": 2}, 6),
        ({"rate_per_second": 2.5, "burst": 1}, 3),
        ({"requests_per_second": 5, "rate_per_second": 100, "burst": 20}, 5),
    ],
)
def test_pacing_settings_map_to_requests_in_any_second(extra: dict[str, Any], limit: int) -> None:
    c = AmoCrmConnector("crm", token_settings(**extra), timeout=1)
    assert isinstance(c.throttle, SlidingWindow) and c.throttle.limit == limit
    with pytest.raises(ValidationError):
        token_settings(requests_per_second=0)


async def test_the_bucket_spaces_requests_at_the_configured_rate() -> None:
    t = FakeTime()
    bucket = TokenBucket(7, 1, clock=t, sleep=t.sleep)
    for _ in range(4):
        await bucket.acquire()
    # the first goes at once, then one every 1/7 s (sleeping advances the fake clock)
    assert t.slept == pytest.approx([1 / 7] * 3) and t.now == pytest.approx(1_000 + 3 / 7)


@pytest.mark.parametrize(("limit", "window", "limited"), [(7, 1.02, False), (8, 1.0, True)])
async def test_default_pacing_never_trips_the_emulators_limit(
    limit: int, window: float, limited: bool
) -> None:
    t = FakeTime()
    app, state = create_amocrm_emulator(rate_limit=7, clock=t, long_lived_token="long-1")
    c = connector(transport=httpx.ASGITransport(app=app))
    c.throttle = SlidingWindow(limit, window, clock=t, sleep=t.sleep)
    outcomes: list[object] = []
    for _ in range(30):
        try:
            outcomes.append(await c.find(PROBE, None))
        except RateLimited:
            outcomes.append("429")
    assert ("429" in outcomes) is limited
    assert (state.rate_limited > 0) is limited
    if not limited:
        # all the allowance is used: 30 requests, 7 per window, the last in the 5th window
        assert t.now == pytest.approx(1_000 + 4 * window)
    await c.aclose()


async def test_check_reports_the_account_rights_and_the_key_field() -> None:
    app, _ = create_amocrm_emulator(long_lived_token="long-1")
    c = connector(
        token_settings(external_key_field_id=700101), transport=httpx.ASGITransport(app=app)
    )
    assert await c.check() == [
        "account example (id 28805383)",
        "leads: read/write",
        "contacts: read/write",
        "external key: lead field 700101 (Helpdesk ticket)",
    ]
    bad = connector(
        token_settings(external_key_field_id=123), transport=httpx.ASGITransport(app=app)
    )
    with pytest.raises(Rejected, match="external_key_field_id 123"):
        await bad.check()


async def test_the_emulator_spends_refresh_tokens_once() -> None:
    app, state = create_amocrm_emulator()
    _, refresh = state.issue_tokens()
    body = {
        "client_id": state.client_id,
        "client_secret": state.client_secret,
        "grant_type": "refresh_token",
        "refresh_token": refresh,
        "redirect_uri": state.redirect_uri,
    }
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url=BASE) as client:
        first = await client.post("/oauth2/access_token", json=body)
        again = await client.post("/oauth2/access_token", json=body)
        access = first.json()["access_token"]
        ok = await client.get("/api/v4/contacts", headers={"Authorization": f"Bearer {access}"})
        state.expire_tokens()
        expired = await client.get(
            "/api/v4/contacts", headers={"Authorization": f"Bearer {access}"}
        )
    assert first.status_code == 200 and first.json()["refresh_token"] != refresh
    assert again.status_code == 400 and again.json()["hint"] == "Token has been revoked"
    assert ok.status_code == 204 and expired.status_code == 401


@respx.mock
async def test_a_lost_note_is_looked_for_on_later_pages_too() -> None:
    first = hal("notes", [{"id": 9, "params": {"text": "other\n\n[syncd hd:event:9]"}}])
    first["_links"]["next"] = {"href": f"{API}/leads/900/notes?page=2"}
    second = hal("notes", [{"id": 1, "params": {"text": "hello\n\n[syncd hd:event:1]"}}])
    route = respx.get(f"{API}/leads/900/notes").mock(
        side_effect=[httpx.Response(200, json=first), httpx.Response(200, json=second)]
    )
    lost = Upsert("note", "hd:event:1", create_only=True, parent="hd:ticket:1")
    found = await connector().find(lost, "900")
    assert found is not None and found.crm_id == "1"
    assert [c.request.url.params["page"] for c in route.calls] == ["1", "2"]


async def test_the_emulators_answers_are_classified_like_amocrms() -> None:
    app, state = create_amocrm_emulator(long_lived_token="long-1")
    c = connector(token_settings(), transport=httpx.ASGITransport(app=app))
    bad_field = UpsertDeal(key="hd:ticket:1", title="x", fields={"700999": "x"})
    with pytest.raises(Rejected) as info:
        await c.execute(Plan((bad_field,)), ctx(MemoryLinks()))
    assert "custom_fields_values.0.field_id=700999: NotSupportedChoice" in str(info.value)
    assert state.leads == {}
    state.block_account()
    with pytest.raises(AccessDenied, match="blocked") as blocked:
        await c.find(PROBE, None)
    assert "<html" not in str(blocked.value)
    state.block_account(402)
    with pytest.raises(AccessDenied, match="payment required"):
        await c.find(PROBE, None)
    state.unblock_account()
    assert await c.find(PROBE, None) is None  # 204: no contacts yet
    await c.aclose()


def _contact_reads(state: Any) -> list[str]:
    return [p for m, p in state.requests if m == "GET" and p.startswith("/api/v4/contacts/")]


async def test_a_follow_up_with_nothing_new_about_the_client_does_not_read_the_contact() -> None:
    app, state = create_amocrm_emulator(long_lived_token="long-1", rate_limit=None)
    c = connector(transport=httpx.ASGITransport(app=app))
    links = MemoryLinks()
    await c.execute(Plan((CONTACT, DEAL, NOTE)), ctx(links, 1))
    [contact_id] = state.contacts
    moved = UpsertDeal(
        key=DEAL.key, stage_id=str(STAGES["open"]), move_stage=True, contact_key=CONTACT.key
    )
    reply = AddNote(key="hd:event:2", parent_key=DEAL.key, parent_entity="deal", text="on it")
    before = len(state.requests)
    await c.execute(Plan((CONTACT, moved, reply)), ctx(links, 2))
    assert [m for m, _ in state.requests[before:]] == ["PATCH", "POST"]  # lead, note
    assert _contact_reads(state) == []
    # a phone amoCRM does not have yet: read the contact, add it
    more = UpsertContact(
        key=CONTACT.key,
        identities=(*CONTACT.identities, "phone:+79990000000"),
        name=CONTACT.name,
        emails=CONTACT.emails,
        phones=(*CONTACT.phones, "+79990000000"),
    )
    again = AddNote(key="hd:event:3", parent_key=DEAL.key, parent_entity="deal", text="more")
    await c.execute(Plan((more, again)), ctx(links, 3))
    assert _contact_reads(state) == [f"/api/v4/contacts/{contact_id}"]
    phones = [
        v["value"]
        for f in state.contacts[contact_id]["custom_fields_values"]
        if f["field_code"] == "PHONE"
        for v in f["values"]
    ]
    assert phones == ["+79991234567", "+79990000000"]
    assert links.rows[("contact", "phone:+79990000000")].crm_id == str(contact_id)
    # known now: the next event with it reads nothing
    await c.execute(Plan((more,)), ctx(links, 4))
    assert len(_contact_reads(state)) == 1
    # a value linked to another contact is not "known" for this one
    links.rows[("contact", "email:other@example.com")] = LinkRef(crm_id="1")
    other = UpsertContact(key=CONTACT.key, emails=("other@example.com",))
    await c.execute(Plan((other,)), ctx(links, 5))
    assert len(_contact_reads(state)) == 2
    await c.aclose()
