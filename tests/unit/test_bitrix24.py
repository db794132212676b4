"""Bitrix24: error mapping, token refresh, batch building and parsing, request shapes, throttle.

The connector is driven over respx (no network); a few checks run the
emulator in-process through ASGI, where its own behaviour is what is tested.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import replace
from typing import Any

import httpx
import pytest
import respx
from pydantic import ValidationError

from syncd.connectors.base import DeliveryContext, LinkRef
from syncd.connectors.bitrix24 import (
    Bitrix24Connector,
    Bitrix24Settings,
    classify,
    note_marker,
    php_query,
    split_name,
    token_seed,
)
from syncd.connectors.throttle import TokenBucket
from syncd.emulators.bitrix24 import create_bitrix24_emulator, parse_php_query
from syncd.errors import (
    AccessDenied,
    Contended,
    NotFound,
    RateLimited,
    Rejected,
    ServerError,
    TransportError,
)
from syncd.mapping import AddNote, Plan, Upsert, UpsertContact, UpsertDeal
from tests.helpers import MemoryCredentials, MemoryLinks

PORTAL = "https://portal.test"
TOKEN_URL = "https://oauth.test/oauth/token/"
HOOK_CODE = "hookcode7731xyz"
WEBHOOK = f"{PORTAL}/rest/1/{HOOK_CODE}/"

CONTACT = UpsertContact(
    key="hd:client:7",
    identities=("email:anna@example.com", "phone:+79991234567"),
    name="Anna Petrova",
    emails=("anna@example.com",),
    phones=("+79991234567",),
    responsible_id="5",
)
DEAL = UpsertDeal(
    key="hd:ticket:42",
    title="Order 1001 is late",
    pipeline_id="2",
    stage_id="C2:NEW",
    responsible_id="5",
    fields={"UF_CRM_TICKET_URL": "https://hd.test/42"},
    contact_key="hd:client:7",
)
NOTE = AddNote(key="hd:event:1", parent_key="hd:ticket:42", parent_entity="deal", text="Hello")


def oauth(credentials: MemoryCredentials | None = None, **extra: Any) -> Bitrix24Connector:
    settings = Bitrix24Settings.model_validate(
        {
            "portal_url": PORTAL,
            "client_id": "app.1",
            "client_secret": "client-secret-value",
            "access_token": "old-access",
            "refresh_token": "old-refresh",
            "token_url": TOKEN_URL,
            **extra,
        }
    )
    return Bitrix24Connector("b24", settings, timeout=2, credentials=credentials)


def webhook(**extra: Any) -> Bitrix24Connector:
    settings = Bitrix24Settings.model_validate({"webhook_url": WEBHOOK, **extra})
    return Bitrix24Connector("b24", settings, timeout=2)


def ctx(links: MemoryLinks, delivery_id: int = 1) -> DeliveryContext:
    return DeliveryContext(
        delivery_id=delivery_id, event_id=delivery_id, destination="b24", attempt=1, links=links
    )


def linked() -> MemoryLinks:
    """Links of a ticket whose contact and deal exist already (the update path)."""
    links = MemoryLinks()
    links.rows[("contact", "hd:client:7")] = LinkRef("11")
    links.rows[("contact", "email:anna@example.com")] = LinkRef("11")
    links.rows[("contact", "phone:+79991234567")] = LinkRef("11")
    links.rows[("deal", "hd:ticket:42")] = LinkRef("22")
    return links


def ok(result: Any, **extra: Any) -> httpx.Response:
    return httpx.Response(200, json={"result": result, "time": {"start": 1.0}, **extra})


def fail(status: int, code: str, description: str = "", **extra: Any) -> httpx.Response:
    return httpx.Response(status, json={"error": code, "error_description": description, **extra})


def body(request: httpx.Request) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(request.content)
    return data


def commands(request: httpx.Request) -> dict[str, tuple[str, dict[str, Any]]]:
    """A batch request's commands, parsed back the way the portal parses them."""
    out = {}
    for name, line in body(request)["cmd"].items():
        method, _, query = line.partition("?")
        out[name] = (method, parse_php_query(query))
    return out


def batch_ok(results: dict[str, Any], errors: dict[str, Any] | None = None) -> httpx.Response:
    return ok(
        {
            "result": results or [],
            "result_error": errors or [],
            "result_total": [],
            "result_next": [],
            "result_time": [],
        }
    )


def api(method: str, base: str = f"{PORTAL}/rest/") -> respx.Route:
    return respx.post(f"{base}{method}")


# --- settings ---------------------------------------------------------------------------


def test_settings_need_exactly_one_auth_mode() -> None:
    with pytest.raises(ValidationError):
        Bitrix24Settings.model_validate({})
    with pytest.raises(ValidationError):
        Bitrix24Settings.model_validate({"webhook_url": WEBHOOK, "portal_url": PORTAL})
    with pytest.raises(ValidationError, match="client_secret"):
        Bitrix24Settings.model_validate(
            {"portal_url": PORTAL, "client_id": "a", "refresh_token": "r"}
        )
    with pytest.raises(ValidationError):
        Bitrix24Settings.model_validate({"webhook_url": WEBHOOK, "color": "red"})
    assert Bitrix24Settings.model_validate({"webhook_url": WEBHOOK}).mode == "webhook"


