"""Realistic Usedesk and Zendesk tickets through the example config's documented rules."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from syncd.config import load_config
from syncd.emulators.usedesk_api import create_usedesk_api
from syncd.emulators.zendesk_api import create_zendesk_api
from syncd.monitor.passwords import hash_password
from syncd.preview import preview

EXAMPLE = Path(__file__).parents[2] / "config" / "syncd.example.toml"

EXAMPLE_HASH = hash_password("example-password")


@pytest.fixture
def config(monkeypatch: pytest.MonkeyPatch):  # type: ignore[no-untyped-def]
    for name in (
        "SYNCD_HOOK_SECRET",
        "CRM_API_TOKEN",
        "USEDESK_SECRET",
        "ZENDESK_SIGNING_SECRET",
        "ZENDESK_API_TOKEN",
    ):
        monkeypatch.setenv(name, "x" * 16)
    for name in ("SYNCD_ANNA_PASSWORD_HASH", "SYNCD_MAX_PASSWORD_HASH"):
        monkeypatch.setenv(name, EXAMPLE_HASH)
    monkeypatch.setenv("SYNCD_SESSION_SECRET", "s" * 32)
    monkeypatch.setenv("SYNCD_GRAFANA_TOKEN", "t" * 24)
    return load_config(EXAMPLE)


def only_plan(result: dict[str, object]) -> dict[str, object]:
    plans = result["plans"]
    assert isinstance(plans, list) and len(plans) >= 1
    return plans[0]  # type: ignore[no-any-return]


@pytest.mark.parametrize(
    ("client", "rule", "pipeline"),
    [("new", "new clients go to sales", "0"), ("existing", "everything else is support", "2")],
)
def test_usedesk_email_ticket(config, client: str, rule: str, pipeline: str) -> None:  # type: ignore[no-untyped-def]
    _, ud = create_usedesk_api("x")
    anna = ud.add_client("Anna", ["anna@example.com"], [("8 (999) 123-45-67", "mobile")])
    ticket = ud.create_ticket("Refund for order 1001", "The kettle arrived broken", client_id=anna)
    body = json.dumps(ud.ticket_created_body(ticket)).encode()
    entry = only_plan(preview(config, "usedesk", body, client=client))  # type: ignore[arg-type]
    assert entry["rule"] == rule
    ops = {op["op"]: op for op in entry["operations"]}  # type: ignore[union-attr]
    assert ops["UpsertDeal"]["pipeline_id"] == pipeline
    assert ops["UpsertContact"]["phones"] == ("+79991234567",) or ops["UpsertContact"][
        "phones"
    ] == ["+79991234567"]
    assert "The kettle arrived broken" in ops["AddNote"]["text"]
    assert ops["UpsertDeal"]["fields"]["UF_CRM_FIRST_REPLY_DUE"]


def test_zendesk_chat_goes_to_sales_and_solved_moves_the_stage(config) -> None:  # type: ignore[no-untyped-def]
    _, zd = create_zendesk_api("a@example.com", "t", webhook_secret="s")
    anna = zd.add_user("Anna", email="anna@example.com", phone="+7 999 123-45-67")
    ticket = zd.create_ticket("Which plan fits us?", requester_id=anna.id, via="chat")
    hook = zd.trigger_webhook(ticket.id, "ticket_created")
    entry = only_plan(preview(config, "zendesk", hook.body, client="existing"))
    assert entry["rule"] == "phone and chat go to sales", entry["reasons"]
    zd.update_ticket(ticket.id, status="solved")
    solved = only_plan(
        preview(
            config,
            "zendesk",
            zd.trigger_webhook(ticket.id, "status_changed").body,
            client="existing",
        )
    )
    deal = next(op for op in solved["operations"] if op["op"] == "UpsertDeal")  # type: ignore[union-attr]
    assert deal["stage_id"] == "WON" and deal["move_stage"] is True
