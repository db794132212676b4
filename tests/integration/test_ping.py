"""`syncd check-config --ping`: each destination is called once, with its credentials."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

from syncd.cli import app
from syncd.emulators.amocrm import create_amocrm_emulator
from syncd.emulators.bitrix24 import create_bitrix24_emulator
from syncd.emulators.serving import ServerThread
from syncd.emulators.sink import create_sink


@pytest.fixture
def servers() -> Iterator[dict[str, object]]:
    sink_app, _ = create_sink()
    b24_app, b24 = create_bitrix24_emulator()
    amo_app, _ = create_amocrm_emulator(long_lived_token="right-token-123456")
    running = {
        "sink": ServerThread(sink_app).start(),
        "b24": ServerThread(b24_app).start(),
        "amo": ServerThread(amo_app).start(),
    }
    yield {**running, "b24_state": b24}
    for server in running.values():
        server.stop()


def test_ping_reports_each_destination(
    servers: dict[str, object], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sink, b24, amo = servers["sink"], servers["b24"], servers["amo"]
    monkeypatch.setenv("B24_WEBHOOK", b24.url + servers["b24_state"].webhook_path())  # type: ignore[attr-defined]
    monkeypatch.setenv("AMO_TOKEN", "wrong-token-654321")
    cfg = tmp_path / "syncd.toml"
    cfg.write_text(
        f"""
[destinations.receiver]
kind = "rest"
base_url = "{sink.url}"

[destinations.portal]
kind = "bitrix24"
webhook_url = "${{B24_WEBHOOK}}"

[destinations.amo]
kind = "amocrm"
base_url = "{amo.url}"
access_token = "${{AMO_TOKEN}}"
"""  # type: ignore[attr-defined]
    )
    result = CliRunner().invoke(app, ["check-config", "-c", str(cfg), "--ping"])
    assert result.exit_code == 1, result.output
    assert "destinations.receiver (rest): OK" in result.output
    assert "lookup answered HTTP 200" in result.output
    assert "destinations.portal (bitrix24): OK" in result.output
    assert "destinations.amo (amocrm): FAILED" in result.output
    # neither secret is ever printed
    assert "wrong-token-654321" not in result.output
    assert servers["b24_state"].webhook_path().split("/")[3] not in result.output  # type: ignore[attr-defined]


def test_ping_checks_the_credentials_of_each_polled_helpdesk(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from syncd.emulators.usedesk_api import create_usedesk_api
    from syncd.emulators.zendesk_api import create_zendesk_api

    zd_app, _ = create_zendesk_api("admin@acme.test", "zd-token-right-1234")
    zd_agent_app, zd_agent = create_zendesk_api("agent@acme.test", "zd-token-agent-5678")
    zd_agent.api_user_role = "agent"
    ud_app, _ = create_usedesk_api("ud-token-right-9012")
    servers = {
        name: ServerThread(app).start()
        for name, app in (("zd", zd_app), ("zd_agent", zd_agent_app), ("ud", ud_app))
    }
    monkeypatch.setenv("ZD_WRONG", "zd-token-wrong-0000")
    monkeypatch.setenv("UD_WRONG", "ud-token-wrong-3456")
    cfg = tmp_path / "syncd.toml"
    cfg.write_text(
        f"""
[sources.plain]
secret = "plain-secret-123"

[sources.zendesk]
kind = "zendesk"
signing_secret = "s"
base_url = "{servers["zd"].url}"
email = "admin@acme.test"
api_token = "zd-token-right-1234"

[sources.zendesk_agent]
kind = "zendesk"
signing_secret = "s"
base_url = "{servers["zd_agent"].url}"
email = "agent@acme.test"
api_token = "zd-token-agent-5678"

[sources.zendesk_wrong]
kind = "zendesk"
signing_secret = "s"
base_url = "{servers["zd"].url}"
email = "admin@acme.test"
api_token = "${{ZD_WRONG}}"

[sources.usedesk]
kind = "usedesk"
secret = "ud-token-right-9012"
api_url = "{servers["ud"].url}"

[sources.usedesk_wrong]
kind = "usedesk"
secret = "${{UD_WRONG}}"
api_url = "{servers["ud"].url}"

[destinations.receiver]
kind = "rest"
base_url = "http://127.0.0.1:9"
"""
    )
    try:
        result = CliRunner().invoke(app, ["check-config", "-c", str(cfg), "--ping"])
    finally:
        for server in servers.values():
            server.stop()
    out = result.output
    assert result.exit_code == 1, out
    assert "sources.zendesk (zendesk) polling: OK" in out
    assert "signed in as admin@acme.test (admin)" in out
    assert "sources.zendesk_agent (zendesk) polling: FAILED" in out and "need an admin" in out
    assert "sources.zendesk_wrong (zendesk) polling: FAILED" in out and "did not accept" in out
    assert "sources.usedesk (usedesk) polling: OK" in out
    assert "sources.usedesk_wrong (usedesk) polling: FAILED" in out
    assert "sources.plain" not in out  # a generic source is not polled
    assert "zd-token-wrong-0000" not in out and "ud-token-wrong-3456" not in out