def test_a_malformed_webhook_url_is_refused_without_echoing_it() -> None:
    with pytest.raises(ValidationError) as info:
        Bitrix24Settings.model_validate({"webhook_url": f"{PORTAL}/api/{HOOK_CODE}"})
    assert all(HOOK_CODE not in str(err["msg"]) for err in info.value.errors())


def test_record_urls_point_at_the_portal_never_at_the_webhook() -> None:
    assert webhook().record_url("deal", "22") == f"{PORTAL}/crm/deal/details/22/"
    assert oauth().record_url("contact", "11") == f"{PORTAL}/crm/contact/details/11/"
    assert webhook().record_url("note", "5") is None


# --- error mapping ----------------------------------------------------------------------


@respx.mock
async def test_query_limit_exceeded_is_rate_limited_and_empties_the_throttle() -> None:
    api("crm.deal.update").mock(return_value=fail(503, "QUERY_LIMIT_EXCEEDED", "Too many requests"))
    connector = oauth()
    t = FakeTime()
    connector.throttle = TokenBucket(2.0, 50, clock=t.clock, sleep=t.sleep)
    with pytest.raises(RateLimited) as info:
        await connector.execute(Plan((DEAL,)), ctx(linked()))
    assert info.value.retry_after == 1.0 and info.value.status_code == 503
    # The portal's bucket is full whatever ours said: the next request waits a slot.
    assert connector.throttle.available == 0


@respx.mock
async def test_operation_time_limit_waits_until_operating_reset_at() -> None:
    reset = time.time() + 240
    api("crm.deal.update").mock(
        return_value=fail(
            429,
            "OPERATION_TIME_LIMIT",
            "Method is blocked due to operation time limit.",
            time={"operating_reset_at": reset},
        )
    )
    with pytest.raises(RateLimited) as info:
        await oauth().execute(Plan((DEAL,)), ctx(linked()))
    assert info.value.retry_after is not None and 230 < info.value.retry_after <= 240


@respx.mock
async def test_operation_time_limit_without_reset_uses_the_last_one_seen() -> None:
    reset = time.time() + 300
    api("crm.deal.update").mock(
        side_effect=[
            ok(True, time={"operating_reset_at": reset}),
            fail(429, "OPERATION_TIME_LIMIT", "blocked"),
        ]
    )
    connector = oauth()
    await connector.execute(Plan((DEAL,)), ctx(linked()))
    with pytest.raises(RateLimited) as info:
        await connector.execute(Plan((DEAL,)), ctx(linked()))
    assert info.value.retry_after is not None and 290 < info.value.retry_after <= 300


@pytest.mark.parametrize(
    ("status", "code"),
    [
        (401, "INVALID_CREDENTIALS"),
        (401, "insufficient_scope"),
        (403, "insufficient_scope"),
        (403, "ACCESS_DENIED"),
        (401, "invalid_token"),
        (401, "NO_AUTH_FOUND"),
    ],
)
@respx.mock
async def test_credential_errors_are_access_denied(status: int, code: str) -> None:
    route = api("crm.deal.update").mock(return_value=fail(status, code, "nope"))
    with pytest.raises(AccessDenied) as info:
        await oauth().execute(Plan((DEAL,)), ctx(linked()))
    assert not info.value.retriable and code in str(info.value)
    assert route.call_count == 1


@respx.mock
async def test_crm_access_denied_inside_a_400_is_access_denied() -> None:
    api("crm.deal.update").mock(return_value=fail(400, "", "Access denied."))
    with pytest.raises(AccessDenied):
        await oauth().execute(Plan((DEAL,)), ctx(linked()))


@respx.mock
async def test_400_not_found_is_not_found() -> None:
    api("crm.deal.update").mock(return_value=fail(400, "", "Not found"))
    with pytest.raises(NotFound):
        await oauth().execute(Plan((DEAL,)), ctx(linked()))


@respx.mock
async def test_other_400_is_rejected_with_bitrix_description() -> None:
    api("crm.deal.update").mock(
        return_value=fail(400, "ERROR_CORE", "The field `Work e-mail` contains an invalid address")
    )
    with pytest.raises(Rejected) as info:
        await oauth().execute(Plan((DEAL,)), ctx(linked()))
    assert "invalid address" in str(info.value) and "crm.deal.update" in str(info.value)


@pytest.mark.parametrize("status", [500, 502, 504])
@respx.mock
async def test_5xx_is_a_server_error_whose_outcome_is_unknown(status: int) -> None:
    api("crm.deal.update").mock(return_value=fail(status, "INTERNAL_SERVER_ERROR", "boom"))
    with pytest.raises(ServerError) as info:
        await oauth().execute(Plan((DEAL,)), ctx(linked()))
    assert info.value.retriable and info.value.outcome_unknown


