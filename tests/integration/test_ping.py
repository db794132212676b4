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
