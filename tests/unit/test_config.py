"""Config loading: every problem is reported with its key path and the file name."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from syncd.cli import app
from syncd.config import load_config, parse_config, resolve_store_url
from syncd.errors import ConfigError
from syncd.monitor.passwords import hash_password

GOOD = """
[store]
url = "sqlite:///data/syncd.db"

[sources.helpdesk]
secret = "${HOOK_SECRET}"

[destinations.crm]
kind = "rest"
base_url = "http://127.0.0.1:9/"
headers = { Authorization = "Bearer ${CRM_TOKEN}" }
"""

EXAMPLE_HASH = hash_password("example-password")


@pytest.fixture(autouse=True)
def _env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOOK_SECRET", "hook-secret-value")
    monkeypatch.setenv("CRM_TOKEN", "crm-token-value")


def problems(text: str, name: str = "syncd.toml") -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_config(text, name)
    return [str(p) for p in info.value.problems]


def test_good_config_resolves_env_references() -> None:
    cfg = parse_config(GOOD, "syncd.toml")
    assert cfg.sources["helpdesk"].settings()["secret"] == "hook-secret-value"
    assert (
        cfg.destinations["crm"].settings()["headers"]["Authorization"] == "Bearer crm-token-value"
    )
    assert cfg.destinations_for("helpdesk") == ["crm"]
    assert "hook-secret-value" in cfg.secret_values()
    assert "Bearer crm-token-value" in cfg.secret_values()


def test_secret_is_not_shown_in_repr() -> None:
    cfg = parse_config(GOOD, "syncd.toml")
    assert "hook-secret-value" not in repr(cfg) and "crm-token-value" not in repr(cfg)
    assert "hook-secret-value" not in str(cfg) and "crm-token-value" not in str(cfg)


def test_secret_from_file(tmp_path: Path) -> None:
    (tmp_path / "hook.secret").write_text("from-a-file\n")
    text = GOOD.replace('secret = "${HOOK_SECRET}"', 'secret_file = "hook.secret"')
    (tmp_path / "syncd.toml").write_text(text)
    cfg = load_config(tmp_path / "syncd.toml")
    assert cfg.sources["helpdesk"].settings()["secret"] == "from-a-file"


def test_every_problem_is_reported_at_once_with_key_and_file(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("HOOK_SECRET")
    text = """
[server]
port = 99999
colour = "blue"

[delivery]
concurrency = 0

[sources.helpdesk]
secret = "${HOOK_SECRET}"
destinations = ["crm", "nowhere"]

[destinations.crm]
kind = "rest"
base_url = "ftp://example"
retries = 3

[destinations.other]
kind = "salesforce"
"""
    found = problems(text, "/etc/syncd/syncd.toml")
    joined = "\n".join(found)
    assert all(p.startswith("/etc/syncd/syncd.toml: ") for p in found)
    assert "server.port" in joined
    assert "server.colour: unknown key" in joined
    assert "delivery.concurrency" in joined
    assert "sources.helpdesk.secret: environment variable HOOK_SECRET is not set" in joined
    assert "sources.helpdesk.destinations.1: no destination named 'nowhere'" in joined
    assert "destinations.crm.base_url" in joined
    assert "destinations.crm.retries: unknown key" in joined
    assert "destinations.other.kind: unknown connector kind 'salesforce'" in joined


def test_missing_required_key() -> None:
    found = problems("[sources.helpdesk]\nkind = 'generic'\n")
    assert found == ["syncd.toml: sources.helpdesk.secret: required key is missing"]


def test_not_toml() -> None:
    found = problems("[server\nport = 1")
    assert len(found) == 1 and "not valid TOML" in found[0]


def test_lease_must_outlive_request() -> None:
    found = problems("[delivery]\nrequest_timeout_seconds = 60\nlease_seconds = 30\n")
    assert "delivery: " in found[0] and "lease_seconds must be at least" in found[0]


def test_unreadable_secret_file() -> None:
    found = problems("[sources.h]\nsecret_file = '/nonexistent/secret'\n")
    assert found[0].startswith("syncd.toml: sources.h.secret_file: cannot read /nonexistent/secret")


def test_relative_sqlite_path_is_relative_to_the_config(tmp_path: Path) -> None:
    (tmp_path / "syncd.toml").write_text(GOOD)
    cfg = load_config(tmp_path / "syncd.toml")
    assert resolve_store_url(cfg) == f"sqlite:///{tmp_path}/data/syncd.db"


def test_check_config_cli_exit_codes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    good = tmp_path / "good.toml"
    good.write_text(GOOD)
    bad = tmp_path / "bad.toml"
    bad.write_text("[server]\nport = 'x'\n[delivery]\nbatch_size = -1\n")
    runner = CliRunner()
    ok = runner.invoke(app, ["check-config", "-c", str(good)])
    assert ok.exit_code == 0, ok.output
    assert "OK" in ok.output
    result = runner.invoke(app, ["check-config", "-c", str(bad)])
    assert result.exit_code == 2
    assert f"{bad}: server.port" in result.output
    assert f"{bad}: delivery.batch_size" in result.output


def test_example_config_is_valid(monkeypatch: pytest.MonkeyPatch) -> None:
    example = Path(__file__).parents[2] / "config" / "syncd.example.toml"
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
    cfg = load_config(example)
    assert set(cfg.sources) == {"helpdesk", "usedesk", "zendesk"} and cfg.destinations
    assert [r.name for r in cfg.mapping.rules] == [
        "phone and chat go to sales",
        "new clients go to sales",
        "everything else is support",
    ]


def test_monitor_users_need_a_hash_not_a_password() -> None:
    found = problems(
        GOOD
        + """
[[monitor.users]]
name = "anna"
role = "admin"
password_hash = "hunter2-in-clear"

[[monitor.users]]
name = "max"
role = "boss"
password_hash = "scrypt$16384$8$1$00$00"

[[monitor.tokens]]
name = "anna"
token = "short"
"""
    )
    text = "\n".join(found)
    assert "monitor.users.0: " in text and "syncd hash-password" in text
    assert "hunter2-in-clear" not in text  # a pasted password is never echoed
    assert "monitor.users.1.role" in text
    assert "monitor.tokens.0.token" in text


def test_monitor_token_is_redacted_from_logs(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("API_TOKEN", "api-token-value-0123456789")
    config = parse_config(
        GOOD + '\n[[monitor.tokens]]\nname = "bot"\ntoken = "${API_TOKEN}"\n', "syncd.toml"
    )
    assert "api-token-value-0123456789" in config.secret_values()
    assert "api-token-value-0123456789" not in repr(config)