@respx.mock
async def test_a_non_json_5xx_page_is_a_server_error() -> None:
    api("crm.deal.update").mock(return_value=httpx.Response(502, text="<html>Bad gateway</html>"))
    with pytest.raises(ServerError):
        await oauth().execute(Plan((DEAL,)), ctx(linked()))


@respx.mock
async def test_connect_error_is_safe_to_resend_and_names_no_secret() -> None:
    respx.post(f"{WEBHOOK}crm.deal.update.json").mock(
        side_effect=httpx.ConnectError(f"cannot reach {WEBHOOK}")
    )
    with pytest.raises(TransportError) as info:
        await webhook().execute(Plan((DEAL,)), ctx(linked()))
    assert not info.value.outcome_unknown
    assert HOOK_CODE not in str(info.value) and HOOK_CODE not in info.value.message


@respx.mock
async def test_timeout_leaves_the_outcome_unknown() -> None:
    respx.post(f"{WEBHOOK}crm.deal.update.json").mock(side_effect=httpx.ReadTimeout("slow"))
    with pytest.raises(TransportError) as info:
        await webhook().execute(Plan((DEAL,)), ctx(linked()))
    assert info.value.outcome_unknown


@respx.mock
async def test_an_error_text_echoing_the_webhook_url_is_scrubbed() -> None:
    respx.post(f"{WEBHOOK}crm.deal.update.json").mock(
        return_value=fail(400, "", f"Bad call to {WEBHOOK}crm.deal.update")
    )
    with pytest.raises(Rejected) as info:
        await webhook().execute(Plan((DEAL,)), ctx(linked()))
    assert HOOK_CODE not in str(info.value) and "***" in str(info.value)


def test_classify_inside_a_batch_has_no_status() -> None:
    assert isinstance(classify(None, "", "Not found", what="m"), NotFound)
    assert isinstance(classify(None, "insufficient_scope", "", what="m"), AccessDenied)
    assert isinstance(classify(None, "QUERY_LIMIT_EXCEEDED", "", what="m"), RateLimited)
    assert isinstance(classify(None, "INTERNAL_SERVER_ERROR", "", what="m"), ServerError)
    assert isinstance(classify(None, "ERROR_CORE", "bad e-mail", what="m"), Rejected)
    overload = classify(503, "OVERLOAD_LIMIT", "blocked", what="m")
    assert isinstance(overload, RateLimited) and (overload.retry_after or 0) >= 600


# --- OAuth refresh ----------------------------------------------------------------------


def token_ok(access: str = "new-access", refresh: str = "new-refresh") -> httpx.Response:
    return httpx.Response(
        200, json={"access_token": access, "refresh_token": refresh, "expires_in": 3600}
    )


@respx.mock
async def test_expired_token_is_refreshed_once_and_saved_before_use() -> None:
    credentials = MemoryCredentials()
    seen: list[str] = []

    def deal_update(request: httpx.Request) -> httpx.Response:
        token = body(request)["auth"]
        seen.append(token)
        if token == "old-access":
            return fail(401, "expired_token", "The access token provided has expired.")
        # By the time the new token is used, it is already durable.
        assert credentials.saved and credentials.saved[-1]["access_token"] == token
        return ok(True)

    api("crm.deal.update").mock(side_effect=deal_update)
    refresh = respx.get(TOKEN_URL).mock(return_value=token_ok())
    connector = oauth(credentials)
    await connector.execute(Plan((DEAL,)), ctx(linked()))
    assert seen == ["old-access", "new-access"]
    assert refresh.call_count == 1
    params = dict(refresh.calls.last.request.url.params)
    assert params == {
        "grant_type": "refresh_token",
        "client_id": "app.1",
        "client_secret": "client-secret-value",
        "refresh_token": "old-refresh",
    }
    assert credentials.saved[-1]["refresh_token"] == "new-refresh"
    assert credentials.saved[-1]["seed"] == token_seed("old-refresh")


@respx.mock
async def test_a_token_that_stays_expired_is_not_refreshed_forever() -> None:
    route = api("crm.deal.update").mock(return_value=fail(401, "expired_token", "expired"))
    refresh = respx.get(TOKEN_URL).mock(side_effect=[token_ok("a1", "r1"), token_ok("a2", "r2")])
    with pytest.raises(AccessDenied):
        await oauth().execute(Plan((DEAL,)), ctx(linked()))
    assert refresh.call_count == 1 and route.call_count == 2


