"""``syncd demo``: the whole path on one machine, with no accounts needed.

It sets up a fresh SQLite file, Usedesk's API, and Bitrix24 and amoCRM as emulators
served over real HTTP. A stream of Usedesk tickets follows: new and returning
clients, comments, status changes. Along the way some webhooks are lost (polling
finds those changes), a few payloads are malformed (they go to quarantine), and
Bitrix24 has a short outage (the retries carry on). Then it prints where to look.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import secrets
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from syncd import logs
from syncd.config import load_config
from syncd.daemon import serve
from syncd.emulators.amocrm import create_amocrm_emulator
from syncd.emulators.bitrix24 import create_bitrix24_emulator
from syncd.emulators.serving import ServerThread, free_port
from syncd.emulators.usedesk_api import create_usedesk_api, encode_webhook
from syncd.monitor.passwords import hash_password

#: Well-known demo passwords, printed by the demo and listed in the README: not secrets.
DEMO_LOGINS = {"admin": "demo-admin", "manager": "demo-manager"}

_CONFIG = """\
# Written by `syncd demo`. Secrets come from the environment, never from this file.
[server]
host = "127.0.0.1"
port = {port}

[store]
url = "sqlite:///syncd-demo.db"

[delivery]
concurrency = 8
schedule_seconds = [2, 4, 8, 15]
rate_limited_floor_seconds = 2
request_timeout_seconds = 5
lease_seconds = 30

[logging]
level = "info"
format = "console"

[monitor]
session_secret = "${{SYNCD_DEMO_SESSION_SECRET}}"
# The demo's own logins (documented in the README; a real install makes its own
# hashes with `syncd hash-password`).
[[monitor.users]]
name = "admin"
role = "admin"
password_hash = "{admin_hash}"
[[monitor.users]]
name = "manager"
role = "viewer"
password_hash = "{manager_hash}"
[[monitor.tokens]]
name = "demo"
role = "viewer"
token = "${{SYNCD_DEMO_API_TOKEN}}"

[sources.usedesk]
kind = "usedesk"
secret = "${{SYNCD_DEMO_USEDESK_SECRET}}"
api_url = "{usedesk_url}"
poll_interval_seconds = 5
poll_overlap_seconds = 60

[destinations.bitrix24]
kind = "bitrix24"
webhook_url = "${{SYNCD_DEMO_B24_WEBHOOK}}"
rate_per_second = {b24_rate}
burst = 40

[destinations.bitrix24.mapping]
default_responsible = "1"
[destinations.bitrix24.mapping.pipelines.sales]
id = "0"
initial_stage = "NEW"
[destinations.bitrix24.mapping.pipelines.sales.stages]
new = "NEW"
open = "PREPARATION"
pending = "EXECUTING"
solved = "WON"
closed = "WON"
spam = "LOSE"
[destinations.bitrix24.mapping.pipelines.support]
id = "2"
initial_stage = "C2:NEW"
[destinations.bitrix24.mapping.pipelines.support.stages]
new = "C2:NEW"
open = "C2:PREPARATION"
pending = "C2:EXECUTING"
solved = "C2:FINAL_INVOICE"
closed = "C2:WON"
spam = "C2:LOSE"
[[destinations.bitrix24.mapping.rules]]
name = "new clients go to sales"
when.client = "new"
then.pipeline = "sales"
then.first_response_minutes = 15
then.first_response_field = "UF_CRM_FIRST_REPLY_DUE"
[[destinations.bitrix24.mapping.rules]]
name = "returning clients go to support"
then.pipeline = "support"
then.timeline = "all"

[destinations.amocrm]
kind = "amocrm"
base_url = "{amo_url}"
access_token = "${{SYNCD_DEMO_AMO_TOKEN}}"
external_key_field_id = 700101

