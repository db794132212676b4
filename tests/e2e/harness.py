"""Runs a real ``syncd run`` subprocess against a real receiver, for end-to-end tests."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import httpx

from syncd.emulators.serving import free_port
from syncd.monitor.passwords import hash_password

HOOK_SECRET = "e2e-hook-secret-7f3a9c"
CRM_TOKEN = "e2e-crm-token-5d21b8e4"
API_TOKEN = "e2e-api-token-9c0d7e1f2a"

CONFIG = """
[server]
host = "127.0.0.1"
port = {port}

[store]
url = "sqlite:///syncd.db"

[delivery]
concurrency = {concurrency}
poll_interval_seconds = 0.2
request_timeout_seconds = {timeout}
lease_seconds = {lease}
retry_window_seconds = {window}
schedule_seconds = {schedule}
jitter = 0
rate_limited_floor_seconds = 0.1
shutdown_grace_seconds = 5
lease_recovery_interval_seconds = 1

[logging]
level = "debug"
format = "json"

[[monitor.tokens]]
name = "e2e"
role = "admin"
token = "${{E2E_API_TOKEN}}"

[sources.helpdesk]
secret = "${{E2E_HOOK_SECRET}}"
fields = {{ event_id = "event_uid" }}

[destinations.crm]
kind = "rest"
base_url = "{sink_url}"
headers = {{ Authorization = "Bearer ${{E2E_CRM_TOKEN}}" }}
"""


#: Put the ticket's basics on the deal, so tests can see them at the receiver.
MAPPING = """
[[mapping.rules]]
name = "everything"
[mapping.rules.then.deal_fields]
subject = "{{ ticket.subject }}"
status = "{{ ticket.status }}"
ticket_id = "{{ ticket.id }}"
"""


def monitor_users(users: Mapping[str, tuple[str, str]]) -> str:
    """``[[monitor.users]]`` entries for ``{name: (role, password)}``, for ``Daemon(extra=...)``."""
    return "".join(
        f'\n[[monitor.users]]\nname = "{name}"\nrole = "{role}"\n'
        f'password_hash = "{hash_password(password)}"\n'
        for name, (role, password) in users.items()
    )


class Daemon:
    """One config directory; can be started, killed and restarted any number of times."""

    def __init__(
        self,
        workdir: Path,
        sink_url: str,
        *,
        window: float = 3600,
        schedule: str = "[0.2, 0.4, 0.8]",
        timeout: float = 2.0,
        lease: float = 10.0,
        concurrency: int = 8,
        extra: str = "",
    ) -> None:
        self.workdir = workdir
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.config = workdir / "syncd.toml"
        self.config.write_text(
            CONFIG.format(
                port=self.port,
                sink_url=sink_url,
                window=window,
                schedule=schedule,
                timeout=timeout,
                lease=lease,
                concurrency=concurrency,
            )
            + extra
            + (MAPPING if "[mapping" not in extra else "")
        )
        self.log_path = workdir / "syncd.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    def start(self) -> Daemon:
        env = {
            **os.environ,
            "E2E_HOOK_SECRET": HOOK_SECRET,
            "E2E_CRM_TOKEN": CRM_TOKEN,
            "E2E_API_TOKEN": API_TOKEN,
        }
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "syncd.cli", "run", "-c", str(self.config)],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=self.workdir,
        )
        self.starts += 1
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"syncd exited with {self.proc.returncode}:\n{self.log()}")
            try:
                if httpx.get(f"{self.url}/healthz", timeout=1).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.05)
        raise RuntimeError(f"syncd did not come up:\n{self.log()}")

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def terminate(self, timeout: float = 20) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def post_raw(
        self, source: str, body: bytes, content_type: str = "application/json", query: str = ""
    ) -> httpx.Response:
        return httpx.post(
            f"{self.url}/hooks/{source}{query}",
            content=body,
            headers={"Content-Type": content_type},
            timeout=10,
        )

    def post(self, body: dict[str, Any], secret: str = HOOK_SECRET) -> httpx.Response:
        return httpx.post(
            f"{self.url}/hooks/helpdesk", json=body, headers={"X-Syncd-Secret": secret}, timeout=10
        )

    def stats(self) -> dict[str, Any]:
        data: dict[str, Any] = httpx.get(
            f"{self.url}/api/v1/stats", timeout=10, headers={"Authorization": f"Bearer {API_TOKEN}"}
        ).json()
        return data

    def wait_for(
        self, condition: Callable[[dict[str, int]], bool], limit: float = 60
    ) -> dict[str, int]:
        """Poll the daemon's stats until ``condition(totals)`` holds."""
        deadline = time.monotonic() + limit
        totals: dict[str, int] = {}
        while time.monotonic() < deadline:
            totals = self.stats()["totals"]
            if condition(totals):
                return totals
            time.sleep(0.05)
        raise AssertionError(
            f"condition not met within {limit}s; totals={totals}\n{self.log()[-3000:]}"
        )

    def db(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.workdir / "syncd.db")
        conn.row_factory = sqlite3.Row
        return conn

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