@respx.mock
async def test_invalid_grant_is_access_denied_and_not_asked_again() -> None:
    api("crm.deal.update").mock(return_value=fail(401, "expired_token", "expired"))
    refresh = respx.get(TOKEN_URL).mock(
        return_value=fail(400, "invalid_grant", "Invalid refresh token")
    )
    connector = oauth()
    for _ in range(2):
        with pytest.raises(AccessDenied) as info:
            await connector.execute(Plan((DEAL,)), ctx(linked()))
        assert not info.value.retriable and "invalid_grant" in str(info.value)
        assert "old-refresh" not in str(info.value)
    assert refresh.call_count == 1


@respx.mock
async def test_a_token_endpoint_outage_is_retriable() -> None:
    api("crm.deal.update").mock(return_value=fail(401, "expired_token", "expired"))
    respx.get(TOKEN_URL).mock(return_value=httpx.Response(502, text="bad gateway"))
    with pytest.raises(ServerError):
        await oauth().execute(Plan((DEAL,)), ctx(linked()))


@respx.mock
async def test_concurrent_expiries_share_one_refresh() -> None:
    def answer(request: httpx.Request, result: Any) -> httpx.Response:
        if body(request)["auth"] == "old-access":
            return fail(401, "expired_token", "expired")
        return result

    # the two deliveries may share a batch request, or go one by one: both paths expire
    api("crm.deal.update").mock(side_effect=lambda request: answer(request, ok(True)))
    api("batch").mock(
        side_effect=lambda request: answer(
            request, batch_ok({name: True for name in commands(request)})
        )
    )
    refresh = respx.get(TOKEN_URL).mock(return_value=token_ok())
    connector = oauth()
    await asyncio.gather(
        connector.execute(Plan((DEAL,)), ctx(linked())),
        connector.execute(Plan((DEAL,)), ctx(linked(), delivery_id=2)),
    )
    assert refresh.call_count == 1


@respx.mock
async def test_stored_tokens_win_over_configured_ones() -> None:
    route = api("crm.deal.update").mock(return_value=ok(True))
    stored = {
        "access_token": "stored-access",
        "refresh_token": "stored-refresh",
        "seed": token_seed("old-refresh"),
    }
    connector = oauth(MemoryCredentials(stored))
    await connector.execute(Plan((DEAL,)), ctx(linked()))
    assert body(route.calls.last.request)["auth"] == "stored-access"


@respx.mock
async def test_a_new_refresh_token_in_the_config_replaces_the_stored_pair() -> None:
    route = api("crm.deal.update").mock(return_value=ok(True))
    stored = {
        "access_token": "stored-access",
        "refresh_token": "stored-refresh",
        "seed": token_seed("an-older-refresh-token"),
    }
    connector = oauth(MemoryCredentials(stored))
    await connector.execute(Plan((DEAL,)), ctx(linked()))
    assert body(route.calls.last.request)["auth"] == "old-access"


@respx.mock
async def test_webhook_mode_sends_no_auth_and_calls_the_json_path() -> None:
    route = respx.post(f"{WEBHOOK}crm.deal.update.json").mock(return_value=ok(True))
    await webhook().execute(Plan((DEAL,)), ctx(linked()))
    assert "auth" not in body(route.calls.last.request)


# --- request shapes and batching ----------------------------------------------------------


@respx.mock
async def test_new_ticket_looks_up_the_client_then_writes_everything_in_one_batch() -> None:
    batches: list[httpx.Request] = []

    def batch(request: httpx.Request) -> httpx.Response:
        batches.append(request)
        if len(batches) == 1:  # the look-up
            return batch_ok({"origin": []})
        return batch_ok({"contact0": 11, "deal1": 22, "note2": 33})

    api("batch").mock(side_effect=batch)
    links = MemoryLinks()
    await oauth().execute(Plan((CONTACT, DEAL, NOTE)), ctx(links))

    lookup = commands(batches[0])
    assert lookup["origin"] == (
        "crm.contact.list",
        {
            "filter": {"ORIGINATOR_ID": "syncd", "ORIGIN_ID": "hd:client:7"},
            "select": ["ID", "NAME", "LAST_NAME", "EMAIL", "PHONE"],
            "order": {"ID": "ASC"},
        },
    )
    assert lookup["email"] == (
        "crm.duplicate.findbycomm",
        {"type": "EMAIL", "values": ["anna@example.com"], "entity_type": "CONTACT"},
    )
    assert lookup["phone"][1]["values"] == ["+79991234567"]

    assert body(batches[1])["halt"] == 1
    writes = commands(batches[1])
    assert list(writes) == ["contact0", "deal1", "note2"]
    method, params = writes["contact0"]
    assert method == "crm.contact.add"
    assert params["fields"] == {
        "NAME": "Anna",
        "LAST_NAME": "Petrova",
        "EMAIL": [{"VALUE": "anna@example.com", "VALUE_TYPE": "WORK"}],
        "PHONE": [{"VALUE": "+79991234567", "VALUE_TYPE": "WORK"}],
        "ASSIGNED_BY_ID": "5",
        "ORIGINATOR_ID": "syncd",
        "ORIGIN_ID": "hd:client:7",
    }
    method, params = writes["deal1"]
    assert method == "crm.deal.add"
    assert params["fields"] == {
        "TITLE": "Order 1001 is late",
        "CATEGORY_ID": "2",
        "STAGE_ID": "C2:NEW",
        "ASSIGNED_BY_ID": "5",
        "CONTACT_ID": "$result[contact0]",
        "ORIGINATOR_ID": "syncd",
        "ORIGIN_ID": "hd:ticket:42",
        "UF_CRM_TICKET_URL": "https://hd.test/42",
    }
    method, params = writes["note2"]
    assert method == "crm.timeline.comment.add"
    assert params == {
        "fields": {
            "ENTITY_ID": "$result[deal1]",
            "ENTITY_TYPE": "deal",
            "COMMENT": f"Hello\n\n{note_marker('hd:event:1')}",
        }
    }
    # Every create's intent was durable before the batch went out.
    assert links.log[:3] == [
        "intend contact:hd:client:7",
        "intend deal:hd:ticket:42",
        "intend note:hd:event:1",
    ]
    assert links.rows[("deal", "hd:ticket:42")].crm_id == "22"
    assert links.rows[("note", "hd:event:1")].crm_id == "33"
    assert links.rows[("contact", "email:anna@example.com")].crm_id == "11"


