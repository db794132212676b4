"""`syncd preview` and POST /api/v1/preview: the plan for a payload, with no CRM involved."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from typer.testing import CliRunner

from syncd.cli import app as cli

from .conftest import App

CONFIG = """
[sources.hd]
secret = "x-secret-value"

[destinations.crm]
kind = "rest"
base_url = "http://127.0.0.1:9"

[mapping.pipelines.sales]
id = "0"
stages = { new = "NEW", solved = "WON" }

[mapping.pipelines.support]
id = "2"
stages = { new = "C2:NEW", solved = "C2:WON" }

[[mapping.rules]]
name = "chat to sales"
when.channel = ["chat"]
then.pipeline = "sales"

[[mapping.rules]]
name = "new email clients to sales"
when.channel = ["email"]
when.client = "new"
then.pipeline = "sales"

[[mapping.rules]]
name = "known email clients to support"
when.channel = ["email"]
then.pipeline = "support"
"""

PAYLOAD = {
    "event": "ticket_created",
    "ticket_id": 5,
    "subject": "Hello",
    "status": "new",
    "channel": "email",
    "client": {"id": 9, "email": "Ivan@Example.ru"},
    "comment": "First message",
}


def test_api_preview_explains_the_rule(make_app: Callable[..., App]) -> None:
    app = make_app(CONFIG)
    r = app.api.post("/api/v1/preview?source=hd&client=new", content=json.dumps(PAYLOAD))
    assert r.status_code == 200
    [entry] = r.json()["plans"]
    assert entry["rule"] == "new email clients to sales" and entry["matched"]
    assert "  client: client is new, rule wants new -> yes" in entry["reasons"]
    ops = {op["op"]: op for op in entry["operations"]}
    assert ops["UpsertDeal"]["pipeline_id"] == "0" and ops["UpsertDeal"]["stage_id"] == "NEW"
    assert ops["UpsertContact"]["emails"] == ["ivan@example.ru"]
    assert ops["AddNote"]["text"] == "Client: First message"
    # the same ticket from a known client goes to support
    known = app.api.post(
        "/api/v1/preview?source=hd&client=existing", content=json.dumps(PAYLOAD)
    ).json()
    assert known["plans"][0]["rule"] == "known email clients to support"
    # nothing was stored
    assert app.api.get("/api/v1/stats").json()["totals"] == {}


def test_api_preview_reports_unmatched_and_bad_input(make_app: Callable[..., App]) -> None:
    app = make_app(CONFIG)
    phone = app.api.post(
        "/api/v1/preview?source=hd", content=json.dumps({**PAYLOAD, "channel": "phone"})
    ).json()
    [entry] = phone["plans"]
    assert not entry["matched"] and entry["operations"] == []
    assert any("did not match: channel: 'phone' in ['chat']" in r for r in entry["reasons"])
    bad = app.api.post("/api/v1/preview?source=hd", content=b"{nope").json()
    assert "cannot be read" in bad["error"]
    assert app.api.post("/api/v1/preview?source=nosuch", content=b"{}").status_code == 404


def test_cli_preview(tmp_path: Path) -> None:
    cfg = tmp_path / "syncd.toml"
    cfg.write_text(CONFIG)
    payload = tmp_path / "ticket.json"
    payload.write_text(json.dumps({**PAYLOAD, "channel": "chat"}))
    result = CliRunner().invoke(cli, ["preview", str(payload), "-c", str(cfg)])
    assert result.exit_code == 0, result.output
    assert "rule 'chat to sales' matched:" in result.output
    assert "UpsertDeal: key='hd:ticket:5'" in result.output and "pipeline_id='0'" in result.output
    payload.write_text(json.dumps({**PAYLOAD, "channel": "fax"}))
    result = CliRunner().invoke(cli, ["preview", str(payload), "-c", str(cfg), "--json"])
    assert result.exit_code == 1
    assert json.loads(result.output)["plans"][0]["matched"] is False
