"""Screenshots of the monitor for docs/monitor.md: the overview, the events list, a ticket trace.

It runs ``syncd demo`` (the daemon, the Usedesk, Bitrix24 and amoCRM emulators and a
sample helpdesk day) in a temporary directory, waits until the demo says everything is
delivered, logs in as the demo's admin in Debian's headless chromium (driven by
Playwright; no browser is downloaded), and saves at 1280x800:

* ``overview.png``: the overview page;
* ``events.png``: the events list for one destination, newest first;
* ``ticket.png``: the trace of the ticket with the most events.

Run from the repository root (takes about a minute)::

    .venv/bin/python docs/screenshots/make.py [--out docs/screenshots]

It needs ``/usr/bin/chromium`` (``apt-get install chromium``) and the ``dev`` extras.
"""

from __future__ import annotations

import argparse
import signal
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

from playwright.sync_api import Page, expect, sync_playwright

from syncd.demo import DEMO_LOGINS
from syncd.emulators.serving import free_port

HERE = Path(__file__).resolve().parent
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
#: What ``syncd demo`` prints once everything is delivered and it keeps running.
SETTLED = "running; press Ctrl-C to stop."


def start_demo(workdir: Path, port: int) -> tuple[subprocess.Popen[bytes], Path]:
    log = workdir / "demo.log"
    proc = subprocess.Popen(
        [sys.executable, "-m", "syncd.cli", "demo", "--dir", str(workdir), "--port", str(port)],
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
    )
    return proc, log


def wait_settled(proc: subprocess.Popen[bytes], log: Path, limit: float = 300) -> None:
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        text = log.read_text(errors="replace")
        if SETTLED in text:
            return
        if proc.poll() is not None:
            raise SystemExit(f"syncd demo exited with {proc.returncode}:\n{text[-3000:]}")
        time.sleep(0.5)
    raise SystemExit(f"syncd demo did not settle within {limit:.0f} s; see {log}")


def busiest_ticket(page: Page, base: str) -> str:
    """The path of the ticket trace with the most events (ties: the newest)."""
    answer = page.request.get(f"{base}/api/v1/events?limit=500")
    assert answer.ok, answer.text()
    events: dict[tuple[str, str], set[int]] = defaultdict(set)
    for item in answer.json()["items"]:
        events[(item["source"], item["ticket_id"])].add(item["event_id"])
    source, ticket = max(events, key=lambda key: (len(events[key]), max(events[key])))
    return f"/tickets/{source}/{ticket}"


def shoot(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryDirectory(prefix="syncd-shots-") as tmp:
        proc, log = start_demo(Path(tmp), port)
        try:
            wait_settled(proc, log)
            with sync_playwright() as pw:
                browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
                context = browser.new_context(
                    viewport={"width": 1280, "height": 800}, locale="en-US"
                )
                page = context.new_page()
                page.goto(f"{base}/login")
                page.get_by_label("User").fill("admin")
                page.get_by_label("Password").fill(DEMO_LOGINS["admin"])
                page.get_by_role("button", name="Log in").click()
                expect(page.get_by_test_id("who")).to_contain_text("admin")

                page.goto(f"{base}/")
                expect(page.get_by_test_id("chart")).to_be_visible()
                page.screenshot(path=out / "overview.png")

                # A filtered list: it shows the filter form in use and the admin's resend controls.
                page.goto(f"{base}/events?destination=bitrix24")
                expect(page.get_by_test_id("event-row").first).to_be_visible()
                page.screenshot(path=out / "events.png")

                page.goto(base + busiest_ticket(page, base))
                expect(page.get_by_test_id("landed")).to_be_visible()
                page.screenshot(path=out / "ticket.png")
                browser.close()
        finally:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
    for name in ("overview.png", "events.png", "ticket.png"):
        print(f"wrote {out / name}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--out", type=Path, default=HERE, help="where to save the PNGs")
    shoot(parser.parse_args().out)


if __name__ == "__main__":
    main()