@respx.mock
async def test_linked_records_update_in_a_single_request() -> None:
    route = api("batch").mock(return_value=batch_ok({"contact0": True, "deal1": True, "note2": 5}))
    contact = replace(CONTACT, fields={"UF_CRM_HELPDESK_ID": "7"})
    moved = UpsertDeal(key="hd:ticket:42", title=None, stage_id="C2:WON", move_stage=True)
    links = linked()
    await oauth().execute(Plan((contact, moved, NOTE)), ctx(links))
    assert route.call_count == 1 and len(respx.calls) == 1
    writes = commands(route.calls.last.request)
    assert writes["contact0"] == (
        "crm.contact.update",
        # Known e-mail and phone are not sent again (Bitrix24 would append duplicates),
        # and the name a manager may have corrected is left alone.
        {"id": "11", "fields": {"UF_CRM_HELPDESK_ID": "7"}},
    )
    assert writes["deal1"] == ("crm.deal.update", {"id": "22", "fields": {"STAGE_ID": "C2:WON"}})
    assert writes["note2"][1]["fields"]["ENTITY_ID"] == "22"
    assert links.rows[("note", "hd:event:1")].crm_id == "5"


@respx.mock
async def test_update_keeps_the_stage_unless_told_to_move_it() -> None:
    route = api("crm.deal.update").mock(return_value=ok(True))
    still = UpsertDeal(key="hd:ticket:42", title="New title", stage_id="C2:NEW", pipeline_id="2")
    await oauth().execute(Plan((still,)), ctx(linked()))
    assert body(route.calls.last.request)["fields"] == {"TITLE": "New title"}


@respx.mock
async def test_a_new_email_on_a_known_contact_is_appended_once() -> None:
    route = api("crm.contact.update").mock(return_value=ok(True))
    changed = UpsertContact(
        key="hd:client:7",
        identities=("email:anna@example.com", "email:anna@work.test"),
        emails=("anna@example.com", "anna@work.test"),
    )
    links = linked()
    await oauth().execute(Plan((changed,)), ctx(links))
    assert body(route.calls.last.request)["fields"] == {
        "EMAIL": [{"VALUE": "anna@work.test", "VALUE_TYPE": "WORK"}]
    }
    assert links.rows[("contact", "email:anna@work.test")].crm_id == "11"
    # Nothing new to say the second time: no request at all.
    await oauth().execute(Plan((changed,)), ctx(links))
    assert route.call_count == 1


@respx.mock
async def test_one_failing_command_records_the_others_and_raises_its_error() -> None:
    api("batch").mock(
        side_effect=[
            batch_ok({"origin": []}),
            batch_ok(
                {"contact0": 11},
                {"deal1": {"error": "", "error_description": "Stage is not valid"}},
            ),
        ]
    )
    links = MemoryLinks()
    with pytest.raises(Rejected, match="Stage is not valid"):
        await oauth().execute(Plan((CONTACT, DEAL, NOTE)), ctx(links))
    assert links.rows[("contact", "hd:client:7")].crm_id == "11"
    # halt=1: the deal failed and the note never ran; both keep their intents for the retry.
    assert links.rows[("deal", "hd:ticket:42")].crm_id is None
    assert links.rows[("note", "hd:event:1")].crm_id is None


@respx.mock
async def test_a_batch_command_not_found_is_not_found() -> None:
    api("batch").mock(
        return_value=batch_ok({}, {"deal1": {"error": "", "error_description": "Not found"}})
    )
    with pytest.raises(NotFound):
        await oauth().execute(Plan((CONTACT, DEAL, NOTE)), ctx(linked()))