[destinations.amocrm.mapping.pipelines.support]
id = "3383152"
initial_stage = "33929752"
[destinations.amocrm.mapping.pipelines.support.stages]
new = "33929752"
open = "33929755"
pending = "33929758"
solved = "142"
closed = "142"
spam = "143"
[[destinations.amocrm.mapping.rules]]
name = "every ticket"
then.pipeline = "support"
"""

_SUBJECTS = [
    "Order {n} has not arrived",
    "Invoice for order {n}",
    "Refund for order {n}",
    "Which plan fits our team?",
    "Cannot log in",
    "Change the delivery address of order {n}",
]
_CLIENT_LINES = ["Any news?", "Thank you!", "I attach the photo.", "Please call me back."]
_AGENT_LINES = ["We are on it.", "Sent you the invoice.", "Refund is on its way."]
_FIRST = ["Anna", "Ivan", "Olga", "Pavel", "Maria", "Sergey", "Elena", "Dmitry"]
_LAST = ["Petrova", "Sokolov", "Ivanova", "Smirnov", "Kuznetsova", "Popov"]


class _Demo:
    """The emulators, the daemon's config, and the ticket stream."""

    def __init__(self, workdir: Path, port: int, b24_rate: float) -> None:
        self.workdir = workdir
        self.port = port
        usedesk_secret = secrets.token_hex(12)
        self.usedesk_secret = usedesk_secret
        ud_app, self.usedesk = create_usedesk_api(usedesk_secret)
        b24_app, self.b24 = create_bitrix24_emulator(rate_per_second=b24_rate, burst=50)
        amo_token = secrets.token_hex(16)
        amo_app, self.amo = create_amocrm_emulator(long_lived_token=amo_token)
        self.servers = [
            ServerThread(ud_app, port=free_port()).start(),
            ServerThread(b24_app, port=free_port()).start(),
            ServerThread(amo_app, port=free_port()).start(),
        ]
        ud_url, b24_url, amo_url = (s.url for s in self.servers)
        self.urls = {"usedesk": ud_url, "bitrix24": b24_url, "amocrm": amo_url}
        os.environ["SYNCD_DEMO_USEDESK_SECRET"] = usedesk_secret
        os.environ["SYNCD_DEMO_B24_WEBHOOK"] = b24_url + self.b24.webhook_path()
        os.environ["SYNCD_DEMO_AMO_TOKEN"] = amo_token
        os.environ["SYNCD_DEMO_SESSION_SECRET"] = secrets.token_urlsafe(32)
        self.api_token = secrets.token_urlsafe(24)
        os.environ["SYNCD_DEMO_API_TOKEN"] = self.api_token
        self.config_path = workdir / "syncd.toml"
        self.config_path.write_text(
            _CONFIG.format(
                port=port,
                usedesk_url=ud_url,
                amo_url=amo_url,
                b24_rate=b24_rate,
                admin_hash=hash_password(DEMO_LOGINS["admin"]),
                manager_hash=hash_password(DEMO_LOGINS["manager"]),
            ),
            encoding="utf-8",
        )

    def stop(self) -> None:
        for server in self.servers:
            server.stop()

    def script(self, tickets: int, rng: random.Random) -> list[tuple[str, Any]]:
        """What happens in the helpdesk, as (what, detail) steps in order."""
        clients = [
            self.usedesk.add_client(
                f"{rng.choice(_FIRST)} {rng.choice(_LAST)}",
                [f"client{i}@example.com"],
                [(_phone(rng, i), "mobile")],
            )
            for i in range(max(3, tickets // 2))
        ]
        steps: list[tuple[str, Any]] = []
        for n in range(tickets):
            client = rng.choice(clients)
            subject = rng.choice(_SUBJECTS).format(n=10_000 + n)
            steps.append(("ticket", (subject, client)))
            for _ in range(rng.randint(0, 2)):
                steps.append(("comment", rng.random() < 0.5))
            steps.append(("status", rng.choice([2, 3, 6])))
        return steps


async def run_demo(directory: Path | None, *, port: int, tickets: int, exit_when_done: bool) -> int:
    workdir = directory or Path(tempfile.mkdtemp(prefix="syncd-demo-"))
    workdir.mkdir(parents=True, exist_ok=True)
    demo = _Demo(workdir, port, b24_rate=10.0)
    config = load_config(demo.config_path)
    logs.configure(config.logging.level, config.logging.format)
    stop = asyncio.Event()
    daemon = asyncio.create_task(serve(config, stop=stop))
    base = f"http://127.0.0.1:{port}"
    ok = False
    try:
        async with httpx.AsyncClient(
            base_url=base, timeout=10, headers={"Authorization": f"Bearer {demo.api_token}"}
        ) as client:
            await _wait_until_up(client, daemon)
            _say(
                f"files in {workdir}",
                f"  monitor     {base}/  (log in as admin / {DEMO_LOGINS['admin']}"
                f" or manager / {DEMO_LOGINS['manager']})",
                f"  API         {base}/api/docs",
                f"  Usedesk     {demo.urls['usedesk']}",
                f"  Bitrix24    {demo.urls['bitrix24']}/_bitrix24/state",
                f"  amoCRM      {demo.urls['amocrm']}",
            )
            sent_at = await _feed(client, demo, tickets)
            totals = await _wait_settled(client, daemon, sent_at)
            ok = _report(demo, totals, tickets)
            if not exit_when_done:
                _say("running; press Ctrl-C to stop.")
                with contextlib.suppress(asyncio.CancelledError):
                    await daemon
                return 0
    finally:
        stop.set()
        code = await daemon
        demo.stop()
    return code if ok else 1


async def _feed(client: httpx.AsyncClient, demo: _Demo, tickets: int) -> float:
    """Play the helpdesk: make changes in Usedesk and send (or lose) their webhooks."""
    rng = random.Random(7)
    ud = demo.usedesk
    hook = f"/hooks/usedesk?token={demo.usedesk_secret}"
    current: int | None = None
    lost = sent = 0
    steps = demo.script(tickets, rng)
    for i, (what, detail) in enumerate(steps):
        if i == len(steps) // 2:
            _say("Bitrix24 goes down for 10 seconds (every request fails with 503)...")
            demo.b24.down_for(10, 503)
        if what == "ticket":
            subject, client_id = detail
            current = ud.create_ticket(subject, rng.choice(_CLIENT_LINES), client_id=client_id)
        elif what == "comment" and current is not None:
            if detail:
                ud.add_comment(current, rng.choice(_AGENT_LINES), sender="user", user_id=545)
            else:
                ud.add_comment(current, rng.choice(_CLIENT_LINES))
        elif what == "status" and current is not None:
            ud.set_status(current, detail)
        ud.advance(1)
        for body in ud.take_webhooks():
            if rng.random() < 0.1:
                lost += 1  # the webhook never arrives; polling will find the change
                continue
            raw, content_type = encode_webhook(body)
            response = await client.post(hook, content=raw, headers={"Content-Type": content_type})
            response.raise_for_status()
            sent += 1
    for garbage in (b"{not json", b'{"ticket": "no object"}', b"\xff\xfe"):
        response = await client.post(
            hook, content=garbage, headers={"Content-Type": "application/json"}
        )
        assert response.status_code == 422
    _say(
        f"sent {sent} webhooks for {tickets} tickets; {lost} were lost on the way "
        "and 3 malformed payloads went to quarantine"
    )
    return time.time()


async def _wait_settled(
    client: httpx.AsyncClient, daemon: asyncio.Task[int], sent_at: float, limit: float = 300
) -> dict[str, int]:
    """Until a poll has run since the last webhook and nothing is left to deliver."""
    deadline = time.monotonic() + limit
    totals: dict[str, int] = {}
    while time.monotonic() < deadline and not daemon.done():
        stats = (await client.get("/api/v1/stats")).json()
        totals = stats["totals"]
        poller = stats["pollers"].get("usedesk", {})
        polled = (poller.get("last_success_at") or 0) > sent_at
        busy = totals.get("pending", 0) + totals.get("in_flight", 0) + totals.get("retry_wait", 0)
        if polled and not busy:
            return totals
        await asyncio.sleep(0.5)
    return totals


def _phone(rng: random.Random, i: int) -> str:
    """A Russian mobile number written the way people type it: 8 (9xx) xxx-xx-xx."""
    area, head, mid = rng.randint(10, 99), rng.randint(100, 999), rng.randint(10, 99)
    return f"8 (9{area}) {head}-{mid}-{i % 100:02d}"


def _report(demo: _Demo, totals: dict[str, int], tickets: int) -> bool:
    b24 = demo.b24.snapshot()
    amo_leads = len(demo.amo.leads)
    duplicates = {k: v for k, v in b24["deals_per_origin"].items() if v > 1}
    one_each = b24["deals"] == tickets == amo_leads and not duplicates
    _say(
        f"delivered {totals.get('delivered', 0)}, failed {totals.get('failed', 0)}, "
        f"missing {totals.get('expired', 0)}",
        f"  Bitrix24: {b24['deals']} deals, {b24['contacts']} contacts, "
        f"{b24['comments']} timeline comments",
        f"  amoCRM:   {amo_leads} leads, {len(demo.amo.contacts)} contacts, "
        f"{len(demo.amo.notes)} notes",
        f"  one deal per ticket in both CRMs: {one_each}",
    )
    return one_each and not totals.get("failed")


def _say(*lines: str) -> None:
    for line in lines:
        print(f"syncd demo: {line}", flush=True)


async def _wait_until_up(client: httpx.AsyncClient, daemon: asyncio.Task[int]) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if daemon.done():
            raise SystemExit(daemon.result())
        with contextlib.suppress(httpx.TransportError):
            if (await client.get("/healthz")).status_code == 200:
                return
        await asyncio.sleep(0.05)
    raise SystemExit("syncd demo: the daemon did not start within 30 s")
