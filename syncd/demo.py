"""``syncd demo``: the whole path on one machine, no accounts needed.

A fresh SQLite file, the bundled REST receiver standing in for a CRM, the
daemon, and a stream of sample tickets (new and returning clients,
comments, status changes) with a short CRM outage in the middle, so the
retries are visible too.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import tempfile
import time
from pathlib import Path

import httpx

from syncd import logs
from syncd.config import load_config
from syncd.daemon import serve
from syncd.emulators.serving import ServerThread, free_port
from syncd.emulators.sink import Faults, create_sink

_CONFIG = """\
# Written by `syncd demo`. Secrets come from the environment, never from this file.
[server]
host = "127.0.0.1"
port = {port}

[store]
url = "sqlite:///syncd-demo.db"

[delivery]
concurrency = 8
schedule_seconds = [1, 2, 4, 8]
rate_limited_floor_seconds = 1
request_timeout_seconds = 5
lease_seconds = 30

[logging]
level = "info"
format = "console"

[sources.helpdesk]
kind = "generic"
secret = "${{SYNCD_DEMO_SECRET}}"

[destinations.crm]
kind = "rest"
base_url = "{sink_url}"
record_url = "{sink_url}/records/$id"
"""

_STATUSES = ["open", "pending", "solved", "closed"]
_CHANNELS = ["email", "chat", "phone", "telegram"]


def _sample_events(count: int, seed: int = 7) -> list[dict[str, object]]:
    rng = random.Random(seed)
    clients = [
        {"name": f"Client {i}", "email": f"client{i}@example.com", "phone": f"+7999000{i:04d}"}
        for i in range(max(3, count // 3))
    ]
    events: list[dict[str, object]] = []
    for n in range(count):
        ticket = 1000 + n
        client = rng.choice(clients)
        events.append(
            {
                "event": "ticket_created",
                "ticket_id": ticket,
                "subject": f"Question #{ticket}",
                "status": "new",
                "channel": rng.choice(_CHANNELS),
                "client": client,
            }
        )
        for _ in range(rng.randint(0, 2)):
            events.append(
                {
                    "event": "comment_added",
                    "ticket_id": ticket,
                    "comment": f"Message about #{ticket}",
                }
            )
        events.append(
            {"event": "status_changed", "ticket_id": ticket, "status": rng.choice(_STATUSES)}
        )
    return events


async def run_demo(directory: Path | None, *, port: int, tickets: int, exit_when_done: bool) -> int:
    workdir = directory or Path(tempfile.mkdtemp(prefix="syncd-demo-"))
    workdir.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("SYNCD_DEMO_SECRET", "demo-" + os.urandom(6).hex())
    secret = os.environ["SYNCD_DEMO_SECRET"]

    sink_app, sink_state = create_sink()
    sink = ServerThread(sink_app, port=free_port()).start()
    config_path = workdir / "syncd.toml"
    config_path.write_text(_CONFIG.format(port=port, sink_url=sink.url), encoding="utf-8")
    config = load_config(config_path)
    logs.configure(config.logging.level, config.logging.format)

    stop = asyncio.Event()
    daemon = asyncio.create_task(serve(config, stop=stop))
    base = f"http://127.0.0.1:{port}"
    async with httpx.AsyncClient(base_url=base, timeout=10) as client:
        await _wait_until_up(client, daemon)
        print(f"\nsyncd demo: files in {workdir}")
        print(f"  daemon    {base}   (stats: {base}/api/v1/stats, API docs: {base}/api/docs)")
        print(f"  receiver  {sink.url}   (state: {sink.url}/_sink/state)\n")

        events = _sample_events(tickets)
        outage_at = len(events) // 2
        for i, body in enumerate(events):
            if i == outage_at:
                print("syncd demo: the CRM goes down for a moment (15 failed requests)...")
                with sink_state.lock:
                    sink_state.faults = Faults(fail_count=15, fail_status=503)
            response = await client.post(
                "/hooks/helpdesk", json=body, headers={"X-Syncd-Secret": secret}
            )
            response.raise_for_status()
        print(f"syncd demo: sent {len(events)} events for {tickets} tickets")

        totals = await _wait_delivered(client, len(events), daemon)
        snap = sink_state.snapshot()
        print(
            f"syncd demo: delivered {totals.get('delivered', 0)}/{len(events)}; receiver holds "
            f"{snap['by_entity']} with {len(snap['duplicate_creates'])} duplicate creates"
        )
        if not exit_when_done:
            print("syncd demo: running; press Ctrl-C to stop.")
            with contextlib.suppress(asyncio.CancelledError):
                await daemon
            sink.stop()
            return 0
    stop.set()
    code = await daemon
    sink.stop()
    ok = totals.get("delivered", 0) == len(events) and not snap["duplicate_creates"]
    return code if ok else 1


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


async def _wait_delivered(
    client: httpx.AsyncClient, expected: int, daemon: asyncio.Task[int], limit: float = 120
) -> dict[str, int]:
    deadline = time.monotonic() + limit
    totals: dict[str, int] = {}
    while time.monotonic() < deadline and not daemon.done():
        totals = (await client.get("/api/v1/stats")).json()["totals"]
        if (
            totals.get("delivered", 0) + totals.get("failed", 0) + totals.get("expired", 0)
            >= expected
        ):
            break
        await asyncio.sleep(0.25)
    return totals