@respx.mock
async def test_contact_is_matched_exactly_after_the_duplicate_search() -> None:
    api("batch").mock(
        return_value=batch_ok({"origin": [], "email": [], "phone": {"CONTACT": [5, 6]}})
    )
    listed = api("crm.contact.list").mock(
        return_value=ok(
            [
                {"ID": "5", "PHONE": [{"VALUE": "+7 999 123-45-68", "VALUE_TYPE": "WORK"}]},
                {"ID": "6", "PHONE": [{"VALUE": "8 (999) 123-45-67", "VALUE_TYPE": "MOBILE"}]},
            ],
            total=2,
        )
    )
    found = await oauth().find(
        Upsert("contact", "hd:client:7", {"emails": [], "phones": ["+79991234567"]}), None
    )
    assert found is not None and found.crm_id == "6"
    assert body(listed.calls.last.request)["filter"] == {"@ID": [5, 6]}


@respx.mock
async def test_a_found_contact_gets_only_the_values_it_lacks() -> None:
    api("batch").mock(
        side_effect=[
            batch_ok({"origin": [], "email": {"CONTACT": [9]}, "phone": []}),
            batch_ok({"contact0": True, "deal1": 22, "note2": 33}),
        ]
    )
    api("crm.contact.list").mock(
        return_value=ok(
            [{"ID": "9", "NAME": "", "EMAIL": [{"VALUE": "ANNA@example.com"}]}], total=1
        )
    )
    links = MemoryLinks()
    await oauth().execute(Plan((CONTACT, DEAL, NOTE)), ctx(links))
    writes = commands(respx.calls.last.request)
    assert writes["contact0"][1]["fields"] == {
        # The contact had no name: it gets one. It had the e-mail: only the phone is added.
        "NAME": "Anna",
        "LAST_NAME": "Petrova",
        "PHONE": [{"VALUE": "+79991234567", "VALUE_TYPE": "WORK"}],
    }
    assert writes["deal1"][1]["fields"]["CONTACT_ID"] == "9"
    assert links.rows[("contact", "hd:client:7")].crm_id == "9"
    assert "intend contact:hd:client:7" not in links.log


@respx.mock
async def test_a_found_contact_keeps_the_name_it_has() -> None:
    api("batch").mock(
        side_effect=[
            batch_ok({"origin": [], "email": {"CONTACT": [9]}, "phone": []}),
            batch_ok({"deal1": 22, "note2": 33}),
        ]
    )
    api("crm.contact.list").mock(
        return_value=ok(
            [
                {
                    "ID": "9",
                    "NAME": "Анна",
                    "EMAIL": [{"VALUE": "anna@example.com"}],
                    "PHONE": [{"VALUE": "8 999 123 45 67"}],
                }
            ],
            total=1,
        )
    )
    await oauth().execute(Plan((CONTACT, DEAL, NOTE)), ctx(MemoryLinks()))
    assert list(commands(respx.calls.last.request)) == ["deal1", "note2"]


@respx.mock
async def test_an_unanswered_deal_is_found_by_its_origin_id() -> None:
    route = api("crm.deal.list").mock(return_value=ok([{"ID": "77"}], total=1))
    links = MemoryLinks()
    links.rows[("deal", "hd:ticket:42")] = LinkRef(None)
    update = api("crm.deal.update").mock(return_value=ok(True))
    await oauth().execute(Plan((DEAL,)), ctx(links))
    assert body(route.calls.last.request)["filter"] == {
        "ORIGINATOR_ID": "syncd",
        "ORIGIN_ID": "hd:ticket:42",
    }
    assert links.rows[("deal", "hd:ticket:42")].crm_id == "77"
    assert body(update.calls.last.request)["id"] == 77


@respx.mock
async def test_an_unanswered_note_is_found_by_its_marker_newest_first() -> None:
    listed = api("crm.timeline.comment.list").mock(
        side_effect=[
            ok([{"ID": "40", "COMMENT": "other [syncd:hd:event:10]"}], total=60, next=50),
            ok([{"ID": "31", "COMMENT": f"Hello\n\n{note_marker('hd:event:1')}"}], total=60),
        ]
    )
    add = api("crm.timeline.comment.add").mock(return_value=ok(99))
    links = linked()
    links.rows[("note", "hd:event:1")] = LinkRef(None)
    await oauth().execute(Plan((NOTE,)), ctx(links))
    first = body(listed.calls[0].request)
    assert first["filter"] == {"ENTITY_ID": 22, "ENTITY_TYPE": "deal"}
    assert first["order"] == {"ID": "DESC"}
    assert body(listed.calls[1].request)["start"] == 50
    assert links.rows[("note", "hd:event:1")].crm_id == "31" and not add.called


async def test_another_deliverys_create_in_flight_is_contended() -> None:
    links = MemoryLinks()
    links.rows[("deal", "hd:ticket:42")] = LinkRef(None, owner_busy=True)
    with pytest.raises(Contended):
        await oauth().execute(Plan((DEAL,)), ctx(links))


async def test_a_lost_intent_race_is_contended_and_sends_nothing() -> None:
    class Racing(MemoryLinks):
        async def intend(self, entity: str, external_key: str) -> bool:
            return False

    with respx.mock(assert_all_called=False) as mock:
        route = mock.post(f"{PORTAL}/rest/crm.deal.add")
        with pytest.raises(Contended):
            await oauth().execute(Plan((DEAL,)), ctx(Racing()))
        assert not route.called


def test_php_query_round_trips_through_the_portal_parser() -> None:
    params = {
        "id": 5,
        "fields": {"EMAIL": [{"VALUE": "a+b@x.ru", "VALUE_TYPE": "WORK"}], "TITLE": "A & B = C"},
        "select": ["ID", "EMAIL"],
        "flag": True,
    }
    query = php_query(params)
    assert "fields[EMAIL][0][VALUE]=a%2Bb%40x.ru" in query
    assert parse_php_query(query) == {
        "id": "5",
        "fields": {"EMAIL": [{"VALUE": "a+b@x.ru", "VALUE_TYPE": "WORK"}], "TITLE": "A & B = C"},
        "select": ["ID", "EMAIL"],
        "flag": "Y",
    }


def test_split_name() -> None:
    assert split_name("Anna Maria Petrova") == {"NAME": "Anna", "LAST_NAME": "Maria Petrova"}
    assert split_name("Anna") == {"NAME": "Anna"}
    assert split_name("  ") == {}


@respx.mock
async def test_check_reports_user_scopes_and_fields() -> None:
    api("batch").mock(
        return_value=batch_ok(
            {
                "profile": {"ID": "1", "NAME": "Ivan", "LAST_NAME": "Admin"},
                "scope": ["crm", "user"],
                "deal": {"ID": {}, "TITLE": {}},
                "contact": {"ID": {}},
            }
        )
    )
    lines = await oauth().check()
    assert lines[0] == "authenticated (oauth) as user 1 (Ivan Admin)"
    assert "scopes: crm, user" in lines
    assert any(line.startswith("crm.deal: 2 fields") for line in lines)


@respx.mock
async def test_check_fails_without_the_crm_scope() -> None:
    api("batch").mock(
        return_value=batch_ok(
            {"profile": {"ID": "1"}, "scope": ["user"], "deal": {}, "contact": {}}
        )
    )
    with pytest.raises(AccessDenied, match="crm scope"):
        await oauth().check()


# --- throttle -----------------------------------------------------------------------------


class FakeTime:
    """A clock that moves only when a waiter sleeps (or the test says so)."""

    def __init__(self) -> None:
        self.now = 100.0
        self.slept: list[float] = []

    def clock(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds


def bucket(rate: float, burst: int) -> tuple[TokenBucket, FakeTime]:
    t = FakeTime()
    return TokenBucket(rate, burst, clock=t.clock, sleep=t.sleep), t


async def test_burst_passes_at_once_then_the_rate_applies() -> None:
    b, t = bucket(rate=2.0, burst=50)
    waits = [await b.acquire() for _ in range(50)]
    assert waits == [0.0] * 50 and t.slept == []
    assert await b.acquire() == pytest.approx(0.5)
    assert await b.acquire() == pytest.approx(0.5)
    assert t.now == pytest.approx(101.0)


async def test_the_bucket_refills_with_time_but_never_past_burst() -> None:
    b, t = bucket(rate=2.0, burst=3)
    for _ in range(3):
        await b.acquire()
    t.now += 1.0
    assert b.available == pytest.approx(2.0)
    t.now += 3600
    assert b.available == pytest.approx(3.0)


async def test_concurrent_waiters_are_spaced_in_order() -> None:
    b, _ = bucket(rate=4.0, burst=1)
    assert b.reserve() == 0.0
    assert [b.reserve() for _ in range(3)] == pytest.approx([0.25, 0.5, 0.75])


async def test_exhaust_makes_the_next_request_wait() -> None:
    b, _ = bucket(rate=2.0, burst=50)
    b.exhaust()
    assert b.reserve() == pytest.approx(0.5)


async def test_a_cancelled_waiter_gives_its_slot_back() -> None:
    gate = asyncio.Event()

    async def blocked(_seconds: float) -> None:
        await gate.wait()

    b = TokenBucket(1.0, 1, clock=lambda: 0.0, sleep=blocked)
    await b.acquire()
    waiter = asyncio.create_task(b.acquire())
    await asyncio.sleep(0)
    assert b.available == pytest.approx(-1.0)
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    assert b.available == pytest.approx(0.0)


def test_bucket_rejects_nonsense() -> None:
    with pytest.raises(ValueError):
        TokenBucket(0, 1)
    with pytest.raises(ValueError):
        TokenBucket(1, 0)


@respx.mock
async def test_the_connector_paces_itself_with_its_settings() -> None:
    api("crm.deal.update").mock(return_value=ok(True))
    connector = oauth(rate_per_second=5, burst=2)
    t = FakeTime()
    connector.throttle = TokenBucket(5, 2, clock=t.clock, sleep=t.sleep)
    for _ in range(3):
        await connector.execute(Plan((DEAL,)), ctx(linked()))
    assert t.slept == [pytest.approx(0.2)]
    assert (connector.throttle.rate, connector.throttle.burst) == (5.0, 2)


# --- the emulator's own rules ----------------------------------------------------------------


def emulator_client(**kwargs: Any) -> tuple[httpx.AsyncClient, Any]:
    app, state = create_bitrix24_emulator(**kwargs)
    client = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://b24")
    return client, state


async def test_emulator_leaky_bucket_refuses_past_burst() -> None:
    client, state = emulator_client(rate_per_second=2, burst=3)
    now = [0.0]
    state.clock = lambda: now[0]
    path = state.webhook_path()
    codes = [(await client.post(f"{path}profile.json")).status_code for _ in range(4)]
    assert codes == [200, 200, 200, 503]
    refused = await client.post(f"{path}profile")
    assert refused.json()["error"] == "QUERY_LIMIT_EXCEEDED"
    now[0] += 0.5
    assert (await client.post(f"{path}profile")).status_code == 200


async def test_emulator_batch_substitutes_results_and_halts() -> None:
    client, state = emulator_client()
    path = state.webhook_path()
    cmd = {
        "c": "crm.contact.add?" + php_query({"fields": {"NAME": "A"}}),
        "d": "crm.deal.add?" + php_query({"fields": {"CONTACT_ID": "$result[c]"}}),
        "bad": "crm.deal.update?" + php_query({"id": 999, "fields": {"TITLE": "x"}}),
        "never": "crm.deal.add?" + php_query({"fields": {"TITLE": "y"}}),
    }
    answer = (await client.post(f"{path}batch", json={"halt": 1, "cmd": cmd})).json()["result"]
    assert answer["result"] == {"c": 1, "d": 2}
    assert answer["result_error"] == {"bad": {"error": "", "error_description": "Not found"}}
    assert state.deals[2]["CONTACT_ID"] == "1" and len(state.deals) == 1


async def test_emulator_rotates_refresh_tokens_and_expires_access() -> None:
    client, state = emulator_client()
    access, refresh = state.issue_tokens()
    assert (await client.post("/rest/profile", json={"auth": access})).status_code == 200
    state.expire_tokens()
    expired = await client.post("/rest/profile", json={"auth": access})
    assert (expired.status_code, expired.json()["error"]) == (401, "expired_token")
    params = {
        "grant_type": "refresh_token",
        "client_id": state.client_id,
        "client_secret": state.client_secret,
        "refresh_token": refresh,
    }
    renewed = (await client.get("/oauth/token/", params=params)).json()
    assert (await client.post("/rest/profile", json={"auth": renewed["access_token"]})).is_success
    again = await client.get("/oauth/token/", params=params)
    assert (again.status_code, again.json()["error"]) == (400, "invalid_grant")


async def test_emulator_refuses_a_wrong_webhook_code() -> None:
    client, _ = emulator_client()
    answer = await client.post("/rest/1/wrong/crm.deal.list.json")
    assert (answer.status_code, answer.json()["error"]) == (401, "INVALID_CREDENTIALS")


async def test_emulator_lists_page_by_fifty_with_string_ids() -> None:
    client, state = emulator_client(burst=1000)
    path = state.webhook_path()
    for n in range(60):
        added = await client.post(f"{path}crm.deal.add", json={"fields": {"TITLE": f"d{n}"}})
        assert isinstance(added.json()["result"], int)
    first = (await client.post(f"{path}crm.deal.list", json={"select": ["ID"]})).json()
    assert (len(first["result"]), first["total"], first["next"]) == (50, 60, 50)
    assert first["result"][0] == {"ID": "1"}
    second = (await client.post(f"{path}crm.deal.list", json={"start": 50})).json()
    assert len(second["result"]) == 10 and "next" not in second


@respx.mock
async def test_links_are_read_in_one_prefetch_when_the_book_offers_it() -> None:
    class Prefetching(MemoryLinks):
        def __init__(self) -> None:
            super().__init__()
            self.asked: list[tuple[str, str]] = []

        async def prefetch(self, keys: list[tuple[str, str]]) -> None:
            self.asked += keys

    api("batch").mock(return_value=batch_ok({"contact0": True, "deal1": True, "note2": 5}))
    links = Prefetching()
    links.rows.update(linked().rows)
    await oauth().execute(Plan((CONTACT, DEAL, NOTE)), ctx(links))
    assert set(links.asked) == {
        ("contact", "hd:client:7"),
        ("contact", "email:anna@example.com"),
        ("contact", "phone:+79991234567"),
        ("deal", "hd:ticket:42"),
        ("note", "hd:event:1"),
    }
